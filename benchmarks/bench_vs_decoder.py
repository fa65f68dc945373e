"""Perceiver AR vs decoder-only Transformers: training-step time and peak memory vs N.

Two decoder-only baselines at the same depth and width (one cross-attend plus
L latent layers is L + 1 attention blocks):

- ``dec``: this library with M = N (every input hosts a latent); each of its
  attentions is SDPA's causal flash kernel (``is_causal``, no mask);
- ``plain``: ``plain_decoder.py``, an independent pre-LN decoder with
  ``num_blocks = L + 1`` (what a user would otherwise pick; the tests check
  it computes what ``dec`` computes once the weights are mapped across).

Perceiver AR (``par``) keeps M = 1024 latents while N grows from 1,024 to
131,072 (at N = 1,024 it is ``dec``). Each (model, N) case runs in a fresh
process, the models alternate within each of ``--rounds`` rounds, the table
gives medians over the rounds and the JSON keeps every run. The step is
forward + loss + backward + fused AdamW on random full rows. The load
average is printed at the start and the end.

    python benchmarks/bench_vs_decoder.py           # the sweep, 3 rounds (~60 min here)
    python benchmarks/bench_vs_decoder.py --quick   # seconds, smoke test
"""

from __future__ import annotations

import argparse

from common import (
    LoadWatch,
    format_table,
    machine_info,
    markdown_table,
    median,
    median_of,
    new_figure,
    ok_runs,
    run_rounds,
    save_figure,
    save_results,
    script_main,
    set_threads,
    timed,
)

MODELS = {"par": "Perceiver AR", "dec": "this library, M = N", "plain": "plain decoder"}


def plain_train_step(cfg: dict, inputs, targets, lr: float = 1e-4):
    """The plain decoder's training step: the same loss (every position's next token) and optimizer."""
    import torch
    import torch.nn.functional as F
    from plain_decoder import DecoderConfig, PlainDecoder

    torch.manual_seed(0)
    model = PlainDecoder(
        DecoderConfig(
            context_len=cfg["context_len"],
            dim=cfg["input_dim"],
            num_heads=cfg["latent_heads"],
            num_blocks=cfg["num_latent_layers"] + 1,
        )
    ).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, fused=True)

    def step() -> float:
        logits = model(inputs)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    return step


def run_one(case: dict) -> dict:
    from common import build_model, make_train_step, random_batch

    threads = set_threads(case["threads"])
    cfg = case["config"]
    inputs, targets = random_batch(case["batch"], cfg["context_len"])
    if case["model"] == "plain":
        step = plain_train_step(cfg, inputs, targets)
    else:
        step = make_train_step(build_model(cfg), inputs, targets, num_latents=case["num_latents"])
    times = timed(step, repeats=case["repeats"], warmup=case["warmup"])
    return {"step_s": median(times), "times": times, "threads": threads}


def build_parser() -> argparse.ArgumentParser:
    """The command line (importable: tests/test_docs.py checks documented commands against it)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes, for the smoke test")
    p.add_argument(
        "--contexts", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072]
    )
    p.add_argument("--latents", type=int, default=1024, help="Perceiver AR's M")
    p.add_argument("--width", type=int, default=512, help="E = D")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--layers", type=int, default=6, help="latent layers L")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="timed steps per process (after one warm-up)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of fresh processes per N")
    p.add_argument(
        "--decoder-max",
        type=int,
        default=16384,
        help="largest N tried for the two decoders",
    )
    p.add_argument("--memory-limit-gb", type=float, default=16.0, help="a case above this does not fit")
    p.add_argument("--timeout", type=float, default=1500.0, help="seconds per case")
    p.add_argument("--threads", type=int, default=2)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.contexts, args.latents, args.width, args.heads, args.layers = [64, 128], 32, 32, 2, 1
        args.repeats, args.decoder_max, args.rounds = 1, 64, 1
    watch = LoadWatch("bench_vs_decoder")
    rows = []
    for n in args.contexts:
        row: dict = {"N": n, "M": min(args.latents, n)}
        # The decoders' steps grow with N^2: past 8k one timed step after no warm-up.
        long = n > 8192
        cases = {}
        for name in MODELS:
            if name != "par" and n > args.decoder_max:
                row[f"{name}_note"] = f"not run (N > {args.decoder_max})"
                continue
            m = min(args.latents, n) if name == "par" else n
            cfg = dict(
                context_len=n,
                num_latents=m,
                input_dim=args.width,
                latent_dim=args.width,
                num_latent_layers=args.layers,
                cross_attend_heads=args.heads,
                latent_heads=args.heads,
            )
            slow = long and name != "par"
            cases[name] = {
                "model": name,
                "config": cfg,
                "num_latents": m,
                "batch": args.batch,
                "repeats": 1 if slow else args.repeats,
                "warmup": 0 if slow else 1,
                "threads": args.threads,
            }
            if slow:
                row[f"{name}_note"] = "1 step, no warm-up"
        runs = run_rounds(
            __file__,
            cases,
            args.rounds,
            timeout=args.timeout,
            memory_limit_mb=args.memory_limit_gb * 1024,
            inline=(lambda name: run_one) if args.quick else None,
            describe=lambda name, r, n=n: f"N={n} {r['step_s']:.2f} s/step, {r['peak_rss_mb'] / 1024:.2f} GB",
        )
        for name, case_runs in runs.items():
            row[f"{name}_runs"] = case_runs
            good = ok_runs(case_runs)
            if not good:
                row[f"{name}_note"] = case_runs[-1]["error"]
                continue
            row[f"{name}_step_s"] = median_of(good, "step_s")
            row[f"{name}_gb"] = median_of(good, "peak_rss_mb") / 1024
        for name in ("dec", "plain"):
            if "par_step_s" in row and f"{name}_step_s" in row:
                row[f"speedup_{name}"] = row[f"{name}_step_s"] / row["par_step_s"]
                row[f"mem_ratio_{name}"] = row[f"{name}_gb"] / row["par_gb"]
        rows.append(row)
    load = watch.finish()

    cols = [
        ("N", "N", ""),
        ("M", "M", ""),
        ("par_step_s", "Perceiver AR s/step", ".2f"),
        ("dec_step_s", "M = N s/step", ".2f"),
        ("plain_step_s", "plain decoder s/step", ".2f"),
        ("speedup_dec", "vs M = N", ".1f"),
        ("speedup_plain", "vs plain", ".1f"),
        ("par_gb", "Perceiver AR GB", ".2f"),
        ("dec_gb", "M = N GB", ".2f"),
        ("plain_gb", "plain GB", ".2f"),
        ("plain_note", "decoder note", ""),
    ]
    info = machine_info(args.threads)
    print(
        f"\nPerceiver AR (M={args.latents}) vs decoder-only (this library with M=N, and the plain decoder): "
        f"E=D={args.width}, {args.heads} heads, L={args.layers}, batch {args.batch}; "
        f"medians of {args.rounds} alternating rounds of fresh processes; "
        f"{info['threads']} threads, torch {info['torch']}; "
        f"load average {load['load_average_start']} -> {load['load_average_end']}"
    )
    print(format_table(rows, cols))
    name = "bench_vs_decoder_quick" if args.quick else "bench_vs_decoder"
    save_results(
        name,
        {"machine": info, **load, "args": vars(args), "rows": rows, "markdown": markdown_table(rows, cols)},
    )

    fig, (ax1, ax2) = new_figure(ncols=2, figsize=(10, 4))
    for key, label in MODELS.items():
        if key == "par":
            label = f"{label} (M={args.latents})"
        pts = [(r["N"], r[f"{key}_step_s"], r[f"{key}_gb"]) for r in rows if f"{key}_step_s" in r]
        if pts:
            ns, ts, gbs = zip(*pts, strict=False)
            ax1.plot(ns, ts, marker="o", label=label)
            ax2.plot(ns, gbs, marker="o", label=label)
    for ax, ylabel in ((ax1, "training step (s)"), (ax2, "peak RSS (GB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context N")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    ax1.set_title(f"E=D={args.width}, L={args.layers}, batch {args.batch}")
    ax2.set_title("peak memory of the step")
    save_figure(fig, name)
    return 0


if __name__ == "__main__":
    script_main(run_one, main)
