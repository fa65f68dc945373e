"""Bad input on the command line: every case exits 2 with one line on stderr, no traceback, and leaves
the files around it exactly as they were (nothing created, changed or removed)."""

import shutil

import numpy as np
import pytest

from perceiver_ar.cli import main
from perceiver_ar.data import prepare_text
from perceiver_ar.train import train
from tests.conftest import tiny_train_config
from tests.test_data import make_corpus
from tests.test_store_safety import snapshot

GOLDEN = "tests/golden/golden_A_rotary.npz"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A folder a user might have: a corpus, stores, a run, model directories, official parameters, notes."""
    import json
    from pathlib import Path

    root = tmp_path_factory.mktemp("workspace")
    make_corpus(root / "corpus", num_docs=4, base_len=200)
    (root / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (root / "notes").mkdir()
    (root / "notes" / "mine.txt").write_text("my notes\n")
    prepare_text([root / "corpus"], root / "store", validation_fraction=0.5)
    prepare_text(
        [root / "corpus"], root / "bpe", tokenizer="bpe", bpe_vocab_size=259, validation_fraction=0.5
    )
    train(tiny_train_config(root / "store", root / "run", model={"context_len": 32, "num_latents": 8}))
    shutil.copytree(root / "run" / "model", root / "corrupt_model")
    weights = root / "corrupt_model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-20] ^= 0xFF
    weights.write_bytes(bytes(data))
    golden = np.load(Path(__file__).parents[1] / GOLDEN, allow_pickle=False)
    np.savez(root / "params.npz", **{k: golden[k] for k in golden.files if k.startswith("params/")})
    (root / "truncated.npz").write_bytes((root / "params.npz").read_bytes()[:5000])
    config = json.loads(str(golden["config_json"]))
    for k in ("param_seed", "z_loss", "label_smoothing"):
        config.pop(k, None)
    (root / "official.json").write_text(json.dumps(config))
    return root


TRAIN = "--preset tiny --model.context_len 32 --steps 2 --batch-size 2 --no-progress --no-tensorboard"
CASES = [
    # prepare
    ("prepare text --out s", "no input"),
    ("prepare text missing.txt --out s", "missing.txt does not exist"),
    ("prepare text latin1.txt --out s", "is not UTF-8 text (bad byte at offset 3)"),
    ("prepare text corpus --out corpus", "contains the input"),
    ("prepare text corpus --out .", "contains the current directory"),
    ("prepare text corpus/sub --out corpus", "contains the input"),
    ("prepare text corpus --out corpus/sub/s", "inside the input folder"),
    ("prepare text corpus --out notes", "is not a data store"),
    ("prepare text corpus --out store", "already holds a data store: pass --overwrite"),
    ("prepare text corpus --out notes/mine.txt", "is a file"),
    ("prepare text corpus --out s --validation-fraction 1.5", "must be in [0, 1)"),
    ("prepare text corpus --out s --tokenizer bpe --vocab-size 100", "vocab_size >= 259"),
    ("prepare text corpus --out s --vocab-size -5", "must be a positive integer"),
    ("prepare copy --length 5 --out s", "even length"),
    ("prepare copy --length 16 --num-train 0 --out s", "must be a positive integer"),
    ("prepare image --out s", "give image files"),
    ("prepare audio corpus --test-fraction -0.1 --out s", "must be in [0, 1)"),
    ("prepare music corpus --limit 0 --out s", "must be a positive integer"),
    # train
    (f"train --data store --out r {TRAIN} --steps -3", "--steps: must be a positive integer"),
    (f"train --data store --out r {TRAIN} --batch-size 0", "--batch-size: must be a positive integer"),
    (f"train --data store --out r {TRAIN} --grad-accum 0", "--grad-accum: must be a positive integer"),
    (f"train --data store --out r {TRAIN} --lr nan", "--lr: must be a finite number"),
    (f"train --data store --out r {TRAIN} --lr -1", "--lr: must be a number > 0"),
    (f"train --data store --out r {TRAIN} --beta2 1.5", "--beta2: must be in [0, 1)"),
    (f"train --data store --out r {TRAIN} --sampler nope", "--sampler: must be one of"),
    (f"train --data store --out r {TRAIN} --preset nope", "--preset: must be one of"),
    (f"train --data store --out r {TRAIN} --batch-size 3 --grad-accum 2", "must be divisible"),
    (f"train --data store --out r {TRAIN} --model.num_latents 2.5", "num_latents must be an integer"),
    (f"train --data store --out r {TRAIN} --set nonsense=1", "not a train field"),
    (f"train --data store --out r {TRAIN} --set steps=0", "steps (--steps) must be a positive integer"),
    (f"train --data nostore --out r {TRAIN}", "not a prepared data store"),
    (f"train --data store --out notes {TRAIN}", "is not empty and is not a training run"),
    (f"train --data store --out store {TRAIN}", "contains the input"),
    (f"train --data store --out run {TRAIN}", "already holds checkpoints: pass --resume"),
    ("train --resume run --batch-size 16", "--batch-size 16 (the run's: 2)"),
    ("train --resume run --steps 1", "--steps can only grow"),
    ("train --resume run --data bpe", "is not the one"),
    ("train --resume notes", "is not a training run"),
    ("train --resume nowhere", "nowhere is not a training run directory"),
    # eval
    ("eval nomodel --data store", "nomodel does not exist"),
    ("eval run --data nostore", "nostore does not exist"),
    ("eval run --data store --num-latents 0", "--num-latents: must be a positive integer"),
    ("eval run --data store --num-latents 1000", "num_latents must be in [1, context_len=32]"),
    ("eval run --data store --batch-size 0", "--batch-size: must be a positive integer"),
    ("eval run --data store --temperature nan", "--temperature: must be a finite number"),
    ("eval run --data store --split nope", "has no split 'nope'"),
    ("eval run --data bpe", "holds text, bpe tokenizer (V=259"),
    ("eval run --data store --json notes/mine.txt", "is not an eval result"),
    ("eval run --data store --json notes", "is a directory"),
    ("eval corrupt_model --data store", "does not match its SHA-256"),
    ("eval run --data store --precision fp8", "precision"),
    # generate
    ("generate run --prompt x --max-new-tokens 0", "--max-new-tokens: must be a positive integer"),
    (
        "generate run --prompt x --max-new-tokens 2 --temperature nan",
        "--temperature: must be a finite number",
    ),
    ("generate run --prompt x --max-new-tokens 2 --top-p 1.5", "--top-p: must be in (0, 1]"),
    ("generate run --prompt x --max-new-tokens 2 --top-k 0", "--top-k: must be a positive integer"),
    ("generate run --prompt x --max-new-tokens 2 --tokenizer bpe", "holds the bpe tokenizer"),
    ("generate run --prompt x --max-new-tokens 2 --stop 999", "stop_tokens must be ids in [0, 259)"),
    ("generate run --prompt-file missing.txt --max-new-tokens 2", "missing.txt does not exist"),
    ("generate run --max-new-tokens 2", "one of the arguments --prompt --prompt-file is required"),
    ("generate corrupt_model --prompt x --max-new-tokens 2", "does not match its SHA-256"),
    ("generate run --prompt x --max-new-tokens 2 --compile --no-cache", "--compile compiles the cached"),
    # render
    ("render run --data store --out r", "the store holds modality 'text'"),
    ("render run --data store --out notes", "holds no render.json"),
    ("render run --data store --out r --num-samples 0", "--num-samples: must be a positive integer"),
    ("render run --data store --out r --top-p 0", "--top-p: must be in (0, 1]"),
    # inspect
    ("inspect nomodel --data store --out i", "nomodel does not exist"),
    ("inspect run --data store --out i --doc 99", "--doc 99 is out of range"),
    ("inspect run --data store --out i --start 100000", "lies outside document 0"),
    ("inspect run --data store --out i --length 1000", "must be in [1, N=32]"),
    ("inspect run --data store --out i --position-block 0", "--position-block: must be a positive integer"),
    ("inspect run --data store --out i --split nope", "has no split 'nope'"),
    ("inspect run --data store --out notes", "holds no inspect.json"),
    ("inspect run --data store --out store", "contains the input"),
    ("inspect run --data bpe --out i", "holds text, bpe tokenizer (V=259"),
    ("inspect corrupt_model --data store --out i", "does not match its SHA-256"),
    # convert-official
    ("convert-official truncated.npz official.json m", "truncated or damaged"),
    ("convert-official nothing.npz official.json m", "nothing.npz does not exist"),
    ("convert-official params.npz nothing.json m", "nothing.json does not exist"),
    ("convert-official params.npz official.json notes", "is not a model directory"),
    ("convert-official params.npz official.json run/model", "already holds a model: pass --overwrite"),
    ("convert-official params.npz latin1.txt m", "cannot read the official config"),
]


@pytest.mark.parametrize("argv, message", CASES, ids=[c[0][:60] for c in CASES])
def test_bad_input_exits_2_in_one_line_and_changes_nothing(workspace, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(workspace)
    before = snapshot(workspace)
    code = main(argv.split())
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "\n" not in err, err
    assert "Traceback" not in err
    assert message in err, err
    assert snapshot(workspace) == before


def test_there_are_at_least_30_cases_across_every_command():
    assert len(CASES) >= 30
    commands = {c[0].split()[0] for c in CASES}
    assert commands == {"prepare", "train", "eval", "generate", "render", "convert-official", "inspect"}
