"""The CLI's help: every subcommand and every prepare modality answers --help; train's flag help
comes from the TrainConfig fields, its preset list from config.PRESETS."""

import argparse
import dataclasses

import pytest

from perceiver_ar.cli import build_parser, main
from perceiver_ar.config import PRESETS
from perceiver_ar.train import TrainConfig

SUBCOMMANDS = ["convert-official", "prepare", "train", "export", "eval", "generate", "render", "inspect"]
MODALITIES = ["text", "audio", "copy", "image", "music"]


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def help_text(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: perceiver-ar")
    return out


def test_the_parser_lists_every_subcommand_and_modality():
    parser = build_parser()
    assert list(subparsers(parser)) == SUBCOMMANDS
    assert list(subparsers(subparsers(parser)["prepare"])) == MODALITIES


@pytest.mark.parametrize("argv", [[], *[[c] for c in SUBCOMMANDS], *[["prepare", m] for m in MODALITIES]])
def test_help_runs(capsys, argv):
    out = help_text(capsys, argv)
    assert "--help" in out


def test_every_train_config_field_has_help():
    for f in dataclasses.fields(TrainConfig):
        assert len(f.metadata.get("help", "")) > 5, f.name


def test_train_help_comes_from_the_config(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "10000")  # argparse wraps at the terminal width, even inside words
    out = " ".join(help_text(capsys, ["train"]).split())
    for f in dataclasses.fields(TrainConfig):
        if f.name not in ("model", "resume"):
            assert "--" + f.name.replace("_", "-") in out, f.name
        assert " ".join(f.metadata["help"].split()) in out, f.name
    assert ", ".join(PRESETS) in out
    # --data and --out are required unless --resume: no unused default is shown for them.
    assert "runs/run" not in out
    assert out.count("(required unless --resume)") == 2
