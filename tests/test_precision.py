"""Mixed precision on every path: bf16 and fp16 forward, kernels, training, evaluation, generation.

This CPU has no native bf16 or fp16 matmul (emulated, many times slower than
fp32), so every model here is tiny.

Tolerances. A low-precision format rounds each value to a unit roundoff u:
2^-8 for bf16 (8 significant bits), 2^-11 for fp16. Between the embedding
and the logits these models round activations about ten times in a row
(projections, attention, MLP, residuals, norms, the output layer), each
rounding a relative error of up to u on the way. Measured over 3 seeds,
rotary and absolute, full and padded rows, autocast and cast: the largest
logit error is 3-9 u times the largest |logit|, the mean error a few times
smaller. So a logit may differ from fp32 by at most 16 u x max|logit|
(about 0.2 for bf16 logits of size 3, 0.025 for fp16) and on average by
4 u x max|logit|. A real bug (a mask or a rotation gone wrong) moves logits
by O(1), far outside.
"""

from __future__ import annotations

import contextlib
import copy
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from perceiver_ar import PerceiverAR, generate, generate_stream
from perceiver_ar.attention import PrefixCausalAttention, band_mask
from perceiver_ar.evaluate import evaluate
from perceiver_ar.generate import decode_one, prefill
from perceiver_ar.kv_cache import KVCache
from perceiver_ar.rotary import apply_rotary, apply_rotary_, rotary_tables
from perceiver_ar.run_checkpoints import TrainState, load_checkpoint
from perceiver_ar.run_dir import list_checkpoints
from perceiver_ar.runtime import setup_runtime
from perceiver_ar.train import make_optimizer, train
from tests.conftest import make_model
from tests.test_generate import golden_sampling_model
from tests.test_model import random_batch
from tests.test_train import config, losses, store  # noqa: F401  (the module's data store fixture)

UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
LOW = [torch.bfloat16, torch.float16]


def assert_close_to_fp32(low: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    """The module docstring's bound: max error <= 16 u max|ref|, mean error <= 4 u max|ref|."""
    diff = (low.detach().float() - ref.detach().float()).abs()
    scale = float(ref.detach().abs().max())
    u = UNIT_ROUNDOFF[dtype]
    worst, mean = float(diff.max()), float(diff.mean())
    assert worst <= 16 * u * scale, f"{what}: max error {worst:.4g} (largest |logit| {scale:.3g})"
    assert mean <= 4 * u * scale, f"{what}: mean error {mean:.4g} (largest |logit| {scale:.3g})"


def low_precision_logits(model, x, dtype, mode):
    """Logits of ``model`` on x under autocast, or of a copy cast to ``dtype``."""
    with torch.no_grad():
        if mode == "autocast":
            with torch.autocast("cpu", dtype=dtype):
                return model(x).logits
        return copy.deepcopy(model).to(dtype)(x).logits


# ----------------------------------------------------------------------------
# Forward: logits near fp32; causality and padding invariance still hold
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
@pytest.mark.parametrize("pe", ["rotary", "absolute"])
def test_low_precision_logits_are_close_to_fp32(pe, dtype):
    model = make_model(pe)
    full = random_batch(3, 32)
    padded = random_batch(3, 32, [32, 20, 5])
    for rows, x in (("full", full), ("padded", padded)):
        with torch.no_grad():
            ref = model(x).logits
        for mode in ("autocast", "cast"):
            logits = low_precision_logits(model, x, dtype, mode)
            assert logits.dtype == dtype, (mode, logits.dtype)
            assert_close_to_fp32(logits, ref, dtype, f"{pe} {rows} {mode}")


@pytest.mark.parametrize("mode", ["autocast", "cast"])
@pytest.mark.parametrize("pe", ["rotary", "absolute"])
def test_bf16_keeps_causality_and_padding_invariance(pe, mode):
    model = make_model(pe)
    bf16 = torch.bfloat16
    # Causality: changing input t leaves every latent on an earlier input unchanged, exactly.
    x = random_batch(3, 32, [32, 20, 5])
    base = low_precision_logits(model, x, bf16, mode)
    latent_index = model(x).latent_index
    for t in (3, 17, 26, 31):
        x2 = x.clone()
        rows = (x[:, t] != 0)[:, None]
        x2[rows[:, 0], t] = 3 + (x2[rows[:, 0], t] - 3 + 1) % 256
        out = low_precision_logits(model, x2, bf16, mode)
        before = (latent_index < t) & (latent_index >= 0)
        after = (latent_index >= t) & rows
        assert torch.equal(out[before], base[before])
        assert (out[after].float() - base[after].float()).abs().max() > 0.1  # the change is visible
    # Padding invariance: a row's logits (the mask-free full-row kernel alone,
    # the masked kernel in a padded batch) agree within the bf16 bound.
    row = random_batch(1, 20, seed=3)
    alone = low_precision_logits(model, row, bf16, mode)
    with torch.no_grad():
        ref = model(row).logits
    for T in (21, 32):
        padded = torch.zeros(2, T, dtype=torch.long)
        padded[0, :20] = row[0]
        padded[1] = random_batch(1, T, seed=4)[0]
        out = low_precision_logits(model, padded, bf16, mode)[:1]
        assert_close_to_fp32(out, ref, bf16, f"padded to {T}")
        assert_close_to_fp32(out, alone.float(), bf16, f"padded to {T} vs alone")


# ----------------------------------------------------------------------------
# Kernels and rotary
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
def test_prefix_causal_attention_in_low_precision(dtype):
    """The CPU full-row kernel takes bf16/fp16 q, k, v: output and gradients near the fp32 reference."""
    g = torch.Generator().manual_seed(0)
    q32, k32, v32 = (torch.randn(2, 2, n, 16, generator=g) for n in (8, 40, 40))
    band = band_mask(8, 40, q32.device)
    leaves = [t.to(dtype).requires_grad_() for t in (q32, k32, v32)]
    out = PrefixCausalAttention.apply(*leaves)
    assert out.dtype == dtype
    ref_leaves = [t.detach().float().requires_grad_() for t in leaves]
    ref = torch.nn.functional.scaled_dot_product_attention(*ref_leaves, attn_mask=band)
    assert_close_to_fp32(out, ref, dtype, "output")
    grad = torch.randn(out.shape, generator=g)
    out.backward(grad.to(dtype))
    ref.backward(grad)
    for name, leaf, ref_leaf in zip("qkv", leaves, ref_leaves, strict=True):
        assert leaf.grad.dtype == dtype
        assert_close_to_fp32(leaf.grad, ref_leaf.grad, dtype, f"d{name}")


@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
def test_rotary_keeps_the_dtype_and_both_forms_agree(dtype):
    """fp32 tables rotate a bf16/fp16 q or k in fp32 and round once: in place and out of place alike."""
    positions = torch.arange(1, 41)[None].expand(2, 40)
    cos, sin = rotary_tables(positions, 8, 64)
    assert cos.dtype == torch.float32
    x = torch.randn(2, 3, 40, 16).to(dtype)
    out = apply_rotary(x, cos, sin)
    assert out.dtype == dtype
    assert torch.equal(apply_rotary_(x.clone(), cos, sin), out)
    ref = apply_rotary(x.float(), cos, sin)
    assert torch.equal(out, ref.to(dtype))  # exactly one rounding


# ----------------------------------------------------------------------------
# Training, evaluation
# ----------------------------------------------------------------------------


def test_bf16_autocast_training_learns_with_fp32_master_weights(store, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    result = train(
        config(store, run, steps=50, precision="bf16", device="cpu", eval_every=0, checkpoint_every=50)
    )
    curve = losses(run)
    assert sorted(curve) == list(range(1, 51)) and all(np.isfinite(list(curve.values())))
    assert np.mean([curve[s] for s in range(46, 51)]) < np.mean([curve[s] for s in range(1, 6)]) - 0.5
    assert np.isfinite(result["eval"]["bits_per_token"])  # the final evaluation ran under autocast too
    ckpt = list_checkpoints(run)[-1]
    moments = load_file(str(ckpt / "optimizer.safetensors"))
    assert moments and {t.dtype for k, t in moments.items() if not k.endswith(".step")} == {torch.float32}
    weights = load_file(str(ckpt / "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.float32}
    assert "grad_scaler" not in json.loads((ckpt / "train_state.json").read_text())  # bf16 needs none


def test_fp16_training_scales_the_loss_and_saves_the_scaler(store, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    train(config(store, run, steps=4, precision="fp16", device="cpu", eval_every=0, checkpoint_every=2))
    curve = losses(run)
    assert sorted(curve) == [1, 2, 3, 4] and all(np.isfinite(list(curve.values())))
    ckpt = list_checkpoints(run)[-1]
    saved = json.loads((ckpt / "train_state.json").read_text())["grad_scaler"]
    assert saved["scale"] > 1.0  # fp16 losses are scaled up before backward
    # A resumed fp16 run restores the scale instead of starting over at 2^16.
    model = PerceiverAR.from_pretrained(str(ckpt))
    assert setup_runtime("cpu", "fp16").grad_scaler().is_enabled()
    assert not setup_runtime("cpu", "bf16").grad_scaler().is_enabled()
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)  # anything but the saved scale
    load_checkpoint(ckpt, TrainState(model, make_optimizer(config(store, run), model), scaler=scaler))
    assert scaler.get_scale() == saved["scale"]


def test_evaluation_in_bf16_scores_like_fp32():
    model = make_model(context_len=32, num_latents=8)
    docs = [np.random.default_rng(i).integers(3, 259, size=60) for i in range(3)]
    ref = evaluate(model, docs, batch_size=4)
    auto = evaluate(model, docs, batch_size=4, autocast_dtype=torch.bfloat16)
    cast = evaluate(copy.deepcopy(model).to(torch.bfloat16), docs, batch_size=4)
    for result in (auto, cast):
        assert result["num_tokens"] == ref["num_tokens"]
        assert abs(result["bits_per_token"] - ref["bits_per_token"]) < 0.02  # bits of ~8


# ----------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------

# The golden sampling model's greedy tokens in bf16 match fp32 for the first
# 8 steps, both autocast and cast (measured: autocast 11, cast 8); at step 8
# the fp32 logits of row 1 have a near tie (the top two 0.04 apart), inside
# the bf16 error, and the paths part there.
BF16_GREEDY_AGREEMENT = 8


def in_bf16(model, mode):
    """A context in which to run ``model`` in bf16 and the model to run: autocast, or a bf16 copy."""
    if mode == "autocast":
        return torch.autocast("cpu", dtype=torch.bfloat16), model
    return contextlib.nullcontext(), copy.deepcopy(model).to(torch.bfloat16)


@pytest.mark.parametrize("mode", ["autocast", "cast"])
def test_bf16_greedy_golden_sampling_follows_fp32(mode):
    model, data = golden_sampling_model()
    start = int(data["start_step"])
    prompt = torch.from_numpy(data["prompt_events"][:, :start]).long()
    ref_tokens = data["cached/events"][:, start : start + 20]
    context, runner = in_bf16(model, mode)
    with context:
        steps = list(generate_stream(runner, prompt, 20, temperature=0))
    assert [s.mode for s in steps] == list(data["cached/step_mode"])
    for s in steps[:BF16_GREEDY_AGREEMENT]:
        np.testing.assert_array_equal(s.tokens.numpy(), ref_tokens[:, s.index], err_msg=f"step {s.index}")
        ref = torch.from_numpy(data["cached/step_logits"][s.index])
        assert_close_to_fp32(s.logits, ref, torch.bfloat16, f"step {s.index}")


@pytest.mark.parametrize("mode", ["autocast", "cast"])
@pytest.mark.parametrize("pe", ["rotary", "absolute"])
def test_bf16_cache_equals_recompute(pe, mode):
    """Teacher-forced: each cached step's logits equal a full bf16 forward's over the same tokens."""
    model = make_model(pe)
    tokens = random_batch(2, 12, seed=5)
    positions = torch.arange(1, 13)[None].expand(2, 12)
    context, runner = in_bf16(model, mode)
    with context:
        cache = KVCache.for_model(runner, 2)
        assert cache.cross.k.dtype == torch.bfloat16
        logits = [prefill(runner, tokens[:, :5], positions[:, :5], 1, cache)]
        for t in range(5, 12):  # latents 2..8 = M: the caches fill up
            logits.append(decode_one(runner, tokens[:, t], positions[:, t], cache))
        for k, cached in enumerate(logits):
            T = 5 + k
            recomputed = prefill(runner, tokens[:, :T], positions[:, :T], k + 1, None)
            assert cached.dtype == recomputed.dtype == torch.bfloat16
            assert_close_to_fp32(cached, recomputed, torch.bfloat16, f"{T} tokens")


def test_generate_in_a_bf16_model():
    model = make_model().to(torch.bfloat16)
    out = generate(model, random_batch(2, 5), 12, temperature=0)  # prime, cached steps, a reset
    assert out.tokens.shape == (2, 12) and bool((out.tokens > 0).all())


def test_render_in_a_bf16_model(tmp_path):
    from perceiver_ar.render import PIXEL_IDS, render, score
    from perceiver_ar.store import TokenStore
    from tests.test_render import image_store

    store_dir = image_store(tmp_path, "flat")
    model = make_model("rotary", context_len=8, num_latents=4).to(torch.bfloat16)
    out = render(model, store_dir, tmp_path / "render", num_samples=2, seed=1, temperature=0.9)
    drawn = np.load(out["files"]["tokens"])
    assert set(np.unique(drawn["samples"])) <= set(PIXEL_IDS)
    assert np.isfinite(score(model, TokenStore(store_dir), max_tokens=32)["bits_per_dim"])


# ----------------------------------------------------------------------------
# The commands
# ----------------------------------------------------------------------------


def test_cli_precision_on_cpu(store, tmp_path, capsys):  # noqa: F811
    """--precision bf16 on this CPU runs (with a one-line note when emulated); a bad one is one line."""
    from perceiver_ar.cli import main

    run = str(tmp_path / "run")
    args = ["train", "--data", store, "--out", run, "--preset", "tiny", "--model.context_len", "32"]
    args += ["--set", "model.num_latents=8", "--batch-size", "4", "--steps", "3", "--eval-tokens", "32"]
    args += ["--no-progress", "--no-tensorboard", "--threads", "1", "--device", "cpu"]
    assert main([*args, "--precision", "bf16"]) == 0
    out = capsys.readouterr().out
    assert "bf16 autocast" in out and "trained to step 3" in out
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        assert "no native bf16" in out
    assert main([*args, "--out", str(tmp_path / "other"), "--precision", "fp8"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "precision" in err and "must be one of" in err

    model_dir = str(tmp_path / "run" / "model")
    gen = ["generate", model_dir, "--prompt", "The", "--max-new-tokens", "5", "--seed", "0"]
    assert main([*gen, "--precision", "bf16", "--device", "cpu"]) == 0
    assert "bfloat16]" in capsys.readouterr().err
    assert main(["eval", run, "--data", store, "--max-tokens", "32", "--precision", "bf16"]) == 0
    assert "bits/token" in capsys.readouterr().out
