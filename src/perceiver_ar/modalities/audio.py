"""Raw audio as 8-bit mu-law samples (256 levels, official ids = level + 3).

A document is one file: ``[SOS, sample ids..., EOS]``, mono, at the file's
rate or resampled (8 kHz by default). WAV files are read with Python's
``wave`` module (integer PCM of 1-4 bytes a sample; channels are averaged)
and written back as 16-bit PCM. The default data is the 18 minutes of 8 kHz
music in the Debian package ``asterisk-moh-opsound-wav``, split by file.
"""

from __future__ import annotations

import os
import wave
from pathlib import Path
from typing import Any

import numpy as np

from ..store import StoreWriter, check_store_output
from ..vocab import EOS_ID, SOS_ID, TOKEN_OFFSET
from . import assign_splits, find_files, handle_bad_file, split_keys

MU = 255
LEVELS = MU + 1
VOCAB_SIZE = LEVELS + TOKEN_OFFSET
DEFAULT_RATE = 8000
WAV_SUFFIXES = (".wav", ".wave")
ASTERISK_DIR = Path("/usr/share/asterisk/moh")
# The shortest track (73 s of 18 min) is the test file; the rest train.
ASTERISK_TEST_FILE = "manolo_camp-morning_coffee.wav"


# ----------------------------------------------------------------------------
# mu-law
# ----------------------------------------------------------------------------


def mu_law_encode(x: np.ndarray) -> np.ndarray:
    """Samples in [-1, 1] -> levels 0..255 (uint8), mu = 255, rounding in the companded domain."""
    x = np.clip(np.asarray(x, dtype=np.float64), -1.0, 1.0)
    y = np.sign(x) * np.log1p(MU * np.abs(x)) / np.log1p(MU)  # [-1, 1]
    return np.rint((y + 1.0) * (MU / 2.0)).astype(np.uint8)


def mu_law_decode(levels: np.ndarray) -> np.ndarray:
    """Levels 0..255 -> samples in [-1, 1] (float32)."""
    y = np.asarray(levels, dtype=np.float64) * (2.0 / MU) - 1.0
    return (np.sign(y) * np.expm1(np.abs(y) * np.log1p(MU)) / MU).astype(np.float32)


# ----------------------------------------------------------------------------
# WAV files
# ----------------------------------------------------------------------------


def read_wav(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """Mono float32 samples in [-1, 1] and the sample rate of an integer-PCM WAV file.

    Raises ValueError naming the file for what ``wave`` cannot read (float
    or compressed WAV) and for unsupported sample widths.
    """
    try:
        with wave.open(str(path), "rb") as w:
            channels, width, rate, n = w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()
            raw = w.readframes(n)
    except (wave.Error, EOFError) as e:
        raise ValueError(
            f"{path}: not a WAV file this reader supports ({e}); only integer PCM WAV is read "
            "(convert with e.g. `sox in.wav -b 16 out.wav`)"
        ) from None
    if width == 1:  # 8-bit WAV is unsigned
        x = (np.frombuffer(raw, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 2:
        x = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
    elif width == 3:
        b = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        v = np.where(v >= 1 << 23, v - (1 << 24), v)
        x = v.astype(np.float32) / float(1 << 23)
    elif width == 4:
        x = (np.frombuffer(raw, dtype="<i4").astype(np.float64) / 2.0**31).astype(np.float32)
    else:
        raise ValueError(f"{path}: unsupported WAV sample width of {width} bytes (1, 2, 3 or 4 are read)")
    usable = (x.size // channels) * channels
    x = x[:usable].reshape(-1, channels).mean(axis=1)
    return x.astype(np.float32), rate


def write_wav(path: str | os.PathLike, samples: np.ndarray, rate: int) -> Path:
    """Write mono samples in [-1, 1] as a 16-bit PCM WAV file."""
    pcm = np.clip(np.rint(np.asarray(samples, dtype=np.float64) * 32767.0), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(int(rate))
        w.writeframes(pcm.tobytes())
    return Path(path)


def resample(x: np.ndarray, rate: int, new_rate: int) -> np.ndarray:
    """Resample with a windowed-sinc low-pass (when going down) and linear interpolation."""
    if rate == new_rate or x.size == 0:
        return x.astype(np.float32)
    x = np.asarray(x, dtype=np.float64)
    if new_rate < rate:
        # Low-pass at the new Nyquist frequency, 63-tap Hann-windowed sinc.
        cutoff = 0.5 * new_rate / rate  # cycles per input sample
        n = np.arange(-31, 32)
        taps = 2 * cutoff * np.sinc(2 * cutoff * n) * np.hanning(63)
        x = np.convolve(x, taps / taps.sum(), mode="same")
    duration = x.size / rate
    t_new = np.arange(int(np.floor(duration * new_rate))) / new_rate
    return np.interp(t_new, np.arange(x.size) / rate, x).astype(np.float32)


def samples_to_tokens(samples: np.ndarray) -> np.ndarray:
    """[SOS, mu-law ids..., EOS] of float samples."""
    return np.concatenate([[SOS_ID], mu_law_encode(samples).astype(np.int64) + TOKEN_OFFSET, [EOS_ID]])


def tokens_to_samples(tokens: np.ndarray | list[int]) -> np.ndarray:
    """Float samples of model ids; special ids are skipped."""
    ids = np.asarray(tokens, dtype=np.int64).reshape(-1)
    ids = ids[(ids >= TOKEN_OFFSET) & (ids < VOCAB_SIZE)]
    return mu_law_decode(ids - TOKEN_OFFSET)


def wav_to_tokens(path: str | os.PathLike, rate: int | None = DEFAULT_RATE) -> tuple[np.ndarray, int]:
    """The token document of a WAV file and the rate it is at (``rate=None`` keeps the file's)."""
    x, file_rate = read_wav(path)
    target = file_rate if rate is None else int(rate)
    return samples_to_tokens(resample(x, file_rate, target)), target


def tokens_to_wav(tokens: np.ndarray | list[int], path: str | os.PathLike, rate: int) -> Path:
    return write_wav(path, tokens_to_samples(tokens), rate)


# ----------------------------------------------------------------------------
# Preparing a store
# ----------------------------------------------------------------------------


def asterisk_files() -> dict[str, list[Path]]:
    """The asterisk music-on-hold WAV files, split into train and test by file."""
    files = sorted(ASTERISK_DIR.glob("*.wav")) if ASTERISK_DIR.is_dir() else []
    if not files:
        raise FileNotFoundError(
            f"no WAV files in {ASTERISK_DIR}: install them with `apt-get install asterisk-moh-opsound-wav`, "
            "or give a folder of WAV files instead of --default"
        )
    test = [f for f in files if f.name == ASTERISK_TEST_FILE] or files[-1:]
    return {"train": [f for f in files if f not in test], "test": test}


def audio_meta(rate: int, source: str) -> dict[str, Any]:
    return {
        "modality": "audio",
        "vocabulary": {"type": "mu-law", "vocab_size": VOCAB_SIZE, "mu": MU, "levels": LEVELS},
        "sample_rate": int(rate),
        "sos": True,
        "eos": True,
        "source": source,
    }


def prepare_audio(
    paths: list[str | os.PathLike] | None,
    out: str | os.PathLike,
    *,
    default: bool = False,
    rate: int | None = DEFAULT_RATE,
    validation_fraction: float = 0.0,
    test_fraction: float = 0.2,
    max_seconds: float | None = None,
    on_error: str = "stop",
    overwrite: bool = False,
) -> Path:
    """Write an audio store from WAV files/folders (split by file) or the asterisk default set.

    ``rate=None`` keeps each file's rate, which must then be the same for all.
    ``max_seconds`` keeps only the start of each file (for quick runs).
    ``overwrite``: replace an existing store at ``out`` (see ``store.check_store_output``).
    """
    if default:
        if paths:
            raise ValueError("give either WAV paths or --default, not both")
        by_split = asterisk_files()
        plan = [(f, split) for split, fs in by_split.items() for f in fs]
        source = "asterisk-moh-opsound-wav"
    else:
        if not paths:
            raise ValueError("give WAV files or folders, or --default for the asterisk music")
        files = find_files(list(paths), WAV_SUFFIXES, "WAV files")
        keys = split_keys(files)
        splits = assign_splits(list(keys.values()), validation_fraction, test_fraction)
        plan = [(f, splits[keys[f]]) for f in files]
        source = "files"
    inputs = [*(paths or []), *(f for f, _ in plan)]
    check_store_output(out, inputs, overwrite)
    writer = None
    store_rate = rate
    try:
        for f, split in plan:
            try:
                x, file_rate = read_wav(f)
            except ValueError as e:
                handle_bad_file(f, str(e).removeprefix(f"{f}: "), on_error)
                continue
            target = file_rate if rate is None else int(rate)
            if store_rate is None:
                store_rate = target
            elif target != store_rate:
                handle_bad_file(
                    f, f"its rate {target} Hz differs from the store's {store_rate} Hz (use --rate)", on_error
                )
                continue
            x = resample(x, file_rate, target)
            if max_seconds is not None:
                x = x[: int(max_seconds * target)]
            if x.size == 0:
                handle_bad_file(f, "holds no samples", on_error)
                continue
            if writer is None:
                meta = audio_meta(target, source)
                writer = StoreWriter(out, VOCAB_SIZE, meta, overwrite=overwrite, inputs=inputs)
            writer.add(split, samples_to_tokens(x))
        if writer is None:
            raise ValueError("no readable WAV file: the corpus is empty")
        return writer.close()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise


# ----------------------------------------------------------------------------
# Pictures
# ----------------------------------------------------------------------------


def save_spectrogram(
    samples: np.ndarray, rate: int, path: str | os.PathLike, title: str = "", split_at: float | None = None
) -> Path:
    """A log-magnitude spectrogram PNG; an optional line marks where a prompt ends (seconds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3), dpi=100)
    nfft = min(256 if rate <= 16000 else 1024, max(16, len(samples) // 4))  # short clips: shorter frames
    ax.specgram(
        np.asarray(samples, dtype=np.float64) + 1e-9, NFFT=nfft, Fs=rate, noverlap=nfft // 2, cmap="magma"
    )
    if split_at is not None:
        ax.axvline(split_at, color="cyan", linewidth=1)
    ax.set_xlabel("seconds")
    ax.set_ylabel("Hz")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
