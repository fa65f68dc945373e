"""The package as users install it: a wheel built from a clean clone, in a fresh virtual environment.

Run by `make check-wheel` (and so by CI). It clones the repository's
committed HEAD, builds the wheel, checks that it holds only the package's
modules and metadata (no tests, data, runs or stores), installs it into a new
virtual environment that already has the pinned CPU torch (so the
``torch>=2.4`` requirement is satisfied and never pulls another build), then
runs ``perceiver-ar --help`` and the first Python example of README.md from
outside the clone. Everything happens under build/check-wheel, removed at
the end unless --keep.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# What a wheel may hold: the package's modules and the wheel's own metadata.
ALLOWED = re.compile(r"^(perceiver_ar/(\w+/)*\w+\.py|perceiver_ar-[^/]+\.dist-info/.+)$")


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    print("+", " ".join(map(str, cmd)), flush=True)
    result = subprocess.run(cmd, text=True, capture_output=True, **kw)
    if result.returncode != 0:
        sys.exit(f"failed ({result.returncode}): {' '.join(map(str, cmd))}\n{result.stdout}\n{result.stderr}")
    return result


def first_python_example(readme: Path) -> str:
    match = re.search(r"^```python\n(.*?)^```", readme.read_text(encoding="utf-8"), re.S | re.M)
    if match is None:
        sys.exit(f"{readme} has no ```python example")
    return match.group(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default="python3", help="interpreter that creates the fresh venv")
    parser.add_argument("--torch", default="torch==2.13.0", help="the torch requirement installed first")
    parser.add_argument("--keep", action="store_true", help="keep build/check-wheel afterwards")
    args = parser.parse_args()
    start = time.perf_counter()
    work = ROOT / "build" / "check-wheel"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)

    # 1. A clean clone: committed files only, nothing generated or ignored.
    clone = work / "clone"
    run(["git", "clone", "-q", str(ROOT), str(clone)])
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(work / "dist"), str(clone)])
    (wheel,) = (work / "dist").glob("perceiver_ar-*.whl")

    # 2. Its contents: modules and metadata, the licence among them.
    names = [n for n in zipfile.ZipFile(wheel).namelist() if not n.endswith("/")]
    stray = [n for n in names if not ALLOWED.match(n)]
    if stray:
        sys.exit(f"{wheel.name} holds files that are not the package's modules or metadata: {stray}")
    modules = [n for n in names if n.startswith("perceiver_ar/")]
    if not any(n.endswith("licenses/LICENSE") for n in names):
        sys.exit(f"{wheel.name} does not carry the LICENSE file")
    shipped = {
        p.relative_to(clone / "src").as_posix() for p in (clone / "src" / "perceiver_ar").rglob("*.py")
    }
    if set(modules) != shipped:
        sys.exit(f"{wheel.name} modules differ from src/: {sorted(set(modules) ^ shipped)}")
    meta = len(names) - len(modules)
    print(f"{wheel.name}: {len(names)} files: {len(modules)} modules of perceiver_ar/, {meta} of metadata")

    # 3. A fresh venv that already has torch; the wheel must leave that torch alone.
    venv = work / "venv"
    run([args.python, "-m", "venv", str(venv)])
    py = str(venv / "bin" / "python")
    run([py, "-m", "pip", "install", "-q", args.torch])
    version = "import torch; print(torch.__version__)"
    before = run([py, "-c", version]).stdout.strip()
    run([py, "-m", "pip", "install", "-q", str(wheel)])
    after = run([py, "-c", version]).stdout.strip()
    if before != after:
        sys.exit(f"installing the wheel replaced torch {before} with {after}")

    # 4. The command and the README's example, from outside the clone.
    with tempfile.TemporaryDirectory() as elsewhere:
        where = run([py, "-c", "import perceiver_ar; print(perceiver_ar.__file__)"], cwd=elsewhere).stdout
        if not where.strip().startswith(str(venv)):
            sys.exit(f"perceiver_ar was imported from {where.strip()}, not from the fresh venv")
        usage = run([str(venv / "bin" / "perceiver-ar"), "--help"], cwd=elsewhere).stdout
        if "usage: perceiver-ar" not in usage:
            sys.exit(f"perceiver-ar --help printed no usage:\n{usage}")
        example = first_python_example(clone / "README.md")
        output = run([py, "-c", example], cwd=elsewhere).stdout
    print(f"README example ran: {output.strip()}")
    if not args.keep:
        shutil.rmtree(work)
    print(f"check-wheel passed in {time.perf_counter() - start:.0f} s (torch {after})")


if __name__ == "__main__":
    main()
