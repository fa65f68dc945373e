"""``perceiver-ar prepare music``: MIDI files or the music21 Bach chorales -> a data store."""

from __future__ import annotations

import argparse

from .checks import fraction, positive_int


def register(prepare_subparsers: argparse._SubParsersAction) -> None:
    """Add ``music`` to the subparsers of ``perceiver-ar prepare``."""
    p = prepare_subparsers.add_parser(
        "music",
        help="MIDI as Music Transformer events (note-on/off, 10 ms time shifts, 32 velocity bins)",
        description="Write a data store of symbolic music: one document per piece, SOS, events, EOS, in "
        "the 388-event vocabulary (128 note-on, 128 note-off, 100 time shifts of 10 ms, 32 velocity "
        "bins; ids event + 3). Pieces are split into train/validation/test by a hash of their name.",
    )
    p.add_argument("paths", nargs="*", help="MIDI files (.mid, .midi) or folders of them")
    p.add_argument("--out", required=True, help="the store directory to write")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the data store already at --out (only a data store is ever replaced)",
    )
    p.add_argument(
        "--corpus",
        choices=("bach", "beethoven", "oneills1850", "ryansMammoth"),
        help="a public-domain subset of the music21 corpus instead of paths (bach: 400+ chorales); "
        "each score is rendered to MIDI once and cached",
    )
    p.add_argument(
        "--default", action="store_true", help="the default data: the music21 Bach chorales (--corpus bach)"
    )
    p.add_argument(
        "--cache-dir", help="where music21 renderings are cached (default ~/.cache/perceiver-ar/music21)"
    )
    p.add_argument(
        "--validation-fraction", type=fraction, default=0.05, help="share of pieces for validation"
    )
    p.add_argument("--test-fraction", type=fraction, default=0.1, help="share of pieces for test")
    p.add_argument("--limit", type=positive_int, help="use only the first this many pieces (quick runs)")
    p.add_argument(
        "--on-error", choices=("stop", "skip"), default="stop", help="on an unreadable file: stop, or skip it"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..modalities.music import prepare_music
    from ..store import TokenStore

    corpus = args.corpus or ("bach" if args.default else None)
    out = prepare_music(
        args.paths,
        args.out,
        corpus=corpus,
        cache_dir=args.cache_dir,
        validation_fraction=args.validation_fraction,
        test_fraction=args.test_fraction,
        limit=args.limit,
        on_error=args.on_error,
        overwrite=args.overwrite,
    )
    meta = TokenStore(out).meta
    counts = ", ".join(
        f"{k} {v['num_docs']} pieces / {v['num_tokens']} events" for k, v in meta["splits"].items()
    )
    print(f"wrote {out}: {counts}")
    return 0
