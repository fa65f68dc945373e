"""Images as token sequences: raster order, subpixels interleaved, 256 levels.

A document is ``[SOS, s_1, ..., s_{H*W*C}]`` where the subpixels run row by
row, pixel by pixel, and for colour images R, G, B of each pixel in turn
(grey images have one subpixel per pixel). Level v has the official id v + 3,
so V = 259 as for bytes. There is no EOS: every image of a store has the same
shape, recorded in ``meta["image_shape"]`` = [H, W, C].

Positions: rotary over the flat sequence works as for text; the official
image option sums three absolute tables (row, column, channel), for which
``image_positions`` gives the [length, 3] indices of any crop of a document
(1-based per axis; the SOS token sits at (0, 0, 0)). Both rules live in
``perceiver_ar.data``, which cuts the training crops, and are named here too.

Sources: a folder of PNG/JPEG files or .npy/.npz arrays (resized or cropped
to a stated size), Fashion-MNIST from its gzipped IDX files (Debian package
``dataset-fashion-mnist``), and scikit-learn's 8x8 digits as a smoke set.
"""

from __future__ import annotations

import gzip
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

# The position rule lives with the batches that use it (data.py); named here too.
from ..samplers import IMAGE_POSITION_KINDS as POSITION_KINDS
from ..samplers import crop_positions as crop_positions
from ..samplers import image_positions as image_positions
from ..store import StoreWriter, check_store_output
from ..vocab import SOS_ID, TOKEN_OFFSET
from . import assign_splits, describe, find_files, handle_bad_file, split_keys

VOCAB_SIZE = 256 + TOKEN_OFFSET
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
ARRAY_SUFFIXES = (".npy", ".npz")
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "train": "train-images-idx3-ubyte.gz",
    "test": "t10k-images-idx3-ubyte.gz",
}


# ----------------------------------------------------------------------------
# Tokens <-> pixels
# ----------------------------------------------------------------------------


def as_hwc(image: np.ndarray) -> np.ndarray:
    """An image as uint8 [H, W, C]; a 2-D array is grey (C = 1)."""
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3):
        raise ValueError(f"an image must be [H, W], [H, W, 1] or [H, W, 3], got shape {arr.shape}")
    if arr.dtype != np.uint8:
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise ValueError(f"pixel values must lie in 0..255, got {arr.min()}..{arr.max()}")
        arr = arr.astype(np.uint8)
    return arr


def image_to_tokens(image: np.ndarray) -> np.ndarray:
    """[SOS, subpixel ids...] of one image, raster order with channels interleaved."""
    flat = as_hwc(image).reshape(-1).astype(np.int64)  # row-major: (row, column, channel)
    return np.concatenate([[SOS_ID], flat + TOKEN_OFFSET])


def tokens_to_image(tokens: np.ndarray, shape: tuple[int, int, int], fill: int = 0) -> np.ndarray:
    """The image [H, W, C] of a document or of its data ids alone.

    A leading SOS is dropped; special ids become ``fill``; a short sequence
    (a partial generation) leaves the remaining subpixels at ``fill``.
    """
    ids = np.asarray(tokens, dtype=np.int64).reshape(-1)
    if ids.size and ids[0] == SOS_ID:
        ids = ids[1:]
    H, W, C = shape
    n = H * W * C
    if ids.size > n:
        raise ValueError(f"{ids.size} subpixels do not fit an image of shape {tuple(shape)}")
    values = np.where(ids >= TOKEN_OFFSET, ids - TOKEN_OFFSET, fill).clip(0, 255)
    out = np.full(n, fill, dtype=np.uint8)
    out[: values.size] = values
    return out.reshape(H, W, C)


def position_table_sizes(shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """Rows of the row, column and channel tables for images of ``shape``."""
    H, W, C = shape
    return (H + 1, W + 1, C + 1)


# ----------------------------------------------------------------------------
# Reading images
# ----------------------------------------------------------------------------


def fit_image(img: Any, size: tuple[int, int], channels: int, fit: str) -> np.ndarray:
    """A PIL image converted to ``channels`` and brought to size (H, W) by resize or centre crop."""
    from PIL import Image

    img = img.convert("L" if channels == 1 else "RGB")
    H, W = size
    if fit == "resize":
        img = img.resize((W, H), Image.Resampling.BICUBIC)
    elif fit == "crop":
        # Scale the short side to fit, then take the centre.
        scale = max(H / img.height, W / img.width)
        new = (max(W, round(img.width * scale)), max(H, round(img.height * scale)))
        img = img.resize(new, Image.Resampling.BICUBIC)
        left, top = (img.width - W) // 2, (img.height - H) // 2
        img = img.crop((left, top, left + W, top + H))
    else:
        raise ValueError(f"fit must be 'resize' or 'crop', got {fit!r}")
    return as_hwc(np.asarray(img))


def array_to_pil(arr: np.ndarray) -> Any:
    from PIL import Image

    a = np.asarray(arr)
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[2] not in (1, 3):
        a = a.transpose(1, 2, 0)  # CHW -> HWC
    if a.dtype != np.uint8:
        if a.size and a.min() >= 0 and a.max() <= 1.0 and np.issubdtype(a.dtype, np.floating):
            a = a * 255.0  # floats in [0, 1]
        a = np.clip(np.rint(a), 0, 255).astype(np.uint8)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim not in (2, 3):
        raise ValueError(f"an image array must be [H, W] or [H, W, C], got shape {a.shape}")
    return Image.fromarray(a)


def read_image_file(path: Path, size: tuple[int, int], channels: int, fit: str) -> list[np.ndarray]:
    """The images of one file: one for PNG/JPEG, one or a stack [N, H, W(, C)] for .npy/.npz."""
    suffix = path.suffix.lower()
    if suffix in ARRAY_SUFFIXES:
        if suffix == ".npy":
            arrays = [np.load(path, allow_pickle=False)]
        else:
            with np.load(path, allow_pickle=False) as z:
                arrays = [z[k] for k in z.files]
        out = []
        for a in arrays:
            # A 2-D array, or a 3-D one ending in 1 or 3 channels, is one
            # image; anything with a leading batch axis is a stack.
            single = a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (1, 3) and a.shape[0] > 3)
            for item in [a] if single else list(a):
                out.append(fit_image(array_to_pil(item), size, channels, fit))
        return out
    from PIL import Image

    with Image.open(path) as img:
        img.load()
        return [fit_image(img, size, channels, fit)]


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An IDX file (the MNIST format), gzipped or not, as a numpy array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    dtype_code, ndim = data[2], data[3]
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if dtype_code not in dtypes:
        raise ValueError(f"{path} has an unknown IDX element type 0x{dtype_code:02x}")
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=dtypes[dtype_code], offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ValueError(f"{path} is truncated: {body.size} values for shape {dims}")
    return body.reshape(dims)


def fashion_mnist(idx_dir: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
    """Fashion-MNIST images {"train": [60000, 28, 28], "test": [10000, 28, 28]} uint8."""
    directory = Path(idx_dir) if idx_dir else FASHION_MNIST_DIR
    out = {}
    for split, name in FASHION_MNIST_FILES.items():
        candidates = [directory / name, directory / name.removesuffix(".gz")]
        path = next((c for c in candidates if c.is_file()), None)
        if path is None:
            raise FileNotFoundError(
                f"Fashion-MNIST not found: {candidates[0]} is missing. Install it with "
                "`apt-get install dataset-fashion-mnist`, or pass --idx-dir DIR pointing at a folder "
                f"that holds {FASHION_MNIST_FILES['train']} and {FASHION_MNIST_FILES['test']}"
            )
        out[split] = read_idx(path).astype(np.uint8)
    return out


def digits() -> np.ndarray:
    """scikit-learn's 1,797 8x8 digits, levels 0..16 stretched to 0..255 (uint8 [N, 8, 8])."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ValueError(
            "the digits smoke set needs scikit-learn: pip install scikit-learn (or perceiver-ar[images])"
        ) from None
    images = load_digits().images  # float 0..16
    return np.rint(images * (255.0 / 16.0)).astype(np.uint8)


# ----------------------------------------------------------------------------
# Preparing a store
# ----------------------------------------------------------------------------


def parse_size(text: str) -> tuple[int, int]:
    """'28' -> (28, 28); '32x48' -> (32, 48) as (H, W)."""
    parts = text.lower().replace("*", "x").split("x")
    try:
        nums = [int(p) for p in parts]
    except ValueError:
        nums = []
    if len(nums) == 1:
        nums = nums * 2
    if len(nums) != 2 or min(nums) < 1:
        raise ValueError(f"--size must look like 28 or 32x48 (height x width), got {text!r}")
    return nums[0], nums[1]


def image_meta(shape: tuple[int, int, int], source: str, positions: str = "axes") -> dict[str, Any]:
    if positions not in POSITION_KINDS:
        raise ValueError(f"positions must be one of {POSITION_KINDS}, got {positions!r}")
    return {
        "modality": "image",
        "vocabulary": {"type": "image", "vocab_size": VOCAB_SIZE, "levels": 256},
        "image_shape": list(shape),
        "image_positions": positions,
        "sos": True,
        "eos": False,
        "source": source,
    }


def _write_arrays(
    out: str | os.PathLike, arrays: dict[str, Iterator[np.ndarray]], shape, source, positions, overwrite: bool
) -> Path:
    with StoreWriter(out, VOCAB_SIZE, image_meta(shape, source, positions), overwrite=overwrite) as writer:
        for split, images in arrays.items():
            for img in images:
                writer.add(split, image_to_tokens(img))
        return writer.close()


def prepare_images(
    paths: list[str | os.PathLike] | None,
    out: str | os.PathLike,
    *,
    dataset: str | None = None,
    idx_dir: str | os.PathLike | None = None,
    size: tuple[int, int] | None = None,
    channels: int | None = None,
    fit: str = "resize",
    validation_fraction: float = 0.05,
    test_fraction: float = 0.1,
    limit: int | None = None,
    positions: str = "axes",
    on_error: str = "stop",
    overwrite: bool = False,
) -> Path:
    """Write an image store from files/folders or a named data set.

    ``dataset`` is "fashion-mnist" (train 60,000 minus the last 2,000 kept as
    valid; test 10,000) or "digits" (split by index). Folders are split by a
    hash of each file's path; ``limit`` caps the images per split.
    ``positions`` is "axes" (per-axis absolute tables) or "flat" (rotary).
    ``overwrite``: replace an existing store at ``out`` (see ``store.check_store_output``).
    """
    image_meta((1, 1, 1), "", positions)  # checks ``positions`` before any work
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels}")

    def capped(a: np.ndarray) -> np.ndarray:
        return a if limit is None else a[:limit]

    if dataset is not None:
        if paths:
            raise ValueError("give either input paths or --dataset, not both")
        if size is not None or channels == 3:
            raise ValueError(f"--dataset {dataset} has a fixed size and is grey; leave out --size/--channels")
        check_store_output(out, [], overwrite)  # before the data set is read
        if dataset == "fashion-mnist":
            data = fashion_mnist(idx_dir)
            train, test = data["train"], data["test"]
            arrays = {
                "train": capped(train[:-2000]),
                "validation": capped(train[-2000:]),
                "test": capped(test),
            }
            return _write_arrays(out, arrays, (28, 28, 1), "fashion-mnist", positions, overwrite)
        if dataset == "digits":
            imgs = digits()
            n_test, n_validation = len(imgs) // 10, len(imgs) // 20
            arrays = {
                "train": capped(imgs[: len(imgs) - n_test - n_validation]),
                "validation": capped(imgs[len(imgs) - n_test - n_validation : len(imgs) - n_test]),
                "test": capped(imgs[len(imgs) - n_test :]),
            }
            return _write_arrays(out, arrays, (8, 8, 1), "sklearn-digits", positions, overwrite)
        raise ValueError(f"unknown image data set {dataset!r}; choose fashion-mnist or digits")

    if not paths:
        raise ValueError("give image files or folders, or --dataset fashion-mnist|digits")
    if size is None:
        raise ValueError("--size is required for image folders (for example --size 32 or --size 32x48)")
    channels = channels or 3
    files = find_files(list(paths), IMAGE_SUFFIXES + ARRAY_SUFFIXES, "image files (PNG, JPEG, .npy, .npz)")
    keys = split_keys(files)
    splits = assign_splits(list(keys.values()), validation_fraction, test_fraction)
    shape = (size[0], size[1], channels)
    inputs = [*paths, *files]
    meta = image_meta(shape, "files", positions)
    with StoreWriter(out, VOCAB_SIZE, meta, overwrite=overwrite, inputs=inputs) as writer:
        counts = {"train": 0, "validation": 0, "test": 0}
        for f in files:
            split = splits[keys[f]]
            if limit is not None and counts[split] >= limit:
                continue
            try:
                images = read_image_file(f, size, channels, fit)
            except Exception as e:  # PIL raises many kinds for broken files
                handle_bad_file(f, f"not a readable image ({describe(e)})", on_error)
                continue
            for img in images:
                writer.add(split, image_to_tokens(img))
                counts[split] += 1
        return writer.close()


# ----------------------------------------------------------------------------
# Pictures
# ----------------------------------------------------------------------------


def save_grid(
    images: list[np.ndarray] | np.ndarray,
    path: str | os.PathLike,
    ncols: int = 8,
    scale: int = 4,
    pad: int = 1,
) -> Path:
    """Write images [N, H, W(, C)] as one PNG grid, each pixel ``scale`` x ``scale``."""
    from PIL import Image

    imgs = [as_hwc(i) for i in images]
    if not imgs:
        raise ValueError("no images to draw")
    H, W, C = imgs[0].shape
    ncols = max(1, min(ncols, len(imgs)))
    nrows = (len(imgs) + ncols - 1) // ncols
    cell_h, cell_w = H * scale + pad, W * scale + pad
    canvas = np.full((nrows * cell_h + pad, ncols * cell_w + pad, C), 128, dtype=np.uint8)
    for n, img in enumerate(imgs):
        r, c = divmod(n, ncols)
        big = img.repeat(scale, axis=0).repeat(scale, axis=1)
        canvas[
            pad + r * cell_h : pad + r * cell_h + H * scale, pad + c * cell_w : pad + c * cell_w + W * scale
        ] = big
    Image.fromarray(canvas[:, :, 0] if C == 1 else canvas).save(path, optimize=True)
    return Path(path)
