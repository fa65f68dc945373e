"""What the latents read (perceiver_ar.attention_maps, `perceiver-ar inspect`).

The recomputed cross-attend weights are the kernel's: weights @ v equals
``scaled_dot_product`` for every mask form; each latent's weights sum to 1
over the inputs it may see and are exactly 0 on the others (causality);
summing over position blocks or computing in small chunks changes no
number; a tampered recomputation is refused; the command runs end to end
on a tiny store and writes its pictures.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from perceiver_ar import attention_maps
from perceiver_ar.attention import CrossMask, Masks, attention_weights, cross_visible, scaled_dot_product
from perceiver_ar.attention_maps import cross_attention_map
from perceiver_ar.cli import main
from perceiver_ar.data import prepare_text
from perceiver_ar.train import train
from tests.conftest import make_model, tiny_train_config
from tests.test_data import make_corpus


def random_qkv(B=2, H=3, M=5, T=12, dh=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, n, dh, generator=g) for n in (M, T, T))


@pytest.mark.parametrize("form", ["full_rows", "padded", "dropout", "uniform"])
def test_weights_times_values_is_the_kernel_output(form):
    q, k, v = random_qkv()
    B, M, T = q.shape[0], q.shape[2], k.shape[2]
    if form == "full_rows":
        masks = Masks(full_rows=True)
    else:
        last = torch.tensor([[6, 7, 8, 9, 10], [-1, -1, 3, 4, 5]])
        keep = (
            (torch.rand(B, T, generator=torch.Generator().manual_seed(1)) > 0.4)
            if form == "dropout"
            else None
        )
        uniform = last < 0
        last = torch.where(uniform, T - 1, last)
        masks = Masks(cross=CrossMask(last, keep), uniform_rows=uniform if form == "uniform" else None)
        if form != "uniform":
            masks.cross.last = torch.where(uniform, 2, last)
    out = scaled_dot_product(
        q, k, v, mask=masks.cross, causal=masks.full_rows, uniform_rows=masks.uniform_rows
    )
    w = attention_weights(q, k, cross_visible(masks, M, T), masks.uniform_rows)
    torch.testing.assert_close(w @ v, out, atol=1e-5, rtol=1e-5)
    visible = cross_visible(masks, M, T).expand_as(w)
    assert torch.all(w[~visible] == 0) or form == "uniform"
    torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:-1]))


@pytest.mark.parametrize("position_encoding", ["rotary", "absolute"])
@pytest.mark.parametrize("T", [32, 20, 6])
def test_each_latent_sums_to_one_over_what_it_sees_and_zero_beyond(position_encoding, T):
    model = make_model(position_encoding)
    inputs = torch.randint(3, 259, (1, T), generator=torch.Generator().manual_seed(T))
    amap = cross_attention_map(model, inputs, position_block=1, latent_block=1)
    M = min(model.config.num_latents, T)
    H = model.config.cross_attend_heads
    assert amap.weights.shape == (H, M, T)
    assert list(amap.latent_index) == list(range(T - M, T))
    j = np.arange(T)
    for m, s in enumerate(amap.latent_index):
        assert np.all(amap.weights[:, m, j > s] == 0.0)  # exactly zero on the inputs it may not see
        np.testing.assert_allclose(amap.weights[:, m, j <= s].sum(-1), 1.0, atol=1e-6)
        assert np.all(amap.weights[:, m, j <= s] > 0)
    assert np.all(amap.hidden_sum == 0.0)
    np.testing.assert_allclose(amap.visible_sum, 1.0, atol=1e-6)
    np.testing.assert_allclose(amap.distance_mass.sum(-1), 1.0, atol=1e-6)
    assert amap.kernel_error < 1e-5


def test_distance_buckets_hold_the_mass_at_those_distances():
    model = make_model()
    inputs = torch.randint(3, 259, (1, 32), generator=torch.Generator().manual_seed(3))
    amap = cross_attention_map(model, inputs, position_block=1, latent_block=1)
    for m, s in enumerate(amap.latent_index):
        w = amap.weights[:, m]
        expected = [w[:, s]] + [
            w[:, max(s - (2**b - 1), 0) : s - 2 ** (b - 1) + 1].sum(-1) for b in range(1, 6)
        ]
        np.testing.assert_allclose(amap.distance_mass[:, m], np.stack(expected, axis=1), atol=1e-6)
        widths = [1, 1, 2, 4, 8, 16]
        counts = [min(wd, max(0, s + 1 - (2 ** (b - 1) if b else 0))) for b, wd in enumerate(widths)]
        np.testing.assert_array_equal(amap.distance_count[m, :6], counts)
    assert amap.distance_buckets()[:5] == ["0", "1", "2-3", "4-7", "8-15"]
    uniform = amap.distance_density()  # equal to the mass over the inputs, averaged over latents
    by_hand = (amap.distance_mass / np.maximum(amap.distance_count, 1)).mean(axis=1)
    np.testing.assert_allclose(uniform, by_hand, atol=1e-9)


def test_blocks_and_chunks_change_no_number(monkeypatch):
    model = make_model(context_len=64, num_latents=12)
    inputs = torch.randint(3, 259, (1, 61), generator=torch.Generator().manual_seed(5))
    fine = cross_attention_map(model, inputs, position_block=1, latent_block=1)
    coarse = cross_attention_map(model, inputs, position_block=8, latent_block=5)
    padded = np.zeros((*fine.weights.shape[:2], 64))
    padded[..., :61] = fine.weights
    by_columns = padded.reshape(*fine.weights.shape[:2], 8, 8).sum(-1)
    rows = [by_columns[:, r : r + 5].mean(1) for r in range(0, 12, 5)]
    np.testing.assert_allclose(coarse.weights, np.stack(rows, axis=1), atol=1e-6)
    monkeypatch.setattr(attention_maps, "CHUNK_ENTRIES", 1)  # one latent at a time
    chunked = cross_attention_map(model, inputs, position_block=1, latent_block=1)
    np.testing.assert_allclose(chunked.weights, fine.weights, atol=1e-7)
    np.testing.assert_allclose(chunked.distance_mass, fine.distance_mass, atol=1e-7)


def test_weights_that_are_not_the_kernels_are_refused(monkeypatch):
    def wrong_scale(q, k, visible, uniform_rows=None):
        return attention_weights(2 * q, k, visible, uniform_rows)

    monkeypatch.setattr(attention_maps, "attention_weights", wrong_scale)
    model = make_model()
    with pytest.raises(RuntimeError, match="not the weights the kernel applied"):
        cross_attention_map(model, torch.randint(3, 259, (1, 32)))


def test_the_forward_is_unchanged_by_inspecting():
    model = make_model()
    inputs = torch.randint(3, 259, (1, 32), generator=torch.Generator().manual_seed(7))
    before = model(inputs).logits
    cross_attention_map(model, inputs)
    torch.testing.assert_close(model(inputs).logits, before, atol=0, rtol=0)
    assert (
        not model.cross_attend._forward_pre_hooks and not model.cross_attend.attention.wo._forward_pre_hooks
    )


def test_more_than_one_row_is_refused():
    with pytest.raises(ValueError, match=r"one sequence \[1, T\]"):
        cross_attention_map(make_model(), torch.randint(3, 259, (2, 32)))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect")
    make_corpus(root / "corpus", num_docs=4, base_len=300)
    prepare_text([root / "corpus"], root / "store", validation_fraction=0.5)
    train(tiny_train_config(root / "store", root / "run", model={"context_len": 64, "num_latents": 16}))
    return root


def test_inspect_command_end_to_end(tiny_run, capsys):
    out = tiny_run / "pictures"
    argv = ["inspect", str(tiny_run / "run"), "--data", str(tiny_run / "store"), "--out", str(out)]
    assert main([*argv, "--position-block", "4"]) == 0
    printed = capsys.readouterr().out
    assert "16 latents x 64 inputs, 4 heads" in printed
    for name in ("attention.png", "distance.png", "attention.npz", "inspect.json"):
        assert (out / name).stat().st_size > 0
    summary = json.loads((out / "inspect.json").read_text())
    assert summary["max_hidden_sum"] == 0.0
    assert summary["max_abs_visible_sum_minus_1"] < 1e-5
    assert summary["position_block"] == 4 and summary["num_inputs"] == 64
    arrays = np.load(out / "attention.npz")
    assert arrays["weights"].shape == (4, 16, 16)
    assert (out / "attention.png").read_bytes()[:4] == b"\x89PNG"
    # An earlier inspect output is replaced; a shorter window of another document works too.
    assert main([*argv, "--doc", "1", "--start", "5", "--length", "40", "--mean-only"]) == 0
    assert json.loads((out / "inspect.json").read_text())["num_inputs"] == 40
