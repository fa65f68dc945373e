"""Perceiver AR vs a decoder-only Transformer: training-step time and peak memory vs N.

The decoder-only baseline is this library with M = N (every input hosts a
latent), at the same depth and width: one cross-attend plus L latent layers
either way. Perceiver AR keeps M = 1024 latents while N grows from 1,024 to
131,072 (at N = 1,024 the two are the same model). Each (model, N) case runs
in a fresh process, the two models alternate at each N, and the step is
forward + loss + backward + AdamW on one random full row (batch 1).

    python benchmarks/bench_vs_decoder.py           # the paper-style sweep (~15 min here)
    python benchmarks/bench_vs_decoder.py --quick   # seconds, smoke test
"""

from __future__ import annotations

import argparse
import sys

from common import (
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


def run_one(case: dict) -> dict:
    from common import build_model, make_train_step, random_batch

    threads = set_threads(case["threads"])
    cfg = case["config"]
    model = build_model(cfg)
    inputs, targets = random_batch(case["batch"], cfg["context_len"])
    step = make_train_step(model, inputs, targets, num_latents=case["num_latents"])
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
    p.add_argument(
        "--decoder-max",
        type=int,
        default=16384,
        help="largest N tried for the decoder (beyond it a step takes tens of minutes here)",
    )
    p.add_argument("--memory-limit-gb", type=float, default=16.0, help="a case above this does not fit")
    p.add_argument("--timeout", type=float, default=1500.0, help="seconds per case")
    p.add_argument("--threads", type=int, default=2)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.contexts, args.latents, args.width, args.heads, args.layers = [64, 128], 32, 32, 2, 1
        args.repeats, args.decoder_max = 1, 64

    rows = []
    for n in args.contexts:
        row = {"N": n, "M": min(args.latents, n)}
        for model_name, m in (("par", min(args.latents, n)), ("dec", n)):
            if model_name == "dec" and n > args.decoder_max:
                row["dec_note"] = f"not run (N > {args.decoder_max})"
                continue
            # The decoder's step grows with N^2: past 8k a single timed step after the
            # warm-up is all this machine affords.
            repeats = args.repeats if (model_name == "par" or n <= 8192) else 1
            warmup = 1 if (model_name == "par" or n <= 8192) else 0
            cfg = dict(
                context_len=n,
                num_latents=m,
                input_dim=args.width,
                latent_dim=args.width,
                num_latent_layers=args.layers,
                cross_attend_heads=args.heads,
                latent_heads=args.heads,
            )
            case = {
                "config": cfg,
                "num_latents": m,
                "batch": args.batch,
                "repeats": repeats,
                "warmup": warmup,
                "threads": args.threads,
            }
            r = run_case(
                __file__,
                case,
                timeout=args.timeout,
                memory_limit_mb=args.memory_limit_gb * 1024,
                inline=run_one if args.quick else None,
            )
            if "error" in r:
                row[f"{model_name}_note"] = r["error"]
            else:
                row[f"{model_name}_step_s"] = r["step_s"]
                row[f"{model_name}_gb"] = r["peak_rss_mb"] / 1024
                row[f"{model_name}_times"] = r["times"]
                if warmup == 0:
                    row[f"{model_name}_note"] = "1 step, no warm-up"
            print(
                f"N={n:>7} {model_name}: "
                + (
                    f"{r['step_s']:.2f} s/step, {r['peak_rss_mb'] / 1024:.2f} GB"
                    if "error" not in r
                    else r["error"]
                ),
                flush=True,
            )
        if "par_step_s" in row and "dec_step_s" in row:
            row["speedup"] = row["dec_step_s"] / row["par_step_s"]
            row["mem_ratio"] = row["dec_gb"] / row["par_gb"]
        rows.append(row)

    cols = [
        ("N", "N", ""),
        ("M", "M", ""),
        ("par_step_s", "Perceiver AR s/step", ".2f"),
        ("dec_step_s", "decoder s/step", ".2f"),
        ("speedup", "speed-up", ".1f"),
        ("par_gb", "Perceiver AR GB", ".2f"),
        ("dec_gb", "decoder GB", ".2f"),
        ("dec_note", "decoder note", ""),
    ]
    info = machine_info(args.threads)
    print(
        f"\nPerceiver AR (M={args.latents}) vs decoder-only (M=N): E=D={args.width}, {args.heads} heads, "
        f"L={args.layers}, batch {args.batch}, {info['threads']} threads, torch {info['torch']}"
    )
    print(format_table(rows, cols))
    name = "bench_vs_decoder_quick" if args.quick else "bench_vs_decoder"
    save_results(
        name, {"machine": info, "args": vars(args), "rows": rows, "markdown": markdown_table(rows, cols)}
    )

    fig, (ax1, ax2) = new_figure(ncols=2, figsize=(10, 4))
    for key, label in (("par", f"Perceiver AR (M={args.latents})"), ("dec", "decoder-only (M=N)")):
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
    case = case_argument()
    if case is not None:
        report_case(run_one(case))
    else:
        sys.exit(main())
