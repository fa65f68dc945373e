"""``perceiver-ar render``: a model's metric and generated files in its data's modality."""

from __future__ import annotations

import argparse
import sys

from .checks import (
    NO_VERIFY_HELP,
    load_model,
    nonnegative_float,
    nonnegative_int,
    positive_int,
    probability_mass,
)


def register(sub: argparse._SubParsersAction) -> None:
    from ..generate import DEFAULT_TEMPERATURE
    from ..runtime import INFERENCE_PRECISION_HELP

    p = sub.add_parser(
        "render",
        help="score a model on an image/music/audio store and write samples as PNG, MIDI or WAV",
        description="For a store made by `perceiver-ar prepare image|music|audio`: report the modality's "
        "metric on a held-out split (bits/dim, bits and nats per event, bits per sample; block protocol) "
        "and write generated files: a PNG grid of samples and top-half completions; MIDI continuations of "
        "held-out pieces with piano rolls; WAV continuations of a test file with spectrograms.",
    )
    p.add_argument("model", help="a model directory, or a run directory holding model/")
    p.add_argument("--data", required=True, help="the store the model was trained on")
    p.add_argument("--out", required=True, help="folder for the generated files and render.json")
    p.add_argument("--split", default="test", help="held-out split to score (default test)")
    p.add_argument(
        "--max-tokens", type=positive_int, help="score only the first this many targets of the split"
    )
    p.add_argument(
        "--num-latents", type=positive_int, help="latents per evaluation forward (default: the model's)"
    )
    p.add_argument("--no-score", action="store_true", help="skip the metric")
    p.add_argument("--no-samples", action="store_true", help="skip generation")
    p.add_argument(
        "--num-samples", type=positive_int, default=8, help="samples/continuations to generate (default 8)"
    )
    p.add_argument(
        "--temperature",
        type=nonnegative_float,
        default=DEFAULT_TEMPERATURE,
        help=f"softmax temperature; 0 is greedy (default {DEFAULT_TEMPERATURE:g}, the library's)",
    )
    p.add_argument("--top-k", type=positive_int, default=None, help="draw only from the k most likely tokens")
    p.add_argument(
        "--top-p",
        type=probability_mass,
        default=None,
        help="draw only from the smallest set holding p of the mass",
    )
    p.add_argument(
        "--seed",
        type=nonnegative_int,
        default=0,
        help="sampling seed (default 0): image samples use it, completions seed+1, music piece n seed+n",
    )
    p.add_argument("--no-verify", action="store_true", help=NO_VERIFY_HELP)
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    p.add_argument("--precision", default="auto", help=INFERENCE_PRECISION_HELP)
    p.set_defaults(func=run, must_exist={"model": ("model", "dir"), "data": ("--data", "dir")})


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..files import write_json
    from ..render import check_render_output, render, score
    from ..runtime import setup_runtime
    from ..store import TokenStore

    # Scoring and generation run in the runtime's precision (the model cast to
    # it: bf16 on a CUDA GPU, fp32 on the CPU by default), as eval and generate.
    rt = setup_runtime(args.device, args.precision)
    check_render_output(args.out, [args.model, args.data])
    model = load_model(args.model, rt, verify=not args.no_verify)
    store = TokenStore(args.data)
    if not args.no_score:
        result = score(
            model,
            store,
            args.split,
            num_latents=args.num_latents,
            max_tokens=args.max_tokens,
        )
        Path(args.out).mkdir(parents=True, exist_ok=True)  # only once there is something to write
        write_json(Path(args.out) / "score.json", result)
        extra = f" ({result['nll_per_event_nats']:.4f} nats)" if "nll_per_event_nats" in result else ""
        print(
            f"{result['modality']} {args.split}: {result['metric']} {result[result['metric']]:.4f}{extra} "
            f"over {result['num_tokens']:,} targets, {result['seconds']:.1f} s"
        )
    if not args.no_samples:
        out = render(
            model,
            args.data,
            args.out,
            num_samples=args.num_samples,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
        )
        for name in out["files"].values():
            print(f"wrote {name}")
    return 0


if __name__ == "__main__":  # python -m perceiver_ar.commands.render MODEL --data DIR --out DIR
    import sys

    parser = argparse.ArgumentParser(prog="perceiver-ar")
    register(parser.add_subparsers(required=True))
    parsed = parser.parse_args(["render", *sys.argv[1:]])
    sys.exit(parsed.func(parsed))
