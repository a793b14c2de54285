"""``scripts/gpu_check.py``: refuses clearly without CUDA, selects every CUDA-only test, writes its summary."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_cuda_it_exits_2_with_one_line() -> None:
    """On a CPU-only machine the script exits with status 2 and one line on stderr saying why, before running
    anything.

    A failure means it runs GPU steps that all fail (or hang) instead of saying there is no GPU.
    """
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("gpu_check: error: no CUDA"), done.stderr
    assert done.stdout == ""


def test_steps_fit_in_8_minutes_and_select_the_gpu_tests(tmp_path) -> None:
    """The steps' time limits add up to under 8 minutes, each name once, the tests step selects ``-m gpu``, and
    that selection holds the CUDA-only tests, marked or only skipped for want of CUDA.

    A failure means the check overruns a session's GPU time or misses the CUDA tests.
    """
    steps = _module().steps(tmp_path)
    names = [s["name"] for s in steps]
    assert len(set(names)) == len(names) and sum(s["limit"] for s in steps) < 8 * 60, steps
    assert "-m" in steps[0]["argv"] and steps[0]["argv"][steps[0]["argv"].index("-m", 3) + 1] == "gpu"
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                           "tests/unit/test_offload_cuda.py"],
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                          timeout=240)
    collected = [line for line in done.stdout.splitlines() if "::" in line]
    assert any("test_offload_cuda.py" in line for line in collected), done.stdout


def test_a_test_only_skipped_without_cuda_is_selected_by_the_gpu_marker(tmp_path) -> None:
    """The suite's conftest marks ``gpu`` any test skipped for want of CUDA, so ``-m gpu`` finds tests that only
    carry ``skipif(not torch.cuda.is_available(), reason="needs a CUDA device")``, and no others.

    Failed before: ``-m gpu`` selected only tests that carried the marker, so new CUDA tests without it were
    never run by the GPU check.
    """
    (tmp_path / "conftest.py").write_text((ROOT / "tests" / "conftest.py").read_text())
    (tmp_path / "test_sample.py").write_text(
        "import pytest, torch\n"
        "@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')\n"
        "def test_cuda_only():\n    pass\n"
        "def test_cpu():\n    pass\n")
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                           str(tmp_path / "test_sample.py"), f"--rootdir={tmp_path}", "-c", os.devnull],
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                          timeout=120)
    collected = [line for line in done.stdout.splitlines() if "::" in line]
    assert collected == ["test_sample.py::test_cuda_only"], done.stdout + done.stderr


def test_summary_has_every_step_the_peak_table_and_the_failures(tmp_path) -> None:
    """``write_summary`` writes JSON with every record and Markdown with a row per step, the planner's peak
    table, and the output tail of each step that did not pass.

    A failure means a GPU session's figures are lost or a failure is reported without its output.
    """
    records = [
        {"name": "cuda-tests", "command": "pytest -m gpu", "status": "passed", "returncode": 0, "seconds": 61.2,
         "tail": "12 passed", "figures": {}},
        {"name": "planner-peak", "command": "gpu_check.py --peak-check", "status": "passed", "returncode": 0,
         "seconds": 20.0, "tail": "", "figures": {"peak.json": {"rows": [
             {"limit": 2**31, "predicted": 2**30, "measured": 2**30 + 2**25, "strategies": ["full"]}]}}},
        {"name": "offload", "command": "offload.py", "status": "timed out", "returncode": None, "seconds": 50.0,
         "tail": "round 3 of 8", "figures": {}},
    ]
    json_path, md_path = _module().write_summary(records, tmp_path, {"device": "H200", "torch": "2.13", "cuda": "12.8",
                                                                      "seconds": 131.2})
    data = json.loads(json_path.read_text())
    assert data["passed"] == 2 and data["total"] == 3 and [s["name"] for s in data["steps"]] == [
        "cuda-tests", "planner-peak", "offload"]
    text = md_path.read_text()
    assert text.startswith("# gpu-check: 2 of 3 steps passed")
    assert "| offload | timed out | 50.0 |" in text and "round 3 of 8" in text
    assert "| 2.00 | 1.000 | 1.031 | -3.03% |" in text
