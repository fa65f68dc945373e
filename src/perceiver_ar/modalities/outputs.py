"""A trained model's results in its modality: the metric on held-out data and generated files.

``score`` runs the block evaluation of ``perceiver_ar.evaluate`` on a split
and names the number as each field does: bits per dimension for images
(every subpixel sees the whole image before it when N covers an image),
negative log-likelihood per event for music, bits per sample for audio.

``render`` writes what people look at or listen to:

- images: a PNG grid of unconditional samples and one of completions
  (the top half of test images given, the bottom half generated, next to
  the originals);
- music: ``.mid`` continuations of held-out pieces and their piano rolls;
- audio: WAV continuations of a test file and their spectrograms.

Generation goes through ``perceiver_ar.generate`` (cached). Images stored
with per-axis positions need positions the cached sampler cannot continue
(it follows one axis), so they use a short uncached loop here.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..model import PerceiverAR
from ..store import TokenStore
from ..vocab import EOS_ID, SOS_ID, TOKEN_OFFSET

METRIC_NAMES = {"image": "bits_per_dim", "music": "bits_per_event", "audio": "bits_per_sample"}


def load_model_dir(path: str | os.PathLike) -> PerceiverAR:
    """A model directory, or a run directory holding ``model/``."""
    return PerceiverAR.from_pretrained(path)


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
    progress: bool = False,
) -> dict[str, Any]:
    """The modality's metric on ``split`` under the block protocol (first ``max_tokens`` targets)."""
    from ..evaluate import evaluate

    modality = modality_of(store.meta)
    if store.vocab_size > model.config.vocab_size:
        raise ValueError(f"the store's vocabulary ({store.vocab_size}) is larger than the model's")
    result = evaluate(
        model,
        store.split(split),
        protocol="block",
        num_latents=num_latents,
        meta=store.meta,
        batch_size=batch_size,
        max_tokens=max_tokens,
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


@torch.no_grad()
def sample_uncached(
    model: PerceiverAR,
    prompt: np.ndarray,
    max_new_tokens: int,
    positions_fn,
    temperature: float = 1.0,
    seed: int = 0,
    allowed: tuple[int, int] | None = None,
) -> np.ndarray:
    """Uncached sampling for positions the cached sampler cannot continue (per-axis images).

    prompt [B, T] ids; ``positions_fn(start, length)`` gives the document
    positions of tokens start..start+length-1; ``allowed`` limits draws to ids
    in [lo, hi). One forward with one latent per new token. Returns [B, new].
    """
    device = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    tokens = torch.from_numpy(np.array(prompt, dtype=np.int64)).to(device)
    B = tokens.shape[0]
    N = model.config.context_len
    was_training = model.training
    model.eval()
    try:
        for _ in range(max_new_tokens):
            start = max(0, tokens.shape[1] - N)
            window = tokens[:, start:]
            pos = torch.as_tensor(positions_fn(start, window.shape[1]), device=device)
            pos = pos.unsqueeze(0).expand(B, *pos.shape)
            logits = model(window, pos, num_latents=1).logits[:, -1].float().cpu()
            if allowed is not None:
                mask = torch.full_like(logits, float("-inf"))
                mask[:, allowed[0] : allowed[1]] = 0
                logits = logits + mask
            if temperature == 0:
                nxt = logits.argmax(-1)
            else:
                nxt = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=gen)[:, 0]
            tokens = torch.cat([tokens, nxt.to(device)[:, None]], dim=1)
    finally:
        model.train(was_training)
    return tokens[:, -max_new_tokens:].cpu().numpy() if max_new_tokens else np.zeros((B, 0), np.int64)


def continue_tokens(
    model: PerceiverAR,
    prompt: np.ndarray,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_p: float | None = None,
    seed: int = 0,
    stop_tokens: list[int] | None = None,
) -> np.ndarray:
    """Cached generation (``perceiver_ar.generate``) of [B, new] ids after prompt [B, T]."""
    from ..generate import generate

    out = generate(
        model,
        torch.from_numpy(np.array(prompt, dtype=np.int64)),
        max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        stop_tokens=stop_tokens,
    )
    return out.tokens.cpu().numpy()


# ----------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------


def render_images(
    model: PerceiverAR, store: TokenStore, out_dir: Path, num_samples: int, temperature: float, seed: int
) -> dict[str, Any]:
    from .images import crop_positions, save_grid, tokens_to_image

    meta = store.meta
    shape = tuple(meta["image_shape"])
    n_sub = int(np.prod(shape))
    split = store.split("test" if "test" in store.split_names else store.split_names[-1])
    k = min(num_samples, len(split))
    half = (shape[0] // 2) * shape[1] * shape[2]  # subpixels of the top half
    data_ids = (TOKEN_OFFSET, TOKEN_OFFSET + 256)

    def draw(prompt: np.ndarray, new: int, s: int) -> np.ndarray:
        if meta.get("image_positions", "axes") == "flat":
            out = continue_tokens(model, prompt, new, temperature=temperature, seed=s)
            return np.where(out >= TOKEN_OFFSET, out, TOKEN_OFFSET)  # a stray special id draws black
        return sample_uncached(
            model, prompt, new, lambda a, n: crop_positions(meta, a, n), temperature, s, allowed=data_ids
        )

    t0 = time.perf_counter()
    uncond = draw(np.full((num_samples, 1), SOS_ID), n_sub, seed)
    samples = [tokens_to_image(row, shape) for row in uncond]
    originals = [np.asarray(split[i]) for i in range(k)]
    prompts = np.stack([doc[: 1 + half] for doc in originals])
    rest = draw(prompts, n_sub - half, seed + 1)
    completions = [tokens_to_image(np.concatenate([p, r]), shape) for p, r in zip(prompts, rest, strict=True)]
    seconds = time.perf_counter() - t0
    scale = max(1, 96 // max(shape[:2]))
    files = {
        "samples": str(save_grid(samples, out_dir / "samples.png", ncols=min(8, num_samples), scale=scale)),
        # Row 1: the originals; row 2: top half given, bottom half generated.
        "completions": str(
            save_grid(
                [tokens_to_image(d, shape) for d in originals] + completions,
                out_dir / "completions.png",
                ncols=k,
                scale=scale,
            )
        ),
    }
    return {"files": files, "generation_seconds": seconds}


def render_music(
    model: PerceiverAR,
    store: TokenStore,
    out_dir: Path,
    num_samples: int,
    temperature: float,
    seed: int,
    prompt_events: int = 256,
    new_events: int = 512,
) -> dict[str, Any]:
    from .music import save_piano_roll, tokens_to_midi, tokens_to_notes

    split = store.split("test" if "test" in store.split_names else store.split_names[-1])
    docs = [np.asarray(split[i]) for i in range(len(split)) if len(split[i]) > prompt_events + 1]
    if not docs:
        raise ValueError(f"no held-out piece is longer than the {prompt_events}-event prompt")
    files: dict[str, str] = {}
    t0 = time.perf_counter()
    for n, doc in enumerate(docs[:num_samples]):
        prompt = doc[:prompt_events][None]
        new = continue_tokens(
            model, prompt, new_events, temperature=temperature, seed=seed + n, stop_tokens=[EOS_ID]
        )
        new = new[0][: int(np.argmax(new[0] == EOS_ID)) if (new[0] == EOS_ID).any() else None]
        full = np.concatenate([prompt[0], new])
        prompt_end = _event_seconds(prompt[0])
        files[f"continuation_{n}_mid"] = str(tokens_to_midi(full, out_dir / f"continuation_{n}.mid"))
        files[f"continuation_{n}_png"] = str(
            save_piano_roll(
                tokens_to_notes(full),
                out_dir / f"continuation_{n}.png",
                title=f"held-out piece {n}: prompt (left of the red line) and {len(new)} generated events",
                split_at=prompt_end,
            )
        )
        files[f"original_{n}_mid"] = str(tokens_to_midi(doc, out_dir / f"original_{n}.mid"))
    return {"files": files, "generation_seconds": time.perf_counter() - t0}


def _event_seconds(tokens: np.ndarray) -> float:
    """Seconds the time shifts of a token sequence add up to."""
    from .music import TIME_SHIFT, VELOCITY

    e = np.asarray(tokens, dtype=np.int64) - TOKEN_OFFSET
    shifts = e[(e >= TIME_SHIFT) & (e < VELOCITY)] - TIME_SHIFT + 1
    return float(shifts.sum()) * 0.01


def render_audio(
    model: PerceiverAR,
    store: TokenStore,
    out_dir: Path,
    num_samples: int,
    temperature: float,
    seed: int,
    prompt_seconds: float = 1.0,
    new_seconds: float = 2.0,
    offset_seconds: float = 30.0,
) -> dict[str, Any]:
    from .audio import save_spectrogram, tokens_to_samples, write_wav

    rate = int(store.meta["sample_rate"])
    split = store.split("test" if "test" in store.split_names else store.split_names[-1])
    doc = np.asarray(split[0])
    n_prompt, n_new = int(prompt_seconds * rate), int(new_seconds * rate)
    # A prompt longer than N is fine: the sampler sees its last N samples.
    start = min(int(offset_seconds * rate), max(1, len(doc) - n_prompt - 1))
    prompt = np.repeat(doc[start : start + n_prompt][None], num_samples, axis=0)
    t0 = time.perf_counter()
    new = continue_tokens(model, prompt, n_new, temperature=temperature, seed=seed)
    seconds = time.perf_counter() - t0
    files: dict[str, str] = {}
    original = tokens_to_samples(doc[start : start + n_prompt + n_new])
    files["original_wav"] = str(write_wav(out_dir / "original.wav", original, rate))
    for n in range(num_samples):
        wav = tokens_to_samples(np.concatenate([prompt[n], new[n]]))
        files[f"continuation_{n}_wav"] = str(write_wav(out_dir / f"continuation_{n}.wav", wav, rate))
        files[f"continuation_{n}_png"] = str(
            save_spectrogram(
                wav,
                rate,
                out_dir / f"continuation_{n}.png",
                title=f"{n_prompt / rate:g} s of a test file, then {n_new / rate:g} s generated",
                split_at=n_prompt / rate,
            )
        )
    files["original_png"] = str(
        save_spectrogram(
            original, rate, out_dir / "original.png", title="the test file itself", split_at=n_prompt / rate
        )
    )
    return {"files": files, "generation_seconds": seconds, "new_samples": int(n_new * num_samples)}


def render(
    model: PerceiverAR,
    data_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    num_samples: int = 8,
    temperature: float = 1.0,
    seed: int = 0,
    **kwargs: Any,
) -> dict[str, Any]:
    """Generate into the store's modality and write the files under ``out_dir``; returns their paths."""
    store = TokenStore(data_dir)
    modality = modality_of(store.meta)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fn = {"image": render_images, "music": render_music, "audio": render_audio}[modality]
    result = fn(model, store, out, num_samples, temperature, seed, **kwargs)
    result["modality"] = modality
    (out / "render.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
