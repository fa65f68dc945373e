"""Generation speed: prefill time and decode tokens/s, cached against recomputed.

The default case is the issue's: preset "small" (N=4096, M=512, D=E=512,
8 heads, L=6), batch 1, a 3840-token prompt, 256 new tokens, 2 threads,
greedy. The no-cache path recomputes a full forward every step; it is timed
over its first ``--no-cache-tokens`` steps only (each costs about as much as
the prime), and the ratio compares decode tokens/s. Each path runs in a fresh
process (same seed, so the same weights and prompt): one warm-up generation,
then ``--repeats`` timed ones, medians reported.

    python benchmarks/bench_generate.py --repeats 5                       # batch 1
    python benchmarks/bench_generate.py --batch 4 --no-cache-tokens 4 --repeats 5
    python benchmarks/bench_generate.py --quick                           # seconds, smoke test
"""

from __future__ import annotations

import argparse

from common import (
    format_table,
    machine_info,
    markdown_table,
    median,
    new_figure,
    run_case,
    save_figure,
    save_results,
    script_main,
    set_threads,
)


def run_one(case: dict) -> dict:
    """One path (cached or not) of one configuration: warm-up, then timed generations."""
    import torch

    from perceiver_ar import PerceiverAR, PerceiverARConfig
    from perceiver_ar.generate import generate

    threads = set_threads(case["threads"])
    torch.manual_seed(0)
    cfg = PerceiverARConfig.from_preset(case["config"], final_layer_init_zeros=False)
    model = PerceiverAR(cfg).eval()
    prompt = torch.randint(3, cfg.vocab_size, (case["batch"], case["prompt_len"]))
    new_tokens, use_cache = case["new_tokens"], case["use_cache"]
    generate(model, prompt, min(new_tokens, 4), temperature=0, use_cache=use_cache)  # warm-up
    runs = [
        generate(model, prompt, new_tokens, temperature=0, use_cache=use_cache)
        for _ in range(case["repeats"])
    ]
    return {
        "new_tokens": new_tokens,
        "prefill_s": median([r.prefill_seconds for r in runs]),
        "decode_tok_s": median([r.decode_tokens_per_second for r in runs]),
        "decode_tok_s_runs": [round(r.decode_tokens_per_second, 2) for r in runs],
        "threads": threads,
        "model": {
            "N": cfg.context_len,
            "M": cfg.num_latents,
            "E": cfg.input_dim,
            "D": cfg.latent_dim,
            "L": cfg.num_latent_layers,
            "heads": cfg.latent_heads,
        },
    }


def build_parser() -> argparse.ArgumentParser:
    """The command line (importable: tests/test_docs.py checks documented commands against it)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes, one repeat, in-process (smoke test)")
    p.add_argument("--config", default="small", help="preset name (default: small)")
    p.add_argument("--prompt-len", type=int, default=3840, help="prompt tokens (default: 3840)")
    p.add_argument("--new-tokens", type=int, default=256, help="tokens to generate (default: 256)")
    p.add_argument(
        "--no-cache-tokens", type=int, default=8, help="steps timed on the no-cache path (default: 8)"
    )
    p.add_argument("--batch", type=int, default=1, help="rows generated together (default: 1)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    p.add_argument(
        "--repeats", type=int, default=3, help="timed runs per path, medians reported (default: 3)"
    )
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per case")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.config, args.prompt_len, args.new_tokens = "tiny", 40, 24
        args.no_cache_tokens, args.repeats = 8, 1

    rows = []
    for path, use_cache, new_tokens in (
        ("cached", True, args.new_tokens),
        ("no-cache", False, args.no_cache_tokens),
    ):
        case = {
            "config": args.config,
            "batch": args.batch,
            "prompt_len": args.prompt_len,
            "new_tokens": new_tokens,
            "use_cache": use_cache,
            "repeats": args.repeats,
            "threads": args.threads,
        }
        r = run_case(__file__, case, timeout=args.timeout, inline=run_one if args.quick else None)
        if "error" in r:
            raise SystemExit(f"{path}: {r['error']}")
        rows.append({"path": path, **r})
        print(f"{path}: prefill {r['prefill_s']:.3f} s, decode {r['decode_tok_s']:.2f} tokens/s", flush=True)
    cached, no_cache = rows
    speedup = cached["decode_tok_s"] / no_cache["decode_tok_s"]
    cols = [
        ("path", "path", ""),
        ("new_tokens", "new tokens timed", ""),
        ("prefill_s", "prefill s", ".3f"),
        ("decode_tok_s", "decode tokens/s", ".2f"),
    ]
    info = machine_info(cached["threads"])
    m = cached["model"]
    print(
        f"\n{args.config}: N={m['N']} M={m['M']} E={m['E']} D={m['D']} L={m['L']} batch={args.batch} "
        f"prompt={args.prompt_len} threads={cached['threads']}; medians of {args.repeats}"
    )
    print(format_table(rows, cols))
    print(f"cached / no-cache decode: {speedup:.1f}x")
    name = "bench_generate_quick" if args.quick else "bench_generate"
    save_results(
        name,
        {
            "machine": info,
            "args": vars(args),
            "rows": rows,
            "speedup": speedup,
            "markdown": markdown_table(rows, cols),
        },
    )

    fig, ax = new_figure(figsize=(5, 4))
    bars = ax.bar([r["path"] for r in rows], [r["decode_tok_s"] for r in rows], color=["C0", "C1"])
    for bar, r in zip(bars, rows, strict=True):
        ax.annotate(
            f"{r['decode_tok_s']:.1f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center"
        )
    ax.set_yscale("log")
    ax.set_ylabel("decode tokens/s (log)")
    ax.set_title(f"{args.config}, batch {args.batch}, prompt {args.prompt_len}: {speedup:.1f}x")
    ax.grid(alpha=0.3, axis="y", which="both")
    save_figure(fig, name)
    return 0


if __name__ == "__main__":
    script_main(run_one, main)
