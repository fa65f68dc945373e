"""Docs that run: every command and Python snippet of README.md, docs/*.md and benchmarks/README.md.

The documents are read into fenced blocks and inline code spans, and checked
against the code so they cannot drift from it:

- each shell command is checked against what it calls: ``perceiver-ar ...``
  (also under ``python -m`` or ``torchrun``) against the real argument parser,
  ``python benchmarks/X.py ...`` against that script's ``build_parser()``,
  ``make X`` against the Makefile, ``pip install perceiver-ar[extra]`` against
  pyproject.toml; an option named inline (```--sampler stream```) must exist;
- the ``perceiver-ar`` commands and Python snippets of each document then run,
  in document order, in a scratch directory at toy size: the documented
  command unchanged plus the flags of ``SHRINK`` appended (argparse keeps the
  last value), data that is not on this machine replaced as ``SUBSTITUTE``
  says by small fixtures, ``TrainConfig(...)`` calls in snippets shrunk the
  same way;
- inline API references (``perceiver_ar.evaluate.evaluate(model, split, ...)``)
  must name real objects, parameters and defaults;
- every relative link and repository path named in the docs, every class
  they name, the source tree of the README's Layout, and every ``.md`` file
  named in the code, must exist;
- a usage line names every option of its command; the run directory listing
  of docs/training.md is what a run writes; the commands of ``make demo`` and
  of each benchmark's ``--help`` parse; benchmarks/README.md gives each script
  the run time its ``--help`` gives.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import gzip
import importlib
import importlib.util
import inspect
import io
import json
import re
import shlex
import struct
import sys
import wave
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch

from perceiver_ar.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]
SHELL_LANGS = {"bash", "sh", "shell", "console"}
COMMAND_WORDS = {"perceiver-ar", "python", "torchrun", "make", "bash", "pip", "apt-get"}
PLACEHOLDER = re.compile(r"^(?:[A-Z][A-Z0-9_]*|\.\.\.|<[^>]+>)$")
# Options of tools that are not ours, named in the docs (pip, torchrun).
EXTERNAL_FLAGS = {"--no-deps", "--ignore-requires-python", "--nproc_per_node", "--nproc-per-node"}
EXTERNAL_FLAGS |= {"--nnodes", "--node-rank", "--rdzv-backend", "--rdzv-endpoint", "--rdzv-id"}  # torchrun


# ----------------------------------------------------------------------------
# Reading the documents
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Block:
    doc: str  # path relative to the repository
    line: int  # first line of the block's contents
    lang: str  # "shell", "python" or "text"
    code: str


@dataclasses.dataclass(frozen=True)
class Command:
    doc: str
    line: int
    text: str  # one logical command as written
    argv: tuple[str, ...]
    inline: bool = False  # from a `code span` in the prose, not a block
    synopsis: bool = False  # a usage line ([--flag X] ...): only its flags are checked

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}:{' '.join(self.argv[:3])}"


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


@cache
def read_doc(path: Path) -> tuple[tuple[Block, ...], str]:
    """The fenced blocks of a document and its prose (fenced lines blanked, line numbers kept)."""
    blocks, prose = [], []
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^```(\S*)\s*$", lines[i])
        if not m:
            prose.append(lines[i])
            i += 1
            continue
        start, body = i + 1, []
        i += 1
        while i < len(lines) and not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        if i == len(lines):
            raise AssertionError(f"{rel(path)}:{start}: unclosed code fence")
        prose.extend([""] * (len(body) + 2))
        i += 1
        code = "\n".join(body)
        lang = m.group(1).lower()
        if lang in SHELL_LANGS:
            kind = "shell"
        elif lang == "python":
            kind = "python"
        elif lang == "":
            first_words = {ln.split()[0] for ln in body if ln.strip()}
            kind = "shell" if first_words & COMMAND_WORDS else "text"
        else:
            kind = "text"
        blocks.append(Block(rel(path), start + 1, kind, code))
    return tuple(blocks), "\n".join(prose)


def shell_commands(block: Block) -> list[Command]:
    """The logical commands of a shell block: continuations joined, comments and && split."""
    logical: list[tuple[int, str]] = []
    joining = False
    for n, raw in enumerate(block.code.splitlines()):
        line = raw.rstrip()
        if not line.strip():
            joining = False
            continue
        # A usage line continues on indented lines opening with [ or (.
        synopsis_continues = logical and re.match(r"^\s+[\[(]", line)
        if joining or synopsis_continues:
            logical[-1] = (logical[-1][0], logical[-1][1] + " " + line.strip().rstrip("\\"))
        else:
            logical.append((block.line + n, line.strip().rstrip("\\")))
        joining = line.endswith("\\")
    out = []
    for line_no, text in logical:
        out.extend(split_command(block.doc, line_no, text, inline=False))
    return out


def split_command(doc: str, line: int, text: str, inline: bool) -> list[Command]:
    tokens = shlex.split(text, comments=True)
    synopsis = any(t.startswith(("[", "(")) or t == "|" for t in tokens)
    parts: list[list[str]] = [[]]
    for t in tokens:
        if t == "&&":
            parts.append([])
        else:
            parts[-1].append(t)
    return [Command(doc, line, text, tuple(p), inline, synopsis) for p in parts if p]


INLINE = re.compile(r"`([^`]+)`")


def inline_spans(doc: Path) -> list[tuple[int, str]]:
    """Inline code spans of the prose with their line, whitespace normalised."""
    _, prose = read_doc(doc)
    spans = []
    for m in INLINE.finditer(prose):
        line = prose.count("\n", 0, m.start()) + 1
        spans.append((line, " ".join(m.group(1).split())))
    return spans


def is_command_span(text: str) -> bool:
    words = text.split()
    if not words:
        return False
    if words[0] in ("perceiver-ar", "torchrun", "make", "bash", "pip", "apt-get"):
        return len(words) > 1
    return (
        words[0] == "python" and len(words) > 1 and (words[1].startswith("benchmarks/") or words[1] == "-m")
    )


def all_blocks() -> list[Block]:
    return [b for doc in DOC_FILES for b in read_doc(doc)[0]]


def all_commands() -> list[Command]:
    cmds = []
    for doc in DOC_FILES:
        for b in read_doc(doc)[0]:
            if b.lang == "shell":
                cmds.extend(shell_commands(b))
        for line, text in inline_spans(doc):
            if is_command_span(text):
                cmds.extend(split_command(rel(doc), line, text, inline=True))
    return cmds


COMMANDS = all_commands()


# ----------------------------------------------------------------------------
# Checking a command against what it calls
# ----------------------------------------------------------------------------


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def all_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    out = [parser]
    for sub in {id(p): p for p in subparsers(parser).values()}.values():
        out.extend(all_parsers(sub))
    return out


def accepts(kind, value: str) -> bool:
    """Whether an argparse ``type=`` takes ``value``."""
    try:
        kind(value)
    except (ValueError, TypeError, argparse.ArgumentTypeError):
        return False
    return True


def fill_placeholders(parser: argparse.ArgumentParser, args: list[str]) -> list[str]:
    """Documented placeholders (N, RUN_DIR, ..., <x>) become values of the type their option wants."""
    out = []
    for i, a in enumerate(args):
        if PLACEHOLDER.match(a):
            action = parser._option_string_actions.get(args[i - 1]) if i else None
            if action is not None and action.choices:
                a = str(next(iter(action.choices)))
            elif action is not None and action.type not in (None, str):  # int, float or a checked value
                a = next((v for v in ("4", "0.5", "x") if accepts(action.type, v)), "x")
            else:
                a = "x"
        out.append(a)
    return out


def parse_cli(argv: list[str]) -> tuple[argparse.ArgumentParser, str]:
    """Parse a ``perceiver-ar`` command line; returns the innermost parser and argparse's complaint."""
    parser = build_parser()
    p, rest, path = parser, list(argv), []
    while rest and rest[0] in subparsers(p):
        path.append(rest[0])
        p = subparsers(p)[rest.pop(0)]
    args = path + fill_placeholders(p, rest)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            parser.parse_args(args)
        except SystemExit as e:
            if e.code:
                return p, err.getvalue().strip().splitlines()[-1]
    return p, ""


def check_cli(cmd: Command, argv: list[str]) -> None:
    if cmd.synopsis:
        p, _ = parse_cli([a for a in argv if not a.startswith(("-", "[", "(")) and a != "|"][:2])
        flags = re.findall(r"--[a-z][\w.-]*", " ".join(argv))
        missing = [f for f in flags if f not in p._option_string_actions]
        assert not missing, f"{cmd.doc}:{cmd.line}: {missing} are not options of `{p.prog}`"
        # A usage line stands for the whole command: it names every option.
        options = {a.option_strings[-1] for a in p._actions if a.option_strings and a.dest != "help"}
        unnamed = sorted(options - set(flags))
        assert not unnamed, f"{cmd.doc}:{cmd.line}: the usage of `{p.prog}` leaves out {unnamed}"
        return
    variants = [argv]
    if cmd.inline:  # `prepare image|music|audio` names each alternative
        for i, a in enumerate(argv):
            if "|" in a:
                variants = [argv[:i] + [alt] + argv[i + 1 :] for alt in a.split("|")]
    for v in variants:
        p, error = parse_cli(v)
        named = [a for a in v if a in p.prog.split()]
        if cmd.inline and error and len(named) == len(v):
            continue  # a mention of a subcommand (`perceiver-ar eval`), not a command line
        assert not error, f"{cmd.doc}:{cmd.line}: `{' '.join(v)}`: {error}"
        presets = [v[i + 1] for i, a in enumerate(v[:-1]) if a == "--preset"]
        from perceiver_ar.config import PRESETS

        unknown = [x for x in presets if x not in PRESETS and not PLACEHOLDER.match(x)]
        assert not unknown, f"{cmd.doc}:{cmd.line}: unknown preset {unknown}; presets: {sorted(PRESETS)}"


@cache
def benchmark_module(name: str):
    path = ROOT / "benchmarks" / name
    assert path.is_file(), f"benchmarks/{name} does not exist"
    sys.path.insert(0, str(path.parent))
    try:
        spec = importlib.util.spec_from_file_location(f"docs_bench_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module


def check_benchmark(cmd: Command, script: str, args: list[str]) -> None:
    module = benchmark_module(Path(script).name)
    assert hasattr(module, "build_parser"), f"{script} has no build_parser() for the docs test"
    parser = module.build_parser()
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            parser.parse_args(fill_placeholders(parser, args))
        except SystemExit as e:
            assert not e.code, f"{cmd.doc}:{cmd.line}: `{cmd.text}`: {err.getvalue().strip()}"


def makefile_targets() -> set[str]:
    return set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), flags=re.M))


def package_extras() -> set[str]:
    """The extras of pyproject.toml (read by hand: tomllib is not in Python 3.10)."""
    text = (ROOT / "pyproject.toml").read_text()
    m = re.search(r"^\[project\.optional-dependencies\]\n(.*?)(?=^\[)", text, flags=re.M | re.S)
    return set(re.findall(r"^([\w-]+)\s*=", m.group(1), flags=re.M)) if m else set()


def module_command(module: str, args: list[str]) -> list[str] | None:
    """The ``perceiver-ar`` arguments of ``python -m MODULE ARGS``, or None if MODULE is not a CLI."""
    if module == "perceiver_ar.cli":
        return args
    if module.startswith("perceiver_ar.commands."):
        spec = importlib.util.find_spec(module)
        assert spec is not None, f"no module {module}"
        assert '__name__ == "__main__"' in Path(spec.origin).read_text(), f"{module} cannot run with -m"
        return [module.rsplit(".", 1)[1], *args]
    return None


def check_command(cmd: Command) -> None:
    argv = list(cmd.argv)
    word = argv[0]
    if word == "perceiver-ar":
        check_cli(cmd, argv[1:])
    elif word == "torchrun":
        assert "-m" in argv, f"{cmd.doc}:{cmd.line}: torchrun without -m MODULE"
        i = argv.index("-m")
        cli = module_command(argv[i + 1], argv[i + 2 :])
        assert cli is not None, f"{cmd.doc}:{cmd.line}: torchrun runs {argv[i + 1]}, not the CLI"
        check_cli(cmd, cli)
    elif word == "python" and argv[1] == "-m":
        cli = module_command(argv[2], argv[3:])
        assert cli is not None, f"{cmd.doc}:{cmd.line}: unknown module {argv[2]}"
        check_cli(cmd, cli)
    elif word == "python" and argv[1].startswith("benchmarks/"):
        check_benchmark(cmd, argv[1], argv[2:])
    elif word == "bash":
        assert (ROOT / argv[1]).is_file(), f"{cmd.doc}:{cmd.line}: {argv[1]} does not exist"
    elif word == "make":
        missing = set(argv[1:]) - makefile_targets()
        assert not missing, f"{cmd.doc}:{cmd.line}: no Makefile target {sorted(missing)}"
    elif word == "pip":
        for a in argv[2:]:
            m = re.match(r"^perceiver-ar\[(.*)\]$", a)
            if m:
                missing = set(m.group(1).split(",")) - package_extras()
                assert not missing, f"{cmd.doc}:{cmd.line}: pyproject.toml has no extra {sorted(missing)}"
    elif word == "apt-get":
        pass  # system packages named for the default data sets
    else:
        raise AssertionError(f"{cmd.doc}:{cmd.line}: `{cmd.text}`: test_docs does not know how to check this")


def test_docs_have_commands_and_snippets():
    """The harness finds what it should (a broken reader would make every other test vacuous)."""
    blocks = all_blocks()
    assert sum(b.lang == "python" for b in blocks) >= 6
    words = {c.argv[0] for c in COMMANDS}
    assert {"perceiver-ar", "python", "make", "torchrun"} <= words
    assert len([c for c in COMMANDS if not c.inline]) >= 40


@pytest.mark.parametrize("cmd", COMMANDS, ids=[c.id for c in COMMANDS])
def test_documented_command_parses(cmd):
    check_command(cmd)


def known_flags() -> set[str]:
    flags = set(EXTERNAL_FLAGS)
    for p in all_parsers(build_parser()):
        flags |= set(p._option_string_actions)
    for script in sorted((ROOT / "benchmarks").glob("*.py")):
        module = benchmark_module(script.name)
        if hasattr(module, "build_parser"):
            flags |= set(module.build_parser()._option_string_actions)
    return flags


def test_inline_options_exist():
    """An option named in the prose (`--sampler stream`, `--stop-at STEP`) is an option of some command."""
    flags = known_flags()
    bad = []
    for doc in DOC_FILES:
        for line, text in inline_spans(doc):
            if text.startswith("--"):
                for flag in re.findall(r"(?:^|\s)(--[a-z][\w.-]*)", text):
                    if flag not in flags and not flag.startswith("--model."):
                        bad.append(f"{rel(doc)}:{line}: {flag}")
                    if flag.startswith("--model.") and "<" not in text:
                        from perceiver_ar.config import PerceiverARConfig

                        field = flag[len("--model.") :]
                        if field not in {f.name for f in dataclasses.fields(PerceiverARConfig)}:
                            bad.append(f"{rel(doc)}:{line}: {flag}")
    assert not bad, "options in the docs that no command has:\n" + "\n".join(bad)


def test_readme_lists_every_preset():
    """The README's preset list is the registry's (every preset it uses elsewhere must be listed)."""
    from perceiver_ar.config import PRESETS

    text = " ".join((ROOT / "README.md").read_text().split())
    m = re.search(r"with presets \(`perceiver_ar.PRESETS`\): ((?:`[\w-]+`(?:, | and |, and )?)+)", text)
    assert m, "README.md: the sentence 'with presets: `a`, `b`, ...' is missing"
    listed = re.findall(r"`([\w-]+)`", m.group(1))
    assert listed == list(PRESETS), f"README lists {listed}; the registry holds {list(PRESETS)}"


# ----------------------------------------------------------------------------
# Running the documents at toy size
# ----------------------------------------------------------------------------

# Appended to documented commands (argparse keeps the last value of a flag):
# the documented preset keeps its N and M, the widths and depth shrink.
TRAIN_SHRINK = [
    *("--steps 2 --batch-size 2 --warmup-steps 1 --eval-every 0 --eval-tokens 32".split()),
    *("--no-progress --no-tensorboard --model.input_dim 16 --model.latent_dim 16".split()),
    *("--model.num_latent_layers 1 --model.cross_attend_heads 2 --model.latent_heads 2".split()),
]
TRAIN_KWARGS = dict(steps=2, batch_size=2, warmup_steps=1, eval_every=0, eval_tokens=32, progress=False)
MODEL_KWARGS = dict(input_dim=16, latent_dim=16, num_latent_layers=1, cross_attend_heads=2, latent_heads=2)
SHRINK = {
    "train": TRAIN_SHRINK,
    "train --resume": ["--steps", "3", "--no-progress", "--no-tensorboard"],
    "eval": ["--max-tokens", "48"],
    "generate": ["--max-new-tokens", "8"],
    "render": ["--max-tokens", "48", "--num-samples", "1"],
    "prepare copy": ["--num-train", "16", "--num-validation", "4"],
    "prepare image": ["--limit", "12"],
}
# Data sets that are not installed here (Debian packages, the music21 corpus)
# are replaced by small fixtures of the same kind: (command prefix, option as
# documented, what it becomes; {fixtures} is the fixture folder).
SUBSTITUTE = [
    (
        "prepare image",
        "--dataset fashion-mnist",
        "--dataset fashion-mnist --idx-dir {fixtures}/fashion-mnist",
    ),
    ("prepare music", "--default", "{fixtures}/bach"),
    ("prepare audio", "--default", "{fixtures}/asterisk --rate 400"),
]


def cli_argv(cmd: Command) -> list[str] | None:
    """The ``perceiver-ar`` arguments of a documented command that runs here, else None."""
    if cmd.inline or cmd.synopsis:
        return None
    argv = list(cmd.argv)
    if argv[0] == "perceiver-ar":
        return argv[1:]
    if argv[0] == "python" and len(argv) > 2 and argv[1] == "-m":
        return module_command(argv[2], argv[3:])
    return None  # torchrun, benchmarks, make: checked, not run


def shrunk(argv: list[str], fixtures: Path) -> list[str]:
    text = " ".join(shlex.quote(a) for a in argv)
    for prefix, old, new in SUBSTITUTE:
        if text.startswith(prefix + " "):
            text = re.sub(rf"(?<!\S){re.escape(old)}(?!\S)", new.format(fixtures=fixtures), text)
    argv = shlex.split(text)
    key = " ".join(argv[:2]) if argv[0] == "prepare" else argv[0]
    if argv[0] == "train" and "--resume" in argv:
        key = "train --resume"
    return argv + SHRINK.get(key, [])


class ShrinkTrainConfig(ast.NodeTransformer):
    """``TrainConfig(...)`` in a snippet trains a few steps of a narrow model."""

    def visit_Call(self, node: ast.Call) -> ast.Call:
        self.generic_visit(node)
        name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
        if name != "TrainConfig":
            return node
        given = {k.arg: k for k in node.keywords}
        model = ast.literal_eval(given["model"].value) if "model" in given else {}
        values = {**TRAIN_KWARGS, "tensorboard": False, "model": {**model, **MODEL_KWARGS}}
        node.keywords = [k for k in node.keywords if k.arg not in values]
        node.keywords += [
            ast.keyword(k, ast.Constant(v) if k != "model" else ast.parse(repr(v), mode="eval").body)
            for k, v in values.items()
        ]
        return ast.fix_missing_locations(node)


def run_snippet(block: Block, namespace: dict) -> None:
    tree = ShrinkTrainConfig().visit(ast.parse(block.code, filename=f"{block.doc}:{block.line}"))
    with contextlib.redirect_stdout(io.StringIO()):
        exec(compile(tree, f"{block.doc}:{block.line}", "exec"), namespace)


def run_cli(argv: list[str], where: str) -> None:
    from perceiver_ar.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
    assert code == 0, f"{where}: `perceiver-ar {' '.join(argv)}` exited {code}:\n{err.getvalue()[-3000:]}"


# Fixtures --------------------------------------------------------------------

WORDS = "the a king queen night day sword crown speak loud soft heart and of to in my thy".split()


def write_text_files(folder: Path, count: int, suffix: str = ".txt") -> None:
    rng = np.random.default_rng(len(str(folder)))
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        words = rng.choice(WORDS, size=400)
        (folder / f"doc{i}{suffix}").write_text(" ".join(words).capitalize() + ".\n")


def write_records(folder: Path, name: str, count: int, fmt: str, field: str) -> None:
    """``count`` record files ``{name}{i}.{fmt}`` of 6 documents each, the text in ``field``."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    rng = np.random.default_rng(len(name))
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        texts = [" ".join(rng.choice(WORDS, size=300)).capitalize() + ".\n" for _ in range(6)]
        path = folder / (f"{name}{i}.{fmt}" if count > 1 else f"{name}.{fmt}")
        if fmt == "parquet":
            pq.write_table(pa.table({field: texts}), path)
        else:
            lines = "".join(json.dumps({"id": k, field: t}) + "\n" for k, t in enumerate(texts))
            path.write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))


def write_idx(path: Path, images: np.ndarray) -> None:
    """A gzipped IDX file of uint8 images [n, 28, 28], the Fashion-MNIST format."""
    header = struct.pack(">HBB", 0, 0x08, 3) + struct.pack(">3I", *images.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + images.astype(np.uint8).tobytes())


def write_midi(path: Path, notes: int, seed: int) -> None:
    import mido

    rng = np.random.default_rng(seed)
    track = mido.MidiTrack()
    for _ in range(notes):
        pitch = int(rng.integers(48, 84))
        track.append(mido.Message("note_on", note=pitch, velocity=int(rng.integers(30, 120)), time=0))
        track.append(mido.Message("note_off", note=pitch, velocity=0, time=int(rng.integers(60, 240))))
    mid = mido.MidiFile(ticks_per_beat=480)
    mid.tracks.append(track)
    mid.save(path)


def write_wav(path: Path, seconds: float, rate: int, seed: int) -> None:
    t = np.arange(int(seconds * rate)) / rate
    rng = np.random.default_rng(seed)
    x = 0.4 * np.sin(2 * np.pi * (50 + 10 * seed) * t) + 0.05 * rng.standard_normal(len(t))
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(x, -1, 1) * 32000).astype("<i2").tobytes())


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory) -> Path:
    """Small stand-ins for the inputs the docs name: text folders, images, MIDI, WAV, official params."""
    from PIL import Image

    root = tmp_path_factory.mktemp("doc-fixtures")
    write_text_files(root / "notes", 3)
    write_text_files(root / "books", 3)
    write_text_files(root / "corpus", 12)
    write_records(root / "web", "shard", 2, "jsonl.zst", field="content")
    write_records(root, "wiki", 1, "parquet", field="text")
    rng = np.random.default_rng(0)
    (root / "fashion-mnist").mkdir()
    sparse = lambda n: rng.integers(0, 256, (n, 28, 28)) * (rng.random((n, 28, 28)) < 0.05)  # noqa: E731
    write_idx(root / "fashion-mnist" / "train-images-idx3-ubyte.gz", sparse(2012))
    write_idx(root / "fashion-mnist" / "t10k-images-idx3-ubyte.gz", sparse(12))
    (root / "photos").mkdir()
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (20, 16, 3), dtype=np.uint8)).save(root / "photos" / f"p{i}.png")
    for name, count in (("bach", 8), ("midi_folder", 3)):
        (root / name).mkdir()
        for i in range(count):
            write_midi(root / name / f"piece{i}.mid", notes=150, seed=i)
    (root / "asterisk").mkdir()
    for i in range(5):
        write_wav(root / "asterisk" / f"moh{i}.wav", seconds=40, rate=400, seed=i)
    (root / "recordings").mkdir()
    for i in range(3):
        write_wav(root / "recordings" / f"r{i}.wav", seconds=0.5, rate=8000, seed=i)
    golden = np.load(ROOT / "tests" / "golden" / "golden_A_rotary.npz", allow_pickle=False)
    np.savez(root / "params.npz", **{k: golden[k] for k in golden.files if k.startswith("params/")})
    config = json.loads(str(golden["config_json"]))
    for k in ("param_seed", "z_loss", "label_smoothing"):
        config.pop(k, None)
    (root / "config.json").write_text(json.dumps(config))
    return root


def prepare_workspace(doc: str, fixtures: Path, work: Path) -> dict:
    """Link the fixtures into the scratch directory; the names a document's snippets take as given."""
    for item in fixtures.iterdir():
        (work / item.name).symlink_to(item)
    namespace: dict = {"__name__": "__docs__"}
    if doc == "docs/generation.md":  # continues the README's run
        from perceiver_ar import PerceiverAR, PerceiverARConfig

        torch.manual_seed(0)
        PerceiverAR(PerceiverARConfig.from_preset("tiny")).save_pretrained(
            str(work / "runs/shakespeare/model")
        )
    if doc == "docs/long_context.md":  # what benchmarks/bench_context_benefit.py leaves in runs/
        from perceiver_ar import PerceiverAR, PerceiverARConfig, provenance
        from perceiver_ar.data import prepare_text

        out = work / "runs" / "context_benefit"
        plays = work / "plays"
        plays.mkdir()
        for i in range(4):  # plays long enough for the documented --start
            words = np.random.default_rng(i).choice(WORDS, size=6000)
            (plays / f"play{i}.md").write_text(" ".join(words) + "\n")
        prepare_text([plays], out / "data", validation_fraction=0.25)
        torch.manual_seed(0)
        model = PerceiverAR(PerceiverARConfig.from_preset("tiny", context_len=512, num_latents=32))
        model.provenance = provenance.from_store_meta(json.loads((out / "data" / "meta.json").read_text()))
        model.save_pretrained(str(out / "long"))
        copy = PerceiverARConfig.from_preset(  # and a copy-task model (benchmarks/train_copy.py)
            "tiny", context_len=4096, position_encoding="absolute", absolute_table="sinusoidal"
        )
        PerceiverAR(copy).save_pretrained(str(work / "runs" / "copy-4096"))
    if doc == "docs/modalities.md":  # an image, a MIDI file and a WAV file of the reader's
        namespace["pixels"] = np.random.default_rng(0).integers(0, 256, (28, 28, 1), dtype=np.uint8)
        (work / "piece.mid").symlink_to(fixtures / "bach" / "piece0.mid")
        (work / "clip.wav").symlink_to(fixtures / "recordings" / "r0.wav")
    return namespace


RUN_DOCS = [rel(d) for d in DOC_FILES if rel(d) != "benchmarks/README.md"]


@pytest.mark.parametrize("doc", RUN_DOCS)
def test_document_runs(doc, fixtures, tmp_path, monkeypatch):
    """Every perceiver-ar command and Python snippet of the document, in order, at toy size."""
    monkeypatch.chdir(tmp_path)
    namespace = prepare_workspace(doc, fixtures, tmp_path)
    threads = torch.get_num_threads()  # the commands set their own; later tests keep the suite's
    ran = 0
    try:
        for block in read_doc(ROOT / doc)[0]:
            if block.lang == "python":
                run_snippet(block, namespace)
                ran += 1
            elif block.lang == "shell":
                for cmd in shell_commands(block):
                    argv = cli_argv(cmd)
                    if argv is not None:
                        run_cli(shrunk(argv, fixtures), f"{cmd.doc}:{cmd.line}")
                        ran += 1
    finally:
        torch.set_num_threads(threads)
    assert ran > 0, f"{doc} has nothing to run"
    if doc == "docs/training.md":
        check_run_directory(doc, tmp_path)


# ----------------------------------------------------------------------------
# Inline API references: real names, parameters and defaults
# ----------------------------------------------------------------------------

# Names the prose uses for objects rather than importable paths.
ALIASES = {
    "model": "perceiver_ar.PerceiverAR.forward",
    "model.save_pretrained": "perceiver_ar.PerceiverAR.save_pretrained",
}


FILE_SUFFIXES = {"json", "jsonl", "safetensors", "png", "py", "md", "npz", "mid", "wav"}


@cache
def submodules() -> frozenset[str]:
    import pkgutil

    import perceiver_ar

    return frozenset(m.name for m in pkgutil.iter_modules(perceiver_ar.__path__))


def resolve(name: str):
    """The object a documented dotted name means, or None when it is not ours (a variable, a field)."""
    name = ALIASES.get(name, name)
    if not (name == "perceiver_ar" or name.startswith("perceiver_ar.")):
        import perceiver_ar

        head, *rest = name.split(".")
        if head in submodules() and rest and rest[-1] not in FILE_SUFFIXES:  # `runtime.setup_runtime`
            return resolve(f"perceiver_ar.{name}")
        if head not in perceiver_ar.__all__:
            return None
        obj = getattr(perceiver_ar, head)  # the package's export, not a submodule of that name
        for attr in rest:
            assert hasattr(obj, attr), f"`{name}` does not exist ({head} has no {attr!r})"
            obj = getattr(obj, attr)
        return obj
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                raise AssertionError(f"`{name}` does not exist ({'.'.join(parts[:i])} has no {attr!r})")
            obj = getattr(obj, attr)
        return obj
    raise AssertionError(f"`{name}`: no such module")


def dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


def check_api_span(text: str) -> str | None:
    """Check one inline span that calls or names our API; returns what was checked, or None."""
    m = re.match(r"^([A-Za-z_][\w.]*)\((.*)\)$", text)
    if m is None:
        if re.match(r"^[a-z_]+(\.\w+)+$", text) and resolve(text) is not None:
            return text
        return None
    name, inside = m.groups()
    open_ended = re.search(r"(^|,)\s*\.\.\.\s*$", inside) is not None  # `f(a, b=1, ...)`: more follow
    if open_ended:
        inside = re.sub(r"(^|,)\s*\.\.\.\s*$", "", inside)
    obj = resolve(name)
    if obj is None or not callable(obj):
        return None
    sig = inspect.signature(obj)
    params = [p for p in sig.parameters.values() if p.name != "self"]
    try:
        call = ast.parse(f"_({inside})", mode="eval").body
    except SyntaxError:
        call = None
    if call is not None:  # a call: its arguments must bind, its literal keywords match the defaults
        args = list(call.args)
        if not any(p.kind is p.VAR_POSITIONAL for p in params):
            positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
            assert len(args) <= len(positional), (
                f"`{text}`: {name} takes {len(positional)} positional arguments"
            )
        names = {p.name: p for p in params}
        for kw in call.keywords:
            if kw.arg is None or any(p.kind is p.VAR_KEYWORD for p in params):
                continue
            assert kw.arg in names, f"`{text}`: {name} has no parameter {kw.arg!r} ({list(names)})"
        return text
    # A signature as documented: the same parameters, in order, with the same defaults.
    fake = ast.parse(f"def _({inside}): pass").body[0].args
    documented = [a.arg for a in fake.posonlyargs + fake.args + fake.kwonlyargs]
    real = [p.name for p in params][: len(documented) if open_ended else None]
    assert documented == real, f"`{text}`: the real parameters are {[p.name for p in params]}"
    kwonly = [a.arg for a in fake.kwonlyargs]
    real_kwonly = [p.name for p in params if p.kind is p.KEYWORD_ONLY and p.name in documented]
    assert kwonly == real_kwonly, f"`{text}`: keyword-only parameters are {real_kwonly}"
    defaults = dict(zip([a.arg for a in fake.args][::-1], fake.defaults[::-1], strict=False))
    defaults |= {a.arg: d for a, d in zip(fake.kwonlyargs, fake.kw_defaults, strict=True) if d is not None}
    for arg, node in defaults.items():
        real = sig.parameters[arg].default
        assert ast.literal_eval(node) == real, f"`{text}`: {arg} defaults to {real!r}"
    return text


def test_inline_api_references_are_real():
    checked, bad = [], []
    for doc in DOC_FILES:
        for line, text in inline_spans(doc):
            try:
                if check_api_span(text):
                    checked.append(text)
            except AssertionError as e:
                bad.append(f"{rel(doc)}:{line}: {e}")
    assert not bad, "\n".join(bad)
    assert len(checked) >= 10, checked


# ----------------------------------------------------------------------------
# Links and paths
# ----------------------------------------------------------------------------

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
# Paths the docs name that a command creates (ignored by git) rather than the repository holds.
GENERATED = ("benchmarks/results/*.json", "benchmarks/results/*.md", "benchmarks/.env-ports")
REPO_DIRS = ("src/", "tests/", "docs/", "benchmarks/", "perceiver_ar/")
# Files of the official JAX repository that the docs cite.
OFFICIAL_FILES = {
    "sample_utils.py",
    "inference.ipynb",
    "dataset.py",
    "experiment.py",
    "perceiver_ar_model_test.py",
}


def repo_file_names() -> set[str]:
    names = set()
    for top in ("src", "tests", "docs", "benchmarks"):
        names |= {p.name for p in (ROOT / top).rglob("*") if ".venv" not in p.parts}
    return names | {p.name for p in ROOT.iterdir()}


def test_links_and_paths_in_docs_exist():
    from fnmatch import fnmatch

    names = repo_file_names()
    bad = []
    for doc in DOC_FILES:
        _, prose = read_doc(doc)
        for m in LINK.finditer(prose):
            target = m.group(1).split("#")[0]
            if target and "://" not in target and not (doc.parent / target).exists():
                bad.append(f"{rel(doc)}: link {target}")
        for line, text in inline_spans(doc):
            if " " in text or "<" in text or "~" in text:  # not a path, a placeholder, a Haiku name
                continue
            path = text
            if path.startswith(REPO_DIRS) and "/" in path:
                if path.startswith("perceiver_ar/"):
                    path = "src/" + path
                if any(fnmatch(path, g) for g in GENERATED):
                    continue
                if not (list(ROOT.glob(path.rstrip("/"))) if "*" in path else (ROOT / path).exists()):
                    bad.append(f"{rel(doc)}:{line}: {text}")
            elif re.match(r"^[\w-]+\.(py|md|sh)$", path) and path not in names | OFFICIAL_FILES:
                bad.append(f"{rel(doc)}:{line}: {text} (no such file in the repository)")
    assert not bad, "docs name files that do not exist:\n" + "\n".join(bad)


def test_code_names_only_docs_that_exist():
    """A .md file (or shared/ folder) named in a comment or docstring of the code exists in the repository."""
    bad = []
    files = [
        *ROOT.glob("src/**/*.py"),
        *ROOT.glob("tests/*.py"),
        *ROOT.glob("benchmarks/*.py"),
        ROOT / "Makefile",
    ]
    for f in files:
        if f.resolve() == Path(__file__).resolve():  # this file names the patterns it looks for
            continue
        for n, line in enumerate(f.read_text().splitlines(), 1):
            for ref in re.findall(r"[\w./-]*\b[\w-]+\.md\b|\bshared/[\w./-]*", line):
                if not (ROOT / ref).exists() and not (f.parent / ref).exists():
                    bad.append(f"{rel(f)}:{n}: {ref}")
    assert not bad, "the code names documents that do not exist:\n" + "\n".join(bad)


def test_benchmark_run_times_agree_with_the_scripts():
    """The run time benchmarks/README.md gives a script is the one its --help gives, if it gives one."""
    table = (ROOT / "benchmarks" / "README.md").read_text()
    rows = re.findall(r"^\|[^|]*`(\w+\.py)` \|[^|]*\| ([^|]*) \|$", table, flags=re.M)
    assert len(rows) >= 6, rows
    for script, documented in rows:
        help_text = benchmark_module(script).build_parser().format_help()
        said = re.findall(r"~\d+ min", help_text)
        if said or "~" in documented:
            assert re.findall(r"~\d+ min", documented) == said[:1], (script, documented, said)


def makefile_commands() -> list[Command]:
    """The perceiver-ar command lines of the Makefile's recipes (make demo), variables expanded."""
    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    variables = dict(re.findall(r"^([A-Z_]+) :?= (.*)$", text, flags=re.M))
    cmds = []
    for n, line in enumerate(text.splitlines(), 1):
        m = re.match(r"^\t@?\$\(VENV\)/bin/(perceiver-ar .*)$", line)
        if m:
            expanded = re.sub(r"\$\((\w+)\)", lambda v: variables.get(v.group(1), v.group(0)), m.group(1))
            cmds.extend(split_command("Makefile", n, expanded, inline=False))
    return cmds


def test_makefile_commands_parse():
    """`make demo` runs perceiver-ar commands; they must parse as the CLI stands."""
    cmds = makefile_commands()
    assert len(cmds) >= 3
    for cmd in cmds:
        check_command(cmd)


def test_benchmark_help_commands_parse():
    """The example command lines in each benchmark's docstring (its --help) parse."""
    checked = 0
    for script in sorted((ROOT / "benchmarks").glob("*.py")):
        doc = ast.get_docstring(ast.parse(script.read_text())) or ""
        for n, line in enumerate(doc.splitlines(), 1):
            if line.strip().startswith("python benchmarks/"):
                for cmd in split_command(rel(script), n, line.strip(), inline=False):
                    check_command(cmd)
                    checked += 1
    assert checked >= 8


def check_run_directory(doc: str, work: Path) -> None:
    """The run directory listing of docs/training.md is what a run writes."""
    blocks = [b for b in read_doc(ROOT / doc)[0] if b.lang == "text" and b.code.startswith("runs/demo/")]
    assert len(blocks) == 1, "docs/training.md: the run directory listing (runs/demo/) is missing"
    listing = blocks[0].code
    run = work / "runs" / "demo"
    for name in re.findall(r"^  (\S+)", listing, flags=re.M):
        pattern = re.sub(r"\d+", "*", name.rstrip("/"))
        assert list(run.glob(pattern)), f"{doc}: the run directory has no {name}"
    checkpoint = sorted(run.glob("checkpoints/step_*"))[-1]
    for name in re.findall(
        r"[\w.]+\.(?:json|safetensors)", listing.split("checkpoints/", 1)[1].split("model/")[0]
    ):
        assert (checkpoint / name).is_file(), f"{doc}: a checkpoint has no {name}"
    keys = re.findall(r'"(\w+)"', listing.split("metrics.jsonl", 1)[1].splitlines()[0])
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert set(keys) <= set(first), f"{doc}: metrics.jsonl lines hold {sorted(first)}, not {keys}"


# Names of the official JAX code the docs cite.
OFFICIAL_NAMES = {"RandomMirroredDataset"}


def test_named_classes_exist():
    """A class the docs name (`KVCache`, `PerceiverAR.decode_step`) exists; `file.py, `Name`` lives there."""
    sources = {p: p.read_text() for p in ROOT.glob("src/**/*.py")}
    everything = "\n".join(sources.values())

    def defined(name: str, text: str) -> bool:
        return re.search(rf"^\s*(class|def) {name}\b|^\s*{name}\s*[:=]", text, flags=re.M) is not None

    bad, checked = [], 0
    for doc in DOC_FILES:
        for line, text in inline_spans(doc):
            if not re.match(r"^[A-Z]\w*[a-z]\w*(\.\w+)*$", text) or text in ("None", "True", "False"):
                continue
            if text.split(".")[0] in OFFICIAL_NAMES:
                continue
            checked += 1
            if not all(defined(part, everything) for part in text.split(".")):
                bad.append(f"{rel(doc)}:{line}: {text}")
        _, prose = read_doc(doc)
        for m in re.finditer(r"\b(\w+)\.py`?, `(\w+)`", prose):
            path = ROOT / "src" / "perceiver_ar" / f"{m.group(1)}.py"
            checked += 1
            if not (path.is_file() and defined(m.group(2), path.read_text())):
                bad.append(f"{rel(doc)}: {m.group(2)} is not in {m.group(1)}.py")
    assert checked >= 8
    assert not bad, "\n".join(bad)


def test_file_trees_in_docs_exist():
    """A tree of the sources in the docs (README's Layout) names files and folders that exist."""
    bad, checked = [], 0
    for doc in DOC_FILES:
        for block in read_doc(doc)[0]:
            if block.lang != "text" or not block.code.startswith("src/perceiver_ar/"):
                continue
            for line in block.code.splitlines()[1:]:
                m = re.match(r"^(\s*)([\w./-]+\.py|[\w-]+/)(\s|$)", line)
                if m:
                    base = ROOT / "src" / "perceiver_ar" if m.group(1) else ROOT
                    checked += 1
                    if not (base / m.group(2)).exists():
                        bad.append(f"{rel(doc)}:{block.line}: {m.group(2)}")
    if not checked:
        pytest.skip("no source tree (a block opening with src/perceiver_ar/) in the docs")
    assert not bad, "the docs' file trees name what does not exist:\n" + "\n".join(bad)
