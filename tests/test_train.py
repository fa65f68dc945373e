"""Training: a run learns, resume continues the identical loss curve, checkpoints are atomic,
gradient accumulation and 2 processes equal one process with the whole batch."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from perceiver_ar import PerceiverAR
from perceiver_ar.data import prepare_text
from perceiver_ar.run_dir import list_checkpoints
from perceiver_ar.train import TrainConfig, lr_at, resume_config, train
from tests.conftest import tiny_train_config
from tests.test_data import make_corpus

TINY = {"context_len": 32, "num_latents": 8}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_data")
    make_corpus(root / "corpus", num_docs=6, base_len=300)
    return str(prepare_text([root / "corpus"], root / "store", validation_fraction=0.3))


def config(store, out, **kw):
    """The conftest tiny run, longer: 8 steps of batch 4, evaluated and checkpointed every 4."""
    settings = dict(model=dict(TINY), steps=8, batch_size=4, lr=3e-3, warmup_steps=2)
    settings.update(eval_every=4, eval_tokens=64, checkpoint_every=4)
    return tiny_train_config(store, out, **{**settings, **kw})


def losses(run_dir):
    lines = [json.loads(ln) for ln in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if "loss" in r}


def test_a_run_learns_and_writes_its_directory(store, tmp_path):
    result = train(
        config(store, tmp_path / "run", steps=30, eval_every=10, checkpoint_every=10, keep_checkpoints=2)
    )
    run = tmp_path / "run"
    curve = losses(run)
    assert sorted(curve) == list(range(1, 31))
    assert np.mean([curve[s] for s in range(26, 31)]) < np.mean([curve[s] for s in range(1, 6)]) - 0.5
    assert [p.name for p in list_checkpoints(run)] == ["step_000020", "step_000030"]  # last 2 kept
    ckpt = list_checkpoints(run)[-1]
    assert {p.name for p in ckpt.iterdir()} == {
        "config.json",
        "model.safetensors",
        "optimizer.safetensors",
        "train_state.json",
        "MANIFEST.json",
        "provenance.json",
    }
    assert (run / "loss.png").stat().st_size > 1000
    model = PerceiverAR.from_pretrained(str(run / "model"))
    assert model.config.num_latents == 8 and model.config.context_len == 32  # rebuilt from its config
    assert result["step"] == 30 and result["eval"]["num_tokens"] == 64
    assert json.loads((run / "train_config.json").read_text())["steps"] == 30


def test_resume_continues_the_identical_loss_curve(store, tmp_path):
    kw = dict(model={**TINY, "dropout": 0.1}, steps=10)  # dropout: the RNG must resume too
    train(config(store, tmp_path / "straight", **kw))
    train(config(store, tmp_path / "broken", stop_at=5, **kw))
    assert max(losses(tmp_path / "broken")) == 5
    # A half-written checkpoint (no manifest) and a corrupt one are ignored.
    good = list_checkpoints(tmp_path / "broken")[-1]
    assert good.name == "step_000005"
    half = good.parent / "step_000007"
    shutil.copytree(good, half)
    (half / "MANIFEST.json").unlink()
    corrupt = good.parent / "step_000009"
    shutil.copytree(good, corrupt)
    with open(corrupt / "model.safetensors", "r+b") as f:
        f.truncate(100)
    assert [p.name for p in list_checkpoints(tmp_path / "broken")] == ["step_000004", "step_000005"]
    result = train(resume_config(tmp_path / "broken", progress=False, tensorboard=False, threads=1))
    assert result["step"] == 10
    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "broken")
    assert sorted(resumed) == list(range(1, 11))
    for step in range(1, 11):
        assert resumed[step] == straight[step], step  # bit for bit
    a = PerceiverAR.from_pretrained(str(tmp_path / "straight" / "model")).state_dict()
    b = PerceiverAR.from_pretrained(str(tmp_path / "broken" / "model")).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_grad_accumulation_equals_the_whole_batch(store, tmp_path):
    train(config(store, tmp_path / "whole", steps=3, batch_size=8, optimizer="sgd", lr=0.5))
    train(config(store, tmp_path / "accum", steps=3, batch_size=8, grad_accum=4, optimizer="sgd", lr=0.5))
    whole, accum = losses(tmp_path / "whole"), losses(tmp_path / "accum")
    assert np.allclose([whole[s] for s in (1, 2, 3)], [accum[s] for s in (1, 2, 3)], rtol=1e-5, atol=0)
    assert whole[3] != whole[1]  # it did train


def test_stream_windows_train(store, tmp_path):
    result = train(config(store, tmp_path / "stream", steps=3, sampler="stream", eval_every=0))
    assert result["step"] == 3
    records = [json.loads(ln) for ln in (tmp_path / "stream" / "metrics.jsonl").read_text().splitlines()]
    assert [r["targets"] for r in records if "targets" in r] == [4 * 8] * 3  # full windows: every latent


def test_run_directory_guards(store, tmp_path):
    train(config(store, tmp_path / "run", steps=2))
    with pytest.raises(ValueError, match="already holds checkpoints"):
        train(config(store, tmp_path / "run", steps=4))
    with pytest.raises(FileNotFoundError, match="there is no run to resume"):
        train(config(store, tmp_path / "empty", resume=True))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="is not a training run"):
        train(config(store, tmp_path / "empty", resume=True))
    with pytest.raises(ValueError, match="divisible"):
        train(config(store, tmp_path / "odd", batch_size=6, grad_accum=4))


def test_absolute_positions_are_sized_to_the_documents(store, tmp_path):
    from perceiver_ar.store import TokenStore

    longest = max(int(TokenStore(store).split(s).lengths.max()) for s in ("train", "validation"))
    model = {**TINY, "position_encoding": "absolute"}
    train(config(store, tmp_path / "abs", steps=2, model=model))
    cfg = PerceiverAR.from_pretrained(str(tmp_path / "abs" / "model")).config
    assert cfg.position_table_sizes == (longest + 1,)
    with pytest.raises(ValueError, match="position tables hold \\[33\\] rows"):
        train(config(store, tmp_path / "abs2", steps=2, model={**model, "position_table_sizes": [33]}))


def test_learning_rate_schedule():
    cfg = TrainConfig(lr=1.0, warmup_steps=4, steps=14, min_lr_ratio=0.1)
    assert [lr_at(cfg, s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(cfg, 9) == pytest.approx(0.55)
    assert lr_at(cfg, 14) == pytest.approx(0.1)
    cfg.schedule = "constant"
    assert lr_at(cfg, 13) == 1.0


DDP_SCRIPT = """
import sys
from perceiver_ar.train import TrainConfig, train
train(TrainConfig(**__import__("json").loads(sys.argv[1])))
"""


def test_two_processes_equal_one_with_the_doubled_batch(store, tmp_path):
    """torchrun --nproc_per_node 2 (gloo): same per-step losses and final weights as one process."""
    kw = dict(steps=3, batch_size=8, optimizer="sgd", lr=0.5, eval_every=0, checkpoint_every=0)
    train(config(store, tmp_path / "one", **kw))
    cfg = config(store, tmp_path / "two", **kw).to_dict()
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [str(script), json.dumps(cfg)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert np.allclose([one[s] for s in (1, 2, 3)], [two[s] for s in (1, 2, 3)], rtol=1e-5, atol=0)
    a = PerceiverAR.from_pretrained(str(tmp_path / "one" / "model")).state_dict()
    b = PerceiverAR.from_pretrained(str(tmp_path / "two" / "model")).state_dict()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6), k
