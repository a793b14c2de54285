"""A pool of spawned ranks with a gloo process group, started once and reused by many tests.

Spawning (never forking: a fork after torch has run CPU ops can deadlock) and joining a process group
costs seconds per rank, so each test module starts one pool and sends it tasks. A task is an
importable function called on every rank; its per-rank results, or per-rank tracebacks, come back.
A task that does not finish in time kills the pool (a hung collective cannot be recovered) and fails
with whatever the ranks reported.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import queue
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world: int, port: int, tasks: Any, results: Any) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1",
    )
    import datetime

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        while True:
            task = tasks.get()
            if task is None:
                break
            fn, args, kwargs = task
            try:
                results.put((rank, True, fn(*args, **kwargs)))
            except BaseException:  # reported to the parent, which fails the test
                results.put((rank, False, traceback.format_exc()))
        dist.barrier()
    finally:
        dist.destroy_process_group()


class RankPool:
    """``world`` spawned ranks in one gloo group; ``run(fn, *args)`` calls ``fn`` on each."""

    def __init__(self, world: int) -> None:
        self.world = world
        context = mp.get_context("spawn")
        self._tasks = [context.Queue() for _ in range(world)]
        self._results = context.Queue()
        port = _free_port()
        self._procs = [
            context.Process(target=_worker, args=(rank, world, port, self._tasks[rank], self._results), daemon=True)
            for rank in range(world)
        ]
        for proc in self._procs:
            proc.start()
        self.broken = False

    def run(self, fn: Callable[..., Any], *args: Any, timeout: float = 180.0, **kwargs: Any) -> list[Any]:
        """Call ``fn(*args, **kwargs)`` on every rank; return the results in rank order.

        Raises:
            RuntimeError: with every failing rank's traceback, or on timeout (the pool is then dead).
        """
        if self.broken:
            raise RuntimeError("the rank pool was killed by an earlier timeout")
        for task_queue in self._tasks:
            task_queue.put((fn, args, kwargs))
        got: dict[int, tuple[bool, Any]] = {}
        deadline = time.monotonic() + timeout
        while len(got) < self.world:
            remaining = deadline - time.monotonic()
            dead = [p.pid for p in self._procs if not p.is_alive()]
            try:
                rank, ok, value = self._results.get(timeout=max(0.1, min(remaining, 1.0)))
                got[rank] = (ok, value)
                continue
            except queue.Empty:
                pass
            if remaining <= 0 or dead:
                self.close(kill=True)
                reported = "\n".join(f"rank {r}: {'ok' if ok else v}" for r, (ok, v) in sorted(got.items()))
                why = f"rank process(es) {dead} died" if dead else f"timed out after {timeout:.0f}s"
                raise RuntimeError(f"{fn.__name__}: {why}; ranks that reported:\n{reported or '(none)'}")
        failed = {rank: value for rank, (ok, value) in got.items() if not ok}
        if failed:
            raise RuntimeError(
                f"{fn.__name__} failed on rank(s) {sorted(failed)}:\n"
                + "\n".join(f"--- rank {rank} ---\n{tb}" for rank, tb in sorted(failed.items()))
            )
        return [got[rank][1] for rank in range(self.world)]

    def close(self, *, kill: bool = False, wait: bool = True) -> None:
        """Stop the ranks: politely (barrier, destroy the group), or by killing them.

        ``wait=False`` asks them to stop and returns at once (they leave while the next tests run);
        ``join`` later waits for them, and kills any rank still there after 30 s.
        """
        if not kill and not self.broken:
            for task_queue in self._tasks:
                task_queue.put(None)
        self.broken = True
        if kill:
            self._kill()
        elif wait:
            self.join()

    def join(self) -> None:
        """Wait (30 s at most) for ranks asked to stop, then kill the ones left."""
        for proc in self._procs:
            proc.join(timeout=30)
        self._kill()

    def _kill(self) -> None:
        for proc in self._procs:
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=10)


def torchrun(nproc: int, *args: str, timeout: float = 240.0, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m torch.distributed.run --nproc_per_node nproc ARGS`` on a free port; output captured.

    Raises:
        subprocess.TimeoutExpired: after ``timeout`` seconds (the launcher and its ranks are killed).
    """
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


REPORT_PREFIX = "RESULT "
"""The line a scenario script's rank 0 prints its JSON report on."""


def launch_report(nproc: int, script: str, *args: str, timeout: float = 360.0) -> dict:
    """Run ``script ARGS`` under torchrun with this checkout first on ``PYTHONPATH``; return the JSON report
    rank 0 printed after ``REPORT_PREFIX`` (exactly once), asserting a clean exit."""
    root = str(Path(__file__).resolve().parents[2])
    result = torchrun(nproc, script, *args, timeout=timeout,
                      env={"PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))})
    explain = f"exit status {result.returncode}\n--- stdout ---\n{result.stdout[-6000:]}\n--- stderr ---\n{result.stderr[-12000:]}"
    return read_report(result, explain)


def read_report(result: subprocess.CompletedProcess[str], explain: str) -> dict:
    """The JSON report of a launch that exited 0 and printed exactly one ``REPORT_PREFIX`` line (rank 0's);
    ``explain`` describes the launch when it did not."""
    assert result.returncode == 0, explain
    assert result.stdout.count(REPORT_PREFIX) == 1, explain
    return json.loads(result.stdout.split(REPORT_PREFIX, 1)[1].splitlines()[0])


def print_report(report: dict) -> None:
    """Rank 0 prints ``report`` for ``launch_report``; then every rank leaves the group, if one is left."""
    import torch.distributed as dist

    if int(os.environ.get("RANK", "0")) == 0:
        print(REPORT_PREFIX + json.dumps(report), flush=True)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
