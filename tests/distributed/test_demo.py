"""The demo trains under torchrun with checkpointing and FSDP2, and its gradient check catches mismatches.

The multi-rank test launches ``python -m torch.distributed.run`` as a subprocess (2 ranks, gloo on
CPU); the comparison itself is tested in-process with gradients known to differ.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ckpt_wrapper.tools.demo import compare_gradients
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


def _gradients(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "tok_emb.weight": torch.randn(16, 8, generator=generator),
        "layers.0.attn.qkv.weight": torch.randn(24, 8, generator=generator),
        "layers.1.mlp.fc.weight": torch.randn(32, 8, generator=generator),
        "head.weight": torch.randn(16, 8, generator=generator),
    }


@pytest.mark.timeout(60)
def test_comparison_accepts_identical_gradients() -> None:
    """Equal gradients match with zero difference; a failure would make the demo cry wolf."""
    report = compare_gradients(_gradients(), _gradients(), rtol=1e-5, atol=1e-6)
    assert report.matched and report.mismatched == () and report.max_abs_diff == 0.0


@pytest.mark.timeout(60)
def test_comparison_names_the_worst_parameter() -> None:
    """Of several wrong gradients, the one furthest outside tolerance is reported, with its difference.

    A failure means the demo would point users at the wrong parameter, or miss a mismatch.
    """
    expected = _gradients()
    actual = {name: grad.clone() for name, grad in expected.items()}
    actual["layers.0.attn.qkv.weight"][3, 4] += 1e-4  # just outside tolerance
    actual["layers.1.mlp.fc.weight"][0, 0] += 0.5  # far outside: the worst
    actual["head.weight"] *= 1 + 1e-7  # float32 noise: within tolerance
    report = compare_gradients(actual, expected, rtol=1e-5, atol=1e-6)
    assert not report.matched
    assert report.worst == "layers.1.mlp.fc.weight"
    assert report.mismatched == ("layers.0.attn.qkv.weight", "layers.1.mlp.fc.weight")
    assert report.worst_abs_diff == pytest.approx(0.5, rel=1e-6)
    assert "layers.1.mlp.fc.weight" in report.detail


@pytest.mark.timeout(60)
def test_comparison_catches_averaging_mistake() -> None:
    """Gradients summed over 2 ranks instead of averaged (a classic) are caught.

    A failure means a demo that forgot FSDP2's averaging, or a sharding setup that sums, would pass.
    """
    expected = _gradients()
    summed = {name: 2 * grad for name, grad in expected.items()}
    report = compare_gradients(summed, expected, rtol=1e-5, atol=1e-6)
    assert not report.matched and set(report.mismatched) == set(expected)


@pytest.mark.timeout(60)
def test_comparison_reports_missing_and_renamed_gradients() -> None:
    """A missing gradient or a renamed parameter (a wrapper prefix, say) is a mismatch, reported by name.

    A failure means names changed by wrapping would slip past the check.
    """
    expected = _gradients()
    actual: dict[str, torch.Tensor | None] = dict(expected)
    actual["layers.0.attn.qkv.weight"] = None
    actual["layers.1._checkpoint_wrapped_module.mlp.fc.weight"] = actual.pop("layers.1.mlp.fc.weight")
    report = compare_gradients(actual, expected, rtol=1e-5, atol=1e-6)
    assert not report.matched
    assert set(report.mismatched) == {
        "layers.0.attn.qkv.weight",
        "layers.1.mlp.fc.weight",
        "layers.1._checkpoint_wrapped_module.mlp.fc.weight",
    }
    assert "no gradient" in report.detail
