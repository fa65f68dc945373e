"""The command line end to end on a tiny corpus: prepare text, train, resume, eval; bad input."""

import json

import pytest

from perceiver_ar.cli import main
from tests.test_data import make_corpus

TRAIN = ["--preset", "tiny", "--model.context_len", "32", "--set", "model.num_latents=8", "--batch-size", "4"]
QUIET = ["--no-progress", "--no-tensorboard", "--threads", "1", "--warmup-steps", "2", "--eval-tokens", "64"]


def test_prepare_train_resume_eval(tmp_path, capsys):
    make_corpus(tmp_path / "corpus")
    store, run = str(tmp_path / "store"), str(tmp_path / "run")
    assert (
        main(["prepare", "text", str(tmp_path / "corpus"), "--out", store, "--validation-fraction", "0.3"])
        == 0
    )
    assert "train 4 documents" in capsys.readouterr().out

    args = ["train", "--data", store, "--out", run, "--steps", "6", "--stop-at", "3", *TRAIN, *QUIET]
    assert main(args) == 0
    assert "trained to step 3" in capsys.readouterr().out
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert saved["model"] == {"context_len": 32, "num_latents": 8} and saved["batch_size"] == 4

    assert main(["train", "--resume", run, "--no-progress", "--eval-every", "0"]) == 0
    out = capsys.readouterr().out
    assert "trained to step 6" in out and "validation" in out and "bits/byte" in out
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps[:6] == [1, 2, 3, 4, 5, 6]

    result_file = tmp_path / "eval.json"
    assert main(["eval", run, "--data", store, "--num-latents", "4", "--json", str(result_file)]) == 0
    out = capsys.readouterr().out
    assert "unigram:" in out and "bits/byte" in out
    result = json.loads(result_file.read_text())
    assert result["num_latents"] == 4 and result["protocol"] == "block" and result["bits_per_byte"] > 0

    model_dir = str(tmp_path / "run" / "model")
    assert (
        main(
            ["eval", model_dir, "--data", store, "--protocol", "stride1", "--sample", "12", "--prompt", "The"]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "protocol stride1" in out and "[The]" in out


def test_resume_refuses_model_changes(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path), "--model.num_latents", "4"]) == 2
    assert "model fields cannot change" in capsys.readouterr().err


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d / "missing.txt", "missing.txt does not exist"),
        (lambda d: (d / "bad.txt").write_bytes(b"ok \xff\xfe") and d / "bad.txt", "bad.txt is not UTF-8"),
        (lambda d: (d / "empty.txt").write_text("") or d / "empty.txt", "the corpus is empty"),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path, capsys, make, message):
    path = make(tmp_path)
    assert main(["prepare", "text", str(path), "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_train_and_eval_errors(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path / "nostore"), "--out", str(tmp_path / "r")]) == 2
    assert "not a prepared data store" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "r")]) == 2
    assert "needs --data" in capsys.readouterr().err
    assert main(["train", "--data", "x", "--out", "y", "--set", "nonsense=1"]) == 2
    assert "not a train field" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "nomodel"), "--data", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["prepare", "text", "--out", str(tmp_path / "s")]) == 2
    assert "--default" in capsys.readouterr().err


def test_bpe_corpus_trains_and_reports_bits_per_byte(tmp_path, capsys):
    make_corpus(tmp_path / "corpus")
    store, run = str(tmp_path / "store"), str(tmp_path / "run")
    prep = [
        "prepare",
        "text",
        str(tmp_path / "corpus"),
        "--out",
        store,
        "--tokenizer",
        "bpe",
        "--vocab-size",
        "300",
    ]
    assert main([*prep, "--validation-fraction", "0.3"]) == 0
    assert "bpe tokenizer, V=300" in capsys.readouterr().out
    assert main(["train", "--data", store, "--out", run, "--steps", "2", *TRAIN, *QUIET]) == 0
    capsys.readouterr()
    result_file = tmp_path / "eval.json"
    assert main(["eval", run, "--data", store, "--json", str(result_file)]) == 0
    result = json.loads(result_file.read_text())
    # BPE tokens hold several bytes each: fewer bits per byte than per token.
    assert result["num_bytes"] > 1.5 * result["num_tokens"]
    assert result["bits_per_byte"] < result["bits_per_token"] / 1.5
