"""What ``scripts/bench/offload.py`` measures with: its configurations, the engines' counters, one timed call.

A step is forward + ``lm_loss`` + backward + ``zero_grad``. On CUDA a timed call records events around
forward and backward of each step and reads memory as ``max_memory_allocated`` and as the allocator's
peak *active* bytes (``memory_stats()["active_bytes.all.peak"]``), both above what was in use before it.
Active also counts blocks Python has freed whose recorded side-stream copy (``record_stream``) has not
finished, which the allocator cannot hand out yet; ``max_memory_allocated`` drops them at once and so
understates an offloading step. On CPU: ``time.perf_counter``, and (``held_cpu``) the bytes held after
forward plus the engine's host buffers in use. ``host_link`` measures pinned copies each way.

Imported by ``offload.py`` and ``offload_report.py`` beside it (running a script puts its folder on
``sys.path``).
"""

from __future__ import annotations

import dataclasses
import gc
import statistics
import time
from typing import Any

import torch
from torch import nn

import ckpt_wrapper
from ckpt_wrapper.measure import held_after_forward
from ckpt_wrapper.testing.data import lm_loss
from ckpt_wrapper.tools import benchkit

__all__ = ["Config", "H2DCounter", "Sample", "Subject", "engines", "held_cpu", "host_link", "timed"]


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



def engines(model: nn.Module) -> list[ckpt_wrapper.OffloadEngine]:
    """The distinct offload engines the model's wrapped blocks use (one per apply call)."""
    found: dict[int, ckpt_wrapper.OffloadEngine] = {}
    for module in model.modules():
        if not isinstance(module, ckpt_wrapper.ActivationWrapper):
            continue
        engine = getattr(module, "offload_engine", None)
        if engine is not None:
            found[id(engine)] = engine
    return list(found.values())



class H2DCounter:
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
        """Count from zero again."""
        if self.bytes is not None:
            self.bytes = 0



@dataclasses.dataclass
class Subject:
    """A configuration, its model and what observes it."""

    config: Config
    """What it is."""
    model: nn.Module
    """Its wrapped copy of the model."""
    engines: list[ckpt_wrapper.OffloadEngine]
    """The distinct offload engines its wrappers use."""
    counters: list[H2DCounter]
    """One per engine."""

    def reset_counters(self) -> None:
        """Zero the engines' stats and the H2D counters before a timed call."""
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



@dataclasses.dataclass(frozen=True, kw_only=True)
class Sample(benchkit.Timing):
    """One timed call of one configuration: ``benchkit.Timing`` with a forward/backward split and active bytes."""

    forward_s: float
    """Seconds of forward (and loss) per step."""
    wall_s: float
    """Host wall-clock seconds per step (CUDA: until the whole device, side streams included, is done)."""
    peak_active_bytes: int | None = None
    """CUDA: peak of the allocator's active bytes above the start, which also counts memory freed by Python
    but not yet reusable because a side-stream copy recorded on it (``record_stream``) has not finished."""



def timed(subject: Subject, inputs: torch.Tensor, targets: torch.Tensor, steps: int, device: torch.device) -> Sample:
    """``steps`` steps of forward + loss + backward + zero_grad, timed per step with a forward/backward split."""
    model = subject.model
    gc.collect()
    subject.reset_counters()
    if device.type == "cuda":
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
            loss = lm_loss(model(inputs), targets)
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
        return Sample(seconds=step_s, forward_s=forward_s, wall_s=wall,
                      peak_bytes=torch.cuda.max_memory_allocated(device) - start_bytes, peak_active_bytes=peak_active)
    forward_s = 0.0
    begin = time.perf_counter()
    for _ in range(steps):
        start = time.perf_counter()
        loss = lm_loss(model(inputs), targets)
        forward_s += time.perf_counter() - start
        loss.backward()
        model.zero_grad(set_to_none=True)
    elapsed = (time.perf_counter() - begin) / steps
    return Sample(seconds=elapsed, forward_s=forward_s / steps, wall_s=elapsed)



def host_link(device: torch.device, nbytes: int, repeats: int) -> dict[str, Any]:
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



def held_cpu(subject: Subject, inputs: torch.Tensor) -> dict[str, int]:
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

