"""Run each entry point many times, a few at a time, and count the runs that exit abnormally.

A run is abnormal when its launcher exits non-zero, a rank dies of a signal, or its output says
``terminate called`` / ``Fatal Python error`` / ``core dumped`` (a rank aborting after its summary,
which a job scheduler reads as a failed job). Every run is small (a tiny model, a few steps) on
2 CPU ranks under ``torchrun --standalone``, so 50 runs of a mode take minutes.

    PYTHONPATH=$PWD python scripts/stress/exit_stress.py                         # every mode, 10 runs, 2 at a time
    PYTHONPATH=$PWD python scripts/stress/exit_stress.py --modes offload fsdp1 --runs 50 --parallel 2
    PYTHONPATH=$PWD python scripts/stress/exit_stress.py --list

Exit status: 0 when every run exited cleanly, 1 when any did not (its output is kept under
``--log-dir``), 2 on bad flags. ``--cores`` lets crashing ranks dump core into the run's folder, for
``gdb -batch -ex 'thread apply all bt' python core.*``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import os
import pathlib
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]
DRIVER = str(ROOT / "scripts" / "launch" / "train_driver.py")
TINY = ["--steps", "3", "--n-layer", "2", "--d-model", "32", "--n-head", "2", "--seq-len", "16",
        "--vocab-size", "64", "--batch", "1"]
"""The model and training flags every mode shares: small enough that start-up dominates."""

MODES: dict[str, list[str]] = {
    "offload": [DRIVER, *TINY, "--progress", "off", "--ac", "offload", "--offload-cpu-copy"],
    "full+offload": [DRIVER, *TINY, "--progress", "off", "--ac", "full+offload", "--offload-cpu-copy"],
    "fsdp1": [DRIVER, *TINY, "--progress", "off", "--parallel", "fsdp1", "--ac-order", "after", "--every", "2"],
    "fsdp2": [DRIVER, *TINY, "--progress", "off", "--parallel", "fsdp2", "--ac", "full"],
    "train-example": [str(ROOT / "scripts" / "launch" / "train.py"), "--steps", "3"],
    "demo": ["-m", "ckpt_wrapper", "demo", *TINY],
    "parity": ["-m", "ckpt_wrapper", "parity", "--steps", "2"],
    "parity-offload": ["-m", "ckpt_wrapper", "parity", "--steps", "2", "--ac", "offload"],
}
"""Mode name -> what torchrun runs (a script or ``-m module``, then its flags)."""

ABNORMAL_TEXT = re.compile(r"terminate called|Fatal Python error|core dumped|Segmentation fault|"
                           r"Signal \d+ \(SIG\w+\) received by PID|exitcode\s*:\s*-\d+")
"""What a rank that died after its work (or a signal) leaves in the launcher's output."""


@dataclasses.dataclass
class Result:
    mode: str
    index: int
    status: int
    seconds: float
    why: str
    """Empty for a clean run; else what was abnormal."""


def _signal_name(text: str) -> str:
    found = re.search(r"Signal (\d+) \((SIG\w+)\)", text) or re.search(r"exitcode\s*:\s*(-\d+)", text)
    if found is None:
        return ""
    return found.group(2) if found.lastindex == 2 else f"signal {-int(found.group(1))}"


def run_once(mode: str, index: int, args: argparse.Namespace, log_dir: pathlib.Path) -> Result:
    """One launch of ``mode``: torchrun on ``args.nproc`` CPU ranks, output to a folder of its own."""
    folder = log_dir / f"{mode}-{index:03d}"
    folder.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]), PYTHONFAULTHANDLER="1")
    env.pop("RANK", None), env.pop("WORLD_SIZE", None), env.pop("LOCAL_RANK", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
               *MODES[mode]]

    def allow_cores() -> None:
        if args.cores:
            resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))

    started = time.monotonic()
    with open(folder / "output.txt", "wb") as out:
        try:
            status = subprocess.run(command, cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    timeout=args.timeout, preexec_fn=allow_cores).returncode
        except subprocess.TimeoutExpired:
            status = -9
    seconds = time.monotonic() - started
    text = (folder / "output.txt").read_text(errors="replace")
    why = ""
    if status == -9 and seconds >= args.timeout:
        why = f"timed out after {args.timeout:.0f} s"
    elif status != 0 or ABNORMAL_TEXT.search(text):
        marks = [m for m in ("terminate called", "Fatal Python error") if m in text]
        why = ", ".join(filter(None, [f"exit {status}", _signal_name(text), *marks]))
    if not why and not args.keep_all:
        shutil.rmtree(folder, ignore_errors=True)
    return Result(mode, index, status, seconds, why)


def table(results: list[Result], modes: list[str]) -> str:
    """One row per mode: runs, clean, abnormal, the kinds of failure, median seconds."""
    rows = [("mode", "runs", "clean", "abnormal", "median s", "failures")]
    for mode in modes:
        mine = [r for r in results if r.mode == mode]
        bad = [r for r in mine if r.why]
        kinds: dict[str, int] = {}
        for r in bad:
            kinds[r.why] = kinds.get(r.why, 0) + 1
        rows.append((mode, str(len(mine)), str(len(mine) - len(bad)), str(len(bad)),
                     f"{statistics.median(r.seconds for r in mine):.1f}" if mine else "-",
                     "; ".join(f"{n}x {k}" for k, n in sorted(kinds.items())) or "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", nargs="+", choices=sorted(MODES), default=None, metavar="MODE",
                   help=f"modes to run (default: all): {', '.join(MODES)}")
    p.add_argument("--runs", type=int, default=10, help="launches of each mode (default: 10)")
    p.add_argument("--parallel", type=int, default=2,
                   help="launches running at the same time (default: 2; the race shows under load)")
    p.add_argument("--nproc", type=int, default=2, help="ranks per launch (default: 2)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds before a launch counts as hung (default: 300)")
    p.add_argument("--log-dir", type=pathlib.Path, default=None,
                   help="keep the output of abnormal runs here (default: a new temporary folder)")
    p.add_argument("--keep-all", action="store_true", help="keep the output of clean runs too")
    p.add_argument("--cores", action="store_true", help="let crashing ranks dump core into their run's folder")
    p.add_argument("--list", action="store_true", help="print each mode's command and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.runs < 1 or args.parallel < 1 or args.nproc < 1:
        parser.error(f"--runs, --parallel and --nproc must be >= 1; found {args.runs}, {args.parallel}, {args.nproc}")
    modes = args.modes or list(MODES)
    if args.list:
        for mode in modes:
            print(f"{mode}: torchrun --standalone --nproc_per_node {args.nproc} {' '.join(MODES[mode])}")
        return 0
    log_dir = args.log_dir or pathlib.Path(tempfile.mkdtemp(prefix="exit_stress-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    # Interleave the modes, so a mode's runs meet the others' load and not only their own.
    jobs = [(mode, i) for i in range(args.runs) for mode in modes]
    print(f"exit_stress: {len(jobs)} launches ({args.runs} of each of {', '.join(modes)}), {args.parallel} at a "
          f"time, {args.nproc} ranks each; logs of abnormal runs in {log_dir}", flush=True)
    results: list[Result] = []
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(args.parallel) as executor:
        futures = [executor.submit(run_once, mode, i, args, log_dir) for mode, i in jobs]
        for future in concurrent.futures.as_completed(futures):
            result = future.result()
            results.append(result)
            if result.why:
                print(f"  ABNORMAL {result.mode} #{result.index}: {result.why} "
                      f"({log_dir / f'{result.mode}-{result.index:03d}'})", flush=True)
    print(table(results, modes))
    bad = sum(1 for r in results if r.why)
    print(f"{bad} abnormal exit(s) in {len(results)} launches, {time.monotonic() - started:.0f} s", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
