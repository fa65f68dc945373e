"""Long context: chunked cross-attend, activation checkpointing, the copy task, benchmark smoke runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from perceiver_ar.config import PerceiverARConfig
from perceiver_ar.copy_task import (
    WidthCurriculum,
    centred_windows,
    copy_accuracy,
    copy_distance,
    copy_sequences,
    distance_buckets,
    half_length,
    training_crops,
    write_copy_store,
)
from perceiver_ar.loss import perceiver_ar_loss, shift_events
from perceiver_ar.model import PerceiverAR, PerceiverAROutput
from perceiver_ar.store import TokenStore
from perceiver_ar.vocab import EOS_ID, PAD_ID, SOS_ID

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def padded_batch(T: int = 40, lengths=(40, 31, 9, 3), seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded events of the given lengths; inputs and targets as the official shift makes them."""
    g = torch.Generator().manual_seed(seed)
    events = torch.randint(3, 259, (len(lengths), T + 1), generator=g)
    for i, n in enumerate(lengths):
        events[i, n + 1 :] = PAD_ID
    return shift_events(events)


def loss_and_grads(cfg: PerceiverARConfig, inputs, targets, seed: int = 0):
    torch.manual_seed(seed)
    model = PerceiverAR(cfg)
    with torch.no_grad():  # the zero-initialised logits layer would hide every other gradient
        model.output.weight.normal_(0, 0.1)
    model.train()
    torch.manual_seed(seed + 1)  # dropout draws
    out = model(inputs)
    loss = perceiver_ar_loss(out.logits, targets, out.latent_index).mean
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads


def assert_same(a, b, atol=1e-5):
    logits_a, grads_a = a
    logits_b, grads_b = b
    torch.testing.assert_close(logits_a, logits_b, atol=atol, rtol=1e-4)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=atol, rtol=1e-4, msg=name)


BASE = dict(
    context_len=64,
    num_latents=16,
    input_dim=32,
    latent_dim=24,
    num_latent_layers=2,
    cross_attend_heads=4,
    latent_heads=4,
)


@pytest.mark.parametrize("position_encoding", ["rotary", "absolute"])
@pytest.mark.parametrize("chunk", [1, 5, 8])
def test_chunked_cross_attend_equals_unchunked(position_encoding, chunk):
    # Rows longer than M, shorter than M (invalid latents, uniform rows) and padded.
    inputs, targets = padded_batch()
    cfg = dict(BASE, position_encoding=position_encoding)
    plain = loss_and_grads(PerceiverARConfig(**cfg), inputs, targets)
    chunked = loss_and_grads(PerceiverARConfig(**cfg, cross_attend_chunk_size=chunk), inputs, targets)
    assert_same(plain, chunked)


def test_chunked_cross_attend_full_rows():
    # The fast path (no padding, one shared band mask) chunks the same way.
    inputs, targets = padded_batch(lengths=(40, 40))
    plain = loss_and_grads(PerceiverARConfig(**BASE), inputs, targets)
    chunked = loss_and_grads(PerceiverARConfig(**BASE, cross_attend_chunk_size=3), inputs, targets)
    assert_same(plain, chunked)


@pytest.mark.parametrize("position_encoding", ["rotary", "absolute"])
def test_inference_forward_equals_training_forward(position_encoding):
    # Without autograd the model may take memory-saving paths (chunks, in-place
    # rotation); the logits must not change.
    inputs, _ = padded_batch()
    for chunk in (0, 8):
        torch.manual_seed(0)
        model = PerceiverAR(
            PerceiverARConfig(**BASE, position_encoding=position_encoding, cross_attend_chunk_size=chunk)
        )
        with torch.no_grad():
            model.output.weight.normal_(0, 0.1)
        model.eval()
        with_grad = model(inputs).logits.detach()
        with torch.no_grad():
            without = model(inputs).logits
        torch.testing.assert_close(with_grad, without, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("M", [1, 5, 16])
def test_prefix_causal_attention_equals_band_mask(M):
    # The mask-free full-row cross-attend against SDPA with the band mask.
    from perceiver_ar.attention import PrefixCausalAttention, band_mask

    T = 40
    g = torch.Generator().manual_seed(M)
    q, k, v = (torch.randn(2, 3, n, 8, generator=g, requires_grad=True) for n in (M, T, T))
    band = band_mask(M, T, q.device)
    assert band[0, 0, 0].sum() == T - M + 1 and band[0, 0, -1].all()
    grad = torch.randn(2, 3, M, 8, generator=g)
    results = []
    for fn in (
        lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=band),
        lambda: PrefixCausalAttention.apply(q, k, v),
    ):
        out = fn()
        results.append((out.detach(), *torch.autograd.grad(out, (q, k, v), grad)))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_activation_checkpointing_leaves_gradients_unchanged(dropout):
    inputs, targets = padded_batch()
    cfg = dict(BASE, dropout=dropout)
    plain = loss_and_grads(PerceiverARConfig(**cfg), inputs, targets)
    ckpt = loss_and_grads(
        PerceiverARConfig(
            **cfg, checkpoint_cross_attend=True, checkpoint_latent_layers=True, cross_attend_chunk_size=4
        ),
        inputs,
        targets,
    )
    assert_same(plain, ckpt)


# ----------------------------------------------------------------------------
# The copy task
# ----------------------------------------------------------------------------


def test_copy_sequences_have_the_official_layout():
    N = 20
    rows = copy_sequences(5, N, np.random.default_rng(0))
    h = half_length(N)
    assert rows.shape == (5, N) and h == 9
    for row in rows:
        assert row[0] == SOS_ID and row[-1] == EOS_ID
        first, mirrored = row[1 : h + 1], row[h + 1 : 2 * h + 1]
        assert np.array_equal(mirrored, first[::-1])
        assert first.min() >= 3 and first.max() <= 258
    # The data tokens are uniform over all 256 byte values.
    many = copy_sequences(200, 258, np.random.default_rng(1))[:, 1:129]
    assert len(np.unique(many)) == 256
    # Event h+1+k copies event h-k: distance 2k+1.
    d = copy_distance(N)
    for k in range(h):
        assert rows[0, h + 1 + k] == rows[0, h + 1 + k - d[k]]
    with pytest.raises(ValueError, match="even length"):
        half_length(21)


def test_distance_buckets_cover_every_distance():
    for N in (8, 20, 1024):
        buckets = distance_buckets(N)
        d = copy_distance(N)
        covered = sum(((d >= lo) & (d <= hi)).sum() for lo, hi in buckets)
        assert covered == len(d)


def test_training_crops_are_prefixes():
    events = torch.from_numpy(copy_sequences(64, 32, np.random.default_rng(0)))
    crops = training_crops(events, 16, torch.Generator().manual_seed(0))
    lengths = (crops != PAD_ID).sum(1)
    assert lengths.min() >= 16 and lengths.max() <= 32
    for row, crop, n in zip(events, crops, lengths, strict=False):
        assert torch.equal(crop[:n], row[:n]) and (crop[n:] == PAD_ID).all()


@pytest.mark.parametrize("width", [2, 8, 18])
def test_centred_windows_are_slices_of_copy_sequences_at_their_positions(width):
    N = 20
    h = half_length(N)
    events, positions = centred_windows(7, N, width, np.random.default_rng(3))
    assert events.shape == positions.shape == (7, width) and events.dtype == positions.dtype == np.int64
    half = width // 2
    first = h + 1 - half  # event index of the window's first event
    for row, pos in zip(events, positions, strict=True):
        # Put the window's random half where it belongs in a full sequence: the slice is the window.
        full = copy_sequences(1, N, np.random.default_rng(9))[0]
        full[first : h + 1] = row[:half]
        full[h + 1 : 2 * h + 1] = full[1 : h + 1][::-1]
        assert np.array_equal(full[first : first + width], row)
        assert np.array_equal(pos, np.arange(first, first + width) + 1)  # event index i sits at position i+1
        assert row.min() >= 3 and row.max() <= 258
    # A training batch of a window: the last width/2 latents predict mirrored tokens whose source is visible.
    inputs, targets = events[:, :-1], events[:, 1:]
    for j in range(half - 1, width - 1):  # latent on input index j predicts event j + 1
        source = width - 1 - (j + 1)
        assert source <= j and np.array_equal(targets[:, j], inputs[:, source])


def test_centred_window_of_the_whole_length_is_the_official_sequence():
    events, positions = centred_windows(3, 20, 20, np.random.default_rng(5))
    assert np.array_equal(events, copy_sequences(3, 20, np.random.default_rng(5)))
    assert np.array_equal(positions, np.broadcast_to(np.arange(1, 21), (3, 20)))
    assert len(np.unique(centred_windows(2000, 600, 8, np.random.default_rng(0))[0])) == 256  # every byte
    for width in (0, 7, 19, 22):
        with pytest.raises(ValueError, match="centred window"):
            centred_windows(1, 20, width, np.random.default_rng(0))


def test_width_curriculum_doubles_on_running_accuracy_up_to_the_whole_sequence():
    cur = WidthCurriculum(100, start_width=16, grow_at=0.9, window=4, min_steps=3)
    assert cur.width == 16 and not cur.done
    assert not cur.update(1.0) and not cur.update(1.0)  # fewer than min_steps at this width
    assert cur.update(1.0) and cur.width == 32 and cur.recent == []
    for acc in (0.5, 1.0, 1.0):
        assert not cur.update(acc)  # mean of the last 3 is 0.83
    assert cur.update(1.0) is False  # last 4: 0.875
    assert cur.update(1.0) and cur.width == 64  # last 4: 1.0
    for _ in range(3):
        grew = cur.update(0.95)
    assert grew and cur.width == 100 and cur.done  # 128 > 2h = 98: the whole sequence comes next
    assert not any(cur.update(1.0) for _ in range(10)) and cur.width == 100
    assert WidthCurriculum(20, start_width=64).width == 20  # a start wider than N is the whole sequence
    with pytest.raises(ValueError, match="centred window"):
        WidthCurriculum(100, start_width=15)
    with pytest.raises(ValueError, match="grow_at"):
        WidthCurriculum(100, grow_at=1.5)


def test_copy_store_and_cli(tmp_path):
    out = write_copy_store(tmp_path / "copy", length=16, num_train=5, num_validation=3, seed=4)
    store = TokenStore(out)
    assert store.meta["copy"]["length"] == 16
    assert len(store.split("train")) == 5 and len(store.split("validation")) == 3
    for doc in store.split("train"):
        assert len(doc) == 16 and doc[0] == SOS_ID and doc[-1] == EOS_ID
        assert np.array_equal(doc[8:15], doc[1:8][::-1])
    assert not np.array_equal(store.split("train")[0], store.split("validation")[0])

    from perceiver_ar.cli import main

    out2 = tmp_path / "c2"
    argv = [
        "prepare",
        "copy",
        "--length",
        "10",
        "--out",
        str(out2),
        "--num-train",
        "2",
        "--num-validation",
        "1",
    ]
    assert main(argv) == 0
    assert TokenStore(out2).split("train").lengths.tolist() == [10, 10]
    assert main(["prepare", "copy", "--length", "11", "--out", str(tmp_path / "c3")]) == 2  # one clear error
    assert not (tmp_path / "c3").exists()


class MirrorOracle(torch.nn.Module):
    """Predicts the mirrored token exactly, up to a copy distance of ``reach``."""

    def __init__(self, N: int, M: int, reach: int):
        super().__init__()
        self.config = PerceiverARConfig(
            context_len=N,
            num_latents=min(M, N),
            input_dim=8,
            latent_dim=8,
            cross_attend_heads=2,
            latent_heads=2,
        )
        self.h = half_length(N)
        self.reach = reach
        self.calls: list[tuple[int, int]] = []

    def forward(self, inputs, num_latents=None):
        B, T = inputs.shape
        m = min(num_latents, T)
        self.calls.append((T, m))
        idx = torch.arange(T - m, T)
        src = (2 * self.h - idx).clamp(0, T - 1)  # latent on input s predicts event s+1 = event 2h-s
        pred = inputs[:, src]
        dist = 2 * (idx - self.h) + 1
        pred = torch.where((dist <= self.reach)[None, :], pred, torch.full_like(pred, 3))
        logits = torch.nn.functional.one_hot(pred, 259).float()
        return PerceiverAROutput(logits=logits, latent_index=idx.expand(B, m))


@pytest.mark.parametrize("M", [5, 8, 64])
def test_copy_accuracy_scores_every_mirrored_target_once(M):
    N = 40
    seqs = copy_sequences(6, N, np.random.default_rng(2))
    acc = copy_accuracy(MirrorOracle(N, M, reach=10_000), seqs, num_latents=M, batch_size=4)
    assert acc.total == 6 * half_length(N) and acc.accuracy == 1.0
    assert all(b["accuracy"] == 1.0 for b in acc.buckets)
    # An oracle that only reaches distance 7 is right on the first buckets only.
    partial = copy_accuracy(MirrorOracle(N, M, reach=7), seqs, num_latents=M, batch_size=4)
    by_bucket = {(b["lo"], b["hi"]): b["accuracy"] for b in partial.buckets}
    assert by_bucket[(1, 1)] == by_bucket[(4, 7)] == 1.0
    assert by_bucket[(8, 15)] < 0.05 and by_bucket[(16, 31)] < 0.05
    assert partial.correct < partial.total


def test_copy_accuracy_runs_a_real_model():
    torch.manual_seed(0)
    N = 32
    model = PerceiverAR(
        PerceiverARConfig(
            context_len=N,
            num_latents=6,
            input_dim=16,
            latent_dim=16,
            num_latent_layers=1,
            cross_attend_heads=2,
            latent_heads=2,
            position_encoding="absolute",
            absolute_table="sinusoidal",
        )
    )
    acc = copy_accuracy(model, copy_sequences(3, N, np.random.default_rng(0)))
    assert acc.total == 3 * half_length(N) and 0.0 <= acc.accuracy <= 1.0
    assert "distance" in acc.table()


# ----------------------------------------------------------------------------
# Benchmark scripts: smoke runs of --quick (no timing assertions)
# ----------------------------------------------------------------------------

BENCHMARKS = [
    "bench_vs_decoder.py",
    "bench_memory.py",
    "bench_flops.py",
    "bench_flexibility.py",
    "bench_ports.py",
    "train_copy.py",
    "bench_generate.py",
    "bench_cross_attend_dropout.py",
    "bench_context_parallel.py",
    "bench_prepare.py",
    "bench_context_benefit.py",
    "bench_equal_time.py",
    "bench_threads.py",
]


@pytest.mark.parametrize("script", BENCHMARKS)
def test_benchmark_quick_mode_runs(script, tmp_path):
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", PERCEIVER_AR_BENCH_RESULTS=str(tmp_path))
    args = [sys.executable, str(BENCH / script), "--quick"]
    if script == "train_copy.py":
        args += ["--out", str(tmp_path / "copy-model")]
    if script == "bench_context_benefit.py":
        args += ["--out", str(tmp_path / "context-benefit")]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert list(tmp_path.glob("*.json")) and list(tmp_path.glob("*.png"))
    if script == "bench_ports.py":  # the training rows carry the fraction of the peak measured in the run
        result = json.loads((tmp_path / "bench_ports_quick.json").read_text())
        assert result["matmul_peak_gflops"] > 0
        assert result["train_rows"] and all(0 < row["of_peak"] for row in result["train_rows"])


def test_bench_ports_training_rows_against_the_matmul_peak(monkeypatch):
    """Each row's rate over the peak at this library's FLOP count; what 1.3x the faster port needs."""
    monkeypatch.syspath_prepend(str(BENCH))
    import bench_flops
    import bench_ports

    size = dict(N=1024, M=256, D=256, L=4, batch=4)
    gflop = bench_ports.step_gflop(size)
    cfg = dict(input_dim=256, latent_dim=256, num_latent_layers=4, vocab_size=bench_ports.VOCAB)
    assert gflop == pytest.approx(bench_flops.training_flops(cfg, 1024, 256, 4) / 1e9)
    assert gflop > bench_ports.step_gflop({**size, "batch": 1}) * 3.9  # linear in the batch
    rows = [
        {"impl": bench_ports.THIS, "step_s": gflop / 80.0, "gflop_step": gflop, **size},  # 80 GFLOP/s
        {"impl": "perceiver-io 0.11", "step_s": gflop / 70.0, "gflop_step": gflop, **size},
        {"impl": "perceiver-ar-pytorch 0.0.10", "step_s": gflop / 60.0, "gflop_step": gflop, **size},
        {"impl": "perceiver-ar (before)", "step_s": gflop / 90.0, "gflop_step": gflop, **size},
        {"impl": "perceiver-io 0.11", "note": "failed", **size},
    ]
    bench_ports.add_peak_fractions(rows, peak_gflops=100.0)
    assert [round(r.get("of_peak", -1), 6) for r in rows] == [0.8, 0.7, 0.6, 0.9, -1]
    assert rows[0]["target_of_peak"] == pytest.approx(1.3 * 0.7)
    assert all("target_of_peak" not in r for r in rows[1:])
    bench_ports.add_peak_fractions(rows[4:], peak_gflops=None)  # no peak measured: nothing added
    assert "of_peak" not in rows[4]


def test_bench_ports_replot_redraws_a_saved_run(monkeypatch, tmp_path):
    """--replot draws a results JSON's rows, measuring nothing; the annotation is over the faster port."""
    monkeypatch.syspath_prepend(str(BENCH))
    import bench_ports
    import common

    out = tmp_path / "results"
    monkeypatch.setattr(common, "RESULTS_DIR", out)
    monkeypatch.setattr(bench_ports, "RESULTS_DIR", out)
    monkeypatch.setattr(bench_ports, "run_case", lambda *a, **k: pytest.fail("--replot must not measure"))
    size = dict(N=256, M=64, D=64, L=2)
    train = [
        {"impl": bench_ports.THIS, "tokens_per_s": 100.0, "ours_speedup": 1.0, "batch": 2, **size},
        {"impl": "perceiver-io 0.11", "tokens_per_s": 80.0, "ours_speedup": 1.25, "batch": 2, **size},
        {
            "impl": "perceiver-ar-pytorch 0.0.10",
            "tokens_per_s": 90.0,
            "ours_speedup": 1.11,
            "batch": 2,
            **size,
        },
        {"impl": "perceiver-ar (before)", "tokens_per_s": 95.0, "ours_speedup": 1.05, "batch": 2, **size},
    ]
    decode = [
        {"impl": bench_ports.THIS, "decode_tok_s": 50.0, "ours_speedup": 1.0, **size},
        {"impl": "perceiver-io 0.11", "decode_tok_s": 20.0, "ours_speedup": 2.5, **size},
        {"impl": "perceiver-io 0.11", "note": "failed", "N": 1024, "M": 256, "D": 64, "L": 2},
    ]
    # Another tree of this library is never the port it is compared with; a failed row counts for nothing.
    assert bench_ports.faster_port_speedup(train, (256, 64)) == pytest.approx(1.11)
    assert bench_ports.faster_port_speedup(decode, (1024, 256)) is None
    saved = tmp_path / "run.json"
    saved.write_text(json.dumps({"train_rows": train, "decode_rows": decode}))
    assert bench_ports.main(["--replot", str(saved)]) == 0
    assert [f.name for f in out.iterdir()] == ["run.png"] and (out / "run.png").stat().st_size > 10_000
    # The speed-up is written above this library's bar only, at its centre.
    fig, ax = common.new_figure()
    note = lambda r: "1.11x" if r["impl"] == bench_ports.THIS else None  # noqa: E731
    common.grouped_bars(
        ax, train, group=lambda r: r["N"], series=lambda r: r["impl"], value="tokens_per_s", note=note
    )
    ours_bar = ax.containers[0].patches[0]
    assert [t.get_text() for t in ax.texts] == ["1.11x"]
    assert ax.texts[0].xy == pytest.approx((ours_bar.get_x() + ours_bar.get_width() / 2, 100.0))
    # A missing, unreadable or foreign JSON is one argparse error (exit 2), and no figure is (over)written.
    (out / "bench_flops.png").write_bytes(b"a committed figure")
    foreign = tmp_path / "bench_flops.json"
    foreign.write_text(json.dumps({"rows": [{"model": "Perceiver AR"}]}))
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    for bad in (tmp_path / "missing.json", broken, foreign):
        with pytest.raises(SystemExit) as exit_info:
            bench_ports.main(["--replot", str(bad)])
        assert exit_info.value.code == 2
    assert sorted(f.name for f in out.iterdir()) == ["bench_flops.png", "run.png"]
    assert (out / "bench_flops.png").read_bytes() == b"a committed figure"


def test_bench_ports_names_a_partial_run_apart(monkeypatch):
    """Only a run of every size in both modes writes bench_ports.json/.png; a partial run has its own name."""
    monkeypatch.syspath_prepend(str(BENCH))
    import bench_ports

    def name(*argv: str) -> str:
        return bench_ports.result_name(bench_ports.build_parser().parse_args(list(argv)))

    every_train = [str(i) for i in range(len(bench_ports.TRAIN_SIZES))]
    assert name() == "bench_ports"
    assert name("--train-sizes", *reversed(every_train), "--extra-src", "before=/tmp/src") == "bench_ports"
    assert name("--modes", "train", "--train-sizes", "0", "1") == "bench_ports_train0-1"
    assert name("--modes", "train") == "bench_ports_train"
    assert name("--modes", "decode", "--decode-sizes", "2") == "bench_ports_decode2"
    assert name("--train-sizes", "3", "--decode-sizes", "0") == "bench_ports_train3_decode0"
    assert name("--quick") == "bench_ports_quick"
    assert name("--rounds", "1") == "bench_ports_train_decode_settings"
    assert name("--compile", "--extra-src", "before=/tmp/src") == "bench_ports"


def test_bench_threads_names_a_partial_run_apart(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import bench_threads

    def name(*argv: str) -> str:
        return bench_threads.result_name(bench_threads.build_parser().parse_args(list(argv)))

    assert name() == "bench_threads"
    assert name("--sizes", "demo", "small", "--threads", "2", "1") == "bench_threads"
    assert name("--sizes", "small") == name("--settings", "alone") == "bench_threads_partial"
    assert name("--rounds", "1") == name("--seconds", "2") == "bench_threads_partial"


@pytest.mark.parametrize(
    "make_args,says",
    [
        (lambda copy, tmp: [], "give at least one store"),
        (lambda copy, tmp: ["--bach", str(tmp / "missing")], "not a data store"),
        (lambda copy, tmp: ["--fmnist", str(copy)], "the store holds copy, the recipe needs image"),
        (lambda copy, tmp: ["--asterisk", str(copy), "--probe-steps", "1"], "--probe-steps at least 2"),
    ],
    ids=["no store", "missing", "wrong modality", "one probe step"],
)
def test_bench_equal_time_refuses_bad_arguments_in_one_line(make_args, says, tmp_path):
    """Before any training process starts: one line naming the fix, exit code 2, nothing written."""
    copy = write_copy_store(tmp_path / "copy", length=16, num_train=5, num_validation=3)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", PERCEIVER_AR_BENCH_RESULTS=str(tmp_path / "results"))
    args = [sys.executable, str(BENCH / "bench_equal_time.py"), *make_args(copy, tmp_path)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr[-2000:]
    error_lines = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(error_lines) == 1 and says in error_lines[0], proc.stderr
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_train_copy_curriculum_quick_run_reports_times_load_and_growth(tmp_path):
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", PERCEIVER_AR_BENCH_RESULTS=str(tmp_path))
    script = str(BENCH / "train_copy.py")
    args = [sys.executable, script, "--quick", "--curriculum", "centre", "--out", str(tmp_path / "m")]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads((tmp_path / "train_copy_quick.json").read_text())
    assert (tmp_path / "train_copy_quick.png").is_file() and (tmp_path / "m" / "copy_result.json").is_file()
    summary = (tmp_path / "train_copy_quick").with_suffix(".md").read_text()  # the tables the docs show
    assert "| 16 | 5 | 8 |" in summary and "| 32-61 |" in summary and "load average" in summary
    # --quick grows every 5 steps: windows 16 and 32 of N = 64, then whole sequences.
    assert [g["width"] for g in r["growths"]] == [16, 32] and [g["step"] for g in r["growths"]] == [5, 10]
    assert [e["width"] for e in r["steps_log"]] == [16] * 5 + [32] * 5 + [64] * 2
    # 64 targets a step: 8 rows of 8 latents, 4 of 16, 2 of 32.
    assert [e["rows"] for e in r["steps_log"]] == [8] * 5 + [4] * 5 + [2] * 2
    assert [e["step"] for e in r["evals"]] == [5, 10, 12]  # at each growth, then at the last step
    assert r["final"]["length"] == 64 and sum(b["total"] for b in r["final"]["buckets"]) == 4 * 31
    assert 0 < r["train_seconds"] <= r["wall_seconds"] and r["cpu_seconds"] > 0
    assert len(r["load_average_start"]) == len(r["load_average_end"]) == 3
    # A setting that cannot run: one line, exit 2.
    bad = subprocess.run([sys.executable, script, "--length", "101"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "even length" in bad.stderr and "Traceback" not in bad.stderr
