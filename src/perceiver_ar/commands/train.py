"""``perceiver-ar train``: train or resume a model on a prepared store.

Every ``TrainConfig`` field is a flag (``--batch-size 32``), every model
config field is ``--model.<field> VALUE``, and ``--set key=value`` sets
either kind (``--set model.num_latents=64``). ``--resume RUN_DIR`` reloads
the run's saved config; flags given with it override that config, but the
model always comes from the checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

from .checks import arg_type

# Fields whose dataclass defaults exist for Python callers only: the CLI asks for them.
REQUIRED = ("data", "out")
# The exit status of a run stopped by a non-finite loss or gradient (usage errors exit 2).
DIVERGED = 3


def parse_value(text: str) -> Any:
    """A flag value as JSON when it parses (numbers, true/false, lists), else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def register(sub: argparse._SubParsersAction) -> None:
    from ..config import PerceiverARConfig
    from ..train import TrainConfig

    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    p = sub.add_parser(
        "train",
        help="train (or resume) a model on a prepared data store",
        description="Train a Perceiver AR model. Runs unchanged under `torchrun --nproc_per_node K`. "
        "Example: perceiver-ar train --data data/shakespeare --preset demo --steps 600 --out runs/demo",
    )
    for f in fields.values():
        if f.name in ("model", "resume"):
            continue
        flag = "--" + f.name.replace("_", "-")
        text, default = f.metadata["help"], f.default
        # SUPPRESS keeps flags that were not given out of the namespace, so a
        # resumed run keeps its saved values for them.
        if isinstance(default, bool):
            p.add_argument(
                flag,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=f"{text} (default: {'on' if default else 'off'})",
            )
        else:
            # --data and --out have no default a run uses: they are required unless --resume.
            shown = "required unless --resume" if f.name in REQUIRED else f"default: {default}"
            p.add_argument(
                flag, type=arg_type(f.metadata["check"]), default=argparse.SUPPRESS, help=f"{text} ({shown})"
            )
    p.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help=f"{fields['resume'].metadata['help']} (the run in RUN_DIR: its saved config is reloaded, "
        "flags given override it)",
    )
    group = p.add_argument_group(
        f"model config ({fields['model'].metadata['help']}: --model.FIELD VALUE; not with --resume)"
    )
    for f in dataclasses.fields(PerceiverARConfig):
        group.add_argument(
            f"--model.{f.name}",
            dest=f"model.{f.name}",
            type=parse_value,
            default=argparse.SUPPRESS,
            metavar="VALUE",
            help=f"model config: {f.name} (default: the preset's)",
        )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set a train field (steps=100) or a model field (model.num_latents=64); repeatable",
    )
    p.set_defaults(func=run)


def collect(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """The train fields and model fields given on the command line."""
    from ..train import TrainConfig

    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    train_fields = set(defaults)
    given = {k: v for k, v in vars(args).items() if k in train_fields and k not in ("model", "resume")}
    model = {k[len("model.") :]: v for k, v in vars(args).items() if k.startswith("model.")}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        key = key.strip().replace("-", "_")
        if key.startswith("model."):
            model[key[len("model.") :]] = parse_value(value)
        elif key in train_fields and key not in ("model", "resume"):
            text_field = isinstance(defaults[key], str) or defaults[key] is None
            given[key] = value if text_field else parse_value(value)
        else:
            raise ValueError(
                f"--set {key}: not a train field ({', '.join(sorted(train_fields))}) or model.<field>"
            )
    return given, model


def run(args: argparse.Namespace) -> int:
    from ..train import DivergenceError, TrainConfig, resume_config, train

    given, model = collect(args)
    if args.resume:
        if model:
            raise ValueError(
                f"--resume continues the saved model; model fields cannot change: {sorted(model)}"
            )
        cfg = resume_config(args.resume, **given)
    else:
        if "data" not in given or "out" not in given:
            raise ValueError("train needs --data DIR and --out RUN_DIR (or --resume RUN_DIR)")
        cfg = TrainConfig(**given, model=model)
    try:
        result = train(cfg)
    except DivergenceError as e:  # not a usage error, not a bug: its own exit status
        print(f"perceiver-ar train: error: {e}", file=sys.stderr)
        return DIVERGED
    if result["rank"] != 0:  # under torchrun, rank 0 reports
        return 0
    if result["finished_before"]:
        print(
            f"{result['run_dir']} already finished at step {result['step']} of --steps {cfg.steps}: "
            "nothing to do, nothing changed (pass a larger --steps to train on)"
        )
        return 0
    ev = result.get("eval") or {}
    line = f"trained to step {result['step']} in {result['seconds']:.0f} s"
    if result["bits_per_token"] is not None:
        line += f"; train {result['bits_per_token']:.4f} bits/token"
    if ev:
        line += f", validation {ev['bits_per_token']:.4f} bits/token"
        if "bits_per_byte" in ev:
            line += f" ({ev['bits_per_byte']:.4f} bits/byte"
            if "unigram_bits_per_byte" in ev:
                line += f"; unigram baseline {ev['unigram_bits_per_byte']:.4f}"
            line += ")"
    print(line)
    print(f"model: {result['model_dir']}  loss plot: {result['run_dir']}/loss.png")
    return 0
