"""The render path draws through the one sampler: its tokens are ``generate``'s for the same settings."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from perceiver_ar import generate
from perceiver_ar.modalities import audio as au
from perceiver_ar.modalities import images as im
from perceiver_ar.render import PIXEL_IDS, render
from perceiver_ar.samplers import positions_for_crop
from perceiver_ar.store import TokenStore
from perceiver_ar.vocab import SOS_ID
from tests.conftest import make_model

PIL = pytest.importorskip("PIL.Image")

# The sampling settings the render and the direct generate calls share.
SETTINGS = dict(temperature=0.9, top_k=200, top_p=0.95)


def image_store(tmp_path, positions):
    rng = np.random.default_rng(0)
    (tmp_path / "imgs").mkdir(exist_ok=True)
    for i in range(10):  # ten files, so the split by file name gives a test split
        np.save(tmp_path / "imgs" / f"{i}.npy", rng.integers(0, 256, size=(4, 4), dtype=np.uint8))
    return im.prepare_images(
        [tmp_path / "imgs"],
        tmp_path / f"store_{positions}",
        size=(4, 4),
        channels=1,
        positions=positions,
        test_fraction=0.3,
    )


@pytest.mark.parametrize("positions", ["axes", "flat"])
def test_image_render_draws_what_generate_draws(tmp_path, positions):
    store_dir = image_store(tmp_path, positions)
    store = TokenStore(store_dir)
    # N = 8 < 17 tokens an image: the window slides and the latent cache
    # resets, so the per-axis positions of every step are exercised.
    if positions == "axes":
        model = make_model("absolute", context_len=8, num_latents=4, position_table_sizes=(5, 5, 2))
    else:
        model = make_model("rotary", context_len=8, num_latents=4)
    out = render(model, store_dir, tmp_path / "render", num_samples=3, seed=7, **SETTINGS)
    drawn = np.load(out["files"]["tokens"])
    assert json.loads((tmp_path / "render" / "render.json").read_text())["sampling"] == dict(SETTINGS, seed=7)

    n_sub = 16
    planned = torch.from_numpy(positions_for_crop(store.meta, 0, 1 + n_sub))
    assert planned.dim() == (2 if positions == "axes" else 1)

    def direct(prompt, new, seed):
        prompt = torch.as_tensor(prompt)
        # Flat images need no positions: generate's default 1..T continues them.
        pos = planned.expand(len(prompt), *planned.shape) if positions == "axes" else None
        kw = dict(seed=seed, allowed_tokens=PIXEL_IDS, positions=pos, **SETTINGS)
        return generate(model, prompt, new, **kw).tokens.numpy()

    samples = direct(torch.full((3, 1), SOS_ID), n_sub, 7)
    assert np.array_equal(drawn["samples"], samples)
    assert samples.min() >= 3 and samples.max() < 259  # pixel ids only
    assert len(np.unique(samples)) > 3  # really drawn, not one repeated id
    test = store.split("test")
    prompts = np.stack([np.asarray(test[i])[: 1 + 8] for i in range(3)])  # the top half given
    assert np.array_equal(drawn["completions"], direct(prompts, n_sub - 8, 8))
    # The grid shows exactly those pixels.
    grid = np.asarray(PIL.open(out["files"]["samples"]))
    scale = 96 // 4
    first = grid[1 : 1 + 4 * scale : scale, 1 : 1 + 4 * scale : scale]
    assert np.array_equal(first, im.tokens_to_image(samples[0], (4, 4, 1))[:, :, 0])


def test_audio_render_draws_what_generate_draws(tmp_path):
    rng = np.random.default_rng(3)
    (tmp_path / "wav").mkdir()
    t = np.arange(4000) / 8000
    for i in range(4):
        wave = 0.3 * np.sin(2 * np.pi * (200 + 50 * i) * t) + 0.01 * rng.normal(size=t.size)
        au.write_wav(tmp_path / "wav" / f"{i}.wav", wave, 8000)
    store_dir = au.prepare_audio([tmp_path / "wav"], tmp_path / "store", test_fraction=0.25)
    model = make_model("rotary", context_len=16, num_latents=4)
    kw = dict(prompt_seconds=0.003, new_seconds=0.004, offset_seconds=0.1)
    out = render(model, store_dir, tmp_path / "render", num_samples=2, seed=5, **kw, **SETTINGS)
    drawn = np.load(out["files"]["tokens"])["continuations"]
    doc = np.asarray(TokenStore(store_dir).split("test")[0])
    prompt = torch.from_numpy(np.repeat(doc[800:824][None], 2, axis=0))  # 0.1 s in, 3 ms
    expected = generate(model, prompt, 32, seed=5, **SETTINGS).tokens.numpy()
    assert drawn.shape == (2, 32) and np.array_equal(drawn, expected)
    assert not np.array_equal(expected[0], expected[1])  # the rows draw independently
