"""Every GPU figure in one command: CUDA tests, NCCL parity at world size 1, benchmarks, the planner's peak.

The first thing to run in a session that has a GPU (one H100/H200: about 7 minutes). Each step runs in its
own process with a time limit, and the whole run stops starting steps when ``--deadline`` is near:

1. ``cuda-tests``: ``pytest -m gpu`` over ``tests/`` (every test marked ``gpu``; they skip on CPU).
2. ``parity-fsdp2``, ``parity-fsdp1``, ``parity-ddp``: ``torchrun --nproc_per_node 1 -m ckpt_wrapper parity``
   on CUDA (NCCL, world size 1), the checkpointed model against an unwrapped reference.
3. ``overhead``, ``offload``: ``scripts/bench/overhead.py`` and ``scripts/bench/offload.py`` on a reduced
   GPU workload (8 blocks, width 1024, sequence 1024, bf16), few rounds.
4. ``planner-bench``: ``ckpt-wrapper bench`` at budgets 0.5, 0.3, 0.1 on the same workload.
5. ``planner-peak``: ``ckpt_wrapper.plan`` with ``memory_limit`` and AdamW, the predicted step peak against
   ``torch.cuda.max_memory_allocated`` of the applied model (this script, ``--peak-check``).

It writes ``gpu-check.json`` (every step: command, status, seconds, output tail, and the JSON figures the
step wrote) and ``gpu-check.md`` (the same as tables) into ``--out-dir``. Without CUDA it refuses at
once: one line on stderr, exit status 2.

Usage:
    make gpu-check                                       # or: python scripts/gpu_check.py
    python scripts/gpu_check.py --out-dir gpu-results --deadline 470
    python scripts/gpu_check.py --only cuda-tests,planner-peak
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
WORKLOAD = ["--n-layer", "8", "--d-model", "1024", "--n-head", "16", "--seq-len", "1024", "--vocab-size", "32000",
            "--batch", "4", "--dtype", "bf16"]
"""The reduced GPU workload of the benchmark steps: a few seconds per round on an H100."""


def steps(out: Path) -> list[dict[str, Any]]:
    """The steps, in order: name, argv, time limit in seconds, and the JSON files it writes."""
    py = sys.executable
    torchrun = [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    parity = [[*torchrun, "-m", "ckpt_wrapper", "parity", "--parallel", mode, "--device", "cuda", "--min-ranks", "1",
               "--steps", "3"] for mode in ("fsdp2", "fsdp1", "ddp")]
    return [
        {"name": "cuda-tests", "argv": [py, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-rs",
                                        f"--junitxml={out / 'cuda-tests.xml'}", "tests"], "limit": 120, "files": []},
        *[{"name": f"parity-{mode}", "argv": argv, "limit": 40, "files": []}
          for mode, argv in zip(("fsdp2", "fsdp1", "ddp"), parity)],
        {"name": "overhead", "argv": [py, "scripts/bench/overhead.py", "--rounds", "8", "--warmup", "2", *WORKLOAD,
                                      "--out", str(out / "overhead.json")], "limit": 50, "files": ["overhead.json"]},
        {"name": "offload", "argv": [py, "scripts/bench/offload.py", "--rounds", "8", "--warmup", "2", *WORKLOAD,
                                     "--out", str(out / "offload.json")], "limit": 50, "files": ["offload.json"]},
        {"name": "planner-bench", "argv": [py, "-m", "ckpt_wrapper", "bench", "--rounds", "5", "--warmup", "1",
                                           "--budgets", "0.5,0.3,0.1", *WORKLOAD, "--out-dir", str(out / "bench")],
         "limit": 80, "files": ["bench/bench.json"]},
        {"name": "planner-peak", "argv": [py, str(Path(__file__).resolve()), "--peak-check", str(out / "peak.json")],
         "limit": 40, "files": ["peak.json"]},
    ]


def run_step(step: dict[str, Any], out: Path, env: dict[str, str]) -> dict[str, Any]:
    """Run one step; return its record (status ``passed``, ``failed`` or ``timed out``)."""
    start = time.monotonic()
    try:
        done = subprocess.run(step["argv"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=step["limit"])
        status, rc, text = ("passed" if done.returncode == 0 else "failed"), done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as expired:
        status, rc = "timed out", None
        text = (expired.stdout or b"").decode(errors="replace") + (expired.stderr or b"").decode(errors="replace")
    figures = {}
    for name in step["files"]:
        path = out / name
        if path.exists():
            try:
                figures[name] = json.loads(path.read_text())
            except ValueError:
                figures[name] = "unreadable JSON"
    return {"name": step["name"], "command": " ".join(step["argv"]), "status": status, "returncode": rc,
            "seconds": round(time.monotonic() - start, 1), "tail": text[-3000:], "figures": figures}


def write_summary(records: list[dict[str, Any]], out: Path, meta: dict[str, Any]) -> tuple[Path, Path]:
    """Write ``gpu-check.json`` and ``gpu-check.md`` into ``out``; return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    data = {**meta, "steps": records, "passed": sum(r["status"] == "passed" for r in records),
            "total": len(records)}
    json_path, md_path = out / "gpu-check.json", out / "gpu-check.md"
    json_path.write_text(json.dumps(data, indent=1, default=str))
    lines = [f"# gpu-check: {data['passed']} of {data['total']} steps passed", "",
             f"{meta.get('device', '?')}, torch {meta.get('torch', '?')}, CUDA {meta.get('cuda', '?')}, "
             f"{meta.get('seconds', '?')} s in all.", "",
             "| step | status | seconds | command |", "| --- | --- | ---: | --- |"]
    lines += [f"| {r['name']} | {r['status']} | {r['seconds']} | `{r['command']}` |" for r in records]
    peak = next((r["figures"].get("peak.json") for r in records if r["name"] == "planner-peak"), None)
    if isinstance(peak, dict) and "rows" in peak:
        lines += ["", "## Planner: predicted against measured peak", "",
                  "| memory_limit GiB | predicted GiB | measured GiB | error |", "| ---: | ---: | ---: | ---: |"]
        lines += [f"| {row['limit'] / 2**30:.2f} | {row['predicted'] / 2**30:.3f} | {row['measured'] / 2**30:.3f} | "
                  f"{row['predicted'] / row['measured'] - 1:+.2%} |" for row in peak["rows"]]
    for r in records:
        if r["status"] != "passed":
            lines += ["", f"## {r['name']}: {r['status']}", "", "```", r["tail"][-1500:], "```"]
    md_path.write_text("\n".join(lines) + "\n")
    return json_path, md_path


def peak_check(path: str) -> None:
    """Plan a model on CUDA under memory limits, apply each plan, and compare the predicted step peak with
    ``max_memory_allocated`` of a real step (AdamW, after a warm-up step)."""
    import copy

    import torch

    import ckpt_wrapper
    from ckpt_wrapper.measure import measured_step_peak
    from ckpt_wrapper.testing.models import GPT, GPTConfig

    torch.manual_seed(0)
    config = GPTConfig(n_layer=8, d_model=1024, n_head=16, seq_len=1024, vocab_size=32000)
    model = GPT(config).cuda()
    tokens = torch.randint(0, config.vocab_size, (4, config.seq_len), device="cuda")
    top = ckpt_wrapper.plan(model, tokens, memory_budget=1.0, optimizer=torch.optim.AdamW).peak["peak_bytes"]
    rows = []
    for share in (1.0, 0.8, 0.65):
        limit = int(top * share)
        try:
            plan = ckpt_wrapper.plan(model, tokens, memory_limit=limit, optimizer=torch.optim.AdamW)
        except ValueError as error:
            rows.append({"limit": limit, "error": str(error)})
            continue
        applied = copy.deepcopy(model)
        plan.apply(applied)
        optimizer = torch.optim.AdamW(applied.parameters())

        def step() -> None:
            out = applied(tokens)  # referenced until the step ends, as the planner assumes
            out.float().sum().backward()
            optimizer.step()
            optimizer.zero_grad()

        step()
        before = torch.cuda.memory_allocated()
        measured = measured_step_peak(step, applied, optimizer, device="cuda") - before + (
            sum(p.numel() * p.element_size() for p in applied.parameters())
            + sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                  if torch.is_tensor(t) and t.dim() > 0))
        rows.append({"limit": limit, "predicted": plan.peak["peak_bytes"], "measured": measured,
                     "strategies": [str(e.strategy) for e in plan.entries]})
        del applied, optimizer
        torch.cuda.empty_cache()
    Path(path).write_text(json.dumps({"rows": rows}, indent=1))


def main(argv: list[str] | None = None) -> int:
    """Run the steps (or ``--peak-check``); return 0 if every step passed, 1 if not, 2 without CUDA."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=ROOT / "gpu-results", help="where the summary goes "
                                                                                     "(default: gpu-results/)")
    parser.add_argument("--deadline", type=float, default=470.0, help="seconds after which no step is started "
                                                                      "(default: 470, under 8 minutes in all)")
    parser.add_argument("--only", default=None, help="comma-separated step names to run (default: all)")
    parser.add_argument("--peak-check", metavar="OUT.json", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: error: no CUDA device here (torch.cuda.is_available() is False); run it on a machine "
              "with an NVIDIA GPU (H100/H200)", file=sys.stderr, flush=True)
        return 2
    if args.peak_check:
        peak_check(args.peak_check)
        return 0
    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    chosen = steps(out)
    if args.only:
        names = set(args.only.split(","))
        chosen = [s for s in chosen if s["name"] in names]
    start, records = time.monotonic(), []
    for step in chosen:
        left = args.deadline - (time.monotonic() - start)
        if left < 10:
            records.append({"name": step["name"], "command": " ".join(step["argv"]), "status": "skipped (deadline)",
                            "returncode": None, "seconds": 0.0, "tail": "", "figures": {}})
            continue
        step = {**step, "limit": min(step["limit"], left)}
        print(f"gpu_check: {step['name']} (at most {step['limit']:.0f} s)", flush=True)
        records.append(run_step(step, out, env))
        print(f"gpu_check: {step['name']}: {records[-1]['status']} in {records[-1]['seconds']} s", flush=True)
    meta = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
            "seconds": round(time.monotonic() - start, 1)}
    json_path, md_path = write_summary(records, out, meta)
    print(f"gpu_check: wrote {json_path} and {md_path}")
    return 0 if all(r["status"] == "passed" for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
