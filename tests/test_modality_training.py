"""Each modality end to end on tiny sizes: prepare, a few training steps, the metric, generated files."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from perceiver_ar.modalities import audio as au
from perceiver_ar.modalities import images as im
from perceiver_ar.modalities import music as mu
from perceiver_ar.model import PerceiverAR
from perceiver_ar.render import render, score
from perceiver_ar.store import TokenStore
from perceiver_ar.train import train
from tests.conftest import tiny_train_config

PIL = pytest.importorskip("PIL.Image")
pytest.importorskip("mido")


def train_tiny(data, out, **model):
    cfg = tiny_train_config(
        data, out, model=model, steps=3, batch_size=4, warmup_steps=1, eval_tokens=256, checkpoint_every=0
    )
    train(cfg)
    return PerceiverAR.from_pretrained(out)


def test_image_training_with_per_axis_positions_scores_and_renders(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(10):
        PIL.fromarray(rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    store_dir = im.prepare_images([folder], tmp_path / "store", size=(4, 4), test_fraction=0.3)
    model = train_tiny(store_dir, tmp_path / "run", position_encoding="absolute")
    # The trainer sized the row/column/channel tables from the store.
    assert model.config.position_table_sizes == (5, 5, 4)
    store = TokenStore(store_dir)
    result = score(model, store, "test")
    assert result["metric"] == "bits_per_dim" and result["num_tokens"] == 48 * len(store.split("test"))
    assert 6.0 < result["bits_per_dim"] < 10.0  # random pixels: about 8 bits after 3 steps
    out = render(model, store_dir, tmp_path / "render", num_samples=3, seed=1)
    samples = np.asarray(PIL.open(out["files"]["samples"]))
    assert samples.ndim == 3 and samples.shape[2] == 3
    comp = np.asarray(PIL.open(out["files"]["completions"]))
    assert comp.shape[0] > samples.shape[0]  # two rows: originals and completions
    assert json.loads((tmp_path / "render" / "render.json").read_text())["modality"] == "image"
    # The same through the command, from the run directory.
    import argparse

    from perceiver_ar.commands import render as render_command

    parser = argparse.ArgumentParser()
    render_command.register(parser.add_subparsers(required=True))
    argv = ["render", str(tmp_path / "run"), "--data", str(store_dir), "--out", str(tmp_path / "cli")]
    args = parser.parse_args([*argv, "--num-samples", "2"])
    assert args.func(args) == 0
    scored = json.loads((tmp_path / "cli" / "score.json").read_text())
    assert scored["bits_per_dim"] == pytest.approx(result["bits_per_dim"], abs=1e-5)
    assert (tmp_path / "cli" / "samples.png").is_file()


def test_image_training_with_flat_rotary_positions_uses_cached_generation(tmp_path):
    rng = np.random.default_rng(1)
    np.save(tmp_path / "imgs.npy", rng.integers(0, 256, size=(10, 4, 4), dtype=np.uint8))
    store_dir = im.prepare_images(
        [tmp_path / "imgs.npy"],
        tmp_path / "store",
        size=(4, 4),
        channels=1,
        positions="flat",
        test_fraction=0.3,
    )
    model = train_tiny(store_dir, tmp_path / "run")
    assert model.config.position_encoding == "rotary"
    out = render(model, store_dir, tmp_path / "render", num_samples=2)
    assert np.asarray(PIL.open(out["files"]["samples"])).ndim == 2  # grey


def test_music_training_scores_nll_per_event_and_writes_midi(tmp_path):
    rng = np.random.default_rng(2)
    folder = tmp_path / "midi"
    folder.mkdir()
    for i in range(6):
        t = np.cumsum(rng.uniform(0.05, 0.3, size=40))
        notes = [mu.Note(int(rng.integers(50, 80)), float(s), float(s) + 0.2, 80) for s in t]
        notes = [n for k, n in enumerate(notes) if all(m.pitch != n.pitch for m in notes[max(0, k - 3) : k])]
        mu.notes_to_midi(notes, folder / f"{i}.mid")
    store_dir = mu.prepare_music([folder], tmp_path / "store", test_fraction=0.3)
    model = train_tiny(store_dir, tmp_path / "run")
    store = TokenStore(store_dir)
    result = score(model, store, "test")
    assert result["metric"] == "bits_per_event"
    assert math.isclose(result["nll_per_event_nats"], result["bits_per_event"] * math.log(2))
    out = render(model, store_dir, tmp_path / "render", num_samples=1, prompt_events=20, new_events=30)
    mid = out["files"]["continuation_0_mid"]
    notes = mu.midi_to_notes(mid)
    prompt = np.asarray(store.split("test")[0][:20])
    prompt_end = (
        sum(int(e) - 3 - mu.TIME_SHIFT + 1 for e in prompt if 0 <= int(e) - 3 - mu.TIME_SHIFT < 100) / 100
    )
    # The piece's opening comes first, as it was (onsets before the prompt's end).
    onsets = lambda ns: [(n.pitch, round(n.start, 2)) for n in ns if n.start < prompt_end - 1e-6]
    assert onsets(notes) == onsets(mu.tokens_to_notes(prompt)) and onsets(notes)
    assert np.asarray(PIL.open(out["files"]["continuation_0_png"])).std() > 0


def test_audio_training_scores_bits_per_sample_and_writes_wav(tmp_path):
    rng = np.random.default_rng(3)
    folder = tmp_path / "wav"
    folder.mkdir()
    t = np.arange(4000) / 8000
    for i in range(4):
        au.write_wav(
            folder / f"{i}.wav",
            0.3 * np.sin(2 * np.pi * (200 + 50 * i) * t) + 0.01 * rng.normal(size=t.size),
            8000,
        )
    store_dir = au.prepare_audio([folder], tmp_path / "store", test_fraction=0.25)
    model = train_tiny(store_dir, tmp_path / "run")
    store = TokenStore(store_dir)
    result = score(model, store, "test", max_tokens=500)
    assert result["metric"] == "bits_per_sample" and 400 <= result["num_tokens"] <= 500 + 16
    out = render(
        model,
        store_dir,
        tmp_path / "render",
        num_samples=2,
        prompt_seconds=0.005,
        new_seconds=0.005,
        offset_seconds=0.1,
    )
    x, rate = au.read_wav(out["files"]["continuation_1_wav"])
    assert rate == 8000 and len(x) == 40 + 40
    doc = np.asarray(store.split("test")[0])
    prompt = au.tokens_to_samples(doc[800:840])  # 0.1 s into the file
    assert np.abs(x[:40] - prompt).max() < 1e-3  # the prompt comes first, as it was
