"""This library against the public PyTorch ports, at the same sizes, on this CPU: training and decoding.

Ports (PyPI, installed only into ``benchmarks/.env-ports`` by
``benchmarks/setup_ports.sh``, never dependencies of perceiver-ar):

- ``perceiver-ar-pytorch`` 0.0.10: ``PerceiverAR(num_tokens, dim, depth,
  max_seq_len, cross_attn_seq_len = N - M, heads, dim_head = D / heads)``,
  its defaults otherwise (one cross-attend layer, cross-attend heads
  processed two at a time);
- ``perceiver-io`` 0.11: ``CausalSequenceModel`` (its Perceiver AR) with
  ``max_latents = M``, ``num_channels = D``, ``num_self_attention_layers = L``
  and ``cross_attention_dropout = 0`` (its default 0.5 would skip half the
  prefix; this library's cross-attend dropout is also off here).

Every model: vocabulary 259, N inputs, M latents, width D = E, H heads,
L self-attention layers after one cross-attend, MLP 4x, fp32.

Training (``--modes train``): batch B of random full rows; per case the
forward latency (eval mode, no grad), then training steps (forward,
cross-entropy on the M targets, backward, and the same fused AdamW for
every implementation); tokens/s counts the B x N input tokens of a step. Small
models run blocks of steps lasting at least ``--min-block`` seconds. Sizes:
N = 256 / M = 64 / D = 64 / L = 2 / B = 2, 1024 / 256 / 256 / 4 / 4,
4096 / 512 / 512 / 6 / 2, 16,384 / 1024 / 512 / 6 / 1 and the demo preset
(256 / 128 / 128 / 4, batch 16 as ``make demo`` trains it; steps/s is
tokens/s over 4096). Each training row also gives its rate as a fraction of
the fp32 matmul peak (a 2048^2 ``torch.mm`` in its own process before and
after the cases), counting this library's FLOPs (``bench_flops.training_flops``)
for every implementation: they build the same sizes, so how close the
fastest is to the peak bounds the speed-up any of them can have.

Greedy decoding (``--modes decode``), batch 1, each implementation through
its own generation path: this library's ``generate`` (cached: prime, then one
latent per token); perceiver-io's backend driven with its ``kv_cache`` exactly
as its Hugging Face generation helper drives it (first call with the whole
prompt and the fewest latents its ``max_prefix_len`` allows, then one token a
call, latent and cross-attend caches truncated as the helper does; the helper
itself needs ``transformers``, which the port environment leaves out);
perceiver-ar-pytorch's own ``AutoregressiveWrapper.generate`` (it has no cache:
every token is a full forward, so only its first ``--uncached-tokens`` tokens
are timed, each costing the same). Prefill (prompt to first token) and decode
(every later token) are timed separately. For this library the table also
gives the bytes a cached step must read (every weight once, the cross-attend
and latent caches once), the GB/s that makes, and the machine's memory
bandwidth, measured as a large fp32 matrix-vector product in its own process
before and after the cases.

Each (implementation, size) runs in a fresh process, the implementations
alternate within each of ``--rounds`` rounds, and the table gives medians
over the rounds (the JSON keeps every run). The load average is printed at
the start and the end.

    benchmarks/setup_ports.sh                                  # once: builds benchmarks/.env-ports
    python benchmarks/bench_ports.py                           # every size, 3 rounds (~60 min here)
    python benchmarks/bench_ports.py --modes decode --decode-sizes 1
    python benchmarks/bench_ports.py --extra-src before=/tmp/before/src   # a second tree side by side
    python benchmarks/bench_ports.py --quick                   # this library only, seconds (smoke test)
    python benchmarks/bench_ports.py --replot RESULTS.json     # redraw a run's plot, measuring nothing
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from common import (
    BENCH_DIR,
    RESULTS_DIR,
    LoadWatch,
    format_table,
    grouped_bars,
    machine_info,
    markdown_table,
    matvec_bandwidth,
    median,
    median_of,
    new_figure,
    ok_runs,
    run_case,
    run_rounds,
    save_figure,
    save_results,
    script_main,
    set_threads,
    timed_blocks,
)

PORTS_PYTHON = BENCH_DIR / ".env-ports" / "bin" / "python"
THIS = "perceiver-ar (this)"
IMPLS = {
    THIS: "ours",
    "perceiver-ar-pytorch 0.0.10": "lucidrains",
    "perceiver-io 0.11": "krasserm",
}
PORTS = {name for name, kind in IMPLS.items() if kind != "ours"}  # not another tree of this library
VOCAB = 259
TARGET_OVER_PORTS = 1.3  # the training speed-up over the faster port the project aims for (issue 12)

TRAIN_SIZES = [
    # N, M, D, heads, L, batch
    dict(N=256, M=64, D=64, heads=2, L=2, batch=2),
    dict(N=1024, M=256, D=256, heads=4, L=4, batch=4),
    dict(N=4096, M=512, D=512, heads=8, L=6, batch=2),
    dict(N=16384, M=1024, D=512, heads=8, L=6, batch=1),
    dict(N=256, M=128, D=128, heads=4, L=4, batch=16),  # the demo preset, as `make demo` trains it
]
DECODE_SIZES = [
    # prompt: perceiver-ar-pytorch needs more than N - M prompt tokens (its prefix is fixed at N - M)
    dict(N=1024, M=256, D=256, heads=4, L=4, prompt=769, new=255),
    dict(N=4096, M=512, D=512, heads=8, L=6, prompt=3840, new=256),
    dict(N=16384, M=1024, D=512, heads=8, L=6, prompt=16352, new=32),
]
QUICK_TRAIN = [dict(N=128, M=32, D=128, heads=2, L=1, batch=2)]  # dim_head 64: lucidrains' rotary needs >= 32
QUICK_DECODE = [dict(N=128, M=32, D=128, heads=2, L=1, prompt=100, new=12)]


# ----------------------------------------------------------------------------
# The three implementations
# ----------------------------------------------------------------------------


def build(impl: str, s: dict):
    """The model and functions (model, tokens [B, N]) -> training loss, -> logits."""
    import torch
    import torch.nn.functional as F

    N, M, D, H, L, V = s["N"], s["M"], s["D"], s["heads"], s["L"], VOCAB
    if impl == "ours":
        from perceiver_ar.config import PerceiverARConfig
        from perceiver_ar.loss import perceiver_ar_loss
        from perceiver_ar.model import PerceiverAR

        model = PerceiverAR(
            PerceiverARConfig(
                vocab_size=V,
                context_len=N,
                num_latents=M,
                input_dim=D,
                latent_dim=D,
                num_latent_layers=L,
                cross_attend_heads=H,
                latent_heads=H,
                # The zero-initialised logits layer would make every greedy draw the same id.
                final_layer_init_zeros=False,
            )
        )

        def loss_fn(m, x, y):
            out = m(x)
            return perceiver_ar_loss(out.logits, y, out.latent_index).mean

        def forward(m, x):
            return m(x).logits

    elif impl == "lucidrains":
        from perceiver_ar_pytorch import PerceiverAR

        model = PerceiverAR(
            num_tokens=V,
            dim=D,
            depth=L,
            max_seq_len=N,
            cross_attn_seq_len=N - M,
            heads=H,
            dim_head=D // H,
            ff_mult=4,
        )

        def loss_fn(m, x, y):
            return m(x, labels=torch.cat([x[:, :1], y], dim=1)[:, :N])

        def forward(m, x):
            return m(x)

    elif impl == "krasserm":
        from perceiver.model.core import CausalSequenceModel, CausalSequenceModelConfig

        model = CausalSequenceModel(
            CausalSequenceModelConfig(
                vocab_size=V,
                max_seq_len=N,
                max_latents=M,
                num_channels=D,
                num_heads=H,
                num_self_attention_layers=L,
                self_attention_widening_factor=4,
                cross_attention_widening_factor=4,
                cross_attention_dropout=0.0,
            )
        )

        def loss_fn(m, x, y):
            logits = m(x, prefix_len=N - M).logits  # [B, M, V]
            return F.cross_entropy(logits.reshape(-1, V), y[:, N - M :].reshape(-1))

        def forward(m, x):
            return m(x, prefix_len=N - M).logits

    else:
        raise ValueError(impl)
    return model, loss_fn, forward


def krasserm_greedy(model, prompt, new_tokens: int) -> tuple[list[int], float, float]:
    """perceiver-io's cached greedy loop, as its ``PerceiverCausalSequenceModel.generate`` drives the backend.

    Returns (tokens, prefill seconds, decode seconds). The logic follows
    ``prepare_inputs_for_generation``: the prompt is primed with the fewest
    latents ``max_prefix_len`` allows (at least 1); each later call feeds the
    newest token with the caches; once the latents would exceed ``max_latents``
    the prefix grows by one and the self-attention caches keep their last
    ``max_latents - 1`` entries; past ``max_seq_len`` the cross-attention cache
    keeps its last ``max_seq_len - 1``.
    """
    import torch

    backend = model
    seq_len = prompt.shape[1]
    num_latents = max(1, seq_len - backend.max_prefix_len)
    prefix_len = seq_len - num_latents  # the helper's prefix_len; each call starts from it
    keep_latents, keep_inputs = backend.max_latents - 1, backend.max_seq_len - 1
    tokens = []
    with torch.no_grad():
        t0 = time.perf_counter()
        out = backend(prompt, prefix_len=prefix_len, kv_cache=[])
        cache = out.kv_cache
        token = out.logits[:, -1].argmax(-1, keepdim=True)  # [B, 1]
        tokens.append(token)
        t1 = time.perf_counter()
        for _ in range(new_tokens - 1):
            input_len = cache[0][0].shape[1] + 1  # as the helper counts it with a cache
            call_prefix = prefix_len
            too_many_latents = input_len - prefix_len > backend.max_latents
            if too_many_latents and prefix_len < backend.max_prefix_len:
                call_prefix += 1
            if too_many_latents:
                ca, *sa = cache
                cache = [ca] + [(k[:, -keep_latents:], v[:, -keep_latents:]) for k, v in sa]
            if input_len > backend.max_seq_len:
                (k, v), *sa = cache
                cache = [(k[:, -keep_inputs:], v[:, -keep_inputs:]), *sa]
            out = backend(token, prefix_len=call_prefix, kv_cache=cache)
            cache = out.kv_cache
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(token)
        t2 = time.perf_counter()
    return [int(t) for t in torch.cat(tokens, 1)[0]], t1 - t0, t2 - t1


# ----------------------------------------------------------------------------
# One case, in its own process
# ----------------------------------------------------------------------------


def run_train(case: dict) -> dict:
    import torch

    threads = set_threads(case["threads"])
    s = case["size"]
    torch.manual_seed(0)
    model, loss_fn, forward = build(case["impl"], s)
    g = torch.Generator().manual_seed(0)
    events = torch.randint(3, VOCAB, (s["batch"], s["N"] + 1), generator=g)
    x, y = events[:, :-1], events[:, 1:]

    model.eval()
    with torch.no_grad():
        fwd_times, _ = timed_blocks(lambda: forward(model, x), case["repeats"], case["min_block"])
    model.train()
    # The same optimizer for every implementation (it is not part of any model):
    # AdamW as this library's trainer builds it, fused (one pass over all parameters).
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, fused=True)

    def step() -> None:
        loss = loss_fn(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step_times, block = timed_blocks(step, case["repeats"], case["min_block"])
    step_s = median(step_times)
    return {
        "forward_s": median(fwd_times),
        "step_s": step_s,
        "tokens_per_s": s["batch"] * s["N"] / step_s,
        "step_times": step_times,
        "forward_times": fwd_times,
        "steps_per_block": block,
        "params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "threads": threads,
        "torch": torch.__version__,
    }


def run_decode(case: dict) -> dict:
    import torch

    threads = set_threads(case["threads"])
    s = case["size"]
    torch.manual_seed(0)
    model, _, _ = build(case["impl"], s)
    model.eval()
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, VOCAB, (1, s["prompt"]), generator=g)
    new = s["new"]
    result: dict = {"threads": threads, "torch": torch.__version__}
    if case["impl"] == "ours":
        from perceiver_ar.generate import generate

        kw = {"compile": True} if case.get("compile") else {}
        t0 = time.perf_counter()
        # Warm-up; compiled, a generation of the same length, so that the timed ones
        # reuse its graphs (the caches, sized to the generation, are part of the shapes).
        generate(model, prompt, new if kw else min(new, 8), temperature=0, **kw)
        result["warmup_s"] = time.perf_counter() - t0
        runs = [generate(model, prompt, new, temperature=0, **kw) for _ in range(case["repeats"])]
        result.update(
            prefill_s=[r.prefill_seconds for r in runs],
            decode_s=[r.decode_seconds for r in runs],
            decoded=new - 1,
            tokens=runs[-1].tokens[0].tolist(),
        )
        result.update(decode_bytes_per_token(model, s["prompt"], new))
    elif case["impl"] == "krasserm":
        krasserm_greedy(model, prompt, min(new, 8))  # warm-up
        runs = [krasserm_greedy(model, prompt, new) for _ in range(case["repeats"])]
        result.update(
            prefill_s=[r[1] for r in runs], decode_s=[r[2] for r in runs], decoded=new - 1, tokens=runs[-1][0]
        )
    else:  # lucidrains: no cache, every token a full forward of N - M prefix inputs and the latents
        from perceiver_ar_pytorch.autoregressive_wrapper import AutoregressiveWrapper

        wrapper = AutoregressiveWrapper(model)
        k = min(new, case["uncached_tokens"])
        # filter_thres keeps the int((1 - thres) * V) = 1 most likely id: greedy.
        greedy = dict(temperature=1.0, filter_thres=1.0 - 1.5 / VOCAB)
        wrapper.generate(prompt, 2, **greedy)  # warm-up
        prefill, decode = [], []
        for _ in range(case["repeats"]):
            t0 = time.perf_counter()
            wrapper.generate(prompt, 1, **greedy)
            t1 = time.perf_counter()
            out = wrapper.generate(prompt, k, **greedy)
            t2 = time.perf_counter()
            prefill.append(t1 - t0)
            decode.append((t2 - t1) - (t1 - t0))  # the k - 1 tokens after the first
        result.update(prefill_s=prefill, decode_s=decode, decoded=k - 1, tokens=out[0].tolist())
    result["decode_tok_s"] = [result["decoded"] / d for d in result["decode_s"]]
    return result


def decode_bytes_per_token(model, prompt_len: int, new_tokens: int, batch: int = 1) -> dict:
    """Bytes a cached decode step must read, averaged over the steps after the first token.

    Every weight once (of the embedding tables only the rows of the new token),
    the keys and values of the cross-attend cache once (the whole window) and
    of each latent layer's cache once (the latents so far). Steps that reset
    the latent caches recompute a block instead; they are counted like a step.
    """
    cfg = model.config
    size = next(model.parameters()).element_size()
    embeddings = {id(p) for m in [model.tok_embeddings, *model.pos_embeddings] for p in m.parameters()}
    weights = sum(p.numel() for p in model.parameters() if id(p) not in embeddings)
    weights += cfg.input_dim * (1 + len(model.pos_embeddings))  # one row per table
    N, M, E, D, L = cfg.context_len, cfg.num_latents, cfg.input_dim, cfg.latent_dim, cfg.num_latent_layers
    total, latents, steps = 0, 1, 0
    for i in range(1, new_tokens):
        latents = max(M // 2, 1) if latents >= M else latents + 1
        window = min(N, prompt_len + i)
        total += weights + 2 * E * window * batch + L * 2 * D * latents * batch
        steps += 1
    per_token = total * size / max(steps, 1)
    return {"bytes_per_token": per_token, "weight_bytes": weights * size}


def run_bandwidth(case: dict) -> dict:
    threads = set_threads(case["threads"])
    return {**matvec_bandwidth(case["size"], case["repeats"]), "threads": threads}


def run_peak(case: dict) -> dict:
    from bench_flops import matmul_gflops

    threads = set_threads(case["threads"])
    gflops, times = matmul_gflops(case["size"], case["repeats"])
    return {"gflops": gflops, "times": times, "threads": threads}


def run_one(case: dict) -> dict:
    modes = {"train": run_train, "decode": run_decode, "bandwidth": run_bandwidth, "peak": run_peak}
    return modes[case["mode"]](case)


def step_gflop(s: dict) -> float:
    """Analytic GFLOP of one training step of this library's model at size ``s`` (full rows)."""
    from bench_flops import training_flops

    cfg = dict(input_dim=s["D"], latent_dim=s["D"], num_latent_layers=s["L"], vocab_size=VOCAB)
    return training_flops(cfg, s["N"], s["M"], s["batch"]) / 1e9


# ----------------------------------------------------------------------------
# The sweep
# ----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The command line (importable: tests/test_docs.py checks documented commands against it)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes, this library only (smoke test)")
    p.add_argument("--modes", nargs="+", choices=["train", "decode"], default=["train", "decode"])
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of fresh processes per size")
    p.add_argument("--repeats", type=int, default=3, help="timed steps or generations per process")
    p.add_argument(
        "--train-sizes",
        type=int,
        nargs="+",
        default=None,
        help="indices into the training sizes (default all)",
    )
    p.add_argument(
        "--decode-sizes",
        type=int,
        nargs="+",
        default=None,
        help="indices into the decoding sizes (default all)",
    )
    p.add_argument("--min-block", type=float, default=0.5, help="seconds a timed block of small steps lasts")
    p.add_argument(
        "--uncached-tokens", type=int, default=8, help="tokens timed for perceiver-ar-pytorch (no cache)"
    )
    p.add_argument("--compile", action="store_true", help="also decode with generate(..., compile=True)")
    p.add_argument("--bandwidth-size", type=int, default=8192, help="the matrix side of the bandwidth probe")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--with-ports", action="store_true", help="in --quick mode, run the ports too")
    p.add_argument("--timeout", type=float, default=1800.0)
    p.add_argument(
        "--extra-src",
        default=None,
        metavar="LABEL=DIR",
        help="also measure this library from another source tree, e.g. 'before=/tmp/tree/src'",
    )
    p.add_argument(
        "--replot",
        type=Path,
        default=None,
        metavar="JSON",
        help="only redraw the plot of a results JSON, as <its name>.png in the results folder",
    )
    return p


def implementations(args: argparse.Namespace) -> tuple[dict[str, str], dict[str, str]]:
    """Names -> implementation kind, and names -> source tree (for another tree of this library)."""
    impls = dict(IMPLS)
    if args.quick and not args.with_ports:
        impls = {THIS: "ours"}
    sources = {}
    if args.extra_src:
        label, _, src_dir = args.extra_src.partition("=")
        impls[f"perceiver-ar ({label})"] = "ours"
        sources[f"perceiver-ar ({label})"] = str(Path(src_dir).resolve())
    if not PORTS_PYTHON.exists():
        if any(v != "ours" for v in impls.values()):
            print(
                f"{PORTS_PYTHON} not found: run benchmarks/setup_ports.sh first; measuring this library only"
            )
        impls = {k: v for k, v in impls.items() if v == "ours"}
    return impls, sources


def train_rows(args, impls, sources, sizes) -> list[dict]:
    rows = []
    for s in sizes:
        cases = {
            name: {
                "mode": "train",
                "impl": impl,
                "size": s,
                "repeats": args.repeats,
                "threads": args.threads,
                "min_block": 0.0 if args.quick else args.min_block,
            }
            for name, impl in impls.items()
        }
        print(f"\ntraining N={s['N']} M={s['M']} D={s['D']} L={s['L']} B={s['batch']}", flush=True)
        runs = run_rounds(
            __file__,
            cases,
            args.rounds,
            python=lambda n: sys.executable if impls[n] == "ours" else str(PORTS_PYTHON),
            src=sources.get,
            inline=lambda n: run_one if args.quick and impls[n] == "ours" and n not in sources else None,
            timeout=args.timeout,
            describe=lambda n, r: f"{r['tokens_per_s']:.0f} tok/s, step {r['step_s'] * 1e3:.1f} ms",
        )
        group = []
        for name, rs in runs.items():
            ok = ok_runs(rs)
            row = {"mode": "train", "impl": name, **{k: s[k] for k in ("N", "M", "D", "heads", "L", "batch")}}
            row["runs"] = rs
            if not ok:
                row["note"] = rs[0]["error"] if rs else "not run"
            else:
                row.update(
                    tokens_per_s=median_of(ok, "tokens_per_s"),
                    step_s=median_of(ok, "step_s"),
                    forward_s=median_of(ok, "forward_s"),
                    peak_gb=median_of(ok, "peak_rss_mb") / 1024,
                    params=ok[0]["params"],
                    gflop_step=step_gflop(s),
                )
            group.append(row)
        add_ratios(group, "tokens_per_s")
        rows += group
    return rows


def decode_rows(args, impls, sources, sizes) -> list[dict]:
    rows = []
    names = dict(impls)
    if args.compile:
        names[f"{THIS}, compiled"] = "ours"
    for s in sizes:
        cases = {}
        for name, impl in names.items():
            cases[name] = {
                "mode": "decode",
                "impl": impl,
                "size": s,
                "repeats": 1 if args.quick else args.repeats,
                "threads": args.threads,
                "uncached_tokens": args.uncached_tokens,
                "compile": name.endswith("compiled"),
            }
        print(f"\ndecoding N={s['N']} M={s['M']} prompt {s['prompt']}, {s['new']} new tokens", flush=True)
        runs = run_rounds(
            __file__,
            cases,
            args.rounds,
            python=lambda n: sys.executable if names[n] == "ours" else str(PORTS_PYTHON),
            src=sources.get,
            inline=lambda n: run_one if args.quick and names[n] == "ours" and n not in sources else None,
            timeout=args.timeout,
            describe=lambda n, r: (
                f"prefill {median(r['prefill_s']):.3f} s, decode {median(r['decode_tok_s']):.1f} tok/s"
            ),
        )
        group = []
        for name, rs in runs.items():
            ok = ok_runs(rs)
            row = {"mode": "decode", "impl": name, **{k: s[k] for k in ("N", "M", "D", "L", "prompt", "new")}}
            row["runs"] = rs
            if not ok:
                row["note"] = rs[0]["error"] if rs else "not run"
                group.append(row)
                continue
            # Per run: the median of its repeats; then the median over the fresh-process runs.
            prefill = median([median(r["prefill_s"]) for r in ok])
            decode_tok_s = median([median(r["decode_tok_s"]) for r in ok])
            row.update(prefill_s=prefill, decode_tok_s=decode_tok_s, decoded=ok[0]["decoded"])
            # The whole generation of `new` tokens: prefill, then new - 1 decoded tokens.
            row["total_tok_s"] = s["new"] / (prefill + (s["new"] - 1) / decode_tok_s)
            if "bytes_per_token" in ok[0]:
                row["mb_per_token"] = ok[0]["bytes_per_token"] / 1e6
                row["achieved_gb_s"] = ok[0]["bytes_per_token"] * decode_tok_s / 1e9
            group.append(row)
        add_ratios(group, "decode_tok_s")
        for row in group:
            ref = next(r for r in group if r["impl"] == THIS)
            if "total_tok_s" in row and "total_tok_s" in ref:
                row["ours_total_speedup"] = ref["total_tok_s"] / row["total_tok_s"]
        rows += group
    return rows


def add_ratios(group: list[dict], key: str) -> None:
    """This library's rate over each row's, from the medians (>1: this library is faster)."""
    ours = next((r for r in group if r["impl"] == THIS), None)
    for row in group:
        if ours and key in ours and key in row:
            row["ours_speedup"] = ours[key] / row[key]


def probe(args, mode: str, size: int) -> dict:
    """A probe in its own process: ``bandwidth`` (matrix-vector GB/s) or ``peak`` (matmul GFLOP/s)."""
    case = {"mode": mode, "size": size, "repeats": 10, "threads": args.threads}
    r = run_case(__file__, case, inline=run_one if args.quick else None)
    if "error" in r:
        return r
    if mode == "bandwidth":
        print(f"memory bandwidth (fp32 {size}^2 matrix-vector): {r['gb_per_s']:.1f} GB/s", flush=True)
    else:
        print(f"fp32 matmul peak ({size}^2 torch.mm): {r['gflops']:.1f} GFLOP/s", flush=True)
    return r


def probe_median(runs: list[dict], key: str) -> float | None:
    """The median of the probes that did not fail (None if none ran)."""
    values = [r[key] for r in runs if "error" not in r]
    return median(values) if values else None


def add_peak_fractions(rows: list[dict], peak_gflops: float | None) -> None:
    """Each training row's rate against the matmul peak, and the fraction 1.3x the faster port needs."""
    if not peak_gflops:
        return
    for row in rows:
        if "step_s" in row:
            row["of_peak"] = row["gflop_step"] / row["step_s"] / peak_gflops
    for ours in (r for r in rows if r["impl"] == THIS and "of_peak" in r):
        same_size = [r for r in rows if all(r[k] == ours[k] for k in ("N", "M", "D", "L", "batch"))]
        ports = [r["of_peak"] for r in same_size if r["impl"] in PORTS and "of_peak" in r]
        if ports:
            ours["target_of_peak"] = TARGET_OVER_PORTS * max(ports)


TRAIN_COLS = [
    ("impl", "implementation", ""),
    ("N", "N", ""),
    ("M", "M", ""),
    ("D", "D", ""),
    ("L", "L", ""),
    ("batch", "B", ""),
    ("params", "params", ","),
    ("tokens_per_s", "train tokens/s", ".0f"),
    ("step_s", "s/step", ".4f"),
    ("forward_s", "forward s", ".4f"),
    ("peak_gb", "peak RSS GB", ".2f"),
    ("of_peak", "of matmul peak", ".0%"),
    ("target_of_peak", f"{TARGET_OVER_PORTS}x the faster port needs", ".0%"),
    ("ours_speedup", "this lib's speed-up", ".2f"),
    ("note", "note", ""),
]
DECODE_COLS = [
    ("impl", "implementation", ""),
    ("N", "N", ""),
    ("M", "M", ""),
    ("prompt", "prompt", ""),
    ("new", "new", ""),
    ("prefill_s", "prefill s", ".3f"),
    ("decode_tok_s", "decode tokens/s", ".1f"),
    ("total_tok_s", "tokens/s incl. prefill", ".1f"),
    ("ours_speedup", "this lib's decode speed-up", ".2f"),
    ("ours_total_speedup", "(incl. prefill)", ".2f"),
    ("mb_per_token", "MB read/token", ".1f"),
    ("achieved_gb_s", "GB/s", ".1f"),
    ("of_bandwidth", "of bandwidth", ".0%"),
    ("note", "note", ""),
]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.replot:
        try:
            rows = saved_rows(args.replot)
        except ValueError as e:
            parser.error(f"--replot {args.replot}: {e}")
        plot(args.replot.stem, *rows)
        print(f"plot: {RESULTS_DIR / args.replot.stem}.png")
        return 0
    train_sizes = [TRAIN_SIZES[i] for i in args.train_sizes] if args.train_sizes else TRAIN_SIZES
    decode_sizes = [DECODE_SIZES[i] for i in args.decode_sizes] if args.decode_sizes else DECODE_SIZES
    if args.quick:
        train_sizes, decode_sizes = QUICK_TRAIN, QUICK_DECODE
        args.rounds, args.repeats, args.bandwidth_size = 1, 1, 512
    impls, sources = implementations(args)
    watch = LoadWatch("bench_ports")
    info = machine_info(args.threads)
    # Each probe runs before and after the cases it serves; the median of the two is used.
    peak_size = 256 if args.quick else 2048
    bw = [probe(args, "bandwidth", args.bandwidth_size)] if "decode" in args.modes else []
    peaks = [probe(args, "peak", peak_size)] if "train" in args.modes else []
    train = train_rows(args, impls, sources, train_sizes) if "train" in args.modes else []
    if peaks:
        peaks.append(probe(args, "peak", peak_size))
    peak_gflops = probe_median(peaks, "gflops")
    add_peak_fractions(train, peak_gflops)
    decode = decode_rows(args, impls, sources, decode_sizes) if "decode" in args.modes else []
    if bw:
        bw.append(probe(args, "bandwidth", args.bandwidth_size))
    bandwidth_gb_s = probe_median(bw, "gb_per_s")
    for row in decode:
        if bandwidth_gb_s and "achieved_gb_s" in row:
            row["of_bandwidth"] = row["achieved_gb_s"] / bandwidth_gb_s
    load = watch.finish()

    head = (
        f"vocab {VOCAB}, MLP 4x, fp32; medians of {args.rounds} alternating rounds of fresh processes; "
        f"{info['threads']} threads, torch {info['torch']}; load average {load['load_average_start']} -> "
        f"{load['load_average_end']}"
    )
    if train:
        peak_text = f"{peak_gflops:.1f} GFLOP/s" if peak_gflops else "not measured"
        print(f"\nTraining (fp32 matmul peak {peak_text}; {head})")
        print(format_table(train, TRAIN_COLS))
    if decode:
        bw_text = f"{bandwidth_gb_s:.1f} GB/s" if bandwidth_gb_s else "not measured"
        print(f"\nGreedy decoding, batch 1 (memory bandwidth {bw_text}; {head})")
        print(format_table(decode, DECODE_COLS))
    name = result_name(args)
    print(f"results: {RESULTS_DIR / name}.json and .png", flush=True)
    save_results(
        name,
        {
            "machine": info,
            **load,
            "args": vars(args),
            "bandwidth": bw,
            "bandwidth_gb_s": bandwidth_gb_s,
            "matmul_peak": peaks,
            "matmul_peak_gflops": peak_gflops,
            "train_rows": train,
            "decode_rows": decode,
            "markdown_train": markdown_table(train, TRAIN_COLS),
            "markdown_decode": markdown_table(decode, DECODE_COLS),
        },
    )
    plot(name, train, decode)
    return 0


def result_name(args: argparse.Namespace) -> str:
    """``bench_ports`` for a run of every size and mode; a partial run is named by what it ran.

    So a run of a few sizes, or with other rounds, threads or repeats, never
    replaces the full run's JSON and plot.
    """
    if args.quick:
        return "bench_ports_quick"
    parts = []
    for mode, chosen, sizes in (
        ("train", args.train_sizes, TRAIN_SIZES),
        ("decode", args.decode_sizes, DECODE_SIZES),
    ):
        if mode not in args.modes:
            continue
        every = not chosen or sorted(set(chosen)) == list(range(len(sizes)))
        parts.append(mode if every else mode + "-".join(map(str, chosen)))
    defaults = build_parser().parse_args([])
    settings = ("threads", "rounds", "repeats", "min_block", "uncached_tokens", "bandwidth_size")
    if any(getattr(args, k) != getattr(defaults, k) for k in settings):
        parts.append("settings")  # fewer rounds, other threads...: not comparable with the full run
    return "bench_ports" if parts == ["train", "decode"] else "bench_ports_" + "_".join(parts)


def faster_port_speedup(rows: list[dict], group: tuple) -> float | None:
    """This library's speed-up over the faster port in one (N, M) group (the smallest of its ratios)."""
    ratios = [
        r["ours_speedup"]
        for r in rows
        if (r["N"], r["M"]) == group and r["impl"] in PORTS and "ours_speedup" in r
    ]
    return min(ratios) if ratios else None


def plot(name: str, train: list[dict], decode: list[dict]) -> None:
    """Bars per size and implementation; this library's speed-up over the faster port above its bars."""
    panels = [
        (train, "tokens_per_s", "training tokens/s"),
        (decode, "decode_tok_s", "greedy decode tokens/s (batch 1)"),
    ]
    panels = [p for p in panels if p[0]]
    fig, axes = new_figure(ncols=max(len(panels), 1), figsize=(6.5 * max(len(panels), 1), 4.6), squeeze=False)
    for ax, (rows, key, title) in zip(axes[0], panels, strict=False):

        def note(r: dict, rows: list[dict] = rows) -> str | None:
            speedup = faster_port_speedup(rows, (r["N"], r["M"])) if r["impl"] == THIS else None
            return f"{speedup:.2f}x" if speedup else None

        sizes = grouped_bars(
            ax, rows, group=lambda r: (r["N"], r["M"]), series=lambda r: r["impl"], value=key, note=note
        )
        labels = []
        for n, m in sizes:
            first = next(r for r in rows if (r["N"], r["M"]) == (n, m))
            extra = f"\nD={first['D']} L={first['L']}" + (f" B={first['batch']}" if "batch" in first else "")
            labels.append(f"N={n}\nM={m}{extra}")
        ax.set_xticks(range(len(sizes)), labels, fontsize=7)
        ax.set_yscale("log")
        ax.set_title(f"{title} (higher is better)", fontsize=9)
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=len(names), fontsize=7, frameon=False)
    fig.text(
        0.5,
        0.995,
        "above this library's bars: its speed-up over the faster port",
        ha="center",
        va="top",
        fontsize=7,
    )
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    save_figure(fig, name, tight=False)


def saved_rows(path: Path) -> tuple[list[dict], list[dict]]:
    """The training and decoding rows of a bench_ports results JSON; ValueError if it holds none."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"not a readable results JSON ({e.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise ValueError("not a bench_ports results JSON")
    train, decode = data.get("train_rows"), data.get("decode_rows")
    if not isinstance(train, list) or not isinstance(decode, list) or not train + decode:
        raise ValueError("holds no bench_ports training or decoding rows")
    return train, decode


if __name__ == "__main__":
    script_main(run_one, main)
