"""Context parallelism (context_parallel.py): K ranks compute what one process computes.

- the kernel: the merged key blocks equal masked SDPA in values and gradients
  (CPU flash kernels and the portable kernel, full, padded, dropout masks,
  latents with nothing to see in a block);
- one process through ``ContextParallel`` equals the plain model (loss and
  every gradient), for every forward variant;
- 2 processes (gloo) equal 1 in loss, logits and every parameter gradient:
  rotary and absolute positions, full and padded rows, rows shorter than M,
  latents spanning both ranks, both forms of cross-attend dropout, a length
  that does not divide evenly, several key blocks per rank;
- ``perceiver-ar train --context-parallel 2`` under torchrun gives the losses
  and weights of one process; refused set-ups say what to do.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from perceiver_ar import PerceiverAR, PerceiverARConfig, perceiver_ar_loss
from perceiver_ar.attention import CrossMask
from perceiver_ar.context_parallel import ContextParallel, ContextParallelAttention, KeySlice
from perceiver_ar.run_dir import list_checkpoints
from perceiver_ar.train import train
from tests.test_train import TINY as TINY_TRAIN
from tests.test_train import config, losses
from tests.test_train import store as store  # noqa: F401 (the module's data fixture)

TESTS = Path(__file__).resolve().parent
TINY = dict(
    context_len=32,
    num_latents=8,
    input_dim=16,
    latent_dim=16,
    num_latent_layers=2,
    cross_attend_heads=2,
    latent_heads=2,
    vocab_size=20,
    final_layer_init_zeros=False,  # every parameter gets a gradient
)
ABSOLUTE = dict(position_encoding="absolute", position_table_sizes=[33])
DROPOUT = dict(dropout=0.1, latent_dropout=0.1, cross_attend_dropout=0.5)


# ----------------------------------------------------------------------------
# The kernel, in one process
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("portable", [False, True])
@pytest.mark.parametrize("kind", ["full", "padded", "keep"])
def test_merged_key_blocks_equal_masked_sdpa(kind, portable):
    torch.manual_seed(0)
    B, H, M, T, dh = 2, 2, 6, 23, 8
    q, k, v = (torch.randn(B, H, n, dh, dtype=torch.float64).float().requires_grad_() for n in (M, T, T))
    last = torch.arange(T - M, T).expand(B, M).clone()
    uniform = keep = None
    if kind != "full":
        last[1] = torch.tensor([-1, -1, 1, 2, 3, 4])  # row 1 is 5 long: two latents have no input
        uniform = last < 0
        last = torch.where(uniform, T - 1, last)
    if kind == "keep":
        keep = torch.rand(B, T) > 0.5
    keys = KeySlice(last, 0, T, int(last.min()), int(last.max()), keep, uniform, None, 5, 4, portable)
    out = ContextParallelAttention.apply(q, k, v, keys)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=CrossMask(last, keep).dense(T))
    if uniform is not None:
        ref = torch.where(uniform[:, None, :, None], v.mean(dim=2, keepdim=True), ref)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    assert torch.allclose(out, ref, atol=1e-5)
    for a, b in zip(got, want, strict=True):
        assert torch.allclose(a, b, atol=1e-5)


# ----------------------------------------------------------------------------
# One process through the wrapper == the model
# ----------------------------------------------------------------------------


def loss_and_grads(forward, model, inputs, targets):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    out = forward(inputs)
    loss = perceiver_ar_loss(out.logits, targets, out.latent_index).total
    loss.backward()
    return loss.detach(), out.latent_index, {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        ABSOLUTE,
        {**DROPOUT, "cross_attend_dropout_mode": "mask"},
        {**DROPOUT, "cross_attend_dropout_mode": "drop"},
    ],
    ids=["rotary", "absolute", "dropout-mask", "dropout-drop"],
)
@pytest.mark.parametrize("padded", [False, True])
def test_one_process_wrapper_equals_the_model(overrides, padded):
    torch.manual_seed(0)
    model = PerceiverAR(PerceiverARConfig(**{**TINY, **overrides})).train()
    inputs, targets = torch.randint(3, 20, (3, 32)), torch.randint(3, 20, (3, 32))
    if padded:
        inputs[1, 20:] = targets[1, 20:] = 0
        inputs[2, 5:] = targets[2, 5:] = 0
    ref_loss, ref_index, ref = loss_and_grads(model, model, inputs, targets)
    cp = ContextParallel(model, full_block=4, masked_block=3)
    loss, index, grads = loss_and_grads(cp, model, inputs, targets)
    assert torch.equal(index, ref_index)
    assert torch.allclose(loss, ref_loss, rtol=1e-6)
    for name, g in ref.items():
        assert torch.allclose(grads[name], g, rtol=1e-4, atol=1e-5), name


# ----------------------------------------------------------------------------
# 2 processes == 1
# ----------------------------------------------------------------------------

CASES = [
    {"name": "rotary, full rows", "config": TINY},
    {"name": "rotary, padded rows (one shorter than M)", "config": TINY, "lengths": [32, 20, 5]},
    {"name": "absolute, full rows", "config": {**TINY, **ABSOLUTE}},
    {"name": "absolute, padded rows", "config": {**TINY, **ABSOLUTE}, "lengths": [32, 20, 5]},
    {"name": "M = 24: latents on both ranks", "config": {**TINY, "num_latents": 24}, "lengths": [32, 27]},
    {"name": "T = 31 (uneven slices)", "config": TINY, "T": 31, "lengths": [31, 18]},
    {
        "name": "several key blocks per rank",
        "config": TINY,
        "lengths": [32, 19],
        "blocks": dict(full_block=4, masked_block=3),
    },
    {"name": "portable kernel", "config": TINY, "lengths": [32, 19, 6], "blocks": dict(portable=True)},
    {"name": "dropout, mask form", "config": {**TINY, **DROPOUT}, "lengths": [32, 20, 5]},
    {
        "name": "dropout, drop form",
        "config": {**TINY, **DROPOUT, "cross_attend_dropout_mode": "drop"},
        "lengths": [32, 20],
    },
]


def torchrun(args: list[str], nproc: int = 2, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    return subprocess.run(cmd + args, env=env, capture_output=True, text=True, timeout=timeout)


def test_two_ranks_equal_one_process(tmp_path):
    out = tmp_path / "results.json"
    proc = torchrun([str(TESTS / "context_parallel_ranks.py"), json.dumps(CASES), str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert [r["name"] for r in results] == [c["name"] for c in CASES]
    for r in results:
        print(
            f"{r['name']}: loss {r['loss']:.4f} (diff {r['loss_diff']:.1e}), "
            f"logits diff {r['logits_diff']:.1e}, grad diff {r['grad_diff']:.1e} "
            f"of max |grad| {r['grad_scale']:.1f} ({r['worst']})"
        )
        assert r["loss_diff"] <= 1e-5 * r["loss"], r
        assert r["logits_diff"] <= 1e-5, r
        assert r["grad_diff"] <= 1e-5 * max(1.0, r["grad_scale"]), r


# ----------------------------------------------------------------------------
# Training: perceiver-ar train --context-parallel K
# ----------------------------------------------------------------------------

TRAIN = dict(steps=3, batch_size=4, optimizer="sgd", lr=0.5, warmup_steps=2, eval_every=0, eval_tokens=64)
TRAIN_MODEL = {**TINY_TRAIN, "dropout": 0.1, "cross_attend_dropout": 0.25}


def train_under_torchrun(store, out: Path, nproc: int, context_parallel: int, parallel: str = "auto") -> str:
    argv = ["-m", "perceiver_ar.cli", "train", "--data", store, "--out", str(out), "--preset", "tiny"]
    argv += [
        "--parallel",
        parallel,
        "--context-parallel",
        str(context_parallel),
        "--threads",
        "1",
        "--no-progress",
        "--no-tensorboard",
    ]
    for key, value in TRAIN.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    for key, value in TRAIN_MODEL.items():
        argv += [f"--model.{key}", str(value)]
    proc = torchrun(argv, nproc=nproc, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def assert_same_run(one: Path, other: Path) -> None:
    a, b = losses(one), losses(other)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    assert np.allclose([a[s] for s in a], [b[s] for s in a], rtol=1e-5, atol=0)
    wa = PerceiverAR.from_pretrained(str(one / "model")).state_dict()
    wb = PerceiverAR.from_pretrained(str(other / "model")).state_dict()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], rtol=1e-4, atol=1e-6), k


def test_train_context_parallel_2_equals_one_process(store, tmp_path):
    """2 processes sharing every row (dropout included: a group draws the same masks) == 1 process."""
    train(config(store, tmp_path / "one", model=TRAIN_MODEL, **TRAIN))
    stdout = train_under_torchrun(store, tmp_path / "cp2", nproc=2, context_parallel=2)
    assert "2 process(es) (ddp) on cpu, fp32, each row split across 2" in stdout
    assert_same_run(tmp_path / "one", tmp_path / "cp2")


def test_train_context_parallel_2_under_fsdp_equals_one_process(store, tmp_path):
    """FSDP composes with context parallelism: the wrapper is FSDP's root, every weight is sharded over
    both ranks and gathered piece by piece as the split forward calls it; the same run as 1 process."""
    train(config(store, tmp_path / "one", model=TRAIN_MODEL, **TRAIN))
    stdout = train_under_torchrun(store, tmp_path / "cp2", nproc=2, context_parallel=2, parallel="fsdp")
    assert "2 process(es) (fsdp) on cpu, fp32, each row split across 2" in stdout
    assert_same_run(tmp_path / "one", tmp_path / "cp2")
    assert (list_checkpoints(tmp_path / "cp2")[-1] / "shards").is_dir()


@pytest.mark.slow
def test_train_data_parallel_2_x_context_parallel_2_equals_one_process(store, tmp_path):
    """4 processes: 2 data-parallel groups of 2 context-parallel ranks; the same losses without dropout."""
    global TRAIN_MODEL
    saved, TRAIN_MODEL = TRAIN_MODEL, dict(TINY_TRAIN)
    try:
        train(config(store, tmp_path / "one", model=TRAIN_MODEL, **TRAIN))
        train_under_torchrun(store, tmp_path / "dp2cp2", nproc=4, context_parallel=2)
    finally:
        TRAIN_MODEL = saved
    assert_same_run(tmp_path / "one", tmp_path / "dp2cp2")


def test_context_parallel_refusals(store, tmp_path):
    with pytest.raises(ValueError, match="splits each row across 2 processes, but 1 process"):
        train(config(store, tmp_path / "a", context_parallel=2))
    with pytest.raises(ValueError, match="--compile does not apply to --context-parallel"):
        train(config(store, tmp_path / "b", context_parallel=2, compile=True))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
