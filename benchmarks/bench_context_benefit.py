"""Does a model trained with a long context predict real text better when it is given more of it?

Two models of the same size (the demo preset's E = D = 128, L = 4, M = 128)
train on the Shakespeare plays (each play one document of 100-200 KB, UTF-8
bytes, held-out plays for evaluation) for the same budget of *process CPU
time*: one with N = 4096 inputs, one with N = 256. CPU time, not wall time,
because the machine is shared: a run that waits for the cores is not charged
for the wait (both are reported, with the load average). Then the SAME
held-out targets are scored with the long model's context truncated to
C = 256, 512, ..., 4096 inputs (the same M latents each time), and the short
model at its own 256. Each forward scores its last B targets, so a target
sees between C - B + 1 and C inputs; the targets lie at least 4096 bytes
into a play so that every C is available.

Where the gain comes from: every scored byte is put in one class (a
speaker tag ``**NAME**``; a letter of a word whose previous occurrence lies
within 256 bytes, only within 4096 bytes, or further; anything else) and
each class's bits at C = 256 and C = 4096 are compared.

    python benchmarks/bench_context_benefit.py --parallel   # 15 CPU-min each: ~110 min here, shared
    python benchmarks/bench_context_benefit.py --quick      # seconds, smoke test

The trained models land in ``--out`` (``OUT/long``, ``OUT/short``, model
directories) next to the store they were trained on (``OUT/data``), so
``perceiver-ar inspect OUT/long --data OUT/data --out DIR`` can draw what
the long model's latents read.
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import (
    CASE_MARK,
    case_argument,
    format_table,
    machine_info,
    markdown_table,
    new_figure,
    report_case,
    save_figure,
    save_results,
)

CLASSES = ("speaker", "near", "far", "new", "other")


def class_labels(near: int, far: int) -> dict[str, str]:
    """What each class of scored bytes means, for the shortest (near) and longest (far) context."""
    return {
        "speaker": "speaker tag (**NAME**)",
        "near": f"word seen within {near} bytes",
        "far": f"word seen {near + 1}-{far} bytes back only",
        "new": f"word not in the last {far} bytes",
        "other": "spaces, punctuation, markup",
    }


def build_parser() -> argparse.ArgumentParser:
    """The command line (importable: tests/test_docs.py checks documented commands against it)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny models, 4 plays, seconds: smoke test")
    p.add_argument(
        "--data", default=None, help="a text store to use (default: prepare the plays into OUT/data)"
    )
    p.add_argument(
        "--out", default="runs/context_benefit", help="new or empty folder for the models and data"
    )
    p.add_argument("--long-context", type=int, default=4096, help="N of the long model")
    p.add_argument("--short-context", type=int, default=256, help="N of the short model")
    p.add_argument("--contexts", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    p.add_argument("--latents", type=int, default=128, help="M of both models, in training and scoring")
    p.add_argument("--width", type=int, default=128, help="E = D")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup-steps", type=int, default=40)
    p.add_argument("--cpu-minutes", type=float, default=15.0, help="process CPU time budget of each training")
    p.add_argument("--parallel", action="store_true", help="train the two models at once (2 processes)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each process")
    p.add_argument("--block", type=int, default=64, help="B: targets scored per forward (the last latents)")
    p.add_argument("--eval-targets", type=int, default=65536, help="held-out targets scored at each C")
    p.add_argument("--seed", type=int, default=0)
    return p


# ----------------------------------------------------------------------------
# Training for a CPU-time budget (one process per model)
# ----------------------------------------------------------------------------


def train_case(case: dict[str, Any]) -> dict[str, Any]:
    """Train one model until its process has used ``cpu_seconds`` of CPU time; save it to ``case["out"]``.

    The learning rate warms up over ``warmup`` steps, then follows a cosine
    to 10% over the fraction of the CPU budget spent, so both models end
    their schedule when their budget ends, whatever their step cost.
    """
    import numpy as np
    import torch

    from perceiver_ar import provenance
    from perceiver_ar.config import PerceiverARConfig
    from perceiver_ar.loss import perceiver_ar_loss, shift_events
    from perceiver_ar.model import PerceiverAR
    from perceiver_ar.samplers import check_batch, crops_to_batch, make_sampler, targets_per_row
    from perceiver_ar.store import TokenStore

    torch.set_num_threads(case["threads"])
    store = TokenStore(case["data"])
    split = store.split("train")
    torch.manual_seed(case["seed"])
    cfg = PerceiverARConfig(vocab_size=store.vocab_size, **case["model"])
    model = PerceiverAR(cfg)
    model.provenance = provenance.from_store_meta(store.meta)
    sampler = make_sampler("crops", split, cfg.context_len, cfg.num_latents, case["seed"])
    opt = torch.optim.AdamW(model.parameters(), lr=case["lr"], betas=(0.9, 0.95), weight_decay=0.0)
    budget, warmup = float(case["cpu_seconds"]), int(case["warmup"])
    cpu0, wall0 = time.process_time(), time.perf_counter()
    curve, loads, step, targets_seen, window = [], [], 0, 0, []
    model.train()
    while time.process_time() - cpu0 < budget:
        used = (time.process_time() - cpu0) / budget
        lr = case["lr"] * min(1.0, (step + 1) / warmup)
        if step >= warmup:
            lr = case["lr"] * (0.1 + 0.45 * (1.0 + math.cos(math.pi * min(used, 1.0))))
        for group in opt.param_groups:
            group["lr"] = lr
        crops = sampler.crops(step, case["batch"])
        events, positions = crops_to_batch(split, store.meta, crops, cfg.context_len)
        full_rows = check_batch(events, positions, cfg)
        inputs, targets = shift_events(torch.from_numpy(events))
        out = model(inputs, torch.from_numpy(positions), full_rows=full_rows, validate=False)
        loss = perceiver_ar_loss(out.logits, targets, out.latent_index, cfg.z_loss)
        opt.zero_grad(set_to_none=True)
        loss.mean.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        targets_seen += int(targets_per_row(crops, cfg.num_latents).sum())
        window.append(float(loss.mean_ce.detach()) / math.log(2))
        if step % case["log_every"] == 0:
            cpu = time.process_time() - cpu0
            curve.append({"step": step, "cpu_s": cpu, "bits_per_token": float(np.mean(window))})
            loads.append(os.getloadavg()[0])
            window = []
            print(
                f"[N={cfg.context_len}] step {step}: {curve[-1]['bits_per_token']:.3f} bits/token, "
                f"{cpu:.0f}/{budget:.0f} CPU s, load {loads[-1]:.1f}",
                file=sys.stderr,
                flush=True,
            )
    cpu_s, wall_s = time.process_time() - cpu0, time.perf_counter() - wall0
    model.eval()
    model.save_pretrained(case["out"])
    return {
        "context_len": cfg.context_len,
        "num_latents": cfg.num_latents,
        "parameters": model.num_parameters(),
        "steps": step,
        "targets_trained": targets_seen,
        "cpu_s": cpu_s,
        "wall_s": wall_s,
        "cpu_per_step_s": cpu_s / max(step, 1),
        "load_mean": float(np.mean(loads)) if loads else os.getloadavg()[0],
        "load_max": float(np.max(loads)) if loads else os.getloadavg()[0],
        "curve": curve,
        "model_dir": str(case["out"]),
    }


def run_trainings(cases: list[dict[str, Any]], parallel: bool, inline: bool) -> list[dict[str, Any]]:
    """Each case in its own process (both at once with ``parallel``), or here for ``--quick``."""
    if inline:
        return [train_case(c) for c in cases]
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")

    def start(case: dict[str, Any]) -> subprocess.Popen:
        cmd = [sys.executable, __file__, "--case", json.dumps(case)]
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)

    if parallel:
        procs = [start(c) for c in cases]
        return [case_result(p) for p in procs]
    return [case_result(start(c)) for c in cases]


def case_result(proc: subprocess.Popen) -> dict[str, Any]:
    stdout, _ = proc.communicate()
    for line in stdout.splitlines():
        if line.startswith(CASE_MARK):
            return json.loads(line[len(CASE_MARK) :])
    raise SystemExit(f"a training process failed (exit {proc.returncode}); its log is above")


# ----------------------------------------------------------------------------
# Scoring the same targets at several contexts
# ----------------------------------------------------------------------------


def eval_blocks(lengths: list[int], max_context: int, block: int, count: int) -> list[tuple[int, int]]:
    """(document, last target) of ``count`` non-overlapping blocks, spread evenly over the documents.

    Every block's last target t has t >= max_context, so the inputs
    [t - C, t) exist for every C <= max_context.
    """
    candidates = [(doc, t) for doc, n in enumerate(lengths) for t in range(max_context + block - 1, n, block)]
    if not candidates:
        raise SystemExit(f"no held-out document is longer than {max_context + block} tokens")
    if count >= len(candidates):
        return candidates
    picks = [round(i * (len(candidates) - 1) / max(count - 1, 1)) for i in range(count)]
    return [candidates[i] for i in sorted(set(picks))]


def score(model, docs, meta, blocks, context: int, block: int, batch: int = 8):
    """Bits (log2 loss) of each target of ``blocks`` with ``context`` inputs before each block's last target.

    Returns a float array [len(blocks) * block], the targets in block order.
    """
    import numpy as np
    import torch

    from perceiver_ar.samplers import check_batch, positions_for_crop

    M = model.config.num_latents
    bits = []
    with torch.no_grad():
        for b0 in range(0, len(blocks), batch):
            rows = blocks[b0 : b0 + batch]
            inputs = np.stack([docs[d][t - context : t] for d, t in rows]).astype(np.int64)
            positions = np.stack([positions_for_crop(meta, t - context, context) for _, t in rows])
            labels = np.stack([docs[d][t - block + 1 : t + 1] for d, t in rows]).astype(np.int64)
            full_rows = check_batch(inputs, positions, model.config)
            out = model(
                torch.from_numpy(inputs),
                torch.from_numpy(positions),
                num_latents=M,
                full_rows=full_rows,
                validate=False,
            )
            logp = torch.log_softmax(out.logits[:, -block:].float(), dim=-1)
            nll = -logp.gather(-1, torch.from_numpy(labels)[..., None]).squeeze(-1)
            bits.append((nll / math.log(2)).reshape(-1).numpy())
    return np.concatenate(bits)


def classify_targets(docs, blocks, block: int, near: int, far: int) -> list[str]:
    """The class (``CLASSES``) of each scored target, from the document's bytes.

    Words are runs of letters and apostrophes; a letter's class depends on
    how far back the same word (case-sensitive) last started before its own
    start. Speaker tags are the bold ``**NAME**`` lines of the plays.
    """
    from perceiver_ar.vocab import TOKEN_OFFSET

    cache: dict[int, Any] = {}
    out = []
    for d, t in blocks:
        if d not in cache:
            raw = bytes(int(x) - TOKEN_OFFSET if x >= TOKEN_OFFSET else 10 for x in docs[d])
            spans = [(m.start(), m.end(), m.group()) for m in re.finditer(rb"[A-Za-z']+", raw)]
            starts_of: dict[bytes, list[int]] = {}
            for s, _, w in spans:
                starts_of.setdefault(w, []).append(s)
            cache[d] = (raw, spans, [s for s, _, _ in spans], starts_of)
        raw, spans, starts, starts_of = cache[d]
        for i in range(t - block + 1, t + 1):  # target event i is byte raw[i] (SOS, EOS read as newlines)
            line_start = raw.rfind(b"\n", 0, i) + 1
            if raw.startswith(b"**", line_start):
                out.append("speaker")
                continue
            k = bisect.bisect_right(starts, i) - 1
            if k < 0 or not spans[k][0] <= i < spans[k][1]:
                out.append("other")
                continue
            s, _, word = spans[k]
            occurrences = starts_of[word]
            p = bisect.bisect_left(occurrences, s) - 1
            distance = s - occurrences[p] if p >= 0 else None
            if distance is None or distance > far:
                out.append("new")
            elif distance <= near:
                out.append("near")
            else:
                out.append("far")
    return out


# ----------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    case = case_argument(argv)
    if case is not None:
        report_case(train_case(case))
        return 0
    args = build_parser().parse_args(argv)
    if args.quick:
        args.long_context, args.short_context, args.contexts = 256, 64, [64, 128, 256]
        args.latents, args.width, args.heads, args.layers, args.batch = 32, 32, 2, 1, 4
        args.cpu_minutes, args.eval_targets, args.block, args.warmup_steps = 0.05, 256, 16, 2
    contexts = sorted(set(args.contexts))
    if max(contexts) > args.long_context or min(contexts) < args.latents or args.block > args.latents:
        raise SystemExit("need latents <= every context <= --long-context and --block <= --latents")

    import numpy as np
    import torch

    from perceiver_ar.data import default_corpus_files, prepare_text
    from perceiver_ar.evaluate import token_byte_lengths, unigram_log2p
    from perceiver_ar.model import PerceiverAR
    from perceiver_ar.store import TokenStore

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"--out {out} is not empty: choose a new folder")
    out.mkdir(parents=True, exist_ok=True)
    data = args.data
    if data is None:
        plays = default_corpus_files()
        if args.quick:  # four plays, one held out
            plays = plays[:4]
        data = str(out / "data")
        prepare_text(plays, data, validation_fraction=0.25 if args.quick else 0.1, seed=args.seed)
    store = TokenStore(data)
    if store.meta.get("tokenizer", {}).get("type") != "bytes":
        raise SystemExit(f"{data} is not a UTF-8 bytes text store: the byte classes need one")
    base = dict(
        num_latents=args.latents,
        input_dim=args.width,
        latent_dim=args.width,
        num_latent_layers=args.layers,
        cross_attend_heads=args.heads,
        latent_heads=args.heads,
    )
    cases = []
    for name, n in (("long", args.long_context), ("short", args.short_context)):
        cases.append(
            dict(
                data=data,
                out=str(out / name),
                model=dict(base, context_len=n),
                threads=args.threads,
                seed=args.seed,
                lr=args.lr,
                warmup=args.warmup_steps,
                batch=args.batch,
                cpu_seconds=60.0 * args.cpu_minutes,
                log_every=20 if args.quick else 25,
            )
        )
    load_before = os.getloadavg()
    trained = run_trainings(cases, parallel=args.parallel, inline=args.quick)
    load_after = os.getloadavg()
    long_model = PerceiverAR.from_pretrained(out / "long").eval()
    short_model = PerceiverAR.from_pretrained(out / "short").eval()

    valid = store.split("validation")
    docs = [np.asarray(valid[i]) for i in range(len(valid))]
    blocks = eval_blocks([len(d) for d in docs], max(contexts), args.block, args.eval_targets // args.block)
    labels = np.concatenate([d[t - args.block + 1 : t + 1] for d, t in ((docs[d], t) for d, t in blocks)])
    byte_lengths = token_byte_lengths(store.meta)
    num_bytes = int(byte_lengths[labels].sum())
    unigram_bits = float(-unigram_log2p(store.split("train"), store.vocab_size)[labels].sum())

    def bits_per_byte(bits: np.ndarray) -> float:
        return float(bits.sum()) / num_bytes

    rows, per_target = [], {}
    for c in contexts:
        t0 = time.process_time()
        bits = score(long_model, docs, store.meta, blocks, c, args.block)
        per_target[c] = bits
        row = {"context": c, "long_bpb": bits_per_byte(bits), "eval_cpu_s": time.process_time() - t0}
        if c <= args.short_context:
            row["short_bpb"] = bits_per_byte(score(short_model, docs, store.meta, blocks, c, args.block))
        rows.append(row)
        print(f"C={c:>5}: long model {row['long_bpb']:.4f} bits/byte", flush=True)
    for row in rows:
        row["gain_vs_shortest"] = rows[0]["long_bpb"] - row["long_bpb"]

    # Which targets gain: long-model bits at the shortest and the longest context, by class.
    classes = np.asarray(classify_targets(docs, blocks, args.block, min(contexts), max(contexts)))
    lo, hi = per_target[min(contexts)], per_target[max(contexts)]
    total_gain = float((lo - hi).sum())
    breakdown = []
    labels_of = class_labels(min(contexts), max(contexts))
    for key in CLASSES:
        sel = classes == key
        n = int(sel.sum())
        if n == 0:
            continue
        gain = float((lo[sel] - hi[sel]).sum())
        breakdown.append(
            {
                "class": labels_of[key],
                "tokens": n,
                "share": n / len(classes),
                "bits_short": float(lo[sel].mean()),
                "bits_long": float(hi[sel].mean()),
                "gain_per_token": gain / n,
                "share_of_gain": gain / total_gain if total_gain else float("nan"),
            }
        )

    info = machine_info(args.threads)
    long_run, short_run = trained
    cols = [
        ("context", "context C (inputs)", ""),
        ("long_bpb", f"N={args.long_context} model bits/byte", ".4f"),
        ("short_bpb", f"N={args.short_context} model bits/byte", ".4f"),
        ("gain_vs_shortest", f"gain vs C={min(contexts)}", "+.4f"),
    ]
    bcols = [
        ("class", "target class", ""),
        ("tokens", "targets", ""),
        ("share", "share", ".1%"),
        ("bits_short", f"bits at C={min(contexts)}", ".3f"),
        ("bits_long", f"bits at C={max(contexts)}", ".3f"),
        ("gain_per_token", "gain/target", "+.3f"),
        ("share_of_gain", "share of the gain", ".0%"),
    ]
    tcols = [
        ("context_len", "N", ""),
        ("steps", "steps", ""),
        ("targets_trained", "targets trained", ""),
        ("cpu_s", "CPU s", ".0f"),
        ("wall_s", "wall s", ".0f"),
        ("cpu_per_step_s", "CPU s/step", ".2f"),
        ("load_mean", "load avg (mean)", ".1f"),
    ]
    print(
        f"\n{len(labels)} held-out targets ({len(blocks)} blocks of {args.block}) in "
        f"{len(docs)} plays; unigram {unigram_bits / num_bytes:.3f} bits/byte"
    )
    print(format_table(trained, tcols))
    print()
    print(format_table(rows, cols))
    print()
    print(format_table(breakdown, bcols))
    name = "bench_context_benefit_quick" if args.quick else "bench_context_benefit"
    payload = {
        "machine": info,
        "args": vars(args),
        "load_before": load_before,
        "load_after": load_after,
        "num_targets": int(len(labels)),
        "num_bytes": num_bytes,
        "num_blocks": len(blocks),
        "unigram_bits_per_byte": unigram_bits / num_bytes,
        "trainings": trained,
        "rows": rows,
        "breakdown": breakdown,
        "markdown": markdown_table(rows, cols),
        "markdown_training": markdown_table(trained, tcols),
        "markdown_breakdown": markdown_table(breakdown, bcols),
    }
    save_results(name, payload)
    (out / "context_benefit.json").write_text(json.dumps(payload, indent=2) + "\n")

    fig, (ax0, ax1) = new_figure(ncols=2, figsize=(11, 4))
    ax0.plot(contexts, [r["long_bpb"] for r in rows], "o-", label=f"trained at N={args.long_context}")
    short_pts = [(r["context"], r["short_bpb"]) for r in rows if "short_bpb" in r]
    ax0.plot(*zip(*short_pts, strict=True), "s", ms=8, label=f"trained at N={args.short_context}")
    ax0.set_xscale("log", base=2)
    ax0.set_xticks(contexts, [str(c) for c in contexts])
    ax0.set_xlabel("context given at test time (inputs)")
    ax0.set_ylabel("bits per byte, same held-out targets")
    ax0.set_title(f"M={args.latents}, {args.cpu_minutes:g} CPU-min of training each")
    ax0.grid(alpha=0.3)
    ax0.legend()
    for run in (long_run, short_run):
        curve = run["curve"]
        ax1.plot(
            [p["cpu_s"] / 60 for p in curve],
            [p["bits_per_token"] for p in curve],
            label=f"N={run['context_len']} ({run['steps']} steps)",
        )
    ax1.set_xlabel("process CPU minutes")
    ax1.set_ylabel("train bits per token")
    ax1.set_title("training")
    ax1.grid(alpha=0.3)
    ax1.legend()
    save_figure(fig, name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
