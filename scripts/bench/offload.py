"""Offload: ckpt_wrapper's offload against PyTorch's ``offload_wrapper``, checkpointing, and nothing.

One GPT-style decoder (fixed-seed weights, one copy per configuration) runs forward + cross-entropy +
backward in every configuration, interleaved round by round in one process (the order rotates each
round), after warm-up rounds; step time is the median over rounds. Configurations:

- ``none``: no checkpointing, no offload.
- ``torch_offload``: PyTorch's private ``offload_wrapper`` (``save_on_cpu(pin_memory=True)``) on every
  block, through PyTorch's ``apply_activation_checkpointing``.
- ``offload``: ``ckpt_wrapper.offload_wrapper`` on every block, through one
  ``apply_activation_checkpointing`` call (so every block shares one engine).
- ``offload_first_N``: ``offload_wrapper`` on ``first_n(N, by_class(Block))``, for N in ``--first-n``.
- ``offload_all_but_last_K``: ``offload_wrapper`` on ``all_but_last(K, by_class(Block))``, for K in
  ``--all-but-last``.
- ``checkpoint``: ``ckpt_wrapper.checkpoint_wrapper`` on every block.
- ``checkpoint_offload``: ``checkpoint_wrapper(block, offload=True)`` on every block: checkpointing, and
  what the checkpoint still saves (each block's input) kept in host memory.

Reported per configuration: median step time (CUDA events on a GPU, ``time.perf_counter`` on CPU) and
its forward / backward split, the ratio to ``none``; memory: on CUDA the peak during a step above what
was in use before it, after a ``reset_peak_memory_stats``, both as ``max_memory_allocated`` and as the
allocator's peak *active* bytes (``memory_stats()["active_bytes.all.peak"]``). Active also counts blocks
Python has freed whose recorded side-stream copy (``record_stream``) has not finished, which the allocator
cannot hand out yet; ``max_memory_allocated`` drops them at once and so understates an offloading step.
Memory drops and goals use active. On CPU: the bytes held after forward
(``ckpt_wrapper.measure.held_after_forward``) plus the engine's host buffers in use (on CPU the "host"
copies live in the same memory, so offload frees nothing there). For ckpt_wrapper's
configurations also the engine's counters per step: bytes and storages copied out, prefetches,
on-demand restores, bytes copied back, host pool size.

On CUDA the script also measures the host link (a pinned-buffer copy each way, timed with events) and
reports the transfer bound of every-block offload beside its time:

    bound = max(F, D / bw_d2h) + max(B, D / bw_h2d)

with D the bytes the engine copies out per step, F and B the forward and backward time of ``none``.
It is the fastest a step could be if every copy ran at link speed and hid entirely behind compute of
its own phase, given that forward's copies out cannot overlap backward's copies in (backward first
needs the last block's tensors, the last to be copied out). The figure is ``offload`` step / bound.

Goals judged on CUDA, on the GPU reference workload (issue; DESIGN.md, "Measuring"):
- ``offload`` at least 2x faster than ``torch_offload`` at equal or lower peak, and within 15% of the
  transfer bound (``offload`` / bound <= 1.15);
- some ``offload_first_N`` at most 1.03x ``none`` while its peak drops by the bytes it offloads
  (drop / bytes copied >= 0.95);
- ``checkpoint_offload`` at most 1.01x ``checkpoint`` with a lower peak than ``checkpoint``.

On CPU the script runs ckpt_wrapper's offload with ``cpu_copy=True`` (copies into separate host buffers)
so the copy path is exercised: its figures measure bookkeeping plus memcpy, not GPU overlap, and judge
none of the goals. It re-executes itself with ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736``
when they are not set, and uses 2 threads (DESIGN.md, "Measuring").

Usage:
    # GPU reference workload (models.GPU_REFERENCE, batch 4, bf16), the default on a CUDA machine:
    python scripts/bench/offload.py --rounds 20 --warmup 3 --out bench-results/offload-gpu.json
    # CPU, small block stack (8 blocks, width 256, sequence 128, batch 4), copies with cpu_copy=True:
    python scripts/bench/offload.py --rounds 20
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import gc
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    apply_activation_checkpointing as torch_apply_activation_checkpointing,
)
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import offload_wrapper as torch_offload_wrapper

import ckpt_wrapper
from ckpt_wrapper.testing import models
from ckpt_wrapper.measure import held_after_forward

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, also when loaded by path rather than run
import _common  # noqa: E402

GROUPS = ("torch_offload", "offload", "first_n", "all_but_last", "checkpoint", "checkpoint_offload")
_MiB = 2**20

# The goals; judged on CUDA only.
_GOAL_SPEEDUP_VS_TORCH = 2.0
_GOAL_BOUND_RATIO = 1.15
_GOAL_FIRST_N_TIME = 1.03
_GOAL_FIRST_N_DROP = 0.95  # peak drop / bytes copied out
_GOAL_CKPT_OFFLOAD_TIME = 1.01

_log = _common.make_logger("offload")


def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Step time, peak memory and bytes moved of ckpt_wrapper's offload against PyTorch's "
        "offload_wrapper, checkpointing and no checkpointing, interleaved in one process.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _common.add_run_arguments(parser, rounds=20, warmup=3)
    _common.add_model_arguments(parser)
    parser.add_argument(
        "--configs", default=",".join(GROUPS),
        help=f"comma-separated configuration groups to run besides 'none' (always run): {', '.join(GROUPS)}",
    )
    parser.add_argument(
        "--first-n", type=_int_list, default=None,
        help="comma-separated N for offload_first_N ('' for none); default n_layer//8, n_layer//4, n_layer//2, "
        "3*n_layer//4 (at least 1, duplicates dropped)",
    )
    parser.add_argument(
        "--all-but-last", type=_int_list, default="1,2",
        help="comma-separated K for offload_all_but_last_K ('' for none)",
    )
    parser.add_argument(
        "--min-bytes", type=int, default=None,
        help="OffloadOptions.min_bytes for ckpt_wrapper's configurations; default the library's (64 KiB)",
    )
    parser.add_argument(
        "--max-in-flight", type=int, default=None,
        help="OffloadOptions.max_in_flight for ckpt_wrapper's configurations; default the library's",
    )
    parser.add_argument("--no-prefetch", action="store_true", help="OffloadOptions(prefetch=False)")
    parser.add_argument(
        "--no-cpu-copy", action="store_true",
        help="on CPU, run ckpt_wrapper's offload without cpu_copy=True (then it copies nothing: a no-op that warns)",
    )
    parser.add_argument(
        "--link-mib", type=int, default=256, help="CUDA: size of the pinned-buffer copy that measures the host link"
    )
    parser.add_argument("--link-repeats", type=int, default=10, help="CUDA: timed copies each way (median)")
    parser.add_argument(
        "--empty-cache", action="store_true",
        help="CUDA: torch.cuda.empty_cache() before each configuration's step (outside the timing). Off by default: "
        "the next step then pays cudaMalloc inside the timing, more for configurations with a higher peak",
    )
    parser.add_argument(
        "--no-memory", action="store_true",
        help="CPU: skip held_after_forward (four extra forwards per configuration)",
    )
    _common.add_reexec_argument(parser)
    parser.add_argument("--out", type=Path, default=Path("bench-results/offload.json"), help="JSON results file")
    args = parser.parse_args(argv)
    _common.check_run_arguments(parser, args)
    groups = [g.strip() for g in args.configs.split(",") if g.strip()]
    unknown = sorted(set(groups) - set(GROUPS))
    if unknown:
        parser.error(f"--configs: unknown group(s) {unknown}; choose from {', '.join(GROUPS)}")
    args.groups = [g for g in GROUPS if g in groups]
    for flag in ("link_mib", "link_repeats"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    return args


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """One configuration: how its copy of the model is wrapped."""

    name: str
    """Label in tables and JSON."""
    kind: str
    """Its group: none, torch_offload, offload, first_n, all_but_last, checkpoint, checkpoint_offload."""
    offloaded: int
    """Blocks whose saved tensors (or, for checkpoint_offload, inputs) go to host memory."""
    checkpointed: int
    """Blocks that recompute in backward."""


def _plan(args: argparse.Namespace, n_layer: int) -> list[Config]:
    """The configurations to run, in table order."""
    plan = [Config(name="none", kind="none", offloaded=0, checkpointed=0)]
    if "torch_offload" in args.groups:
        plan.append(Config(name="torch_offload", kind="torch_offload", offloaded=n_layer, checkpointed=0))
    if "offload" in args.groups:
        plan.append(Config(name="offload", kind="offload", offloaded=n_layer, checkpointed=0))
    if "first_n" in args.groups:
        wanted = args.first_n
        if wanted is None:
            wanted = [max(1, n_layer // 8), max(1, n_layer // 4), max(1, n_layer // 2), max(1, 3 * n_layer // 4)]
        for n in sorted(set(wanted)):
            if not 1 <= n <= n_layer:
                raise ValueError(f"--first-n: N must be in 1..{n_layer} (the model's blocks), got {n}")
            plan.append(Config(name=f"offload_first_{n}", kind="first_n", offloaded=n, checkpointed=0))
    if "all_but_last" in args.groups:
        for k in sorted(set(args.all_but_last)):
            if not 0 <= k < n_layer:
                raise ValueError(f"--all-but-last: K must be in 0..{n_layer - 1}, got {k}")
            name = f"offload_all_but_last_{k}"
            plan.append(Config(name=name, kind="all_but_last", offloaded=n_layer - k, checkpointed=0))
    if "checkpoint" in args.groups:
        plan.append(Config(name="checkpoint", kind="checkpoint", offloaded=0, checkpointed=n_layer))
    if "checkpoint_offload" in args.groups:
        plan.append(
            Config(name="checkpoint_offload", kind="checkpoint_offload", offloaded=n_layer, checkpointed=n_layer)
        )
    return plan


def _offload_options(args: argparse.Namespace, run: _common.Run) -> ckpt_wrapper.OffloadOptions:
    """Options for ckpt_wrapper's configurations: the library's defaults but for the flags given."""
    given: dict[str, Any] = {}
    if not run.cuda and not args.no_cpu_copy:
        given["cpu_copy"] = True  # on CPU, copy anyway: exercises the copy path (and frees nothing)
    if args.min_bytes is not None:
        given["min_bytes"] = args.min_bytes
    if args.max_in_flight is not None:
        given["max_in_flight"] = args.max_in_flight
    if args.no_prefetch:
        given["prefetch"] = False
    return ckpt_wrapper.OffloadOptions(**given)


def _build(config: Config, base: nn.Module, options: ckpt_wrapper.OffloadOptions) -> nn.Module:
    """A copy of ``base`` wrapped as ``config`` says (``none`` is ``base`` itself)."""
    if config.kind == "none":
        return base
    model = copy.deepcopy(base)
    blocks = ckpt_wrapper.by_class(models.Block)
    if config.kind == "torch_offload":
        torch_apply_activation_checkpointing(
            model, checkpoint_wrapper_fn=torch_offload_wrapper, check_fn=lambda m: isinstance(m, models.Block)
        )
        return model
    offload = functools.partial(ckpt_wrapper.offload_wrapper, **dataclasses.asdict(options))
    fn, select = {
        "offload": (offload, blocks),
        "first_n": (offload, ckpt_wrapper.first_n(config.offloaded, blocks)),
        "all_but_last": (offload, ckpt_wrapper.all_but_last(model.config.n_layer - config.offloaded, blocks)),
        "checkpoint": (ckpt_wrapper.checkpoint_wrapper, blocks),
        "checkpoint_offload": (functools.partial(ckpt_wrapper.checkpoint_wrapper, offload=options), blocks),
    }[config.kind]
    wrapped = ckpt_wrapper.apply_activation_checkpointing(model, checkpoint_wrapper_fn=fn, check_fn=select)
    expected = max(config.offloaded, config.checkpointed)
    if len(wrapped) != expected:
        raise RuntimeError(f"{config.name}: wrapped {wrapped}, expected {expected} blocks")
    return model


def _engines(model: nn.Module) -> list[ckpt_wrapper.OffloadEngine]:
    """The distinct offload engines the model's wrapped blocks use (one per apply call)."""
    found: dict[int, ckpt_wrapper.OffloadEngine] = {}
    for module in model.modules():
        if not isinstance(module, ckpt_wrapper.ActivationWrapper):
            continue
        engine = getattr(module, "offload_engine", None)
        if engine is not None:
            found[id(engine)] = engine
    return list(found.values())


class _H2DCounter:
    """Bytes an engine copies back to the device (prefetches and restores), which its stats count only as copies.

    A diagnostic that wraps the engine's private ``_copy_in`` on the instance; where that name is gone
    the count is None and nothing else changes.
    """

    def __init__(self, engine: ckpt_wrapper.OffloadEngine) -> None:
        self.bytes: int | None = None
        copy_in = getattr(engine, "_copy_in", None)
        if copy_in is None:
            return
        self.bytes = 0

        def counting(entry: Any, *args: Any, **kwargs: Any) -> Any:
            self.bytes += getattr(entry, "nbytes", 0)
            return copy_in(entry, *args, **kwargs)

        engine._copy_in = counting  # type: ignore[method-assign]

    def reset(self) -> None:
        if self.bytes is not None:
            self.bytes = 0


@dataclasses.dataclass
class Subject:
    """A configuration, its model and what observes it."""

    config: Config
    model: nn.Module
    engines: list[ckpt_wrapper.OffloadEngine]
    counters: list[_H2DCounter]

    def reset_counters(self) -> None:
        for engine in self.engines:
            engine.stats.reset()
        for counter in self.counters:
            counter.reset()

    def engine_figures(self, steps: int) -> dict[str, Any] | None:
        """The engines' counters per step, summed over engines; None without an engine."""
        if not self.engines:
            return None
        totals: dict[str, Any] = {}
        for field in dataclasses.fields(ckpt_wrapper.OffloadStats):
            totals[field.name] = sum(getattr(e.stats, field.name) for e in self.engines) / steps
        h2d = [c.bytes for c in self.counters]
        totals["h2d_bytes"] = None if any(b is None for b in h2d) else sum(h2d) / steps
        totals["host_pool_bytes"] = sum(e.pool.total_bytes for e in self.engines)
        return totals


@dataclasses.dataclass
class Sample:
    """One timed call of one configuration."""

    step_s: float
    forward_s: float
    wall_s: float
    peak_bytes: int | None
    """CUDA: peak of ``memory_allocated`` above the start."""
    peak_active_bytes: int | None
    """CUDA: peak of the allocator's active bytes above the start, which also counts memory freed by Python
    but not yet reusable because a side-stream copy recorded on it (``record_stream``) has not finished."""


def _loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = model(inputs)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def _timed(subject: Subject, inputs: torch.Tensor, targets: torch.Tensor, steps: int, run: _common.Run) -> Sample:
    """``steps`` steps of forward + loss + backward + zero_grad, timed per step with a forward/backward split."""
    model, device = subject.model, run.device
    gc.collect()
    subject.reset_counters()
    if run.cuda:
        torch.cuda.synchronize(device)
        # An allocation makes the allocator retire blocks whose recorded stream uses have finished, so
        # "active" below starts from what is really in use.
        torch.empty(1, device=device)
        start_bytes = torch.cuda.memory_allocated(device)
        start_active = torch.cuda.memory_stats(device).get("active_bytes.all.current", 0)
        torch.cuda.reset_peak_memory_stats(device)
        marks = [tuple(torch.cuda.Event(enable_timing=True) for _ in range(3)) for _ in range(steps)]
        begin = time.perf_counter()
        for start, middle, end in marks:
            start.record()
            loss = _loss(model, inputs, targets)
            middle.record()
            loss.backward()
            model.zero_grad(set_to_none=True)
            end.record()
        del loss
        # The whole device, side streams included: the copy streams' work belongs to the step. (The
        # compute stream already waits for every copy back, and those wait for the copies out.)
        torch.cuda.synchronize(device)
        wall = (time.perf_counter() - begin) / steps
        step_s = sum(s.elapsed_time(e) for s, _, e in marks) / 1e3 / steps
        forward_s = sum(s.elapsed_time(m) for s, m, _ in marks) / 1e3 / steps
        peak_active = torch.cuda.memory_stats(device).get("active_bytes.all.peak", 0) - start_active
        return Sample(step_s, forward_s, wall, torch.cuda.max_memory_allocated(device) - start_bytes, peak_active)
    forward_s = 0.0
    begin = time.perf_counter()
    for _ in range(steps):
        start = time.perf_counter()
        loss = _loss(model, inputs, targets)
        forward_s += time.perf_counter() - start
        loss.backward()
        model.zero_grad(set_to_none=True)
    elapsed = (time.perf_counter() - begin) / steps
    return Sample(elapsed, forward_s / steps, elapsed, None, None)


def _host_link(device: torch.device, nbytes: int, repeats: int) -> dict[str, Any]:
    """Pinned host <-> device copy bandwidth, each way alone and both at once, on side streams like the engine's."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.ones(nbytes, dtype=torch.uint8, device=device)
    host.fill_(1)
    result: dict[str, Any] = {"bytes": nbytes, "repeats": repeats}
    stream = torch.cuda.Stream(device)
    torch.cuda.synchronize(device)
    for direction, dst, src in (("d2h", host, dev), ("h2d", dev, host)):
        seconds = []
        with torch.cuda.stream(stream):
            for index in range(repeats + 1):  # the first is a warm-up
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record(stream)
                dst.copy_(src, non_blocking=True)
                end.record(stream)
                end.synchronize()
                if index:
                    seconds.append(start.elapsed_time(end) / 1e3)
        median = statistics.median(seconds)
        result[direction] = {"median_s": median, "min_s": min(seconds), "bytes_per_s": nbytes / median}
    # Both ways at once (forward's copies out can meet backward's prefetches in a pipelined engine).
    host_in = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev_out = torch.empty(nbytes, dtype=torch.uint8, device=device)
    other = torch.cuda.Stream(device)
    duplex: dict[str, list[float]] = {"d2h": [], "h2d": []}
    for index in range(repeats + 1):
        torch.cuda.synchronize(device)
        events = {}
        for direction, s, dst, src in (("d2h", stream, host, dev), ("h2d", other, dev_out, host_in)):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            with torch.cuda.stream(s):
                start.record(s)
                dst.copy_(src, non_blocking=True)
                end.record(s)
            events[direction] = (start, end)
        torch.cuda.synchronize(device)
        if index:
            for direction, (start, end) in events.items():
                duplex[direction].append(start.elapsed_time(end) / 1e3)
    result["duplex"] = {
        d: {"median_s": statistics.median(v), "bytes_per_s": nbytes / statistics.median(v)} for d, v in duplex.items()
    }
    del host, dev, host_in, dev_out
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    return result


def _run_rounds(
    subjects: list[Subject], inputs: torch.Tensor, targets: torch.Tensor, args: argparse.Namespace, run: _common.Run
) -> tuple[dict[str, list[Sample]], dict[str, dict[str, Any] | None]]:
    """Warm-up, then timed rounds; every round runs each configuration once, in a rotated order.

    Returns the timed samples and each configuration's engine counters from its last timed call.
    """
    samples: dict[str, list[Sample]] = {s.config.name: [] for s in subjects}
    figures: dict[str, dict[str, Any] | None] = {s.config.name: None for s in subjects}
    began = time.perf_counter()
    for index in range(args.warmup + args.rounds):
        shift = index % len(subjects)
        order = subjects[shift:] + subjects[:shift]
        this_round: dict[str, float] = {}
        for subject in order:
            if run.cuda and args.empty_cache:
                torch.cuda.empty_cache()
            sample = _timed(subject, inputs, targets, args.steps, run)
            this_round[subject.config.name] = sample.step_s
            if index >= args.warmup:
                samples[subject.config.name].append(sample)
                figures[subject.config.name] = subject.engine_figures(args.steps)
        warm = index < args.warmup
        label = f"warm-up {index + 1}/{args.warmup}" if warm else f"round {index - args.warmup + 1}/{args.rounds}"
        _log(
            f"{label} ({time.perf_counter() - began:.0f} s): "
            + ", ".join(f"{s.config.name} {this_round[s.config.name] * 1e3:.1f} ms" for s in subjects)
        )
    return samples, figures


def _held_cpu(subject: Subject, inputs: torch.Tensor) -> dict[str, int]:
    """CPU memory after forward: allocator bytes forward leaves alive, and the engines' host buffers in use.

    The engines' buffers were allocated (and pooled) by earlier steps, so the allocator does not count
    them as new; adding what is in use after forward gives what the activations really occupy.
    """
    in_use = [0]

    def forward() -> torch.Tensor:
        output = subject.model(inputs)
        in_use[0] = sum(e.pool.in_use_bytes for e in subject.engines)
        return output

    held = held_after_forward(forward, device="cpu")
    return {"held_after_forward_bytes": held, "host_buffers_in_use_bytes": in_use[0], "total_bytes": held + in_use[0]}


def _summarize(
    subjects: list[Subject],
    samples: dict[str, list[Sample]],
    figures: dict[str, dict[str, Any] | None],
    held: dict[str, dict[str, int] | None],
    link: dict[str, Any] | None,
) -> dict[str, dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}
    for subject in subjects:
        config = subject.config
        rows = samples[config.name]
        times = [s.step_s for s in rows]
        q1, q3 = _common.quartiles(times)
        forward = statistics.median(s.forward_s for s in rows)
        entry: dict[str, Any] = {
            "kind": config.kind,
            "blocks_offloaded": config.offloaded,
            "blocks_checkpointed": config.checkpointed,
            "median_s": statistics.median(times),
            "q1_s": q1,
            "q3_s": q3,
            "min_s": min(times),
            "times_s": times,
            "forward_median_s": forward,
            "backward_median_s": statistics.median(s.step_s - s.forward_s for s in rows),
            "wall_median_s": statistics.median(s.wall_s for s in rows),
            "engine_per_step": figures[config.name],
        }
        peaks = [s.peak_bytes for s in rows if s.peak_bytes is not None]
        if peaks:
            # The largest over rounds: a goal about staying under a peak is judged on its worst round.
            entry["peak_allocated_above_start_bytes"] = max(peaks)
            entry["peak_active_above_start_bytes"] = max(s.peak_active_bytes for s in rows)
            entry["peaks_allocated_bytes"] = peaks
            entry["peaks_active_bytes"] = [s.peak_active_bytes for s in rows]
        if held[config.name] is not None:
            entry["cpu_memory"] = held[config.name]
        engine = figures[config.name]
        if link is not None and engine is not None:
            entry["link_time_s"] = {
                "d2h": engine["copied_bytes"] / link["d2h"]["bytes_per_s"],
                "h2d": engine["copied_bytes"] / link["h2d"]["bytes_per_s"],
            }
        results[config.name] = entry
    none = results["none"]
    for entry in results.values():
        entry["ratio_to_none"] = entry["median_s"] / none["median_s"]
        peak = entry.get("peak_active_above_start_bytes")
        if peak is not None:
            entry["peak_drop_vs_none_bytes"] = none["peak_active_above_start_bytes"] - peak
            entry["peak_ratio_to_none"] = peak / none["peak_active_above_start_bytes"]
        elif "cpu_memory" in entry and "cpu_memory" in none:
            held = entry["cpu_memory"]["total_bytes"]
            entry["memory_drop_vs_none_bytes"] = none["cpu_memory"]["total_bytes"] - held
    return results


def _bound(results: dict[str, dict[str, Any]], link: dict[str, Any] | None) -> dict[str, Any] | None:
    """The transfer bound of every-block offload (see the module docstring), or None without link or offload."""
    offload = results.get("offload")
    if link is None or offload is None or not offload["engine_per_step"]:
        return None
    none = results["none"]
    copied = offload["engine_per_step"]["copied_bytes"]
    d2h = copied / link["d2h"]["bytes_per_s"]
    h2d = copied / link["h2d"]["bytes_per_s"]
    bound = max(none["forward_median_s"], d2h) + max(none["backward_median_s"], h2d)
    return {
        "copied_bytes": copied,
        "d2h_s": d2h,
        "h2d_s": h2d,
        "transfer_s": d2h + h2d,
        "none_forward_s": none["forward_median_s"],
        "none_backward_s": none["backward_median_s"],
        "bound_s": bound,
        "offload_s": offload["median_s"],
        "offload_over_bound": offload["median_s"] / bound,
        "exposed_over_transfer": (offload["median_s"] - none["median_s"]) / (d2h + h2d),
        "definition": "bound = max(F_none, D/bw_d2h) + max(B_none, D/bw_h2d), D = bytes copied out per step",
    }


def _goals(results: dict[str, dict[str, Any]], bound: dict[str, Any] | None, cuda: bool) -> dict[str, Any]:
    if not cuda:
        return {"note": "GPU goals; not judged on CPU (cpu_copy measures bookkeeping and memcpy, not overlap)"}
    goals: dict[str, Any] = {}
    offload, torch_offload = results.get("offload"), results.get("torch_offload")
    if offload and torch_offload:
        speedup = torch_offload["median_s"] / offload["median_s"]
        peak_ok = offload["peak_active_above_start_bytes"] <= torch_offload["peak_active_above_start_bytes"]
        goals["offload_vs_torch_offload"] = {
            "speedup": speedup,
            "peak_ratio": offload["peak_active_above_start_bytes"] / torch_offload["peak_active_above_start_bytes"],
            "goal": f"speedup >= {_GOAL_SPEEDUP_VS_TORCH}, peak ratio <= 1",
            "met": speedup >= _GOAL_SPEEDUP_VS_TORCH and peak_ok,
        }
    if bound is not None:
        goals["offload_vs_transfer_bound"] = {
            "ratio": bound["offload_over_bound"],
            "goal": f"<= {_GOAL_BOUND_RATIO}",
            "met": bound["offload_over_bound"] <= _GOAL_BOUND_RATIO,
        }
    first = {name: r for name, r in results.items() if r["kind"] == "first_n" and r["engine_per_step"]}
    if first:
        judged = {}
        for name, entry in first.items():
            copied = entry["engine_per_step"]["copied_bytes"]
            drop = entry["peak_drop_vs_none_bytes"] / copied if copied else 0.0
            judged[name] = {
                "ratio": entry["ratio_to_none"],
                "peak_drop_over_copied": drop,
                "met": entry["ratio_to_none"] <= _GOAL_FIRST_N_TIME and drop >= _GOAL_FIRST_N_DROP,
            }
        passing = [n for n, j in judged.items() if j["met"]]
        best = max(passing, key=lambda n: results[n]["peak_drop_vs_none_bytes"]) if passing else None
        goals["first_n_hidden"] = {
            "per_n": judged,
            "best": best,
            "goal": f"time / none <= {_GOAL_FIRST_N_TIME} and peak drop >= {_GOAL_FIRST_N_DROP} x bytes copied",
            "met": best is not None,
        }
    ckpt, ckpt_offload = results.get("checkpoint"), results.get("checkpoint_offload")
    if ckpt and ckpt_offload:
        ratio = ckpt_offload["median_s"] / ckpt["median_s"]
        lower = ckpt_offload["peak_active_above_start_bytes"] < ckpt["peak_active_above_start_bytes"]
        goals["checkpoint_offload_vs_checkpoint"] = {
            "ratio": ratio,
            "peak_drop_bytes": ckpt["peak_active_above_start_bytes"] - ckpt_offload["peak_active_above_start_bytes"],
            "goal": f"time <= {_GOAL_CKPT_OFFLOAD_TIME}x checkpoint, peak below checkpoint's",
            "met": ratio <= _GOAL_CKPT_OFFLOAD_TIME and lower,
        }
    return goals


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value / _MiB:.1f}"


def _markdown(report: dict[str, Any], cuda: bool) -> str:
    env, model, results = report["environment"], report["model"], report["results"]
    lines = [
        f"### Offload: {env['device']} ({env['device_name']}), torch {env['torch']}, {env['threads']} threads, "
        f"{model['dtype'].removeprefix('torch.')}",
        "",
        f"Model `{model['preset']}`: {model['n_layer']} blocks, width {model['d_model']}, {model['n_head']} heads, "
        f"sequence {model['seq_len']}, vocabulary {model['vocab_size']}, batch {model['batch']}. "
        f"{report['rounds']} rounds (median) after {report['warmup']} warm-up, {report['steps_per_round']} step(s) "
        f"per round. Offload options: `{report['offload_options']}`"
        + ("." if cuda else f"; malloc env {'set' if env['malloc_env_set'] else 'NOT set'}."),
        "",
    ]
    if not cuda:
        lines += [
            "**CPU: these figures measure the engine's bookkeeping plus memcpy (cpu_copy=True), not GPU overlap. "
            "Offload frees no memory on CPU; the GPU goals are not judged here.**",
            "",
        ]
    memory = "peak active MiB | peak allocated MiB" if cuda else "held after fwd + host buffers MiB"
    lines += [
        f"| configuration | offloaded / checkpointed blocks | step ms (median) | IQR ms | / none | fwd ms | bwd ms "
        f"| {memory} | drop vs none MiB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |" + (" ---: |" if cuda else "") + " ---: |",
    ]
    for name, entry in results.items():
        if cuda:
            mem = (
                f"{_mib(entry.get('peak_active_above_start_bytes'))} | "
                f"{_mib(entry.get('peak_allocated_above_start_bytes'))}"
            )
            drop = entry.get("peak_drop_vs_none_bytes")
        else:
            mem = _mib(entry["cpu_memory"]["total_bytes"] if "cpu_memory" in entry else None)
            drop = entry.get("memory_drop_vs_none_bytes")
        lines.append(
            f"| {name} | {entry['blocks_offloaded']} / {entry['blocks_checkpointed']} | "
            f"{entry['median_s'] * 1e3:.2f} | "
            f"{entry['q1_s'] * 1e3:.2f}-{entry['q3_s'] * 1e3:.2f} | {entry['ratio_to_none']:.3f} | "
            f"{entry['forward_median_s'] * 1e3:.2f} | {entry['backward_median_s'] * 1e3:.2f} | {mem} | {_mib(drop)} |"
        )
    if cuda:
        lines += [
            "",
            "Peaks are above what was allocated before the step, the largest over rounds. *Active* counts memory "
            "Python has freed but the allocator cannot reuse yet, because a side-stream copy recorded on it "
            "(`record_stream`) has not finished; *allocated* (`max_memory_allocated`) does not, so it understates "
            "an offloading step. Drops and goals use active.",
        ]
    engine_rows = [(n, e) for n, e in results.items() if e["engine_per_step"]]
    if engine_rows:
        lines += [
            "",
            "ckpt_wrapper engine, per step (copied = storages copied out; H2D = bytes copied back, prefetched or "
            "restored on demand" + ("; link ms = copied bytes at the measured link speed, D2H / H2D" if cuda else "")
            + "):",
            "",
            "| configuration | copied MiB | copies | shared | kept small | prefetched | restores | H2D MiB "
            + ("| link ms D2H / H2D " if cuda else "") + "| host pool MiB |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |" + (" ---: |" if cuda else "") + " ---: |",
        ]
        for name, entry in engine_rows:
            e = entry["engine_per_step"]
            link = (
                f" {entry['link_time_s']['d2h'] * 1e3:.1f} / {entry['link_time_s']['h2d'] * 1e3:.1f} |"
                if "link_time_s" in entry else ""
            )
            lines.append(
                f"| {name} | {_mib(e['copied_bytes'])} | {e['copies']:.0f} | {e['shared']:.0f} | "
                f"{e['kept_small']:.0f} | {e['prefetched']:.0f} | {e['restores']:.0f} | {_mib(e['h2d_bytes'])} |"
                f"{link} {_mib(e['host_pool_bytes'])} |"
            )
    link = report.get("host_link")
    if link:
        lines += [
            "",
            f"Host link (pinned, {link['bytes'] / _MiB:.0f} MiB copies, median of {link['repeats']}): "
            f"D2H {link['d2h']['bytes_per_s'] / 1e9:.1f} GB/s, H2D {link['h2d']['bytes_per_s'] / 1e9:.1f} GB/s; "
            f"both at once: D2H {link['duplex']['d2h']['bytes_per_s'] / 1e9:.1f} GB/s, "
            f"H2D {link['duplex']['h2d']['bytes_per_s'] / 1e9:.1f} GB/s.",
        ]
    bound = report.get("transfer_bound")
    if bound:
        lines += [
            "",
            f"Transfer bound of `offload` (every block): D = {bound['copied_bytes'] / 2**30:.2f} GiB copied out per "
            f"step; D/bw: D2H {bound['d2h_s'] * 1e3:.1f} ms, H2D {bound['h2d_s'] * 1e3:.1f} ms; `none` forward "
            f"{bound['none_forward_s'] * 1e3:.1f} ms, backward {bound['none_backward_s'] * 1e3:.1f} ms. "
            f"Bound = max(F, D/bw_d2h) + max(B, D/bw_h2d) = {bound['bound_s'] * 1e3:.1f} ms; `offload` "
            f"{bound['offload_s'] * 1e3:.1f} ms = **{bound['offload_over_bound']:.3f}x the bound**. "
            f"(Time above `none` / (D2H + H2D time): {bound['exposed_over_transfer']:.3f}.)",
        ]
    lines.append("")
    goals = report["goals"]
    if "note" in goals:
        lines.append(f"Goals: {goals['note']}.")
    for key, goal in goals.items():
        if key == "note":
            continue
        verdict = "met" if goal["met"] else "NOT met"
        if key == "offload_vs_torch_offload":
            detail = f"{goal['speedup']:.2f}x faster, peak {goal['peak_ratio']:.3f}x torch_offload's"
        elif key == "offload_vs_transfer_bound":
            detail = f"{goal['ratio']:.3f}x the bound"
        elif key == "first_n_hidden":
            detail = "; ".join(
                f"{n} {j['ratio']:.3f}x, peak drop {j['peak_drop_over_copied']:.2f}x copied"
                for n, j in goal["per_n"].items()
            ) + (f"; best {goal['best']}" if goal["best"] else "")
        else:
            detail = (
                f"{goal['ratio']:.4f}x checkpoint, peak {goal['peak_drop_bytes'] / _MiB:.1f} MiB below checkpoint's"
            )
        lines.append(f"Goal {key}: {detail} (goal {goal['goal']}): {verdict}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    run = _common.prepare_run(args, _log)  # on CPU without the malloc settings, re-executes and does not return
    preset, config = _common.model_config(args, run.cuda)
    environment = _common.environment(run)
    _log(
        f"{run.device} ({environment['device_name']}), torch {torch.__version__}, "
        f"{environment['threads']} threads, {run.dtype}"
    )
    _log(f"model {preset}: {config}, batch {args.batch}")
    if not run.cuda:
        _log("CPU: ckpt_wrapper offload runs with cpu_copy=True; figures are bookkeeping + memcpy, not GPU overlap")

    try:
        plan = _plan(args, config.n_layer)
    except ValueError as error:
        print(f"offload.py: error: {error}", file=sys.stderr)
        return 2
    options = _offload_options(args, run)

    link = None
    if run.cuda:
        link = _host_link(run.device, args.link_mib * _MiB, args.link_repeats)
        _log(
            f"host link: D2H {link['d2h']['bytes_per_s'] / 1e9:.1f} GB/s, "
            f"H2D {link['h2d']['bytes_per_s'] / 1e9:.1f} GB/s"
        )
    torch.manual_seed(args.seed)
    with torch.device(run.device):
        base = models.GPT(config).to(run.dtype)
    subjects = []
    for item in plan:
        model = _build(item, base, options)
        engines = _engines(model)
        subjects.append(Subject(item, model, engines, [_H2DCounter(e) for e in engines]))
    _log(f"configurations: {', '.join(s.config.name for s in subjects)}")
    inputs, targets = _common.make_batch(config, args.batch, args.seed, run.device)

    # Identical weights and inputs give the same loss in every configuration; a broken harness shows here.
    losses = {}
    for subject in subjects:
        loss = _loss(subject.model, inputs, targets)
        loss.backward()
        subject.model.zero_grad(set_to_none=True)
        losses[subject.config.name] = loss.item()
    _log("first-step losses: " + ", ".join(f"{name} {loss:.6f}" for name, loss in losses.items()))
    if max(losses.values()) - min(losses.values()) > 1e-3 * max(1.0, abs(losses["none"])):
        raise RuntimeError(f"configurations disagree on the loss ({losses}); the comparison would be meaningless")

    samples, figures = _run_rounds(subjects, inputs, targets, args, run)

    held: dict[str, dict[str, int] | None] = {s.config.name: None for s in subjects}
    if not run.cuda and not args.no_memory:
        for subject in subjects:
            held[subject.config.name] = _held_cpu(subject, inputs)
            total = held[subject.config.name]["total_bytes"]
            _log(f"held after forward + host buffers, {subject.config.name}: {total / _MiB:.1f} MiB")

    results = _summarize(subjects, samples, figures, held, link)
    bound = _bound(results, link)
    report = {
        "benchmark": "offload",
        "command": _common.command_line(),
        "environment": environment,
        "model": {"preset": preset, **dataclasses.asdict(config), "batch": args.batch, "dtype": str(run.dtype)},
        "offload_options": dataclasses.asdict(options),
        "rounds": args.rounds,
        "warmup": args.warmup,
        "steps_per_round": args.steps,
        "empty_cache": bool(run.cuda and args.empty_cache),
        "first_step_losses": losses,
        "host_link": link,
        "results": results,
        "transfer_bound": bound,
        "goals": _goals(results, bound, run.cuda),
        "note": None if run.cuda else "CPU: cpu_copy=True; figures measure bookkeeping + memcpy, not GPU overlap",
    }
    print(_markdown(report, run.cuda))
    _common.write_json(args.out, report)
    _log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
