"""FSDP2 and sharded checkpoints (CPU, gloo): 2 processes equal 1 process with the doubled batch;
a checkpoint sharded by 2 processes resumes on 2, on 1 (sharded or not) and after a corrupt shard,
continuing the same loss curve; a plain checkpoint resumes under FSDP; export gives a model
directory whose logits equal the trained model's; two torchrun "nodes" on localhost train and resume.

One torchrun launch (module fixture) trains the sharded run every test starts from; the other
tests resume copies of it, in this process where they can (FSDP over a group of one).
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from perceiver_ar import PerceiverAR
from perceiver_ar.cli import main
from perceiver_ar.data import prepare_text
from perceiver_ar.parallel import parallel_mode
from perceiver_ar.run_dir import list_checkpoints
from perceiver_ar.train import TrainConfig, resume_config, train
from tests.test_data import make_corpus

# Accumulation and clipping are on (grad_clip below the gradient norms seen here, ~1),
# so both are checked under sharding.
SETTINGS = dict(
    preset="tiny",
    model={"context_len": 32, "num_latents": 8},
    steps=6,
    batch_size=8,
    grad_accum=2,
    grad_clip=0.05,
    lr=3e-3,
    warmup_steps=2,
    eval_every=3,
    eval_tokens=64,
    checkpoint_every=2,
    keep_checkpoints=0,
    progress=False,
    tensorboard=False,
    threads=1,
)
TOL = dict(rtol=1e-5, atol=0)
LAUNCH = """
import json, sys
from perceiver_ar.train import TrainConfig, resume_config, train
d = json.loads(sys.argv[1])
out = d.pop("resume_run", None)
train(resume_config(out, **d) if out else TrainConfig(**d))
"""


def losses(run_dir):
    lines = [json.loads(ln) for ln in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if "loss" in r}


def weights(model_dir):
    return PerceiverAR.from_pretrained(str(model_dir)).state_dict()


def assert_same_curve(run, ref, steps):
    got, want = losses(run), losses(ref)
    assert sorted(got) == list(range(1, 7))
    assert np.allclose([got[s] for s in steps], [want[s] for s in steps], **TOL), (got, want)


def assert_same_weights(a, b):
    # Adam turns the round-off gradients of weights whose true gradient is 0 (the cross-attend key
    # bias shifts every score of a query alike) into steps of ~1e-6: atol covers them.
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5), k


def torchrun(tmp: Path, args: dict, *launcher: str) -> None:
    script = tmp / "launch.py"
    script.write_text(LAUNCH)
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", *launcher, str(script), json.dumps(args)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]


def standalone(tmp: Path, args: dict) -> None:
    """torchrun --standalone: its rendezvous takes a free port itself."""
    torchrun(tmp, args, "--standalone", "--nproc-per-node", "2")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The reference (1 process, whole batch, stopped at 3 and resumed) and the sharded run A
    (2 processes, FSDP, stopped at step 3: checkpoints of steps 2 and 3)."""
    root = tmp_path_factory.mktemp("fsdp")
    make_corpus(root / "corpus", num_docs=6, base_len=300)
    store = str(prepare_text([root / "corpus"], root / "store", validation_fraction=0.3))
    train(TrainConfig(data=store, out=str(root / "ref"), stop_at=3, **SETTINGS))
    shutil.copytree(root / "ref", root / "ref_at_3")
    train(resume_config(root / "ref"))
    standalone(
        root, TrainConfig(data=store, out=str(root / "A"), parallel="fsdp", stop_at=3, **SETTINGS).to_dict()
    )
    return root


def test_two_processes_with_fsdp_equal_one_with_the_doubled_batch(runs):
    run, ref = runs / "A", runs / "ref"
    got, want = losses(run), losses(ref)
    assert sorted(got) == [1, 2, 3]
    assert np.allclose([got[s] for s in (1, 2, 3)], [want[s] for s in (1, 2, 3)], **TOL)
    norms = [json.loads(ln).get("grad_norm") for ln in (run / "metrics.jsonl").read_text().splitlines()]
    ref_norms = [json.loads(ln).get("grad_norm") for ln in (ref / "metrics.jsonl").read_text().splitlines()]
    assert min(n for n in norms if n) > 10 * SETTINGS["grad_clip"]  # clipping was active at every step
    assert np.allclose([n for n in norms if n][:3], [n for n in ref_norms if n][:3], **TOL)
    # model/ is a plain model directory, gathered from the shards: the reference's weights at step 3.
    assert_same_weights(weights(run / "model"), weights(ref / "checkpoints" / "step_000003"))
    # Each rank wrote its shards; the manifest covers them (SHA-256), with the config and provenance.
    ckpt = list_checkpoints(run)[-1]
    shards = sorted(p.name for p in (ckpt / "shards").iterdir())
    assert shards == [f"shard-0000{r}-model-00001-of-00001.safetensors" for r in (1, 2)]
    manifest = json.loads((ckpt / "MANIFEST.json").read_text())["files"]
    assert set(manifest) == {"config.json", "provenance.json", "train_state.json"} | {
        f"shards/{s}" for s in shards
    }
    assert not any(b"pickle" in (ckpt / "shards" / s).read_bytes()[:4096] for s in shards)
    assert "started on 2 process(es) (fsdp)" in (run / "run.log").read_text()


def test_sharded_checkpoint_resumes_on_one_process(runs, tmp_path):
    """2 -> 1: with FSDP over one process, and as a plain model (DCP reshards to whole tensors)."""
    for mode in ("fsdp", "none"):
        run = tmp_path / mode
        shutil.copytree(runs / "A", run)
        train(resume_config(run, parallel=mode))
        assert_same_curve(run, runs / "ref", range(1, 7))
        assert_same_weights(weights(run / "model"), weights(runs / "ref" / "model"))
        # A plain session writes plain checkpoints again; an FSDP one, sharded ones.
        assert (list_checkpoints(run)[-1] / "shards").is_dir() == (mode == "fsdp")


def test_a_corrupt_shard_falls_back_to_the_previous_checkpoint(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs / "A", run)
    shard = next((run / "checkpoints" / "step_000003" / "shards").iterdir())
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # a flipped bit in a weight: same size, another SHA-256
    shard.write_bytes(bytes(data))
    train(resume_config(run, parallel="fsdp"))
    log = (run / "run.log").read_text()
    assert "step_000003 is corrupt" in log and "resumed at step 2" in log
    assert_same_curve(run, runs / "ref", range(1, 7))


def test_sharded_checkpoint_resumes_on_two_processes(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs / "A", run)
    standalone(tmp_path, {"resume_run": str(run), "progress": False})
    assert_same_curve(run, runs / "ref", range(1, 7))
    assert_same_weights(weights(run / "model"), weights(runs / "ref" / "model"))
    assert "resumed at step 3 on 2 process(es) (fsdp)" in (run / "run.log").read_text()


def test_plain_checkpoint_resumes_under_fsdp(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs / "ref_at_3", run)
    train(resume_config(run, parallel="fsdp"))
    assert_same_curve(run, runs / "ref", range(1, 7))


def test_export_gives_the_trained_models_logits(runs, tmp_path, capsys):
    """The sharded checkpoint of step 3, consolidated in one process, computes what the run's model/
    (gathered from the live shards at step 3) computes, and what the 1-process run's model did."""
    out = tmp_path / "exported"
    assert main(["export", str(runs / "A"), str(out)]) == 0
    assert "from " + str(runs / "A" / "checkpoints" / "step_000003") in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == {
        "config.json",
        "model.safetensors",
        "provenance.json",
        "MANIFEST.json",
    }
    exported = PerceiverAR.from_pretrained(str(out)).eval()
    trained = PerceiverAR.from_pretrained(str(runs / "A" / "model")).eval()
    single = PerceiverAR.from_pretrained(str(runs / "ref" / "checkpoints" / "step_000003")).eval()
    assert exported.provenance == trained.provenance is not None
    inputs = torch.randint(3, 259, (3, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = [m(inputs).logits for m in (exported, trained, single)]
    assert torch.equal(logits[0], logits[1])
    assert torch.allclose(logits[0], logits[2], rtol=1e-4, atol=1e-5)
    # A checkpoint folder can be named; an existing model is replaced only with --overwrite.
    step2 = runs / "A" / "checkpoints" / "step_000002"
    assert main(["export", str(step2), str(out)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert main(["export", str(step2), str(out), "--overwrite"]) == 0
    assert main(["export", str(tmp_path), str(tmp_path / "x")]) == 2
    assert "neither a training run nor one of its checkpoints" in capsys.readouterr().err
    # eval names the way from a sharded checkpoint to a model directory.
    assert main(["eval", str(step2), "--data", str(runs / "store")]) == 2
    assert "perceiver-ar export" in capsys.readouterr().err


def test_parallel_mode_is_chosen_from_the_world_size():
    assert parallel_mode("auto", 1, "fp32") == "none"
    assert parallel_mode("auto", 4, "bf16") == "ddp"
    assert parallel_mode("ddp", 1, "fp32") == "none"
    assert parallel_mode("fsdp", 1, "fp32") == "fsdp"
    with pytest.raises(ValueError, match="use --parallel ddp or fsdp"):
        parallel_mode("none", 2, "fp32")
    with pytest.raises(ValueError, match="use --precision bf16 or fp32"):
        parallel_mode("fsdp", 2, "fp16")
    with pytest.raises(ValueError, match="TrainConfig.parallel"):
        TrainConfig(parallel="zero3")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(tmp: Path, args: dict) -> None:
    """Two torchrun agents, one process each, meeting through a c10d rendezvous on localhost,
    as two machines would (README "Scaling out"). A port taken between choosing and binding it
    fails the rendezvous: the launch is tried again on another port."""
    script = tmp / "launch.py"
    script.write_text(LAUNCH)
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
    for _attempt in range(3):
        endpoint = f"127.0.0.1:{free_port()}"
        procs = []
        for node in (0, 1):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1"]
            cmd += ["--node-rank", str(node), "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint]
            cmd += ["--rdzv-id", "test", str(script), json.dumps(args)]
            procs.append(subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True))
        errors = [p.communicate(timeout=400)[1] for p in procs]
        if all(p.returncode == 0 for p in procs):
            return
        if not any("EADDRINUSE" in e or "address already in use" in e.lower() for e in errors):
            break
    raise AssertionError("\n".join(e[-3000:] for e in errors))


@pytest.mark.slow
def test_two_nodes_on_localhost_train_and_resume(runs, tmp_path):
    run = tmp_path / "run"
    store = str(runs / "store")
    two_nodes(
        tmp_path, TrainConfig(data=store, out=str(run), parallel="fsdp", stop_at=3, **SETTINGS).to_dict()
    )
    assert [p.name for p in list_checkpoints(run)] == ["step_000002", "step_000003"]
    two_nodes(tmp_path, {"resume_run": str(run), "progress": False})
    assert_same_curve(run, runs / "ref", range(1, 7))
    log = (run / "run.log").read_text()
    assert "started on 2 process(es) (fsdp)" in log and "resumed at step 3 on 2 process(es) (fsdp)" in log


def test_bad_combinations_are_one_line_and_exit_2(runs, tmp_path, capsys):
    """Refused combinations of --parallel, --precision and --context-parallel: exit 2, one line, no run."""
    base = ["train", "--data", str(runs / "store"), "--preset", "tiny", "--steps", "1", "--no-progress"]
    cases = [
        (["--parallel", "fsdp", "--precision", "fp16"], "use --precision bf16 or fp32, or --parallel ddp"),
        (["--parallel", "fsdp", "--context-parallel", "2"], "splits each row across 2 processes, but 1"),
        (["--parallel", "zero3"], "--parallel"),
    ]
    for i, (extra, message) in enumerate(cases):
        out = tmp_path / f"run{i}"
        assert main([*base, "--out", str(out), *extra]) == 2, extra
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert not out.exists()


@pytest.mark.slow
def test_compile_under_fsdp_gives_the_same_losses(runs, tmp_path):
    """torch.compile over FSDP2's hooks (one process): the losses of the reference run."""
    store = str(runs / "store")
    settings = {**SETTINGS, "stop_at": 2, "eval_every": 0}
    train(TrainConfig(data=store, out=str(tmp_path / "run"), parallel="fsdp", compile=True, **settings))
    got, want = losses(tmp_path / "run"), losses(runs / "ref")
    assert sorted(got) == [1, 2]
    assert np.allclose([got[s] for s in (1, 2)], [want[s] for s in (1, 2)], **TOL)
