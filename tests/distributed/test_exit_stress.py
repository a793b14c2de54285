"""Runs that succeed exit 0: the short version of ``scripts/stress/exit_stress.py`` for CI.

A gloo process group left alive into interpreter shutdown could abort a finished run with SIGABRT
("terminate called without an active exception"); ``ckpt_wrapper.distributed.shutdown_distributed``
frees the groups first. The race shows under load, so the launches here run two at a time.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
STRESS = REPO_ROOT / "scripts" / "stress" / "exit_stress.py"


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_offload_and_fsdp1_runs_exit_cleanly_two_at_a_time(tmp_path):
    result = subprocess.run(
        [sys.executable, str(STRESS), "--modes", "offload", "fsdp1", "--runs", "2", "--parallel", "2",
         "--timeout", "200", "--log-dir", str(tmp_path)],
        cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=400, check=False,
    )
    kept = "\n".join(f"--- {p} ---\n{p.read_text(errors='replace')[-3000:]}" for p in tmp_path.glob("*/output.txt"))
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}\n{kept}"
    assert "0 abnormal exit(s) in 4 launches" in result.stdout, result.stdout


_PINNED = textwrap.dedent("""
    import torch
    from ckpt_wrapper.distributed import init_distributed, shutdown_distributed
    init_distributed(torch.device("cpu"))
    # Building an optimizer imports torch._dynamo, which imports torch.distributed.nn.functional, whose
    # defaults capture the default group: without shutdown_distributed it outlives destroy_process_group.
    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    from torch.distributed.fsdp import fully_shard
    model = fully_shard(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)))
    model(torch.randn(2, 4)).sum().backward()
    del model
    print("gloo threads left:", shutdown_distributed())
""")


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_shutdown_distributed_leaves_no_gloo_threads():
    result = subprocess.run([sys.executable, "-c", _PINNED], cwd=REPO_ROOT, env=_env(), capture_output=True,
                            text=True, timeout=110, check=False)
    assert result.returncode == 0, result.stderr
    assert "gloo threads left: 0" in result.stdout, result.stdout + result.stderr
