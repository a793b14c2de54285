"""The one benchmark toolkit: ``ckpt-wrapper bench`` and ``scripts/bench/*.py`` all measure through it.

docs/benchmarks.md ("How figures are measured") fixes how figures are taken, so every benchmark takes them the same way:

- CPU: glibc's ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736`` set before Python starts
  (``prepare_run`` re-executes the command with them), 2 threads, ``time.perf_counter``;
- CUDA: events on the current stream, a synchronize before reading them, and the peak as
  ``torch.cuda.max_memory_allocated`` after a reset, above what was allocated before the step;
- both: configurations interleaved round by round in a rotating order, warm-up first, the median of
  rounds, ratios taken within one run (``run_rounds``).

It also holds the model presets, the environment a result records and the small pieces of their reports
(JSON, quartiles, Markdown tables); ``ckpt_wrapper.tools.bench_flags`` holds the flags they share.

Example:
    >>> import torch
    >>> from ckpt_wrapper.tools import benchkit
    >>> times = benchkit.run_rounds(["a", "b"], lambda name: benchkit.Timing(seconds=0.001),
    ...                             warmup=1, rounds=3, log=lambda line: None)
    >>> {name: len(samples) for name, samples in times.items()}
    {'a': 3, 'b': 3}
    >>> benchkit.quartiles([1.0, 2.0, 3.0, 4.0, 5.0])
    (2.0, 4.0)
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn, Protocol, TypeVar

import torch
from torch import nn

from ckpt_wrapper.distributed import default_device, resolve_dtype
from ckpt_wrapper.testing import models
from ckpt_wrapper.testing.data import lm_loss, random_batch

__all__ = [
    "MALLOC_ENV", "MODEL_FIELDS", "PRESETS", "Run", "Timing", "check_device", "command_line", "cpu_model_name",
    "environment", "heading", "make_batch", "make_logger", "malloc_env_set", "malloc_note", "markdown_table", "model_config",
    "model_line", "prepare_run", "quartiles", "rounds_sentence", "run_rounds", "timed", "train_step", "write_json",
]

MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "68719476736"}
"""glibc's malloc settings (docs/benchmarks.md, "How figures are measured"); glibc reads them at start-up, so they are set by re-executing."""
PRESETS = {
    "small": models.GPTConfig(n_layer=8, d_model=256, n_head=4, seq_len=128, vocab_size=2000),
    "cpu-reference": models.CPU_REFERENCE,
    "gpu-reference": models.GPU_REFERENCE,
}
"""The workloads by name: a small GPT for quick CPU runs, and the CPU and GPU reference workloads."""
MODEL_FIELDS = ("n_layer", "d_model", "n_head", "seq_len", "vocab_size")
"""The ``GPTConfig`` fields a command line may override."""


# --- the process: malloc settings, device, dtype, threads, environment ------------------------------

def malloc_env_set() -> bool:
    """Whether glibc's malloc settings (docs/benchmarks.md, "How figures are measured") are in this process's environment."""
    return all(os.environ.get(key) == value for key, value in MALLOC_ENV.items())


def reexec_with_malloc_env(log: Callable[[str], None]) -> NoReturn:
    """Replace this process by the same command (``sys.orig_argv``: flags and ``-m`` kept) with ``MALLOC_ENV`` set."""
    log("re-executing with " + " ".join(f"{k}={v}" for k, v in MALLOC_ENV.items()))
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, **MALLOC_ENV})


@dataclasses.dataclass(frozen=True, kw_only=True)
class Run:
    """Where and how a benchmark runs, once ``prepare_run`` has set the process up."""

    device: torch.device
    """The device the models live on (with an index on CUDA)."""
    dtype: torch.dtype
    """Parameter and activation dtype."""
    threads_before: int
    """``torch.get_num_threads()`` before ``prepare_run`` changed it, to restore in-process callers."""

    @property
    def cuda(self) -> bool:
        """Whether the device is a CUDA device."""
        return self.device.type == "cuda"


def prepare_run(
    device: str | torch.device | None, *, dtype: str | None, threads: int | None, reexec: bool,
    log: Callable[[str], None],
) -> Run:
    """Resolve device and dtype; on CPU re-execute with ``MALLOC_ENV`` (with ``reexec``) and set threads.

    Args:
        device: ``cpu``, ``cuda``, ``cuda:N``; ``None`` (or ``auto``): CUDA when available, else CPU.
        dtype: ``fp32``, ``bf16`` or ``fp16``; ``None``: bf16 on CUDA, fp32 on CPU.
        threads: ``torch.set_num_threads``; ``None``: 2 on CPU, unchanged on CUDA.
        reexec: on CPU without the malloc settings, replace the process (this call then does not return).
        log: where the re-execution is announced.

    Example:
        >>> import torch
        >>> from ckpt_wrapper.tools.benchkit import prepare_run
        >>> run = prepare_run("cpu", dtype=None, threads=1, reexec=False, log=print)
        >>> run.device, run.dtype, torch.get_num_threads()
        (device(type='cpu'), torch.float32, 1)
        >>> torch.set_num_threads(run.threads_before)
    """
    resolved = default_device(None if device == "auto" else device)
    if resolved.type == "cpu" and reexec and not malloc_env_set():
        reexec_with_malloc_env(log)
    cuda = resolved.type == "cuda"
    if cuda:
        torch.cuda.set_device(resolved)
    before = torch.get_num_threads()
    threads = threads if threads is not None else (None if cuda else 2)
    if threads is not None:
        torch.set_num_threads(threads)
    return Run(device=resolved, dtype=resolve_dtype(dtype or ("bf16" if cuda else "fp32")), threads_before=before)


def check_device(requested: str | None, *, command: str) -> torch.device:
    """The device ``requested`` (``None``: this rank's default) for ``command``; only CPU and CUDA are accepted.

    Raises:
        ValueError: if ``requested`` is no device, neither CPU nor CUDA, or CUDA where none is available.

    Example:
        >>> from ckpt_wrapper.tools.benchkit import check_device
        >>> check_device("cpu", command="bench")
        device(type='cpu')
        >>> check_device("mps:x", command="bench")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: device 'mps:x' is not a device (...); use cpu, cuda or cuda:N
    """
    try:
        device = default_device(None if requested == "auto" else requested)
    except RuntimeError as error:
        raise ValueError(f"device {requested!r} is not a device ({error}); use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {requested!r}: {command} runs on cpu or cuda, not {device.type}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {requested!r} asks for CUDA but none is available; use cpu")
    return device


def cpu_model_name() -> str:
    """The CPU's model name from ``/proc/cpuinfo``, or what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict[str, Any]:
    """What a result depends on besides the model: versions, device, threads, malloc settings.

    Example:
        >>> import torch
        >>> from ckpt_wrapper.tools.benchkit import environment
        >>> sorted(environment(torch.device("cpu")))[:4]
        ['cuda', 'device', 'device_name', 'malloc_env']
    """
    cuda = device.type == "cuda"
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if cuda else cpu_model_name(),
        "threads": torch.get_num_threads(),
        "cuda": torch.version.cuda if cuda else None,
        "malloc_env_set": malloc_env_set(),
        "malloc_env": {key: os.environ.get(key) for key in MALLOC_ENV},
    }


def model_config(
    preset: str | None, *, reference: bool, cuda: bool, overrides: Mapping[str, int | None] | None = None
) -> tuple[str, models.GPTConfig]:
    """The workload's name and shape: ``preset``, else the device's reference (``reference``) or default.

    The default is ``gpu-reference`` on CUDA and ``small`` on CPU; ``overrides`` (``None`` values
    ignored) replace fields of the preset.

    Raises:
        ValueError: for an unknown preset, or a shape ``GPTConfig`` rejects.

    Example:
        >>> from ckpt_wrapper.tools.benchkit import model_config
        >>> name, config = model_config(None, reference=False, cuda=False, overrides={"n_layer": 2})
        >>> name, config.n_layer, config.d_model
        ('small', 2, 256)
    """
    if reference:
        preset = "gpu-reference" if cuda else "cpu-reference"
    preset = preset or ("gpu-reference" if cuda else "small")
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    given = {field: value for field, value in (overrides or {}).items() if value is not None}
    return preset, dataclasses.replace(PRESETS[preset], **given)


def make_batch(config: models.GPTConfig, rows: int, seed: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch every benchmark times: ``random_batch`` for ``config``, made contiguous, on ``device``."""
    tokens, targets = random_batch(step=0, rows=rows, seq_len=config.seq_len, vocab_size=config.vocab_size,
                                   seed=seed, device=device)
    return tokens.contiguous(), targets.contiguous()


# --- timing ------------------------------------------------------------------------------------------

def train_step(model: nn.Module, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Forward, ``lm_loss``, backward, ``zero_grad``: the step every benchmark times; returns the loss."""
    loss = lm_loss(model(tokens), targets)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return loss.detach()


@dataclasses.dataclass(frozen=True, kw_only=True)
class Timing:
    """One timed call of one configuration."""

    seconds: float
    """Seconds per step."""
    peak_bytes: int | None = None
    """CUDA: the peak of ``memory_allocated`` during the call above what was allocated before it."""


def timed(step: Callable[[], Any], device: torch.device, steps: int = 1) -> Timing:
    """Time ``steps`` calls of ``step`` together: seconds per step and, on CUDA, the peak above the start.

    Example:
        >>> import torch
        >>> from ckpt_wrapper.tools.benchkit import timed
        >>> timing = timed(lambda: torch.ones(8).sum(), torch.device("cpu"), steps=2)
        >>> timing.seconds > 0, timing.peak_bytes
        (True, None)
    """
    gc.collect()
    if device.type != "cuda":
        begin = time.perf_counter()
        for _ in range(steps):
            step()
        return Timing(seconds=(time.perf_counter() - begin) / steps)
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        step()
    end.record()
    end.synchronize()
    return Timing(seconds=start.elapsed_time(end) / 1e3 / steps,
                  peak_bytes=torch.cuda.max_memory_allocated(device) - before)


class _Timed(Protocol):
    seconds: float


_Sample = TypeVar("_Sample", bound=_Timed)


def run_rounds(
    names: Sequence[str], measure: Callable[[str], _Sample], *, warmup: int, rounds: int, log: Callable[[str], None]
) -> dict[str, list[_Sample]]:
    """The one interleaved timing loop: warm-up rounds, then timed ones, each measuring every configuration once.

    The order rotates by one each round, so no configuration always follows the same one (caches,
    allocator state and clock boost then fall on all alike). ``measure(name)`` takes one sample and
    does its own device synchronisation (``timed`` does); each round's times go to ``log``.

    Args:
        names: the configurations, in table order.
        measure: takes one sample of a configuration: anything with a ``seconds`` attribute.
        warmup: untimed rounds first.
        rounds: timed rounds.
        log: progress lines.

    Returns:
        Each configuration's timed samples, in round order.
    """
    samples: dict[str, list[_Sample]] = {name: [] for name in names}
    began = time.perf_counter()
    for index in range(warmup + rounds):
        shift = index % len(names)
        this_round: dict[str, float] = {}
        round_began = time.perf_counter()
        for name in [*names[shift:], *names[:shift]]:
            sample = measure(name)
            this_round[name] = sample.seconds
            if index >= warmup:
                samples[name].append(sample)
        label = f"warm-up {index + 1}/{warmup}" if index < warmup else f"round {index - warmup + 1}/{rounds}"
        left = (warmup + rounds - index - 1) * (time.perf_counter() - round_began)
        log(f"{label} ({time.perf_counter() - began:.0f} s, about {left:.0f} s left): "
            + ", ".join(f"{name} {this_round[name] * 1e3:.1f} ms" for name in names))
    return samples


# --- reports -----------------------------------------------------------------------------------------

def quartiles(values: Sequence[float]) -> tuple[float, float]:
    """First and third quartiles (inclusive method); both the value itself for a single value."""
    if len(values) < 2:
        return values[0], values[0]
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q3


def command_line() -> str:
    """The command that ran this process, as a user would type it."""
    return " ".join([Path(sys.executable).name, *sys.orig_argv[1:]])


def write_json(path: Path, report: Mapping[str, Any]) -> None:
    """Write ``report`` to ``path`` as indented JSON, creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


def make_logger(prefix: str, *, enabled: bool = True) -> Callable[[str], None]:
    """A progress printer to stderr, each line tagged ``[prefix]``; silent when not ``enabled`` (other ranks)."""

    def log(message: str) -> None:
        if enabled:
            print(f"[{prefix}] {message}", file=sys.stderr, flush=True)

    return log


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> list[str]:
    """A Markdown table's lines: header, rule (``align``: ``l``/``r`` per column), one line per row.

    Cells are not padded, so a row reads ``| name | ...`` and can be found by its first cell. Plain-text
    tables go through ``ckpt_wrapper.table.format_table``.

    Raises:
        ValueError: if a row or ``align`` does not have one entry per header.

    Example:
        >>> from ckpt_wrapper.tools.benchkit import markdown_table
        >>> print("\\n".join(markdown_table(["name", "ms"], [["none", 1.5]], align="lr")))
        | name | ms |
        | --- | ---: |
        | none | 1.5 |
    """
    align = align or "l" * len(headers)
    if len(align) != len(headers) or set(align) - {"l", "r"}:
        raise ValueError(f"align needs one of 'l'/'r' per column ({len(headers)}), got {align!r}")
    bad = [len(row) for row in rows if len(row) != len(headers)]
    if bad:
        raise ValueError(f"every row needs {len(headers)} cells (one per header); got rows of {sorted(set(bad))}")
    rule = ["---:" if a == "r" else "---" for a in align]
    return ["| " + " | ".join(str(cell) for cell in row) + " |" for row in (headers, rule, *rows)]


def heading(title: str, report: Mapping[str, Any]) -> str:
    """A report's first line: ``### title: device (name), torch X, N threads, dtype``."""
    env, model = report["environment"], report["model"]
    return (f"### {title}: {env['device']} ({env['device_name']}), torch {env['torch']}, {env['threads']} threads, "
            f"{model['dtype'].removeprefix('torch.')}")


def model_line(report: Mapping[str, Any]) -> str:
    """The workload sentence of a report: ``Model `small`: 8 blocks, width 256, ..., batch 4.``"""
    model = report["model"]
    return (f"Model `{model['preset']}`: {model['n_layer']} blocks, width {model['d_model']}, {model['n_head']} heads, "
            f"sequence {model['seq_len']}, vocabulary {model['vocab_size']}, batch {model['batch']}.")


def rounds_sentence(report: Mapping[str, Any]) -> str:
    """How the scripts' figures were taken: ``N rounds (median) after W warm-up, S step(s) per round``."""
    return (f"{report['rounds']} rounds (median) after {report['warmup']} warm-up, "
            f"{report['steps_per_round']} step(s) per round")


def malloc_note(report: Mapping[str, Any]) -> str:
    """``.`` on CUDA, else ``; malloc env set.`` (or ``NOT set``): how a CPU sentence ends."""
    env = report["environment"]
    if env["device"].startswith("cuda"):
        return "."
    return f"; malloc env {'set' if env['malloc_env_set'] else 'NOT set'}."
