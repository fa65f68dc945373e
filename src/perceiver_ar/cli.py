"""The ``perceiver-ar`` command line: one subcommand per action.

Each subcommand lives in ``perceiver_ar.commands.<name>``, which defines
``register(subparsers)`` and calls one library function that works from
Python too; a new subcommand is one module plus one line in ``COMMANDS``.
Errors a user can cause are printed as one line, not a traceback, and exit
with status 2: a bad flag value at parse time (``commands.checks.Parser``),
any other user error (ValueError, a missing file, ...) when it is found.
``train`` exits 3 when the run diverged. Set PERCEIVER_AR_DEBUG=1 for the
traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from .commands import convert, export, generate, inspect, prepare, render, train
from .commands import eval as eval_command
from .commands.checks import Parser, check_paths

# The subcommand modules, in the order --help lists them. Their register()
# imports the library lazily, so building the parser stays cheap.
COMMANDS = [convert, prepare, train, export, eval_command, generate, render, inspect]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="perceiver-ar",
        description="Perceiver AR: long-context autoregressive models (prepare, train, eval, generate).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # a bad flag, already reported in one line, is exit status 2
        if e.code == 2:
            return 2
        raise  # --help
    try:
        check_paths(args)
        result = args.func(args)
    except (
        ValueError,
        FileNotFoundError,
        FileExistsError,
        NotADirectoryError,
        IsADirectoryError,
        PermissionError,
    ) as e:
        if os.environ.get("PERCEIVER_AR_DEBUG"):
            raise
        print(f"perceiver-ar {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"perceiver-ar {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
