"""Parse-time checks of flag values, and the parser that reports a bad one in one line.

``arg_type(check)`` turns a check of ``perceiver_ar.checks`` into an argparse
``type=``; ``check_paths`` refuses a missing input right after parsing,
before any work starts. ``load_model`` loads a model for eval, render and
inspect in the runtime's device and precision.
``Parser`` prints a usage error as one line (``perceiver-ar train: error:
argument --steps: must be a positive integer, got '-3'``) and exits 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from .. import checks


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line on stderr (exit status 2), naming --help."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        sys.exit(2)


def arg_type(check: Callable[[Any], Any]) -> Callable[[str], Any]:
    """``check`` as an argparse type: its ValueError becomes the one-line usage error."""

    def parse(text: str) -> Any:
        try:
            return check(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = getattr(check, "__name__", "value")
    return parse


positive_int = arg_type(checks.positive_int)
nonnegative_int = arg_type(checks.nonnegative_int)
positive_float = arg_type(checks.positive_float)
nonnegative_float = arg_type(checks.nonnegative_float)
finite_float = arg_type(checks.finite_float)
fraction = arg_type(checks.fraction)
probability_mass = arg_type(checks.probability_mass)


def check_paths(args: argparse.Namespace) -> None:
    """The paths a command reads must exist before it starts (``set_defaults(must_exist=...)``).

    ``must_exist`` maps an argument's dest to (its name, "dir" | "file" | "new file"); a "new file" is
    one to write, whose folder must exist. Checked right after parsing, not by argparse itself, so that
    documented command lines still parse where their files are not (tests/test_docs.py).
    """
    for dest, (name, kind) in getattr(args, "must_exist", {}).items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        path = Path(value)
        if kind == "new file":
            if path.is_dir():
                raise IsADirectoryError(f"argument {name}: {value} is a directory, not a file")
            if not path.parent.is_dir():
                raise FileNotFoundError(f"argument {name}: the folder of {value} does not exist")
        elif not path.exists():
            raise FileNotFoundError(f"argument {name}: {value} does not exist")
        elif kind == "dir" and not path.is_dir():
            raise NotADirectoryError(f"argument {name}: {value} is not a directory")
        elif kind == "file" and not path.is_file():
            raise IsADirectoryError(f"argument {name}: {value} is not a file")


NO_VERIFY_HELP = (
    "skip the SHA-256 check of the model's files against its MANIFEST.json (for trusted, very large "
    "models: the check reads every byte once more; README 'Safety')"
)


def load_model(path: str, rt: Any, verify: bool) -> Any:
    """The model of ``path`` on the runtime's device, cast for inference; a note if it lacks provenance."""
    from ..model import PerceiverAR

    model = rt.for_inference(PerceiverAR.from_pretrained(path, map_location=rt.device, verify=verify))
    if model.provenance is None:
        print(
            f"note: {path} records no provenance (saved before provenance.json existed): "
            "the store is checked by vocabulary size only",
            file=sys.stderr,
        )
    return model
