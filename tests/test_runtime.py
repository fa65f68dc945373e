"""The runtime policy: decided in runtime.py and only there; CPU set-up; clear errors."""

import ast
from pathlib import Path

import pytest
import torch

from perceiver_ar.runtime import setup_runtime

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "perceiver_ar"


def package_sources() -> dict[str, str]:
    return {str(p.relative_to(PACKAGE)): p.read_text() for p in sorted(PACKAGE.rglob("*.py"))}


def test_only_runtime_asks_whether_cuda_is_available():
    sources = package_sources()
    assert "runtime.py" in sources and len(sources) > 10
    callers = sorted(name for name, text in sources.items() if "cuda.is_available" in text)
    assert callers == ["runtime.py"]


def test_omp_wait_policy_is_set_in_one_place():
    sources = package_sources()
    setters = sorted(name for name, text in sources.items() if 'environ.setdefault("OMP_WAIT_POLICY"' in text)
    assert setters == ["__init__.py"]
    # It must come before the package's first import of anything that imports torch.
    text = sources["__init__.py"]
    assert text.index("OMP_WAIT_POLICY") < text.index("from .")


def test_runtime_sits_at_the_bottom_of_the_layers():
    tree = ast.parse((PACKAGE / "runtime.py").read_text())
    local = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (
            node.level > 0 or (node.module or "").startswith("perceiver_ar")
        ):
            local.add(node.module or "")
        elif isinstance(node, ast.Import):
            local |= {a.name for a in node.names if a.name.startswith("perceiver_ar")}
    assert local <= {"config", "perceiver_ar.config"}, local


def test_cpu_runtime_is_fp32_and_sets_threads():
    before = torch.get_num_threads()
    try:
        rt = setup_runtime("cpu", threads=1)
        assert rt.device == torch.device("cpu") and rt.autocast_dtype is None
        assert (rt.rank, rt.world_size, rt.is_main, rt.precision) == (0, 1, True, "fp32")
        assert torch.get_num_threads() == 1
        setup_runtime("cpu", threads=None)  # None leaves torch's choice alone
        assert torch.get_num_threads() == 1
        with rt.autocast():
            assert not torch.is_autocast_enabled("cpu")
        bf16 = setup_runtime("cpu", precision="bf16")
        assert bf16.autocast_dtype == torch.bfloat16 and bf16.precision == "bf16 autocast"
        with bf16.autocast():
            assert torch.is_autocast_enabled("cpu")
        if not torch.cuda.is_available():
            assert setup_runtime("auto").device.type == "cpu"
            assert setup_runtime(None).autocast_dtype is None
    finally:
        torch.set_num_threads(before)


def test_bad_settings_are_one_clear_error():
    with pytest.raises(ValueError, match="precision must be"):
        setup_runtime("cpu", precision="fp8")
    with pytest.raises(ValueError, match="unknown device 'tpu0'"):
        setup_runtime("tpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="use --device cpu"):
            setup_runtime("cuda")
