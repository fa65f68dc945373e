"""Training runs are safe by default: one writer per run, checksummed checkpoints, divergence stops
the run, a resume is the same run, and kill -9 at any moment resumes bit for bit."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from perceiver_ar import PerceiverAR
from perceiver_ar.cli import main
from perceiver_ar.run_dir import RUN_LOG, list_checkpoints
from perceiver_ar.train import DivergenceError, resume_config, train
from tests.test_data import make_corpus
from tests.test_store_safety import snapshot
from tests.test_train import config, losses

QUIET = dict(progress=False, tensorboard=False, threads=1)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from perceiver_ar.data import prepare_text

    root = tmp_path_factory.mktemp("safety_data")
    make_corpus(root / "corpus", num_docs=6, base_len=300)
    return str(prepare_text([root / "corpus"], root / "store", validation_fraction=0.3))


def weights(path):
    return PerceiverAR.from_pretrained(str(path)).state_dict()


def assert_same_weights(a, b):
    assert all(torch.equal(a[k], b[k]) for k in a)


def cli(*argv):
    """``perceiver-ar`` in a fresh process: (exit status, stdout, stderr, seconds)."""
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "perceiver_ar.cli", *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return proc.returncode, proc.stdout, proc.stderr, time.perf_counter() - t0


def train_argv(store, out, *extra):
    return [
        *("train", "--data", store, "--out", str(out), "--preset", "tiny"),
        *"--model.context_len 32 --model.num_latents 8 --batch-size 4 --lr 3e-3 --warmup-steps 2".split(),
        *"--eval-every 0 --eval-tokens 64 --no-progress --no-tensorboard --threads 1".split(),
        *extra,
    ]


# ----------------------------------------------------------------------------
# The run directory
# ----------------------------------------------------------------------------


def test_train_never_writes_into_a_folder_it_did_not_make(store, tmp_path):
    mine = tmp_path / "mine"
    (mine / "model").mkdir(parents=True)
    (mine / "model" / "weights.bin").write_bytes(b"the user's")
    (mine / "train_config.json").write_text('{"the user": "wrote this"}')
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match="is not empty and is not a training run"):
        train(config(store, mine, steps=2))
    with pytest.raises(ValueError, match="is not a training run"):
        train(config(store, mine, steps=2, resume=True))
    with pytest.raises(ValueError, match="contains the input"):
        train(config(store, Path(store).parent, steps=2))
    assert snapshot(tmp_path) == before


def test_overwrite_starts_a_run_again_and_touches_nothing_else(store, tmp_path):
    """--overwrite replaces only what a run wrote, only in a run, and never with --resume."""
    run = tmp_path / "run"
    train(config(store, run, steps=3, checkpoint_every=3))
    (run / "notes.txt").write_text("the user's")
    with pytest.raises(ValueError, match="already holds checkpoints"):
        train(config(store, run, steps=2))
    with pytest.raises(ValueError, match="pass one of them"):
        train(config(store, run, steps=2, resume=True, overwrite=True))
    train(config(store, run, steps=2, checkpoint_every=2, overwrite=True))
    assert sorted(losses(run)) == [1, 2]  # a new run's log, not the old one's continued
    assert [p.name for p in list_checkpoints(run)] == ["step_000002"]
    assert (run / "notes.txt").read_text() == "the user's"
    # The new run resumes as usual (its saved --overwrite does not come back).
    train(resume_config(run, steps=4))
    assert sorted(losses(run)) == [1, 2, 3, 4]
    # A folder that is not a run is refused, --overwrite or not, and left as it was.
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "model").mkdir()
    (mine / "metrics.jsonl").write_text("mine")
    before = snapshot(tmp_path / "mine")
    with pytest.raises(ValueError, match="is not empty and is not a training run"):
        train(config(store, mine, steps=2, overwrite=True))
    assert snapshot(tmp_path / "mine") == before


def test_two_train_processes_on_one_out(store, tmp_path):
    """Started together: exactly one runs, the other exits 2 at once, in one line naming the holder."""
    run = tmp_path / "run"
    argv = train_argv(store, run, "--steps", "100000", "--checkpoint-every", "20")
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "perceiver_ar.cli", *argv],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        deadline = time.time() + 240
        while all(p.poll() is None for p in procs) and time.time() < deadline:
            time.sleep(0.05)
        loser = next(p for p in procs if p.poll() is not None)
        winner = next(p for p in procs if p is not loser)
        assert loser.returncode == 2
        assert winner.poll() is None  # the other one is training
        err = loser.stderr.read().strip()
        assert "\n" not in err and "Traceback" not in err
        assert f"is in use by another training process (PID {winner.pid}" in err
        deadline = time.time() + 120
        while not list_checkpoints(run) and time.time() < deadline:
            time.sleep(0.05)
        # The run is one run: its steps once each, its own config.
        assert json.loads((run / "train_config.json").read_text())["steps"] == 100000
    finally:
        for p in procs:
            p.kill()
            p.wait()
    steps = sorted(losses(run))
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 20


def test_a_running_train_holds_its_lock_against_a_new_run_and_a_resume(store, tmp_path, capsys):
    run = tmp_path / "run"
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(
        [sys.executable, "-m", "perceiver_ar.cli", *train_argv(store, run, "--steps", "2000")],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 120
        while not (run / "metrics.jsonl").exists() and time.time() < deadline:
            time.sleep(0.05)
        for argv in (train_argv(store, run, "--steps", "5"), ["train", "--resume", str(run)]):
            t0 = time.perf_counter()
            assert main(argv) == 2
            err = capsys.readouterr().err.strip()
            assert f"in use by another training process (PID {first.pid}" in err and "\n" not in err
            assert time.perf_counter() - t0 < 10  # refused at once, not after waiting
        assert first.poll() is None  # the first run goes on
    finally:
        first.kill()
        first.wait()


# ----------------------------------------------------------------------------
# kill -9 and corruption
# ----------------------------------------------------------------------------


def test_kill_9_at_any_moment_resumes_bit_for_bit(store, tmp_path):
    """A run killed with SIGKILL (mid-step, mid-checkpoint: any moment) resumes from its last complete
    checkpoint, its lock taken over, and ends with the weights of the uninterrupted run."""
    kw = dict(steps=12, checkpoint_every=2, keep_checkpoints=10, model={"context_len": 32, "num_latents": 8})
    train(config(store, tmp_path / "straight", eval_every=0, **kw, **QUIET))
    run = tmp_path / "killed"
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
    argv = train_argv(store, run, "--steps", "12", "--checkpoint-every", "2", "--keep-checkpoints", "10")
    proc = subprocess.Popen(
        [sys.executable, "-m", "perceiver_ar.cli", *argv], env=env, stderr=subprocess.PIPE
    )
    deadline = time.time() + 120
    while len(list_checkpoints(run)) < 2 and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = int(list_checkpoints(run)[-1].name[5:])
    assert 4 <= done < 12  # killed in the middle
    result = train(resume_config(run, **QUIET))
    assert result["step"] == 12
    assert_same_weights(weights(tmp_path / "straight" / "model"), weights(run / "model"))
    straight, resumed = losses(tmp_path / "straight"), losses(run)
    assert all(resumed[s] == straight[s] for s in range(done + 1, 13))


def flip_bytes(path, at=-100, count=8):
    data = bytearray(path.read_bytes())
    for i in range(count):
        data[at + i] ^= 0xFF
    path.write_bytes(bytes(data))  # the same size: only a checksum can tell


def test_a_corrupt_newest_checkpoint_is_reported_and_the_previous_one_used(store, tmp_path):
    kw = dict(steps=10, checkpoint_every=2, keep_checkpoints=5, eval_every=0, **QUIET)
    train(config(store, tmp_path / "straight", **kw))
    run = tmp_path / "run"
    train(config(store, run, stop_at=6, **kw))
    newest = list_checkpoints(run)[-1]
    assert newest.name == "step_000006"
    flip_bytes(newest / "model.safetensors")
    result = train(resume_config(run, **QUIET))
    assert result["step"] == 10
    log = (run / RUN_LOG).read_text()
    assert (
        "checkpoints/step_000006 is corrupt or incomplete (model.safetensors does not match its SHA-256"
        in log
    )
    assert "resumed at step 4" in log
    straight, resumed = losses(tmp_path / "straight"), losses(run)
    assert [resumed[s] for s in range(5, 11)] == [straight[s] for s in range(5, 11)]
    assert_same_weights(weights(tmp_path / "straight" / "model"), weights(run / "model"))


def test_every_checkpoint_corrupt_is_a_clear_error(store, tmp_path):
    run = tmp_path / "run"
    train(config(store, run, steps=4, checkpoint_every=2, eval_every=0, **QUIET))
    for ckpt in list_checkpoints(run):
        flip_bytes(ckpt / "optimizer.safetensors")
    with pytest.raises(FileNotFoundError, match=r"no complete checkpoint to resume from \(2 corrupt"):
        train(resume_config(run, **QUIET))


# ----------------------------------------------------------------------------
# Divergence
# ----------------------------------------------------------------------------


def nan_loss_from(step, monkeypatch):
    """Make the loss NaN from optimizer step ``step`` on (the run is forced to diverge there)."""
    import perceiver_ar.train as train_module

    real = train_module.perceiver_ar_loss
    calls = {"n": 0}

    def loss(*args, **kwargs):
        calls["n"] += 1
        out = real(*args, **kwargs)
        if calls["n"] >= step:
            out.total = out.total * float("nan")
        return out

    monkeypatch.setattr(train_module, "perceiver_ar_loss", loss)


def test_divergence_stops_the_run_and_leaves_the_last_good_checkpoint_and_model(store, tmp_path, monkeypatch):
    run = tmp_path / "run"
    nan_loss_from(7, monkeypatch)
    with pytest.raises(DivergenceError, match="step 7: the loss is nan.*the checkpoint of step 6 and model/"):
        train(config(store, run, steps=12, checkpoint_every=3, eval_every=0, **QUIET))
    assert [p.name for p in list_checkpoints(run)] == ["step_000003", "step_000006"]
    good = list_checkpoints(run)[-1]
    assert_same_weights(weights(good), weights(run / "model"))  # model/ is step 6's, finite
    assert all(torch.isfinite(v).all() for v in weights(run / "model").values())
    assert "training diverged" in (run / RUN_LOG).read_text()
    assert max(losses(run)) == 6  # the NaN step is not recorded as a result


def test_divergence_exits_3_in_one_line(store, tmp_path, monkeypatch, capsys):
    nan_loss_from(2, monkeypatch)
    code = main(train_argv(store, tmp_path / "run", "--steps", "5", "--checkpoint-every", "1"))
    err = capsys.readouterr().err.strip()
    assert code == 3 and "\n" not in err and "training diverged" in err
    assert "the checkpoint of step 1 and model/ are as they were" in err


def test_non_finite_weights_are_never_saved(store, tmp_path, monkeypatch, capsys):
    """Weights that turn infinite after an update (forced at step 2) are never written: the
    checkpoint of that step is refused and step 1's checkpoint and model/ stay."""
    real_step = torch.optim.AdamW.step
    calls = {"n": 0}

    def step(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:
            with torch.no_grad():
                self.param_groups[1]["params"][0].fill_(float("inf"))  # a bias, say
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    run = tmp_path / "run"
    assert main(train_argv(store, run, "--steps", "3", "--checkpoint-every", "1")) == 3
    err = capsys.readouterr().err
    assert "step 2: the weights are not finite" in err and "the checkpoint of step 1 and model/" in err
    assert [p.name for p in list_checkpoints(run)] == ["step_000001"]
    assert_same_weights(weights(list_checkpoints(run)[0]), weights(run / "model"))


# ----------------------------------------------------------------------------
# Resume means the same run
# ----------------------------------------------------------------------------


def test_resume_refuses_changed_settings_and_changes_nothing(store, tmp_path, capsys):
    run = tmp_path / "run"
    train(config(store, run, steps=6, stop_at=3, eval_every=0, **QUIET))
    before = snapshot(run)
    assert main(["train", "--resume", str(run), "--batch-size", "16", "--preset", "demo", "--lr", "0.1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert "--batch-size 16 (the run's: 4)" in err and "--preset 'demo' (the run's: 'tiny')" in err
    assert "--lr 0.1 (the run's: 0.003)" in err
    assert main(["train", "--resume", str(run), "--steps", "5"]) == 2
    assert "--steps can only grow" in capsys.readouterr().err
    other = tmp_path / "other"
    (other / "x.txt").parent.mkdir()
    (other / "x.txt").write_text("different text, so a different store\n" * 40)
    from perceiver_ar.data import prepare_text

    prepare_text([other], tmp_path / "other_store", validation_fraction=0)
    assert main(["train", "--resume", str(run), "--data", str(tmp_path / "other_store")]) == 2
    assert "is not the one" in capsys.readouterr().err
    assert snapshot(run) == before


def test_resume_records_safe_changes_and_a_finished_run_stays_as_it_is(store, tmp_path, capsys):
    run = tmp_path / "run"
    train(config(store, run, steps=4, stop_at=2, eval_every=0, **QUIET))
    assert main(["train", "--resume", str(run), "--steps", "6", "--eval-every", "3", "--no-progress"]) == 0
    log = (run / RUN_LOG).read_text()
    assert "resumed at step 2 on 1 process(es) (none); changed --steps 4 -> 6, --eval-every 0 -> 3" in log
    assert json.loads((run / "train_config.json").read_text())["steps"] == 6
    capsys.readouterr()
    before = snapshot(run)
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert "already finished at step 6" in capsys.readouterr().out
    assert snapshot(run) == before


def test_a_run_from_before_run_json_and_checksums_still_resumes(store, tmp_path):
    run = tmp_path / "run"
    train(config(store, run, steps=4, stop_at=2, eval_every=0, **QUIET))
    (run / "run.json").unlink()
    ckpt = list_checkpoints(run)[-1]
    manifest = json.loads((ckpt / "MANIFEST.json").read_text())
    sizes_only = {"step": 2, "files": {name: entry["bytes"] for name, entry in manifest["files"].items()}}
    (ckpt / "MANIFEST.json").write_text(json.dumps(sizes_only))  # the manifest of the first release
    result = train(resume_config(run, **QUIET))
    assert result["step"] == 4 and (run / "run.json").is_file()
