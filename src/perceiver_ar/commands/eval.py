"""``perceiver-ar eval``: validation bits per token / per byte of a run or a model directory."""

from __future__ import annotations

import argparse
from pathlib import Path

from .checks import NO_VERIFY_HELP, load_model, nonnegative_float, nonnegative_int, positive_int


def register(sub: argparse._SubParsersAction) -> None:
    from ..generate import DEFAULT_TEMPERATURE
    from ..runtime import INFERENCE_PRECISION_HELP

    p = sub.add_parser(
        "eval",
        help="evaluate a model on a data store (bits per token and per byte)",
        description="Score every target of a split. block (the official protocol): blocks of B <= M "
        "targets, each scored by one forward over the <= N tokens before it, so every token sees at "
        "least N - B + 1 tokens of context. stride1: one forward per token with full context (exact, "
        "slow). Prints the unigram baseline of the train split next to the result. "
        "Example: perceiver-ar eval runs/demo --data data/shakespeare",
    )
    p.add_argument("model", help="a run directory (its model/ is used) or a model directory")
    p.add_argument("--data", required=True, help="the data store (written by `perceiver-ar prepare`)")
    p.add_argument("--split", default="validation", help="the split to score (default: validation)")
    p.add_argument("--protocol", choices=("block", "stride1"), default="block", help="evaluation protocol")
    p.add_argument("--num-latents", type=positive_int, help="latents per forward (default: the model's M)")
    p.add_argument(
        "--block-size", type=positive_int, help="targets per forward in the block protocol (<= num latents)"
    )
    p.add_argument(
        "--max-tokens", type=positive_int, help="score only about this many targets (documents in order)"
    )
    p.add_argument("--batch-size", type=positive_int, default=8, help="rows per forward")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    p.add_argument("--precision", default="auto", help=INFERENCE_PRECISION_HELP)
    p.add_argument(
        "--json",
        metavar="FILE",
        help="also write the result as JSON to FILE (a new file, or one eval wrote)",
    )
    p.add_argument("--no-verify", action="store_true", help=NO_VERIFY_HELP)
    p.add_argument(
        "--sample",
        type=nonnegative_int,
        default=0,
        metavar="TOKENS",
        help="then print a sample of this many tokens",
    )
    p.add_argument("--prompt", help="the sample's prompt (default: the start of the first scored document)")
    p.add_argument(
        "--temperature",
        type=nonnegative_float,
        default=DEFAULT_TEMPERATURE,
        help=f"the sample's softmax temperature; 0 is greedy (default {DEFAULT_TEMPERATURE:g})",
    )
    p.set_defaults(
        func=run,
        must_exist={"model": ("model", "dir"), "data": ("--data", "dir"), "json": ("--json", "new file")},
    )


def run(args: argparse.Namespace) -> int:
    from ..evaluate import evaluate_store
    from ..files import write_json
    from ..runtime import setup_runtime
    from ..store import TokenStore

    rt = setup_runtime(args.device, args.precision)  # auto: bf16 on a CUDA GPU, fp32 on the CPU
    if args.json:
        check_result_file(Path(args.json))
    model = load_model(args.model, rt, verify=not args.no_verify)
    result = evaluate_store(
        model,
        args.data,
        split=args.split,
        protocol=args.protocol,
        num_latents=args.num_latents,
        block_size=args.block_size,
        max_tokens=args.max_tokens,
        batch_size=args.batch_size,
        progress=True,
    )
    print(
        f"{args.split}: {result['num_tokens']:,} tokens, protocol {result['protocol']} "
        f"(N={result['context_len']}, M={result['num_latents']}, B={result['block_size']}), "
        f"{result['seconds']:.1f} s"
    )
    print(f"  model:   {result['bits_per_token']:.4f} bits/token", end="")
    print(f"  {result['bits_per_byte']:.4f} bits/byte" if "bits_per_byte" in result else "")
    if "unigram_bits_per_token" in result:
        print(f"  unigram: {result['unigram_bits_per_token']:.4f} bits/token", end="")
        print(
            f"  {result['unigram_bits_per_byte']:.4f} bits/byte" if "unigram_bits_per_byte" in result else ""
        )
    if args.json:
        write_json(Path(args.json), result)
    if args.sample > 0:
        store = TokenStore(args.data)
        print_sample(model, store, args)
    return 0


def check_result_file(path: Path) -> None:
    """--json names a new file or one eval wrote before (a JSON object with "bits_per_token")."""
    from ..files import read_json

    if path.exists():
        old = read_json(path)
        if not (isinstance(old, dict) and "bits_per_token" in old):
            raise ValueError(f"--json {path} exists and is not an eval result: choose another file")


def print_sample(model, store, args: argparse.Namespace) -> None:
    """Continue a prompt (or the first 64 tokens of the first scored document) and print the text."""
    import numpy as np
    import torch

    from ..generate import generate
    from ..tokenizer import tokenizer_from_dict
    from ..vocab import SOS_ID

    if "tokenizer" not in store.meta:
        raise ValueError(f"{store.dir} has no tokenizer in meta.json: cannot print a text sample")
    tok = tokenizer_from_dict(store.meta["tokenizer"])
    if args.prompt is not None:
        prompt = np.asarray([SOS_ID, *tok.encode(args.prompt)], dtype=np.int64)
    else:
        prompt = np.asarray(store.split(args.split)[0][:64], dtype=np.int64)
    device = next(model.parameters()).device
    out = generate(
        model,
        torch.from_numpy(prompt).to(device)[None],
        args.sample,
        temperature=args.temperature,
        seed=0,
        stop_tokens=[1],
    )
    n = int(out.num_generated[0])
    print("--- sample (prompt in [brackets]) ---")
    print(f"[{tok.decode(prompt.tolist())}]{tok.decode(out.tokens[0, :n].tolist())}")
