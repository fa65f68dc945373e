"""``perceiver-ar prepare copy``: a data store of copy-task sequences (random bytes, then mirrored)."""

from __future__ import annotations

import argparse

from .checks import nonnegative_int, positive_int


def register(prepare_subparsers: argparse._SubParsersAction) -> None:
    """Add ``copy`` to the subparsers of ``perceiver-ar prepare``."""
    p = prepare_subparsers.add_parser(
        "copy",
        help="generate the copy task: SOS, random bytes, the same bytes mirrored, EOS",
        description="Write a data store of copy-task sequences in the official layout "
        "(SOS, (N-2)/2 random bytes, the same bytes reversed, EOS; every document is N events long).",
    )
    p.add_argument("--length", type=positive_int, required=True, help="events per sequence N (even, >= 4)")
    p.add_argument("--out", required=True, help="the store directory to write")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the data store already at --out (only a data store is ever replaced)",
    )
    p.add_argument(
        "--num-train", type=positive_int, default=10_000, help="training sequences (default 10000)"
    )
    p.add_argument(
        "--num-validation", type=positive_int, default=256, help="validation sequences (default 256)"
    )
    p.add_argument("--seed", type=nonnegative_int, default=0, help="random seed (validation uses seed + 1)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..copy_task import half_length, write_copy_store

    half_length(args.length)  # validates the length before anything is written
    if args.num_train < 1 or args.num_validation < 1:
        raise ValueError("--num-train and --num-validation must be >= 1")
    out = write_copy_store(
        args.out, args.length, args.num_train, args.num_validation, args.seed, overwrite=args.overwrite
    )
    print(
        f"wrote {out}: {args.num_train} train + {args.num_validation} validation copy sequences "
        f"of {args.length} events"
    )
    return 0
