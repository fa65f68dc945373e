"""``perceiver-ar prepare audio``: WAV files or the asterisk music -> a data store of mu-law samples."""

from __future__ import annotations

import argparse

from .checks import fraction, positive_float


def register(prepare_subparsers: argparse._SubParsersAction) -> None:
    """Add ``audio`` to the subparsers of ``perceiver-ar prepare``."""
    p = prepare_subparsers.add_parser(
        "audio",
        help="WAV as 8-bit mu-law samples (256 levels), at the file's rate or resampled",
        description="Write a data store of raw audio: one document per file, SOS, mono 8-bit mu-law "
        "samples (ids level + 3), EOS. Files are split into train/validation/test as wholes.",
    )
    p.add_argument("paths", nargs="*", help="WAV files (integer PCM) or folders of them")
    p.add_argument("--out", required=True, help="the store directory to write")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the data store already at --out (only a data store is ever replaced)",
    )
    p.add_argument(
        "--default",
        action="store_true",
        help="the default data: 18 min of 8 kHz music from the Debian package asterisk-moh-opsound-wav "
        "(4 files train, 1 test)",
    )
    p.add_argument(
        "--rate",
        default="8000",
        help="sample rate to resample to, in Hz (default 8000), or 'file' to keep each file's rate",
    )
    p.add_argument("--validation-fraction", type=fraction, default=0.0, help="share of files for validation")
    p.add_argument("--test-fraction", type=fraction, default=0.2, help="share of files for test")
    p.add_argument(
        "--max-seconds", type=positive_float, help="keep only the first this many seconds of each file"
    )
    p.add_argument(
        "--on-error", choices=("stop", "skip"), default="stop", help="on an unreadable file: stop, or skip it"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..modalities.audio import prepare_audio
    from ..store import TokenStore

    if args.rate == "file":
        rate = None
    else:
        try:
            rate = int(args.rate)
        except ValueError:
            raise ValueError(f"--rate must be a number of Hz or 'file', got {args.rate!r}") from None
        if rate < 1:
            raise ValueError(f"--rate must be positive, got {rate}")
    out = prepare_audio(
        args.paths,
        args.out,
        default=args.default,
        rate=rate,
        validation_fraction=args.validation_fraction,
        test_fraction=args.test_fraction,
        max_seconds=args.max_seconds,
        on_error=args.on_error,
        overwrite=args.overwrite,
    )
    meta = TokenStore(out).meta
    rate_hz = meta["sample_rate"]
    counts = ", ".join(
        f"{k} {v['num_docs']} files / {v['num_tokens'] / rate_hz:.1f} s" for k, v in meta["splits"].items()
    )
    print(f"wrote {out}: mu-law at {rate_hz} Hz; {counts}")
    return 0
