"""A trained model's results in its modality: the metric on held-out data and generated files.

The application layer over the library (it sits above ``modalities``, below
the commands). ``score`` runs the block evaluation of ``perceiver_ar.evaluate``
on a split and names the number as each field does: bits per dimension for
images (every subpixel sees the whole image before it when N covers an
image), negative log-likelihood per event for music, bits per sample for audio.

``render`` writes what people look at or listen to:

- images: a PNG grid of unconditional samples and one of completions
  (the top half of test images given, the bottom half generated, next to
  the originals);
- music: ``.mid`` continuations of held-out pieces and their piano rolls;
- audio: WAV continuations of a test file and their spectrograms;

and ``tokens.npz``, the ids each generation drew. Every token is drawn by the
one sampler, ``perceiver_ar.generate.generate`` (cached), fed the store's
positions for every token to come (per-axis (row, column, channel) ones for
images prepared with ``--positions axes``). Images draw pixel ids only
(``allowed_tokens``). Temperature, top-k and top-p mean what they mean to
``generate``; each generation is one ``generate`` call with its own seed: the
image samples use ``seed``, the completions ``seed + 1``; music piece n uses
``seed + n``; the audio continuations ``seed``. The same call to ``generate``
reproduces a file's tokens exactly.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .evaluate import evaluate
from .files import check_output_path, is_empty_dir, write_json
from .generate import DEFAULT_TEMPERATURE, generate
from .modalities import audio, images, music
from .model import PerceiverAR
from .provenance import check_store
from .samplers import positions_for_crop
from .store import TokenStore
from .vocab import EOS_ID, SOS_ID, TOKEN_OFFSET

METRIC_NAMES = {"image": "bits_per_dim", "music": "bits_per_event", "audio": "bits_per_sample"}
PIXEL_IDS = range(TOKEN_OFFSET, TOKEN_OFFSET + 256)  # what an image model may draw


# The files that mark a folder as render's own output.
RENDER_MARKERS = ("render.json", "score.json")


def check_render_output(out: str | os.PathLike, inputs: Sequence[str | os.PathLike] = ()) -> Path:
    """``--out`` of render: a new or empty folder, or one render wrote before (it holds render.json)."""
    target = check_output_path(out, inputs, scanned=False)
    if (
        target.exists()
        and not is_empty_dir(target)
        and not any((target / n).is_file() for n in RENDER_MARKERS)
    ):
        raise ValueError(
            f"--out {out} is not empty and holds no render.json (render writes samples.png, tokens.npz, ... "
            "there): choose another --out"
        )
    return target


def modality_of(meta: dict[str, Any]) -> str:
    modality = meta.get("modality")
    if modality not in METRIC_NAMES:
        raise ValueError(
            f"the store holds modality {modality!r}; this works on {sorted(METRIC_NAMES)} "
            "(made by `perceiver-ar prepare image|music|audio`)"
        )
    return modality


# ----------------------------------------------------------------------------
# The metric
# ----------------------------------------------------------------------------


def score(
    model: PerceiverAR,
    store: TokenStore,
    split: str = "test",
    *,
    num_latents: int | None = None,
    max_tokens: int | None = None,
    batch_size: int = 8,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """The modality's metric on ``split`` under the block protocol (first ``max_tokens`` targets).

    ``autocast_dtype``: as ``evaluate``'s (the command passes the runtime's precision).
    """
    modality = modality_of(store.meta)
    check_store(model.provenance, model.config.vocab_size, store.meta, str(store.dir))
    result = evaluate(
        model,
        store.split(split),
        protocol="block",
        num_latents=num_latents,
        meta=store.meta,
        batch_size=batch_size,
        max_tokens=max_tokens,
        autocast_dtype=autocast_dtype,
        progress=progress,
    )
    bits = result["bits_per_token"]
    result.update(modality=modality, split=split, metric=METRIC_NAMES[modality])
    result[METRIC_NAMES[modality]] = bits
    if modality == "music":
        result["nll_per_event_nats"] = bits * math.log(2)  # Music Transformer reports nats
    if modality == "image":
        # Images have no EOS: every target is a subpixel.
        result["num_images"] = result["num_tokens"] // int(np.prod(store.meta["image_shape"]))
    return result


# ----------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------


def continue_tokens(
    model: PerceiverAR,
    meta: dict[str, Any],
    prompt: np.ndarray,
    max_new_tokens: int,
    sampling: dict[str, Any],
    *,
    seed: int,
    stop_tokens: list[int] | None = None,
    allowed_tokens: Sequence[int] | None = None,
) -> np.ndarray:
    """[B, new] ids after prompt [B, T] by one ``generate`` call (PAD after a stop token).

    The prompt and every token to come get positions by the store's rule
    (``positions_for_crop``) counted from the prompt's first token, so
    per-axis image positions continue the way the model was trained.
    ``sampling``: temperature, top_k, top_p.
    """
    prompt = np.asarray(prompt, dtype=np.int64)
    B, T = prompt.shape
    planned = torch.from_numpy(positions_for_crop(meta, 0, T + max_new_tokens))
    out = generate(
        model,
        torch.from_numpy(prompt),
        max_new_tokens,
        positions=planned.expand(B, *planned.shape),
        seed=seed,
        stop_tokens=stop_tokens,
        allowed_tokens=allowed_tokens,
        **sampling,
    )
    return out.tokens.cpu().numpy()


# ----------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------


def _test_split(store: TokenStore):
    return store.split("test" if "test" in store.split_names else store.split_names[-1])


def render_images(
    model: PerceiverAR, store: TokenStore, out_dir: Path, num_samples: int, sampling: dict, seed: int
) -> dict[str, Any]:
    meta = store.meta
    shape = tuple(meta["image_shape"])
    n_sub = int(np.prod(shape))
    split = _test_split(store)
    k = min(num_samples, len(split))
    half = (shape[0] // 2) * shape[1] * shape[2]  # subpixels of the top half
    t0 = time.perf_counter()
    draw = dict(sampling=sampling, allowed_tokens=PIXEL_IDS)
    uncond = continue_tokens(model, meta, np.full((num_samples, 1), SOS_ID), n_sub, seed=seed, **draw)
    samples = [images.tokens_to_image(row, shape) for row in uncond]
    originals = [np.asarray(split[i]) for i in range(k)]
    prompts = np.stack([doc[: 1 + half] for doc in originals])
    rest = continue_tokens(model, meta, prompts, n_sub - half, seed=seed + 1, **draw)
    completions = [
        images.tokens_to_image(np.concatenate([p, r]), shape) for p, r in zip(prompts, rest, strict=True)
    ]
    seconds = time.perf_counter() - t0
    scale = max(1, 96 // max(shape[:2]))
    files = {
        "samples": str(
            images.save_grid(samples, out_dir / "samples.png", ncols=min(8, num_samples), scale=scale)
        ),
        # Row 1: the originals; row 2: top half given, bottom half generated.
        "completions": str(
            images.save_grid(
                [images.tokens_to_image(d, shape) for d in originals] + completions,
                out_dir / "completions.png",
                ncols=k,
                scale=scale,
            )
        ),
        "tokens": _save_tokens(out_dir, samples=uncond, completions=rest),
    }
    return {"files": files, "generation_seconds": seconds}


def render_music(
    model: PerceiverAR,
    store: TokenStore,
    out_dir: Path,
    num_samples: int,
    sampling: dict,
    seed: int,
    prompt_events: int = 256,
    new_events: int = 512,
) -> dict[str, Any]:
    split = _test_split(store)
    docs = [np.asarray(split[i]) for i in range(len(split)) if len(split[i]) > prompt_events + 1]
    if not docs:
        raise ValueError(f"no held-out piece is longer than the {prompt_events}-event prompt")
    files: dict[str, str] = {}
    drawn: dict[str, np.ndarray] = {}
    t0 = time.perf_counter()
    for n, doc in enumerate(docs[:num_samples]):
        prompt = doc[:prompt_events][None]
        row = continue_tokens(
            model, store.meta, prompt, new_events, sampling, seed=seed + n, stop_tokens=[EOS_ID]
        )[0]
        drawn[f"continuation_{n}"] = row
        new = row[: int(np.argmax(row == EOS_ID)) if (row == EOS_ID).any() else None]
        full = np.concatenate([prompt[0], new])
        prompt_end = _event_seconds(prompt[0])
        files[f"continuation_{n}_mid"] = str(music.tokens_to_midi(full, out_dir / f"continuation_{n}.mid"))
        files[f"continuation_{n}_png"] = str(
            music.save_piano_roll(
                music.tokens_to_notes(full),
                out_dir / f"continuation_{n}.png",
                title=f"held-out piece {n}: prompt (left of the red line) and {len(new)} generated events",
                split_at=prompt_end,
            )
        )
        files[f"original_{n}_mid"] = str(music.tokens_to_midi(doc, out_dir / f"original_{n}.mid"))
    files["tokens"] = _save_tokens(out_dir, **drawn)
    return {"files": files, "generation_seconds": time.perf_counter() - t0}


def _event_seconds(tokens: np.ndarray) -> float:
    """Seconds the time shifts of a token sequence add up to."""
    e = np.asarray(tokens, dtype=np.int64) - TOKEN_OFFSET
    shifts = e[(e >= music.TIME_SHIFT) & (e < music.VELOCITY)] - music.TIME_SHIFT + 1
    return float(shifts.sum()) * 0.01


def render_audio(
    model: PerceiverAR,
    store: TokenStore,
    out_dir: Path,
    num_samples: int,
    sampling: dict,
    seed: int,
    prompt_seconds: float = 1.0,
    new_seconds: float = 2.0,
    offset_seconds: float = 30.0,
) -> dict[str, Any]:
    rate = int(store.meta["sample_rate"])
    doc = np.asarray(_test_split(store)[0])
    n_prompt, n_new = int(prompt_seconds * rate), int(new_seconds * rate)
    # A prompt longer than N is fine: the sampler sees its last N samples.
    start = min(int(offset_seconds * rate), max(1, len(doc) - n_prompt - 1))
    prompt = np.repeat(doc[start : start + n_prompt][None], num_samples, axis=0)
    t0 = time.perf_counter()
    new = continue_tokens(model, store.meta, prompt, n_new, sampling, seed=seed)
    seconds = time.perf_counter() - t0
    files: dict[str, str] = {}
    original = audio.tokens_to_samples(doc[start : start + n_prompt + n_new])
    files["original_wav"] = str(audio.write_wav(out_dir / "original.wav", original, rate))
    for n in range(num_samples):
        wav = audio.tokens_to_samples(np.concatenate([prompt[n], new[n]]))
        files[f"continuation_{n}_wav"] = str(audio.write_wav(out_dir / f"continuation_{n}.wav", wav, rate))
        files[f"continuation_{n}_png"] = str(
            audio.save_spectrogram(
                wav,
                rate,
                out_dir / f"continuation_{n}.png",
                title=f"{n_prompt / rate:g} s of a test file, then {n_new / rate:g} s generated",
                split_at=n_prompt / rate,
            )
        )
    files["original_png"] = str(
        audio.save_spectrogram(
            original, rate, out_dir / "original.png", title="the test file itself", split_at=n_prompt / rate
        )
    )
    files["tokens"] = _save_tokens(out_dir, continuations=new)
    return {"files": files, "generation_seconds": seconds, "new_samples": int(n_new * num_samples)}


def _save_tokens(out_dir: Path, **arrays: np.ndarray) -> str:
    """``tokens.npz``: the ids each ``generate`` call returned, named as in the docstring of ``render``."""
    path = out_dir / "tokens.npz"
    np.savez(path, **{name: np.asarray(a, dtype=np.int64) for name, a in arrays.items()})
    return str(path)


def render(
    model: PerceiverAR,
    data_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    num_samples: int = 8,
    temperature: float = DEFAULT_TEMPERATURE,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    **kwargs: Any,
) -> dict[str, Any]:
    """Generate into the store's modality and write the files under ``out_dir``; returns their paths.

    The sampling settings are ``generate``'s. ``tokens.npz`` holds the drawn
    ids: ``samples`` [num_samples, H*W*C] and ``completions`` [k, bottom half]
    for images, ``continuation_<n>`` [new_events] (PAD after EOS) for music,
    ``continuations`` [num_samples, new samples] for audio. kwargs: the
    modality's own sizes (music: prompt_events, new_events; audio:
    prompt_seconds, new_seconds, offset_seconds).
    """
    store = TokenStore(data_dir)
    modality = modality_of(store.meta)
    check_store(model.provenance, model.config.vocab_size, store.meta, str(data_dir))
    out = check_render_output(out_dir, [data_dir])
    out.mkdir(parents=True, exist_ok=True)
    fn = {"image": render_images, "music": render_music, "audio": render_audio}[modality]
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    result = fn(model, store, out, num_samples, sampling, seed, **kwargs)
    result.update(modality=modality, sampling=dict(sampling, seed=seed))
    write_json(out / "render.json", result)
    return result
