"""The demo trains under torchrun with checkpointing and FSDP2, and says so only when nothing differed.

The multi-rank test launches ``python -m torch.distributed.run`` as a subprocess (2 ranks, gloo on
CPU). The comparison is the parity harness's (``ckpt_wrapper.testing.check_parity``, tested in
test_parity.py); here the demo's reading of its report is tested in-process with reports that differ.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ckpt_wrapper.testing import ParityReport
from ckpt_wrapper.tools.demo import verdict
from pool import torchrun

REPO_ROOT = Path(__file__).resolve().parents[2]
RUN_TIMEOUT_S = 240


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"  # two ranks on a 2-core machine: one thread each
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False,
    )


def _explain(result: subprocess.CompletedProcess[str]) -> str:
    # torchrun prefixes nothing, so stderr holds every rank's traceback; show both streams whole.
    return f"exit status {result.returncode}\n--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_rank_demo_gradients_match_unwrapped_model() -> None:
    """Checkpointed + fully_shard training on 2 ranks gives the unwrapped model's gradients and losses.

    A failure means AC before fully_shard changed the numerics (or names) of training, or the demo
    cannot start under torchrun.
    """
    result = torchrun(2, "-m", "ckpt_wrapper", "demo", "--steps", "3", timeout=RUN_TIMEOUT_S)
    assert result.returncode == 0, _explain(result)
    assert "gradients match the unwrapped model: yes" in result.stdout, _explain(result)
    assert "losses match the unwrapped model: yes" in result.stdout, _explain(result)
    assert "world size                          2" in result.stdout, _explain(result)
    # Rank 0 alone prints: one line per step, not two.
    assert result.stdout.count("step 1/3") == 1, _explain(result)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_single_process_demo_runs_without_torchrun() -> None:
    """``python -m ckpt_wrapper demo`` works with no launcher (a one-rank group of its own).

    A failure means the demo needs torchrun's environment to start.
    """
    result = _run(["-m", "ckpt_wrapper", "demo", "--steps", "2", "--n-layer", "2"])
    assert result.returncode == 0, _explain(result)
    assert "gradients match the unwrapped model: yes" in result.stdout, _explain(result)


def _report(max_diff: dict[str, float], failures: list[str]) -> ParityReport:
    return ParityReport(recipe="fsdp2", reference="unsharded", tolerances=(1e-5, 1e-6), max_diff=max_diff,
                        failures=failures)


@pytest.mark.timeout(60)
def test_verdict_says_yes_when_nothing_differed() -> None:
    """A clean report gives three "yes" lines with the largest differences; a failure would make the demo cry wolf."""
    lines = verdict(_report({"loss": 1e-7, "grad:head.weight": 2e-8, "grad:tok_emb.weight": 3e-9}, []), parameters=2)
    assert lines == [
        "losses match the unwrapped model: yes (max abs diff 1.0e-07)",
        "gradients match the unwrapped model: yes (max abs diff 2.0e-08)",
        "outputs and parameters after each step match: yes",
    ]


@pytest.mark.timeout(60)
def test_verdict_names_the_worst_gradient_and_counts_the_failing_ones() -> None:
    """Of several wrong gradients the largest difference is named, and each failing parameter counted once.

    A failure means the demo would point users at the wrong parameter, or pass with mismatched gradients.
    """
    report = _report(
        {"loss": 0.0, "grad:layers.0.attn.qkv.weight": 1e-4, "grad:layers.1.mlp.fc.weight": 0.5, "grad:head.weight": 1e-9},
        ["grad:layers.0.attn.qkv.weight: max abs diff 0.0001 exceeds rtol=1e-05, atol=1e-06",
         "grad:layers.1.mlp.fc.weight: max abs diff 0.5 exceeds rtol=1e-05, atol=1e-06",
         "grad:layers.1.mlp.fc.weight: max abs diff 0.4 exceeds rtol=1e-05, atol=1e-06"],
    )
    lines = verdict(report, parameters=3)
    assert lines[0].startswith("losses match the unwrapped model: yes")
    assert lines[1] == ("gradients match the unwrapped model: NO: worst parameter 'layers.1.mlp.fc.weight' "
                        "(max abs diff 5.0e-01; 2 of 3 parameters outside rtol=1e-05, atol=1e-06)")
    assert "    grad:layers.1.mlp.fc.weight: max abs diff 0.5 exceeds rtol=1e-05, atol=1e-06" in lines


@pytest.mark.timeout(60)
def test_verdict_reports_loss_and_parameter_failures() -> None:
    """A loss, a missing gradient or a parameter drifting after the step each turn their line to NO.

    A failure means a demo whose losses differ, or whose wrapping renamed a parameter, would still say yes.
    """
    report = _report({"loss": 0.1}, [
        "loss: max abs diff 0.1 exceeds rtol=1e-05, atol=1e-06",
        "grad names differ: only in reference ['layers.1.mlp.fc.weight'], only in checkpointed []",
        "param:head.weight: max abs diff 0.01 exceeds rtol=1e-05, atol=1e-06",
    ])
    text = "\n".join(verdict(report, parameters=3))
    assert "losses match the unwrapped model: NO (max abs diff 1.0e-01)" in text
    assert "gradients match the unwrapped model: NO" in text and "grad names differ" in text
    assert "outputs and parameters after each step match: NO" in text and "param:head.weight" in text
