"""Images, symbolic music and raw audio: tokenizers round-trip, prepare on tiny fixtures, bad files.

Every fixture is written by the test itself (PNG, MIDI, WAV in tmp_path);
nothing needs the Debian data packages or music21's corpus.
"""

from __future__ import annotations

import argparse
import gzip
import json
import struct
import wave

import numpy as np
import pytest

from perceiver_ar.modalities import BadInputFile, assign_splits
from perceiver_ar.modalities import audio as au
from perceiver_ar.modalities import images as im
from perceiver_ar.modalities import music as mu
from perceiver_ar.samplers import positions_for_crop
from perceiver_ar.store import TokenStore
from perceiver_ar.vocab import EOS_ID, SOS_ID

PIL = pytest.importorskip("PIL.Image")
mido = pytest.importorskip("mido")


def prepare_cli(argv: list[str]) -> int:
    """Run ``perceiver-ar prepare <modality> ...`` through the modality command modules."""
    from perceiver_ar.commands import prepare_audio, prepare_image, prepare_music

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(required=True)
    for module in (prepare_image, prepare_music, prepare_audio):
        module.register(sub)
    args = parser.parse_args(argv)
    return args.func(args)


# ----------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------


def test_image_tokens_round_trip_exactly_and_interleave_channels():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    tokens = im.image_to_tokens(rgb)
    assert tokens[0] == SOS_ID and len(tokens) == 1 + 5 * 7 * 3
    # Pixel (0, 0) R, G, B, then pixel (0, 1) R: raster order, channels interleaved.
    assert list(tokens[1:5]) == [rgb[0, 0, 0] + 3, rgb[0, 0, 1] + 3, rgb[0, 0, 2] + 3, rgb[0, 1, 0] + 3]
    assert np.array_equal(im.tokens_to_image(tokens, (5, 7, 3)), rgb)
    grey = rng.integers(0, 256, size=(4, 6), dtype=np.uint8)
    tokens = im.image_to_tokens(grey)
    assert len(tokens) == 1 + 24 and tokens[1:].min() >= 3 and tokens.max() <= 258
    assert np.array_equal(im.tokens_to_image(tokens, (4, 6, 1))[:, :, 0], grey)
    # A partial generation fills the rest.
    part = im.tokens_to_image(tokens[:5], (4, 6, 1), fill=7)
    assert part[0, :4, 0].tolist() == grey[0, :4].tolist() and part[0, 4, 0] == 7
    with pytest.raises(ValueError, match="pixel values"):
        im.image_to_tokens(np.full((2, 2), 300))


def test_image_positions_follow_rows_columns_channels():
    pos = im.image_positions((2, 3, 3), 0, 1 + 18)
    assert pos[0].tolist() == [0, 0, 0]  # SOS
    assert pos[1].tolist() == [1, 1, 1] and pos[3].tolist() == [1, 1, 3] and pos[4].tolist() == [1, 2, 1]
    assert pos[10].tolist() == [2, 1, 1] and pos[18].tolist() == [2, 3, 3]
    # A crop from the middle of a document gives the same rows as the whole.
    assert np.array_equal(im.image_positions((2, 3, 3), 5, 7), pos[5:12])
    meta = im.image_meta((2, 3, 3), "test")
    assert np.array_equal(positions_for_crop(meta, 5, 7), pos[5:12])
    flat = positions_for_crop(im.image_meta((2, 3, 3), "test", positions="flat"), 5, 7)
    assert flat.tolist() == list(range(6, 13))
    with pytest.raises(ValueError, match="outside"):
        im.image_positions((2, 3, 3), 10, 10)


def write_png(path, array):
    PIL.fromarray(array).save(path)
    return path


def test_prepare_image_folder_resizes_splits_and_reports_bad_files(tmp_path, capsys):
    rng = np.random.default_rng(1)
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    for i in range(6):
        write_png(folder / f"a{i}.png", rng.integers(0, 256, size=(10 + i, 12, 3), dtype=np.uint8))
    exact = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    write_png(folder / "sub" / "exact.png", exact)
    np.save(folder / "stack.npy", rng.integers(0, 256, size=(3, 4, 4), dtype=np.uint8))  # 3 grey images
    bad = folder / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")

    with pytest.raises(BadInputFile, match="broken.png"):
        prepare_cli(["image", str(folder), "--out", str(tmp_path / "s"), "--size", "4"])
    assert not (tmp_path / "s").exists()  # a stopped run leaves no store behind

    assert (
        prepare_cli(["image", str(folder), "--out", str(tmp_path / "s"), "--size", "4", "--on-error", "skip"])
        == 0
    )
    assert "skipping" in capsys.readouterr().err
    store = TokenStore(tmp_path / "s")
    meta = store.meta
    assert meta["modality"] == "image" and meta["image_shape"] == [4, 4, 3] and store.vocab_size == 259
    total = sum(len(store.split(s)) for s in store.split_names)
    assert total == 6 + 1 + 3  # the .npy stack gives three images, grey turned RGB
    docs = [np.asarray(d) for s in store.split_names for d in store.split(s)]
    assert all(len(d) == 1 + 48 for d in docs)
    # An image already at the size comes through unchanged.
    assert any(np.array_equal(im.tokens_to_image(d, (4, 4, 3)), exact) for d in docs)

    # Centre crop keeps the middle of a larger image at its scale.
    big = np.zeros((8, 16), dtype=np.uint8)
    big[:, 4:12] = 200
    cropped = im.fit_image(PIL.fromarray(big), (8, 8), 1, "crop")
    assert cropped.shape == (8, 8, 1) and cropped.min() == 200


def test_fashion_mnist_reads_idx_files_and_explains_when_missing(tmp_path):
    images = np.arange(3 * 28 * 28, dtype=np.uint32).reshape(3, 28, 28) % 256

    def write_idx(name, arr):
        header = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
        with gzip.open(tmp_path / name, "wb") as f:
            f.write(header + arr.astype(np.uint8).tobytes())

    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        im.fashion_mnist(tmp_path)
    write_idx("train-images-idx3-ubyte.gz", np.concatenate([images] * 1000))  # 3,000 images
    write_idx("t10k-images-idx3-ubyte.gz", images)
    data = im.fashion_mnist(tmp_path)
    assert data["train"].shape == (3000, 28, 28) and np.array_equal(data["test"], images.astype(np.uint8))
    out = im.prepare_images(None, tmp_path / "fm", dataset="fashion-mnist", idx_dir=tmp_path, limit=5)
    store = TokenStore(out)
    assert {s: len(store.split(s)) for s in store.split_names} == {"train": 5, "validation": 5, "test": 3}
    assert np.array_equal(im.tokens_to_image(store.split("test")[1], (28, 28, 1))[:, :, 0], images[1])
    (tmp_path / "bad.gz").write_bytes(gzip.compress(b"\x01\x02junk"))
    with pytest.raises(ValueError, match="not an IDX file"):
        im.read_idx(tmp_path / "bad.gz")


def test_digits_smoke_set_and_png_grid(tmp_path):
    pytest.importorskip("sklearn")
    store = TokenStore(im.prepare_images(None, tmp_path / "d", dataset="digits"))
    assert store.meta["image_shape"] == [8, 8, 1]
    assert sum(len(store.split(s)) for s in store.split_names) == 1797
    first = im.tokens_to_image(store.split("train")[0], (8, 8, 1))
    assert first.min() == 0 and set(np.unique(first)) <= {round(v * 255 / 16) for v in range(17)}
    path = im.save_grid([first] * 5, tmp_path / "grid.png", ncols=3, scale=2, pad=1)
    grid = np.asarray(PIL.open(path))
    assert grid.shape == (2 * 17 + 1, 3 * 17 + 1)
    assert np.array_equal(grid[1:17:2, 1:17:2], first[:, :, 0])


def test_assign_splits_is_stable_and_keeps_train():
    names = [f"f{i}" for i in range(20)]
    a = assign_splits(names, 0.1, 0.2)
    assert a == assign_splits(list(reversed(names)), 0.1, 0.2)
    assert sorted(a.values()).count("test") == 4 and sorted(a.values()).count("validation") == 2
    assert set(assign_splits(["x", "y", "z"], 0.1, 0.1).values()) == {"train", "validation", "test"}
    assert assign_splits(["only"], 0.1, 0.5) == {"only": "train"}


# ----------------------------------------------------------------------------
# Music
# ----------------------------------------------------------------------------


def random_notes(rng, n=40) -> list[mu.Note]:
    """Notes whose same-pitch occurrences never overlap (one voice per pitch), chords allowed."""
    notes, free_at = [], {}
    t = 0.0
    for _ in range(n):
        t += float(rng.choice([0.0, 0.013, 0.25, 0.5, 1.7]))  # chords, short and long gaps (> 1 s)
        pitch = int(rng.integers(30, 90))
        if free_at.get(pitch, -1.0) > t:
            continue
        dur = float(rng.uniform(0.004, 1.5))
        notes.append(mu.Note(pitch, t, t + dur, int(rng.integers(1, 128))))
        free_at[pitch] = t + dur + 0.02
    return notes


def test_music_events_round_trip_within_grid_and_velocity_bins(tmp_path):
    rng = np.random.default_rng(0)
    notes = random_notes(rng)
    path = tmp_path / "x.mid"
    mu.notes_to_midi(notes, path)
    tokens = mu.midi_to_tokens(path)
    assert tokens[0] == SOS_ID and tokens[-1] == EOS_ID
    assert tokens[1:-1].min() >= 3 and tokens[1:-1].max() < mu.VOCAB_SIZE == 391
    back = mu.tokens_to_notes(tokens)
    # MIDI stores whole milliseconds, then events the 10 ms grid: within 6 ms.
    assert len(back) == len(notes)
    for a, b in zip(sorted(notes, key=lambda n: (n.start, n.pitch)), back, strict=True):
        assert a.pitch == b.pitch and abs(b.velocity - a.velocity) <= 2
        assert abs(a.start - b.start) <= 0.006 and abs(max(a.end, a.start + 0.01) - b.end) <= 0.011
    # Notes already on the grid (and velocities at bin centres) come back exactly.
    on_grid = mu.quantize_notes(notes)
    mu.notes_to_midi(on_grid, tmp_path / "g.mid")
    assert mu.tokens_to_notes(mu.midi_to_tokens(tmp_path / "g.mid")) == on_grid
    # Writing the decoded tokens and reading them again is exact.
    mu.tokens_to_midi(tokens, tmp_path / "y.mid")
    assert np.array_equal(mu.midi_to_tokens(tmp_path / "y.mid"), tokens)


def test_music_reads_tempo_changes_tracks_and_skips_percussion(tmp_path):
    mid = mido.MidiFile(ticks_per_beat=96)
    t1 = mido.MidiTrack(
        [
            mido.MetaMessage("set_tempo", tempo=1_000_000, time=0),  # 1 s a beat
            mido.Message("note_on", note=60, velocity=100, time=48),  # 0.5 s
            mido.Message("note_on", note=60, velocity=0, time=96),  # 1.5 s (velocity-0 note-off)
            mido.MetaMessage("set_tempo", tempo=500_000, time=0),  # 0.5 s a beat from here
            mido.Message("note_on", note=64, velocity=40, time=96),  # 2.0 s
            mido.Message("note_off", note=64, time=48),  # 2.25 s
        ]
    )
    t2 = mido.MidiTrack(
        [
            mido.Message("note_on", channel=9, note=36, velocity=90, time=0),  # a drum: ignored
            mido.Message("note_off", channel=9, note=36, time=10),
        ]
    )
    mid.tracks.extend([t1, t2])
    mid.save(tmp_path / "t.mid")
    notes = mu.midi_to_notes(tmp_path / "t.mid")
    assert [(n.pitch, round(n.start, 3), round(n.end, 3), n.velocity) for n in notes] == [
        (60, 0.5, 1.5, 100),
        (64, 2.0, 2.25, 40),
    ]
    events = mu.notes_to_events(notes)
    # 0.5 s: shift 50; velocity bin of 100; note-on 60; 1 s shift (100); note-off 60; ...
    assert events[:5].tolist() == [
        mu.TIME_SHIFT + 49,
        mu.VELOCITY + mu.velocity_to_bin(100),
        mu.NOTE_ON + 60,
        mu.TIME_SHIFT + 99,
        mu.NOTE_OFF + 60,
    ]


def test_music_same_pitch_restart_and_tolerant_decoding():
    # A second voice striking a sounding pitch ends the first one there.
    notes = [mu.Note(60, 0.0, 1.0, 64), mu.Note(60, 0.5, 0.8, 64)]
    back = mu.events_to_notes(mu.notes_to_events(notes))
    assert [(n.start, n.end) for n in back] == [(0.0, 0.5), (0.5, 1.0)]
    # A sampler's odd output: off without on, a note never released.
    e = [mu.NOTE_OFF + 10, mu.NOTE_ON + 61, mu.TIME_SHIFT + 9]
    assert mu.events_to_notes(e) == [mu.Note(61, 0.0, 0.1, mu.bin_to_velocity(mu.velocity_to_bin(64)))]


def test_prepare_music_folder_and_bad_midi(tmp_path, capsys):
    rng = np.random.default_rng(2)
    folder = tmp_path / "midi"
    folder.mkdir()
    for i in range(5):
        mu.notes_to_midi(random_notes(rng, 20), folder / f"p{i}.mid")
    (folder / "fake.mid").write_bytes(b"this is not a MIDI file at all")
    with pytest.raises(BadInputFile, match="fake.mid"):
        prepare_cli(["music", str(folder), "--out", str(tmp_path / "s")])
    assert prepare_cli(["music", str(folder), "--out", str(tmp_path / "s"), "--on-error", "skip"]) == 0
    assert "fake.mid" in capsys.readouterr().err
    store = TokenStore(tmp_path / "s")
    assert store.meta["modality"] == "music" and store.vocab_size == 391
    assert sum(len(store.split(s)) for s in store.split_names) == 5
    expected = assign_splits(sorted(f.name for f in folder.glob("*.mid")), 0.05, 0.1)
    for split in ("train", "validation", "test"):
        n = sum(v == split for k, v in expected.items() if k != "fake.mid")
        assert (len(store.split(split)) if split in store.split_names else 0) == n
    with pytest.raises(ValueError, match="public-domain"):
        mu.music21_midi_files("essenFolksong")


def test_piano_roll_png(tmp_path):
    path = mu.save_piano_roll(random_notes(np.random.default_rng(3)), tmp_path / "roll.png", split_at=1.0)
    img = np.asarray(PIL.open(path))
    assert img.shape[0] > 100 and img.shape[1] > 300 and img.std() > 0


# ----------------------------------------------------------------------------
# Audio
# ----------------------------------------------------------------------------


def test_mu_law_round_trips_within_its_quantisation():
    levels = np.arange(256)
    assert np.array_equal(au.mu_law_encode(au.mu_law_decode(levels)), levels)
    x = np.linspace(-1, 1, 20001)
    y = au.mu_law_decode(au.mu_law_encode(x))
    # The error is at most half a step of the companded scale around each sample.
    compand = lambda v: np.sign(v) * np.log1p(255 * np.abs(v)) / np.log1p(255)
    assert np.abs(compand(x) - compand(y)).max() <= 1 / 255 + 1e-6
    assert np.abs(x - y).max() < 0.025 and abs(float(au.mu_law_decode(au.mu_law_encode(0.0)))) < 1e-4
    # Quiet samples are kept much finer than loud ones.
    assert np.abs(x - y)[np.abs(x) < 0.01].max() < 5e-4


def write_pcm(path, samples_int, width, rate=8000, channels=1):
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        if width == 3:
            v = np.asarray(samples_int, dtype=np.int64) % (1 << 24)
            data = np.stack([v & 255, (v >> 8) & 255, (v >> 16) & 255], axis=1).astype(np.uint8).tobytes()
        else:
            data = np.asarray(samples_int).astype({1: "u1", 2: "<i2", 4: "<i4"}[width]).tobytes()
        w.writeframes(data)
    return path


def write_float_wav(path, samples):
    data = np.asarray(samples, dtype="<f4").tobytes()
    fmt = struct.pack("<HHIIHH", 3, 1, 8000, 8000 * 4, 4, 32)  # format 3: IEEE float
    body = (
        b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    )
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
    return path


def test_wav_reading_widths_and_writing(tmp_path):
    s16 = np.array([0, 16384, -16384, 32767, -32768])
    x, rate = au.read_wav(write_pcm(tmp_path / "a.wav", s16, 2))
    assert rate == 8000 and np.allclose(x, s16 / 32768.0)
    x, _ = au.read_wav(write_pcm(tmp_path / "b.wav", [128, 192, 64], 1))
    assert np.allclose(x, [0, 0.5, -0.5])
    x, _ = au.read_wav(write_pcm(tmp_path / "c.wav", [0, 1 << 22, -(1 << 22)], 3))
    assert np.allclose(x, [0, 0.5, -0.5])
    stereo = np.array([[1000, 3000], [-2000, 0]]).reshape(-1)
    x, _ = au.read_wav(write_pcm(tmp_path / "d.wav", stereo, 2, channels=2))
    assert np.allclose(x, [2000 / 32768, -1000 / 32768])
    with pytest.raises(ValueError, match="f.wav"):
        au.read_wav(write_float_wav(tmp_path / "f.wav", [0.1, 0.2]))
    wav = np.sin(np.linspace(0, 20, 400)).astype(np.float32) * 0.5
    y, r = au.read_wav(au.write_wav(tmp_path / "w.wav", wav, 16000))
    assert r == 16000 and np.abs(y - wav).max() < 1e-4


def test_resample_keeps_the_tone():
    rate = 16000
    t = np.arange(rate) / rate
    x = np.sin(2 * np.pi * 440 * t) + 0.5 * np.sin(2 * np.pi * 6000 * t)  # 6 kHz is above 8 kHz's Nyquist
    y = au.resample(x, rate, 8000)
    assert len(y) == 8000
    spectrum = np.abs(np.fft.rfft(y))
    assert abs(int(np.argmax(spectrum)) - 440) <= 1  # 1 Hz bins over one second
    assert spectrum[1900:2100].max() < 0.05 * spectrum.max()  # 6 kHz would alias to 2 kHz


def test_prepare_audio_folder_splits_by_file_and_reports_bad_files(tmp_path, capsys):
    folder = tmp_path / "wav"
    folder.mkdir()
    rng = np.random.default_rng(4)
    for i in range(5):
        write_pcm(folder / f"t{i}.wav", rng.integers(-20000, 20000, size=4000 + 100 * i), 2, rate=16000)
    write_float_wav(folder / "float.wav", [0.0] * 100)
    with pytest.raises(BadInputFile, match="float.wav"):
        prepare_cli(["audio", str(folder), "--out", str(tmp_path / "s")])
    assert prepare_cli(["audio", str(folder), "--out", str(tmp_path / "s"), "--on-error", "skip"]) == 0
    assert "float.wav" in capsys.readouterr().err
    store = TokenStore(tmp_path / "s")
    assert store.meta["modality"] == "audio" and store.meta["sample_rate"] == 8000
    lengths = sorted(int(n) for s in store.split_names for n in store.split(s).lengths)
    assert lengths == [2 + 2000 + 50 * i for i in range(5)]  # resampled 16 kHz -> 8 kHz, SOS + EOS
    expected = assign_splits(sorted(f.name for f in folder.glob("*.wav")), 0.0, 0.2)
    assert len(store.split("train")) == sum(v == "train" for k, v in expected.items() if "float" not in k)
    # Keeping the file's rate.
    assert prepare_cli(["audio", str(folder / "t0.wav"), "--out", str(tmp_path / "k"), "--rate", "file"]) == 0
    keep = TokenStore(tmp_path / "k")
    assert keep.meta["sample_rate"] == 16000 and keep.split("train").num_tokens == 4002
    doc = np.asarray(keep.split("train")[0])
    x, _ = au.read_wav(folder / "t0.wav")
    assert np.array_equal(doc[1:-1] - 3, au.mu_law_encode(x))


def test_spectrogram_png(tmp_path):
    t = np.arange(8000) / 8000
    path = au.save_spectrogram(np.sin(2 * np.pi * 1000 * t), 8000, tmp_path / "s.png", split_at=0.5)
    assert np.asarray(PIL.open(path)).std() > 0
    json.dumps({"ok": str(path)})
