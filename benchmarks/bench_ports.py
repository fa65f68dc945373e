"""This library against the public PyTorch ports, at the same sizes, on this CPU.

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
L self-attention layers after one cross-attend, MLP 4x, fp32, batch B of
random full rows. Each case (implementation, size) runs in a fresh process
and the implementations alternate within each round. Per case: forward
latency (eval mode, no grad), then training steps (forward, cross-entropy
on the M targets, backward, AdamW); training tokens/s counts the B x N
input tokens of a step; peak memory is the process's peak RSS.

    benchmarks/setup_ports.sh                   # once: builds benchmarks/.env-ports
    python benchmarks/bench_ports.py            # both sizes, 3 rounds (~20 min here)
    python benchmarks/bench_ports.py --quick    # this library only, seconds (smoke test)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common import (
    BENCH_DIR,
    case_argument,
    format_table,
    machine_info,
    markdown_table,
    median,
    new_figure,
    report_case,
    run_case,
    save_figure,
    save_results,
    set_threads,
    timed,
)

PORTS_PYTHON = BENCH_DIR / ".env-ports" / "bin" / "python"
IMPLS = {
    "perceiver-ar (this)": "ours",
    "perceiver-ar-pytorch 0.0.10": "lucidrains",
    "perceiver-io 0.11": "krasserm",
}

SIZES = [
    # N, M, D, heads, L, batch
    dict(N=4096, M=512, D=512, heads=8, L=6, batch=2),
    dict(N=16384, M=1024, D=512, heads=8, L=6, batch=1),
]


def build(impl: str, s: dict):
    """The model and a function (model, tokens [B, N]) -> training loss."""
    import torch
    import torch.nn.functional as F

    N, M, D, H, L, V = s["N"], s["M"], s["D"], s["heads"], s["L"], 259
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


def run_one(case: dict) -> dict:
    import torch

    threads = set_threads(case["threads"])
    s = case["size"]
    torch.manual_seed(0)
    model, loss_fn, forward = build(case["impl"], s)
    g = torch.Generator().manual_seed(0)
    events = torch.randint(3, 259, (s["batch"], s["N"] + 1), generator=g)
    x, y = events[:, :-1], events[:, 1:]

    model.eval()
    with torch.no_grad():
        fwd_times = timed(lambda: forward(model, x), repeats=case["repeats"], warmup=1)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)

    def step() -> None:
        loss = loss_fn(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step_times = timed(step, repeats=case["repeats"], warmup=1)
    step_s = median(step_times)
    return {
        "forward_s": median(fwd_times),
        "step_s": step_s,
        "tokens_per_s": s["batch"] * s["N"] / step_s,
        "step_times": step_times,
        "forward_times": fwd_times,
        "params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "threads": threads,
        "torch": torch.__version__,
    }


def build_parser() -> argparse.ArgumentParser:
    """The command line (importable: tests/test_docs.py checks documented commands against it)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny size, this library only (smoke test)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of fresh processes per size")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per process (after one warm-up)")
    p.add_argument(
        "--sizes", type=int, nargs="+", default=None, help="indices into the size list (default all)"
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--with-ports", action="store_true", help="in --quick mode, run the ports too")
    p.add_argument("--timeout", type=float, default=1800.0)
    p.add_argument(
        "--extra-src",
        default=None,
        metavar="LABEL=DIR",
        help="also measure this library from another source tree, e.g. 'patched=/tmp/tree/src'",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    sizes = [SIZES[i] for i in args.sizes] if args.sizes else SIZES
    impls = dict(IMPLS)
    if args.quick:
        sizes = [
            dict(N=128, M=32, D=128, heads=2, L=1, batch=2)
        ]  # dim_head 64: the lucidrains rotary needs >= 32
        args.rounds, args.repeats = 1, 1
        if not args.with_ports:
            impls = {k: v for k, v in impls.items() if v == "ours"}
    sources = {}
    if args.extra_src:
        label, _, src_dir = args.extra_src.partition("=")
        impls[f"perceiver-ar ({label})"] = "ours"
        sources[f"perceiver-ar ({label})"] = str(Path(src_dir).resolve())
    ports_ready = Path(PORTS_PYTHON).exists()
    if not ports_ready:
        missing = [k for k, v in impls.items() if v != "ours"]
        if missing:
            print(
                f"{PORTS_PYTHON} not found: run benchmarks/setup_ports.sh first; measuring this library only"
            )
        impls = {k: v for k, v in impls.items() if v == "ours"}

    rows = []
    for s in sizes:
        results: dict[str, list[dict]] = {name: [] for name in impls}
        names = list(impls)
        for r in range(args.rounds):
            order = names[r % len(names) :] + names[: r % len(names)]  # rotate who goes first
            for name in order:
                impl = impls[name]
                python = sys.executable if impl == "ours" else str(PORTS_PYTHON)
                case = {"impl": impl, "size": s, "repeats": args.repeats, "threads": args.threads}
                inline = run_one if (args.quick and impl == "ours" and name not in sources) else None
                res = run_case(
                    __file__, case, python=python, timeout=args.timeout, inline=inline, src=sources.get(name)
                )
                results[name].append(res)
                msg = res.get("error") or (
                    f"{res['tokens_per_s']:.0f} tok/s, step {res['step_s']:.2f} s, "
                    f"fwd {res['forward_s']:.2f} s, {res['peak_rss_mb'] / 1024:.2f} GB"
                )
                print(f"N={s['N']} M={s['M']} round {r + 1} {name}: {msg}", flush=True)
        for name, runs in results.items():
            ok = [x for x in runs if "error" not in x]
            row = {"impl": name, **{k: s[k] for k in ("N", "M", "D", "heads", "L", "batch")}}
            if not ok:
                row["note"] = runs[0]["error"] if runs else "not run"
            else:
                row.update(
                    tokens_per_s=median([x["tokens_per_s"] for x in ok]),
                    # Other jobs on a shared machine only ever add time: the fastest
                    # step of all rounds estimates what the code itself costs.
                    best_tokens_per_s=s["batch"] * s["N"] / min(t for x in ok for t in x["step_times"]),
                    step_s=median([x["step_s"] for x in ok]),
                    forward_s=median([x["forward_s"] for x in ok]),
                    peak_gb=median([x["peak_rss_mb"] for x in ok]) / 1024,
                    params=ok[0]["params"],
                    runs=ok,
                )
            rows.append(row)
        ours = next(r for r in rows[-len(results) :] if r["impl"].startswith("perceiver-ar (this)"))
        for row in rows[-len(results) :]:
            if "tokens_per_s" in row and "tokens_per_s" in ours:
                row["ours_speedup"] = ours["tokens_per_s"] / row["tokens_per_s"]
                row["ours_best_speedup"] = ours["best_tokens_per_s"] / row["best_tokens_per_s"]

    info = machine_info(args.threads)
    cols = [
        ("impl", "implementation", ""),
        ("N", "N", ""),
        ("M", "M", ""),
        ("batch", "B", ""),
        ("params", "params", ","),
        ("tokens_per_s", "train tokens/s", ".0f"),
        ("best_tokens_per_s", "best tokens/s", ".0f"),
        ("step_s", "s/step", ".2f"),
        ("forward_s", "forward s", ".3f"),
        ("peak_gb", "peak RSS GB", ".2f"),
        ("ours_speedup", "this lib's speed-up (medians)", ".2f"),
        ("ours_best_speedup", "(best)", ".2f"),
        ("note", "note", ""),
    ]
    print(
        f"\nD={sizes[0]['D']}, {sizes[0]['heads']} heads, L={sizes[0]['L']}, vocab 259, MLP 4x; medians of "
        f"{args.rounds} alternating rounds x {args.repeats} steps; {info['threads']} threads, "
        f"torch {info['torch']}"
    )
    print(format_table(rows, cols))
    name = "bench_ports_quick" if args.quick else "bench_ports"
    save_results(
        name, {"machine": info, "args": vars(args), "rows": rows, "markdown": markdown_table(rows, cols)}
    )

    fig, axes = new_figure(ncols=3, figsize=(13, 4))
    names = list(impls)
    width = 0.8 / len(names)
    for ax, key, label in zip(
        axes,
        ("tokens_per_s", "forward_s", "peak_gb"),
        ("training tokens/s (higher is better)", "forward latency (s)", "peak RSS (GB)"),
        strict=True,
    ):
        for j, impl_name in enumerate(names):
            pts = [
                (i, r[key])
                for i, s in enumerate(sizes)
                for r in rows
                if r["N"] == s["N"] and r["impl"] == impl_name and key in r
            ]
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.bar(
                    [x + width * (j - (len(names) - 1) / 2) for x in xs],
                    ys,
                    width=width,
                    color=f"C{j}",
                    label=impl_name,
                )
        ax.set_xticks(range(len(sizes)), [f"N={s['N']}\nM={s['M']} B={s['batch']}" for s in sizes])
        ax.set_title(label)
    axes[0].legend(fontsize=8)
    save_figure(fig, name)
    return 0


if __name__ == "__main__":
    case = case_argument()
    if case is not None:
        report_case(run_one(case))
    else:
        sys.exit(main())
