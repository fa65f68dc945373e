"""The import-linter layers contract of pyproject.toml really fails on an upward import.

`make lint` runs `lint-imports` on the package itself; these tests run it on a
copy of the package with one rule broken on purpose, so a contract that
silently checks nothing (a misspelt module, a wrong root) cannot pass.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"

pytestmark = pytest.mark.skipif(
    not LINT_IMPORTS.exists(), reason="import-linter (the dev extra) is not installed"
)


def lint_copy(tmp_path: Path, edit) -> subprocess.CompletedProcess:
    """lint-imports with the project's contract on a copy of the package changed by ``edit(package_dir)``."""
    package = tmp_path / "src" / "perceiver_ar"
    shutil.copytree(ROOT / "src" / "perceiver_ar", package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    edit(package)
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "src"))  # the copy comes before the installed package
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--no-logo"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_unchanged_copy_keeps_the_contract(tmp_path):
    result = lint_copy(tmp_path, lambda package: None)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


def test_an_upward_import_breaks_the_contract(tmp_path):
    def model_imports_the_generator(package: Path) -> None:
        path = package / "model.py"
        path.write_text(path.read_text() + "\nfrom .generate import generate  # noqa: E402\n")

    result = lint_copy(tmp_path, model_imports_the_generator)
    assert result.returncode != 0
    assert "perceiver_ar.model -> perceiver_ar.generate" in result.stdout, result.stdout


def test_a_module_outside_the_layers_breaks_the_contract(tmp_path):
    result = lint_copy(tmp_path, lambda package: (package / "stray.py").write_text('"""Not placed."""\n'))
    assert result.returncode != 0
    assert "perceiver_ar.stray" in result.stdout, result.stdout


def test_readme_layer_diagram_is_the_contract():
    """README's Layout diagram lists the contract's layers, top to bottom, in the same order."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    layers = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]
    readme = (ROOT / "README.md").read_text()
    diagram = readme.split("## Layout", 1)[1].split("```text\n", 1)[1].split("```", 1)[0]
    names = [re.split(r"\s{2,}", line.strip())[0] for line in diagram.splitlines() if line.strip()]
    assert names == layers["layers"]
