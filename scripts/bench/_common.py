"""What the benchmark scripts share: the CPU measuring environment, workload presets, one step, timing.

DESIGN.md ("Measuring") fixes how figures are taken, so every script takes them the same way:

- CPU: glibc's ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736`` set before Python starts
  (``reexec_with_malloc_env``), 2 threads, ``time.perf_counter``;
- CUDA: events on the current stream, a synchronize before reading them, and peak memory as
  ``torch.cuda.max_memory_allocated`` after a reset, above what was allocated before the step;
- both: configurations interleaved round by round, warm-up first, median of rounds, ratios taken within
  one run.

Not a public module: the scripts beside it import it by file name (``python scripts/bench/X.py`` puts
this folder first on ``sys.path``).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ckpt_wrapper.testing import models
# One definition of the malloc settings and the timed step, shared with ``ckpt-wrapper bench``.
from ckpt_wrapper.tools.bench import MALLOC_ENV, malloc_env_set  # noqa: F401  (re-exported for the scripts)
from ckpt_wrapper.tools.bench import train_step as step  # noqa: F401

# glibc reads these when the process starts, so they are set by re-executing, not by os.environ.
PRESETS = ("small", "cpu-reference", "gpu-reference")
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
MODEL_FIELDS = ("n_layer", "d_model", "n_head", "seq_len", "vocab_size")


def add_run_arguments(parser: argparse.ArgumentParser, *, rounds: int = 20, warmup: int = 3) -> None:
    """Flags every benchmark takes: device, dtype, rounds, warm-up, steps, threads."""
    parser.add_argument("--device", default="auto", help="'cpu', 'cuda', 'cuda:N', or 'auto' (cuda when available)")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None,
        help="parameter and activation dtype (the model is cast to it); default bf16 on CUDA, fp32 on CPU",
    )
    parser.add_argument("--rounds", type=int, default=rounds, help="timed rounds; each runs every configuration once")
    parser.add_argument("--warmup", type=int, default=warmup, help="untimed rounds before the timed ones")
    parser.add_argument("--steps", type=int, default=1, help="steps per configuration per round, timed together")
    parser.add_argument(
        "--threads", type=int, default=None,
        help="torch.set_num_threads; default 2 on CPU (as CI's machine), unchanged on CUDA",
    )


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags that choose the model: a preset, per-field overrides, batch and seed."""
    parser.add_argument(
        "--preset", choices=PRESETS, default=None,
        help="model shape: 'small' (8 blocks, width 256, 4 heads, sequence 128, vocabulary 2000), "
        "'cpu-reference' (models.CPU_REFERENCE), 'gpu-reference' (models.GPU_REFERENCE); "
        "default small on CPU, gpu-reference on CUDA",
    )
    parser.add_argument(
        "--reference", action="store_true",
        help="shorthand for the device's reference workload: --preset cpu-reference on CPU, gpu-reference on CUDA",
    )
    parser.add_argument("--n-layer", type=int, default=None, help="override the preset's number of blocks")
    parser.add_argument("--d-model", type=int, default=None, help="override the preset's hidden width")
    parser.add_argument("--n-head", type=int, default=None, help="override the preset's attention heads")
    parser.add_argument("--seq-len", type=int, default=None, help="override the preset's sequence length")
    parser.add_argument("--vocab-size", type=int, default=None, help="override the preset's vocabulary size")
    parser.add_argument("--batch", type=int, default=4, help="sequences per step")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights and tokens")


def add_reexec_argument(parser: argparse.ArgumentParser) -> None:
    """``--no-reexec``: keep the current environment on CPU."""
    parser.add_argument(
        "--no-reexec", action="store_true",
        help=f"on CPU, do not re-execute with {' '.join(f'{k}={v}' for k, v in MALLOC_ENV.items())} "
        "when they are missing (the result records whether they were set)",
    )


def check_run_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``parser.error`` for out-of-range values of the shared flags."""
    for flag in ("rounds", "steps"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.reference and args.preset is not None:
        parser.error("pass either --reference or --preset, not both")


def make_logger(prefix: str) -> Callable[[str], None]:
    """A progress printer to stderr, each line tagged ``[prefix]``."""

    def log(message: str) -> None:
        print(f"[{prefix}] {message}", file=sys.stderr, flush=True)

    return log


def reexec_with_malloc_env(log: Callable[[str], None]) -> None:
    """Replace this process by the same command with the glibc malloc settings in its environment."""
    env = dict(os.environ)
    env.update(MALLOC_ENV)
    # sys.orig_argv keeps interpreter flags and `-m`, so the same command runs again.
    argv = [sys.executable, *sys.orig_argv[1:]]
    log(f"re-executing with {' '.join(f'{k}={v}' for k, v in MALLOC_ENV.items())}")
    sys.stdout.flush()
    os.execve(sys.executable, argv, env)


def cpu_model_name() -> str:
    """The CPU's model name from ``/proc/cpuinfo``, or what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@dataclasses.dataclass(frozen=True, kw_only=True)
class Run:
    """Where and how a benchmark runs, once ``prepare_run`` has set the process up."""

    device: torch.device
    """The device the models live on."""
    dtype: torch.dtype
    """Parameter and activation dtype."""

    @property
    def cuda(self) -> bool:
        """Whether the device is a CUDA device."""
        return self.device.type == "cuda"


def prepare_run(args: argparse.Namespace, log: Callable[[str], None]) -> Run:
    """Resolve the device; on CPU re-execute with the malloc settings (unless ``--no-reexec``) and set threads.

    Does not return when it re-executes.
    """
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if device.type == "cpu" and not malloc_env_set() and not args.no_reexec:
        reexec_with_malloc_env(log)  # does not return
    cuda = device.type == "cuda"
    if cuda:
        if device.index is None:
            # torch.cuda.set_device rejects a device without an index ("cuda"): name the current one.
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    dtype = getattr(torch, DTYPES[args.dtype or ("bf16" if cuda else "fp32")])
    threads = args.threads if args.threads is not None else (None if cuda else 2)
    if threads is not None:
        torch.set_num_threads(threads)
    return Run(device=device, dtype=dtype)


def environment(run: Run) -> dict[str, Any]:
    """What a result depends on besides the model: versions, device, threads, malloc settings."""
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(run.device),
        "device_name": torch.cuda.get_device_name(run.device) if run.cuda else cpu_model_name(),
        "threads": torch.get_num_threads(),
        "cuda": torch.version.cuda if run.cuda else None,
        "malloc_env_set": malloc_env_set(),
        "malloc_env": {key: os.environ.get(key) for key in MALLOC_ENV},
    }


def model_config(args: argparse.Namespace, cuda: bool) -> tuple[str, models.GPTConfig]:
    """The preset's name and its ``GPTConfig`` with the command line's overrides applied."""
    if args.reference:
        preset = "gpu-reference" if cuda else "cpu-reference"
    else:
        preset = args.preset or ("gpu-reference" if cuda else "small")
    base = {
        "small": models.GPTConfig(n_layer=8, d_model=256, n_head=4, seq_len=128, vocab_size=2000),
        "cpu-reference": models.CPU_REFERENCE,
        "gpu-reference": models.GPU_REFERENCE,
    }[preset]
    overrides = {field: getattr(args, field) for field in MODEL_FIELDS if getattr(args, field) is not None}
    return preset, dataclasses.replace(base, **overrides)


def make_batch(
    config: models.GPTConfig, batch: int, seed: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded random tokens: inputs and next-token targets, ``(batch, seq_len)`` each."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, config.vocab_size, (batch, config.seq_len + 1), generator=generator).to(device)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def timed(step: Callable[[], Any], steps: int, device: torch.device) -> tuple[float, int | None]:
    """Seconds per step over ``steps`` steps, and on CUDA the peak bytes allocated above the start."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start_bytes = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / steps, torch.cuda.max_memory_allocated(device) - start_bytes
    begin = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - begin) / steps, None


def quartiles(values: list[float]) -> tuple[float, float]:
    """First and third quartiles (inclusive method); both the value itself for a single value."""
    if len(values) < 2:
        return values[0], values[0]
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q3


def command_line() -> str:
    """The command that ran this process, as a user would type it."""
    return " ".join([Path(sys.executable).name, *sys.orig_argv[1:]])


def write_json(path: Path, report: dict[str, Any]) -> None:
    """Write ``report`` to ``path`` as indented JSON, creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
