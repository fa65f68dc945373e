"""``perceiver-ar prepare image``: image files or Fashion-MNIST/digits -> a data store."""

from __future__ import annotations

import argparse

from .checks import fraction, positive_int


def register(prepare_subparsers: argparse._SubParsersAction) -> None:
    """Add ``image`` to the subparsers of ``perceiver-ar prepare``."""
    p = prepare_subparsers.add_parser(
        "image",
        help="images (PNG/JPEG folders, .npy/.npz, Fashion-MNIST, digits) as raster-order subpixels",
        description="Write a data store of images: one document per image, SOS then its subpixels "
        "in raster order (R, G, B of each pixel in turn; grey: one per pixel), 256 levels with ids "
        "level + 3. Folders are split into train/validation/test by a hash of each file path.",
    )
    p.add_argument(
        "paths", nargs="*", help="image files (PNG, JPEG, ...), .npy/.npz arrays, or folders of them"
    )
    p.add_argument("--out", required=True, help="the store directory to write")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the data store already at --out (only a data store is ever replaced)",
    )
    p.add_argument(
        "--dataset",
        choices=("fashion-mnist", "digits"),
        help="a built-in data set instead of paths: fashion-mnist (70,000 28x28 grey images, Debian "
        "package dataset-fashion-mnist) or digits (scikit-learn's 1,797 8x8 digits, a smoke set)",
    )
    p.add_argument(
        "--idx-dir",
        help="folder holding the Fashion-MNIST IDX files (default /usr/share/datasets/fashion-mnist)",
    )
    p.add_argument(
        "--size", help="height x width every image is brought to, e.g. 32 or 32x48 (required for paths)"
    )
    p.add_argument("--channels", type=int, choices=(1, 3), help="1 (grey) or 3 (RGB, the default for paths)")
    p.add_argument(
        "--fit",
        choices=("resize", "crop"),
        default="resize",
        help="resize, or scale and centre-crop to --size",
    )
    p.add_argument(
        "--positions",
        choices=("axes", "flat"),
        default="axes",
        help="positions the trainer feeds: axes = (row, column, channel) for the official summed absolute "
        "tables (train with --model.position_encoding absolute); flat = 1..length, for rotary",
    )
    p.add_argument("--validation-fraction", type=fraction, default=0.05, help="share of files for validation")
    p.add_argument("--test-fraction", type=fraction, default=0.1, help="share of files for test")
    p.add_argument("--limit", type=positive_int, help="at most this many images per split (quick runs)")
    p.add_argument(
        "--on-error", choices=("stop", "skip"), default="stop", help="on an unreadable file: stop, or skip it"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..modalities.images import parse_size, prepare_images
    from ..store import TokenStore

    out = prepare_images(
        args.paths,
        args.out,
        dataset=args.dataset,
        idx_dir=args.idx_dir,
        size=parse_size(args.size) if args.size else None,
        channels=args.channels,
        fit=args.fit,
        validation_fraction=args.validation_fraction,
        test_fraction=args.test_fraction,
        limit=args.limit,
        positions=args.positions,
        on_error=args.on_error,
        overwrite=args.overwrite,
    )
    meta = TokenStore(out).meta
    counts = ", ".join(f"{k} {v['num_docs']}" for k, v in meta["splits"].items())
    print(f"wrote {out}: images of shape {meta['image_shape']} (H, W, C); {counts}")
    return 0
