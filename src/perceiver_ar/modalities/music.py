"""Symbolic music: MIDI <-> the Music Transformer event vocabulary.

The 388 events the paper used (Music Transformer, Huang et al. 2018):

    0..127    note-on of pitch p
    128..255  note-off of pitch p
    256..355  time shift of 1..100 steps of 10 ms
    356..387  set velocity to bin 0..31 (4 MIDI velocities a bin)

Event e has the official id e + 3, so V = 391. A document is
``[SOS, events..., EOS]``. MIDI is read and written through ``mido``:
every track and channel except percussion (channel 10) is merged into one
performance, times come from the tempo map, and onsets and offsets snap to
the 10 ms grid. Writing uses 500 ticks per beat at 120 bpm, so one tick is
exactly one millisecond and the grid survives a round trip.

The default corpus is the public-domain Bach chorales bundled with the PyPI
package ``music21``; parsing a score takes most of a second, so each one is
rendered to MIDI once into a cache folder and read from there afterwards.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from ..files import atomic_write
from ..store import StoreWriter, check_store_output
from ..vocab import EOS_ID, SOS_ID, TOKEN_OFFSET
from . import assign_splits, describe, find_files, handle_bad_file, split_keys

NUM_PITCHES = 128
NUM_TIME_SHIFTS = 100
NUM_VELOCITY_BINS = 32
NOTE_ON = 0
NOTE_OFF = NOTE_ON + NUM_PITCHES
TIME_SHIFT = NOTE_OFF + NUM_PITCHES
VELOCITY = TIME_SHIFT + NUM_TIME_SHIFTS
NUM_EVENTS = VELOCITY + NUM_VELOCITY_BINS  # 388
VOCAB_SIZE = NUM_EVENTS + TOKEN_OFFSET  # 391
STEP_SECONDS = 0.01
PERCUSSION_CHANNEL = 9  # MIDI channel 10, zero-based
TICKS_PER_BEAT = 500  # with 120 bpm (500,000 us a beat) one tick is 1 ms
TEMPO = 500_000
MIDI_SUFFIXES = (".mid", ".midi")
# The subsets of the music21 corpus that are in the public domain (the default data uses these).
PUBLIC_DOMAIN_COMPOSERS = ("bach", "beethoven", "oneills1850", "ryansMammoth")
SCORE_SUFFIXES = (".mxl", ".xml", ".musicxml", ".krn", ".abc", ".mid", ".midi")


@dataclass(frozen=True)
class Note:
    pitch: int
    start: float  # seconds
    end: float  # seconds
    velocity: int


def velocity_to_bin(velocity: int) -> int:
    return min(int(velocity), 127) * NUM_VELOCITY_BINS // 128


def bin_to_velocity(b: int) -> int:
    """The middle of a bin's 4 velocities (2, 6, ..., 126)."""
    return int(b) * (128 // NUM_VELOCITY_BINS) + 2


# ----------------------------------------------------------------------------
# MIDI <-> notes (mido)
# ----------------------------------------------------------------------------


def midi_to_notes(source: str | os.PathLike | bytes) -> list[Note]:
    """The notes of a MIDI file (path or bytes), sorted by onset; percussion is left out."""
    import mido

    if isinstance(source, bytes):
        mid = mido.MidiFile(file=io.BytesIO(source))
    else:
        mid = mido.MidiFile(source)
    notes: list[Note] = []
    sounding: dict[tuple[int, int], list[tuple[float, int]]] = {}  # (channel, pitch) -> [(start, velocity)]
    now = 0.0
    # Iterating a MidiFile merges the tracks and converts delta ticks to
    # seconds through the tempo map.
    for msg in mid:
        now += msg.time
        if msg.type not in ("note_on", "note_off") or msg.channel == PERCUSSION_CHANNEL:
            continue
        key = (msg.channel, msg.note)
        if msg.type == "note_on" and msg.velocity > 0:
            sounding.setdefault(key, []).append((now, msg.velocity))
        elif sounding.get(key):
            start, vel = sounding[key].pop(0)  # first in, first out
            notes.append(Note(msg.note, start, now, vel))
    for (_, pitch), opens in sounding.items():  # notes never released end with the file
        notes.extend(Note(pitch, start, now, vel) for start, vel in opens)
    notes.sort(key=lambda n: (n.start, n.pitch, n.end))
    return notes


def notes_to_midi(notes: list[Note], path: str | os.PathLike | None = None) -> Any:
    """A one-track ``mido.MidiFile`` of the notes (1 tick = 1 ms); saved when ``path`` is given."""
    import mido

    events = []  # (tick, order, message): offs sort before ons at the same tick
    for n in notes:
        on, off = round(n.start * 1000), max(round(n.end * 1000), round(n.start * 1000) + 1)
        events.append((on, 1, mido.Message("note_on", note=n.pitch, velocity=max(1, min(127, n.velocity)))))
        events.append((off, 0, mido.Message("note_off", note=n.pitch, velocity=0)))
    events.sort(key=lambda e: (e[0], e[1]))
    track = mido.MidiTrack([mido.MetaMessage("set_tempo", tempo=TEMPO, time=0)])
    last = 0
    for tick, _, msg in events:
        track.append(msg.copy(time=tick - last))
        last = tick
    track.append(mido.MetaMessage("end_of_track", time=0))
    mid = mido.MidiFile(ticks_per_beat=TICKS_PER_BEAT)
    mid.tracks.append(track)
    if path is not None:
        mid.save(path)
    return mid


# ----------------------------------------------------------------------------
# Notes <-> events
# ----------------------------------------------------------------------------


def notes_to_events(notes: list[Note]) -> np.ndarray:
    """Event ids (0..387, no offset) of a performance on the 10 ms grid.

    At each grid step note-offs come before velocity changes and note-ons. A
    note shorter than one step lasts one step; a note that restarts while its
    pitch still sounds cuts the earlier one short (one voice per pitch).
    """
    changes = []  # (step, kind, pitch, velocity); kind 0 = off, 1 = on
    for n in notes:
        on = round(n.start / STEP_SECONDS)
        off = max(round(n.end / STEP_SECONDS), on + 1)
        changes.append((on, 1, n.pitch, n.velocity))
        changes.append((off, 0, n.pitch, 0))
    changes.sort(key=lambda c: (c[0], c[1], c[2]))
    events: list[int] = []
    step, velocity_bin = 0, None
    # How many notes of each pitch are asked to sound; the event stream only
    # has one voice per pitch, so only the first on and the last off count.
    active = np.zeros(NUM_PITCHES, dtype=np.int64)
    for at, kind, pitch, velocity in changes:
        if kind == 0:
            active[pitch] -= 1
            if active[pitch] > 0:
                continue  # another voice of this pitch still sounds
        elif active[pitch] > 0:
            # Restart: end the sounding note here, then strike again.
            active[pitch] += 1
            emit_off = True
        else:
            active[pitch] += 1
            emit_off = False
        while at > step:
            shift = min(at - step, NUM_TIME_SHIFTS)
            events.append(TIME_SHIFT + shift - 1)
            step += shift
        if kind == 0:
            events.append(NOTE_OFF + pitch)
            continue
        if emit_off:
            events.append(NOTE_OFF + pitch)
        b = velocity_to_bin(velocity)
        if b != velocity_bin:
            events.append(VELOCITY + b)
            velocity_bin = b
        events.append(NOTE_ON + pitch)
    return np.asarray(events, dtype=np.int64)


def events_to_notes(events: np.ndarray | list[int]) -> list[Note]:
    """Notes of an event stream (ids 0..387); notes left sounding end at the last step.

    Tolerant of what a sampler may produce: an off without an on is ignored,
    an on of a sounding pitch restarts it.
    """
    notes: list[Note] = []
    sounding: dict[int, tuple[int, int]] = {}  # pitch -> (start step, velocity)
    step, velocity = 0, bin_to_velocity(velocity_to_bin(64))
    for e in map(int, events):
        if NOTE_ON <= e < NOTE_OFF or NOTE_OFF <= e < TIME_SHIFT:
            pitch = e % NUM_PITCHES
            if pitch in sounding:
                start, vel = sounding.pop(pitch)
                if step > start:
                    notes.append(Note(pitch, start * STEP_SECONDS, step * STEP_SECONDS, vel))
            if e < NOTE_OFF:
                sounding[pitch] = (step, velocity)
        elif TIME_SHIFT <= e < VELOCITY:
            step += e - TIME_SHIFT + 1
        elif VELOCITY <= e < NUM_EVENTS:
            velocity = bin_to_velocity(e - VELOCITY)
    end = max([step] + [s + 1 for s, _ in sounding.values()])
    for pitch, (start, vel) in sounding.items():
        notes.append(Note(pitch, start * STEP_SECONDS, end * STEP_SECONDS, vel))
    notes.sort(key=lambda n: (n.start, n.pitch, n.end))
    return notes


def midi_to_tokens(source: str | os.PathLike | bytes) -> np.ndarray:
    """[SOS, event ids + 3..., EOS] of a MIDI file."""
    events = notes_to_events(midi_to_notes(source))
    return np.concatenate([[SOS_ID], events + TOKEN_OFFSET, [EOS_ID]]).astype(np.int64)


def tokens_to_notes(tokens: np.ndarray | list[int]) -> list[Note]:
    """Notes of model ids; special ids (PAD, EOS, SOS) are skipped."""
    ids = np.asarray(tokens, dtype=np.int64).reshape(-1)
    ids = ids[(ids >= TOKEN_OFFSET) & (ids < VOCAB_SIZE)]
    return events_to_notes(ids - TOKEN_OFFSET)


def tokens_to_midi(tokens: np.ndarray | list[int], path: str | os.PathLike) -> Path:
    notes_to_midi(tokens_to_notes(tokens), path)
    return Path(path)


def quantize_notes(notes: list[Note]) -> list[Note]:
    """What a round trip through the events keeps: the 10 ms grid and the velocity bins."""
    out = []
    for n in notes:
        on = round(n.start / STEP_SECONDS)
        off = max(round(n.end / STEP_SECONDS), on + 1)
        vel = bin_to_velocity(velocity_to_bin(n.velocity))
        out.append(Note(n.pitch, on * STEP_SECONDS, off * STEP_SECONDS, vel))
    return sorted(out, key=lambda n: (n.start, n.pitch, n.end))


# ----------------------------------------------------------------------------
# Sources: MIDI folders and the music21 corpus
# ----------------------------------------------------------------------------


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or (Path.home() / ".cache")
    return Path(base) / "perceiver-ar" / "music21"


def music21_midi_files(
    composer: str = "bach",
    cache_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    on_error: str = "skip",
    progress: bool = True,
) -> list[Path]:
    """MIDI renderings of a music21 corpus subset, made once and cached.

    Each score is parsed by music21 and written as ``<cache>/<composer>/<name>.mid``;
    later calls read the cached file. Roman-numeral analyses (.rntxt) are not
    music and are left out.
    """
    if composer not in PUBLIC_DOMAIN_COMPOSERS:
        raise ValueError(
            f"music21 corpus {composer!r} is not one of the public-domain subsets {PUBLIC_DOMAIN_COMPOSERS}"
        )
    try:
        from music21 import corpus
    except ImportError:
        raise ValueError(
            "the default music data needs music21: pip install music21 (or perceiver-ar[music])"
        ) from None
    scores = sorted(Path(p) for p in corpus.getComposer(composer) if Path(p).suffix.lower() in SCORE_SUFFIXES)
    if not scores:
        raise ValueError(f"music21 has no scores for {composer!r}; is its corpus installed?")
    if limit is not None:
        scores = scores[:limit]
    out_dir = Path(cache_dir or default_cache_dir()) / composer
    out_dir.mkdir(parents=True, exist_ok=True)
    todo = [s for s in scores if not (out_dir / f"{s.name}.mid").is_file()]
    bar = None
    if todo and progress:
        from tqdm import tqdm

        bar = tqdm(
            total=len(todo), desc=f"music21 {composer} -> MIDI (once, cached in {out_dir})", unit="score"
        )
    result = []
    for score in scores:
        target = out_dir / f"{score.name}.mid"
        if not target.is_file():
            try:
                data = render_score_to_midi(score)
            except Exception as e:  # music21 raises many kinds on odd scores
                handle_bad_file(score, f"music21 could not render it ({describe(e)})", on_error)
                data = None
            if bar is not None:
                bar.update(1)
            if data is None:
                continue
            atomic_write(target, partial(_write_bytes, data=data))  # never half-written
        result.append(target)
    if bar is not None:
        bar.close()
    return result


def _write_bytes(path: str, data: bytes) -> None:
    Path(path).write_bytes(data)


def render_score_to_midi(path: str | os.PathLike) -> bytes:
    from music21 import converter, midi

    score = converter.parse(str(path))
    return midi.translate.music21ObjectToMidiFile(score).writestr()


# ----------------------------------------------------------------------------
# Preparing a store
# ----------------------------------------------------------------------------


def music_meta(source: str) -> dict[str, Any]:
    return {
        "modality": "music",
        "vocabulary": {
            "type": "midi-events",
            "vocab_size": VOCAB_SIZE,
            "note_on": NOTE_ON + TOKEN_OFFSET,
            "note_off": NOTE_OFF + TOKEN_OFFSET,
            "time_shift": TIME_SHIFT + TOKEN_OFFSET,
            "velocity": VELOCITY + TOKEN_OFFSET,
            "time_shift_seconds": STEP_SECONDS,
            "velocity_bins": NUM_VELOCITY_BINS,
        },
        "sos": True,
        "eos": True,
        "source": source,
    }


def prepare_music(
    paths: list[str | os.PathLike] | None,
    out: str | os.PathLike,
    *,
    corpus: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    validation_fraction: float = 0.05,
    test_fraction: float = 0.1,
    limit: int | None = None,
    on_error: str = "stop",
    overwrite: bool = False,
) -> Path:
    """Write a music store from MIDI files/folders or a music21 corpus subset (split by piece).

    ``overwrite``: replace an existing store at ``out`` (see ``store.check_store_output``).
    """
    check_store_output(out, [*(paths or []), *([cache_dir] if cache_dir else [])], overwrite)
    if corpus is not None:
        if paths:
            raise ValueError("give either MIDI paths or --corpus, not both")
        files = music21_midi_files(corpus, cache_dir, limit=limit, on_error="skip")
        source = f"music21:{corpus}"
    else:
        if not paths:
            raise ValueError("give MIDI files or folders, or --corpus bach")
        files = find_files(list(paths), MIDI_SUFFIXES, "MIDI files (.mid, .midi)")
        if limit is not None:
            files = files[:limit]
        source = "files"
    keys = {f: f.name for f in files} if corpus else split_keys(files)
    splits = assign_splits(list(keys.values()), validation_fraction, test_fraction)
    inputs = [*(paths or []), *files]
    with StoreWriter(out, VOCAB_SIZE, music_meta(source), overwrite=overwrite, inputs=inputs) as writer:
        for f in files:
            try:
                tokens = midi_to_tokens(f)
            except Exception as e:  # mido raises OSError, EOFError, ValueError, ... on broken files
                handle_bad_file(f, f"not a readable MIDI file ({describe(e)})", on_error)
                continue
            if tokens.size <= 2:
                handle_bad_file(f, "holds no notes", on_error)
                continue
            writer.add(splits[keys[f]], tokens)
        return writer.close()


# ----------------------------------------------------------------------------
# Pictures
# ----------------------------------------------------------------------------


def save_piano_roll(
    notes: list[Note], path: str | os.PathLike, title: str = "", split_at: float | None = None
) -> Path:
    """A piano-roll PNG: one bar per note, pitch up, time right; an optional line marks a prompt's end."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3), dpi=100)
    if notes:
        for n in notes:
            ax.add_patch(
                plt.Rectangle(
                    (n.start, n.pitch - 0.4),
                    max(n.end - n.start, STEP_SECONDS),
                    0.8,
                    color=plt.cm.viridis(n.velocity / 127),
                    linewidth=0,
                )
            )
        lo, hi = min(n.pitch for n in notes), max(n.pitch for n in notes)
        ax.set_xlim(0, max(n.end for n in notes))
        ax.set_ylim(lo - 2, hi + 2)
    if split_at is not None:
        ax.axvline(split_at, color="red", linewidth=1)
    ax.set_xlabel("seconds")
    ax.set_ylabel("MIDI pitch")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
