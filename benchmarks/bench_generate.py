"""Generation speed: prefill time and decode tokens/s, cached against recomputed.

The default case is the issue's: preset "small" (N=4096, M=512, D=E=512,
8 heads, L=6), batch 1, a 3840-token prompt, 256 new tokens, 2 threads,
greedy. The no-cache path recomputes a full forward every step; it is timed
over its first ``--no-cache-tokens`` steps only (each costs about as much as
the prime), and the ratio compares decode tokens/s.

    python benchmarks/bench_generate.py [--quick] [--config small] [--prompt-len 3840] ...
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from perceiver_ar import PerceiverAR, PerceiverARConfig  # noqa: E402
from perceiver_ar.generate import generate  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "generate.json"


def measure(model: PerceiverAR, prompt: torch.Tensor, new_tokens: int, use_cache: bool, repeats: int) -> dict:
    """Median prefill seconds and decode tokens/s over ``repeats`` runs (after one warm-up)."""
    generate(model, prompt, min(new_tokens, 4), temperature=0, use_cache=use_cache)  # warm-up
    runs = [generate(model, prompt, new_tokens, temperature=0, use_cache=use_cache) for _ in range(repeats)]
    return {
        "new_tokens": new_tokens,
        "prefill_s": statistics.median(r.prefill_seconds for r in runs),
        "decode_tok_s": statistics.median(r.decode_tokens_per_second for r in runs),
        "decode_tok_s_runs": [round(r.decode_tokens_per_second, 2) for r in runs],
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick", action="store_true", help="tiny sizes, one repeat (the test suite's smoke test)"
    )
    ap.add_argument("--config", default="small", help="preset name (default: small)")
    ap.add_argument("--prompt-len", type=int, default=3840, help="prompt tokens (default: 3840)")
    ap.add_argument("--new-tokens", type=int, default=256, help="tokens to generate (default: 256)")
    ap.add_argument("--no-cache-tokens", type=int, default=8, help="steps timed on the no-cache path")
    ap.add_argument("--batch", type=int, default=1, help="rows generated together (default: 1)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per path; medians are reported")
    ap.add_argument("--no-save", action="store_true", help="do not write benchmarks/results/generate.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.config, args.prompt_len, args.new_tokens = "tiny", 40, 24
        args.no_cache_tokens, args.repeats, args.no_save = 8, 1, True

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = PerceiverARConfig.from_preset(args.config, final_layer_init_zeros=False)
    model = PerceiverAR(cfg).eval()
    prompt = torch.randint(3, cfg.vocab_size, (args.batch, args.prompt_len))
    cached = measure(model, prompt, args.new_tokens, True, args.repeats)
    no_cache = measure(model, prompt, args.no_cache_tokens, False, args.repeats)
    result = {
        "config": args.config,
        "N": cfg.context_len,
        "M": cfg.num_latents,
        "E": cfg.input_dim,
        "D": cfg.latent_dim,
        "L": cfg.num_latent_layers,
        "heads": cfg.latent_heads,
        "batch": args.batch,
        "prompt_len": args.prompt_len,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cached": cached,
        "no_cache": no_cache,
        "speedup": cached["decode_tok_s"] / no_cache["decode_tok_s"],
    }
    print(
        f"{args.config}: N={cfg.context_len} M={cfg.num_latents} E={cfg.input_dim} D={cfg.latent_dim} "
        f"L={cfg.num_latent_layers} batch={args.batch} prompt={args.prompt_len} threads={result['threads']}"
    )
    print(f"  prefill (prime)      {cached['prefill_s']:.3f} s")
    print(f"  cached decode        {cached['decode_tok_s']:.1f} tokens/s over {args.new_tokens} tokens")
    print(
        f"  no-cache decode      {no_cache['decode_tok_s']:.2f} tokens/s over {args.no_cache_tokens} tokens"
    )
    print(f"  cached / no-cache    {result['speedup']:.1f}x")
    if not args.no_save:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(result, indent=2) + "\n")
        print(f"  wrote {RESULTS}")
    return result


if __name__ == "__main__":
    main()
