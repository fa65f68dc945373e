"""Peak resident memory of one training step and of a forward-only evaluation vs N.

Each case (context N, memory switches) runs in a fresh process; ``ru_maxrss``
of that process is its peak, including the ~0.3 GB of Python and torch.
The default sizes are the issue's bound: M = 1024, L = 6, D = E = 512,
8 heads, batch 1, rotary positions; ``--preset copy-131k`` measures the
official copy-task size instead.

    python benchmarks/bench_memory.py            # N = 16k .. 131k (~6 min here)
    python benchmarks/bench_memory.py --quick    # seconds, smoke test
"""

from __future__ import annotations

import argparse
import time

from common import (
    format_table,
    machine_info,
    markdown_table,
    new_figure,
    run_case,
    save_figure,
    save_results,
    script_main,
    set_threads,
)

SWITCHES = {
    "plain": dict(cross_attend_chunk_size=0, checkpoint_cross_attend=False, checkpoint_latent_layers=False),
    "chunk": dict(cross_attend_chunk_size=128, checkpoint_cross_attend=False, checkpoint_latent_layers=False),
    "chunk+ckpt": dict(
        cross_attend_chunk_size=128, checkpoint_cross_attend=True, checkpoint_latent_layers=True
    ),
}


def base_config(args: argparse.Namespace, n: int) -> dict:
    if args.preset:
        from perceiver_ar.config import PRESETS

        cfg = dict(PRESETS[args.preset])
        cfg["context_len"] = n
        cfg.pop("position_table_sizes", None)
        return cfg
    return dict(
        context_len=n,
        num_latents=min(args.latents, n),
        input_dim=args.width,
        latent_dim=args.width,
        num_latent_layers=args.layers,
        cross_attend_heads=args.heads,
        latent_heads=args.heads,
    )


def run_one(case: dict) -> dict:
    import torch
    from common import build_model, make_forward, make_train_step, random_batch

    threads = set_threads(case["threads"])
    model = build_model(case["config"])
    inputs, targets = random_batch(1, case["config"]["context_len"])
    t0 = time.perf_counter()
    if case["mode"] == "train":
        make_train_step(model, inputs, targets)()
    else:
        make_forward(model, inputs)()
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "threads": threads, "torch": torch.__version__}


def build_parser() -> argparse.ArgumentParser:
    """The command line (importable: tests/test_docs.py checks documented commands against it)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes, for the smoke test")
    p.add_argument("--contexts", type=int, nargs="+", default=[16384, 32768, 65536, 131072])
    p.add_argument("--switches", nargs="+", default=["plain", "chunk+ckpt"], choices=sorted(SWITCHES))
    p.add_argument("--latents", type=int, default=1024)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--preset", default=None, help="measure a named preset's sizes instead")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--name", default=None, help="results name (default bench_memory[_PRESET])")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.contexts, args.latents, args.width, args.heads, args.layers = [256], 64, 32, 2, 1
        args.preset = None

    rows = []
    for n in args.contexts:
        evaluated: set[bool] = set()
        for sw in args.switches:
            for mode in ("train", "eval"):
                chunked = SWITCHES[sw]["cross_attend_chunk_size"] > 0
                if mode == "eval" and chunked in evaluated:
                    continue  # checkpointing only acts in training: one eval per chunk setting
                if mode == "eval":
                    evaluated.add(chunked)
                cfg = {**base_config(args, n), **SWITCHES[sw]}
                r = run_case(
                    __file__,
                    {"config": cfg, "mode": mode, "threads": args.threads},
                    inline=run_one if args.quick else None,
                )
                label = sw if mode == "train" else ("chunk" if chunked else "plain")
                row = {"N": n, "switches": label, "mode": mode, **r}
                if "peak_rss_mb" in r:
                    row["peak_rss_gb"] = r["peak_rss_mb"] / 1024
                rows.append(row)
                print(
                    f"N={n:>7} {mode:5} {row['switches']:>10}: "
                    + (
                        f"{row['peak_rss_gb']:.2f} GB, {r['seconds']:.1f} s"
                        if "error" not in r
                        else r["error"]
                    ),
                    flush=True,
                )

    cols = [
        ("N", "N", ""),
        ("mode", "mode", ""),
        ("switches", "switches", ""),
        ("peak_rss_gb", "peak RSS (GB)", ".2f"),
        ("seconds", "time (s)", ".1f"),
        ("error", "note", ""),
    ]
    print()
    print(format_table(rows, cols))
    name = args.name or (
        "bench_memory" + (f"_{args.preset}" if args.preset else "") + ("_quick" if args.quick else "")
    )
    save_results(
        name,
        {
            "machine": machine_info(args.threads),
            "args": vars(args),
            "rows": rows,
            "markdown": markdown_table(rows, cols),
        },
    )

    fig, ax = new_figure(figsize=(6, 4))
    for mode, sw in sorted({(r["mode"], r["switches"]) for r in rows}, reverse=True):
        pts = [
            (r["N"], r["peak_rss_gb"])
            for r in rows
            if r["mode"] == mode and r["switches"] == sw and "peak_rss_gb" in r
        ]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=f"{mode}, {sw}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context N")
    ax.set_ylabel("peak RSS (GB)")
    ax.set_title("Peak memory of one step vs N")
    ax.legend()
    ax.grid(alpha=0.3)
    save_figure(fig, name)
    return 0


if __name__ == "__main__":
    script_main(run_one, main)
