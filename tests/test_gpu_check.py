"""benchmarks/gpu_check.py --device cpu --quick: every check of the GPU check at toy sizes, on the CPU.

The compiled cases use the ``eager`` backend here: Dynamo captures the
graphs as ``train --compile`` would, without Inductor's minute of code
generation per graph on this CPU (tests/test_compile.py covers the compiled
training run itself).
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_quick_mode_runs_every_check_on_the_cpu(tmp_path):
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    args = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--quick"]
    args += ["--out", str(tmp_path), "--compile-backend", "eager"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check_quick.json").read_text())
    checks = {c["check"].split(":")[0]: c for c in result["checks"]}
    assert set(checks) == {
        "golden logits, fp32, TF32 off",
        "cross-attend kernel vs SDPA, fp32",
        "cross-attend kernel vs SDPA, bf16",
        "model logits on the device's kernels vs the CPU's, fp32",
        "bf16 autocast logits vs fp32",
        "bf16 cast logits vs fp32",
        "bf16 training",
        "fp16 training",
    }
    assert result["all_checks_pass"] and all(c["pass"] for c in checks.values())
    assert checks["golden logits, fp32, TF32 off"]["value"] < 1e-4
    assert "FlexAttention" in checks["cross-attend kernel vs SDPA, fp32"]["kernel"]
    rows = result["throughput"]
    # The eager cases first, the compiled ones (minutes of code generation on a GPU) last.
    assert [(r["model"], r["compile"]) for r in rows] == [("perceiver_ar", "no"), ("decoder", "no")] * 2 + [
        ("perceiver_ar", "eager"),
        ("decoder", "eager"),
    ] * 2
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 for r in rows)
    assert result["memory"]["peak_gb"] > 0
    assert [r["compile"] for r in result["decode"]] == ["no", "eager"]
    for r in result["decode"]:
        assert r["decode_tokens_per_s"] > 0 and r["mb_per_token"] > 0
        assert 0 < r["fraction_of_bandwidth"] < 1  # bytes a step must read over the copy bandwidth
    assert not result["errors"] and not result["skipped"]
    table = (tmp_path / "gpu_check_quick.json").with_suffix(".md").read_text()  # the markdown tables
    assert "| check | value | limit | result |" in table and "FAIL" not in table


@pytest.fixture
def gpu_check(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_check

    return gpu_check


def test_gpu_check_keeps_what_it_measured_when_a_lease_runs_out(tmp_path, monkeypatch, gpu_check):
    """--budget-s: what ran is kept, what would start later is skipped and named; exit code 3."""

    def slow_golden(device):  # passes, but outlasts the budget
        time.sleep(3.5)
        return [gpu_check.check("planted", 0.0, 1.0, True)]

    monkeypatch.setattr(gpu_check, "section_golden", slow_golden)
    # Sections given out of order and twice: one order, each once (and so one file name).
    args = ["--device", "cpu", "--quick", "--sections", "memory", "golden", "golden", "--budget-s", "3"]
    result = gpu_check.main([*args, "--out", str(tmp_path)])
    assert [c["check"] for c in result["checks"]] == ["planted"]  # what ran before the deadline is kept
    assert result["skipped"] == ["memory"] and result["memory"] == {}
    assert result["all_checks_pass"] and not result["complete"] and gpu_check.exit_code(result) == 3
    path = tmp_path / "gpu_check_quick_golden_memory.json"
    assert json.loads(path.read_text())["skipped"] == ["memory"]
    assert "Skipped (time budget spent): memory." in path.with_suffix(".md").read_text()


def test_gpu_check_skips_training_cases_past_the_deadline(gpu_check):
    rows = list(gpu_check.section_throughput(None, gpu_check.QUICK, "eager", 1e9, True, deadline=0.0))
    assert [(r["model"], r["compile"], r["error"]) for r in rows] == [
        ("perceiver_ar", "eager", "skipped: time budget spent"),
        ("decoder", "eager", "skipped: time budget spent"),
    ] * 2


def test_gpu_check_records_a_section_that_raises_and_runs_the_rest(tmp_path, monkeypatch, gpu_check):
    """One section's exception is written into the results (and fails the run); the next still runs."""

    def broken(device):
        raise RuntimeError("planted fault | with a pipe\nand a second line")

    monkeypatch.setattr(gpu_check, "section_golden", broken)
    args = ["--device", "cpu", "--quick", "--sections", "golden", "memory", "--out", str(tmp_path)]
    result = gpu_check.main(args)
    assert result["errors"] == {"golden": "RuntimeError: planted fault \\| with a pipe"}
    assert result["memory"]["peak_gb"] > 0 and not result["all_checks_pass"]
    assert gpu_check.exit_code(result) == 1
    path = tmp_path / "gpu_check_quick_golden_memory.json"
    assert json.loads(path.read_text())["errors"] == result["errors"]
    table = path.with_suffix(".md").read_text()
    assert "| section golden raised | RuntimeError: planted fault \\| with a pipe | - | FAIL |" in table
