"""The planner's default cost: step time modelled from counts, so the same inputs give the same plan.

A step's time is modelled as ``flops * seconds_per_flop + bytes * seconds_per_byte + ops * seconds_per_op``
plus ``mode_ops * seconds_per_mode_op`` for ops that pass through a Python dispatch mode (selective
checkpointing's policy). The counts come from ``ckpt_wrapper.timeline.StepRecorder`` and are exact; the
four constants are a ``Calibration``: measured once on a machine (``Calibration.measure``), or the
defaults per device type. The calibration a plan used is stored in its JSON, so a plan can be
re-derived, and two runs with the same inputs and calibration give byte-identical plans.

Example:
    >>> from ckpt_wrapper.planner.cost import Calibration, Counts
    >>> calibration = Calibration(seconds_per_flop=1e-11, seconds_per_byte=1e-10, seconds_per_op=1e-5,
    ...                           seconds_per_mode_op=3e-5)
    >>> calibration.seconds(Counts(flops=10**9, bytes=10**7, ops=100, mode_ops=0))
    0.012
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from typing import Any, NamedTuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["Calibration", "Counts", "DEFAULT_CALIBRATIONS"]


class Counts(NamedTuple):
    """What a step does, counted: the inputs of the cost model."""

    flops: int
    """FLOPs (matmuls, convolutions, attention)."""
    bytes: int
    """Bytes of every op's tensor inputs and outputs."""
    ops: int
    """Aten ops run."""
    mode_ops: int
    """Ops that also pass through a Python dispatch mode (selective checkpointing), forward and recompute."""

    def minus(self, other: Counts) -> Counts:
        """These counts less ``other``'s, each at least 0 (the extra over another strategy)."""
        return Counts(*(max(a - b, 0) for a, b in zip(self, other)))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Calibration:
    """The constants turning ``Counts`` into seconds, for one machine and device."""

    seconds_per_flop: float
    """Seconds per FLOP of a large matmul."""
    seconds_per_byte: float
    """Seconds per byte an elementwise op reads or writes."""
    seconds_per_op: float
    """Seconds of fixed cost per op (dispatch, launch)."""
    seconds_per_mode_op: float
    """Extra seconds per op run under a Python dispatch mode."""
    source: str = "default"
    """``default`` (the built-in constants) or where it was measured (``measured on cpu, 2 threads``)."""

    def seconds(self, counts: Counts) -> float:
        """The modelled seconds of ``counts``, rounded to the nanosecond (so JSON is stable across platforms)."""
        total = (counts.flops * self.seconds_per_flop + counts.bytes * self.seconds_per_byte
                 + counts.ops * self.seconds_per_op + counts.mode_ops * self.seconds_per_mode_op)
        return round(total, 9)

    def to_dict(self) -> dict[str, Any]:
        """The calibration as JSON-ready values."""
        return dataclasses.asdict(self)

    @classmethod
    def default(cls, device: torch.device | str) -> Calibration:
        """The built-in constants for ``device``'s type (CPU ones for any type without its own)."""
        kind = torch.device(device).type
        return DEFAULT_CALIBRATIONS.get(kind, DEFAULT_CALIBRATIONS["cpu"])

    @classmethod
    def measure(cls, device: torch.device | str = "cpu", *, repeats: int = 5) -> Calibration:
        """Measure the four constants on ``device`` with small fixed kernels (a second or so).

        Each figure is the least time of ``repeats`` runs (noise on a shared machine only adds).
        Measure once per machine and pass the result to ``plan(calibration=...)``.

        Example:
            >>> from ckpt_wrapper.planner.cost import Calibration
            >>> calibration = Calibration.measure("cpu", repeats=1)
            >>> calibration.seconds_per_flop > 0 and calibration.source.startswith("measured")
            True
        """
        device = torch.device(device)

        def least(fn: Any, n: int) -> float:
            best = float("inf")
            for _ in range(repeats):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                for _ in range(n):
                    fn()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                best = min(best, (time.perf_counter() - start) / n)
            return best

        small = torch.ones(1, device=device)
        per_op = least(lambda: small.add(1.0), 200)
        with _Passthrough():
            per_mode_op = max(least(lambda: small.add(1.0), 200) - per_op, 0.0)
        side = 1024 if device.type == "cuda" else 384
        a, b = torch.randn(side, side, device=device), torch.randn(side, side, device=device)
        per_flop = max(least(lambda: a @ b, 5) - per_op, 1e-9) / (2 * side**3)
        big = torch.randn(2**22 if device.type == "cuda" else 2**20, device=device)
        per_byte = max(least(lambda: big.mul(2.0), 5) - per_op, 1e-9) / (2 * big.numel() * big.element_size())
        threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
        return cls(seconds_per_flop=per_flop, seconds_per_byte=per_byte, seconds_per_op=per_op,
                   seconds_per_mode_op=per_mode_op, source=f"measured on {device.type}{threads}")

    def fitted(self, counts: Counts, seconds: float) -> Calibration:
        """This calibration with ``seconds_per_flop`` set so that ``counts`` model to ``seconds``.

        The bytes, op and mode-op constants stay; the FLOP rate absorbs what a small kernel does not see
        of a real step (its matmul shapes, cold caches, a machine's sustained clock).

        Raises:
            ValueError: if ``counts`` has no FLOPs, or its other terms alone already exceed ``seconds``.

        Example:
            >>> from ckpt_wrapper.planner.cost import Calibration, Counts
            >>> base = Calibration(seconds_per_flop=1e-11, seconds_per_byte=0.0, seconds_per_op=0.0, seconds_per_mode_op=0.0)
            >>> round(base.fitted(Counts(flops=10**9, bytes=0, ops=0, mode_ops=0), 0.02).seconds_per_flop, 15)
            2e-11
        """
        rest = counts.bytes * self.seconds_per_byte + counts.ops * self.seconds_per_op + counts.mode_ops * self.seconds_per_mode_op
        if not math.isfinite(seconds):
            raise ValueError(f"cannot fit the FLOP rate to a measured {seconds} s; expected a finite measured time")
        if counts.flops <= 0 or seconds <= rest:
            raise ValueError(f"cannot fit the FLOP rate: the step counts {counts.flops} FLOPs and its bytes and ops "
                             f"alone model to {rest:.6f} s against a measured {seconds:.6f} s; expected FLOPs and a "
                             "measured time above the rest (time a larger step, or keep the calibration as it is)")
        return dataclasses.replace(self, seconds_per_flop=(seconds - rest) / counts.flops,
                                   source=f"{self.source}; FLOP rate fitted to a {seconds * 1e3:.4f} ms step")

    @classmethod
    def fit(cls, model: torch.nn.Module, batch: Any, *, device: torch.device | str | None = None,
            base: Calibration | None = None, repeats: int = 5) -> Calibration:
        """Calibrate on ``model``'s own step: ``base``'s constants, the FLOP rate fitted to the measured step.

        ``base`` defaults to ``Calibration.measure(device)``. The forward and backward ``plan`` models (the
        model called on ``batch``, the sum of its floating outputs, backward) is recorded once for its
        counts and timed ``repeats`` times after one untimed run; the median is the time fitted. The model
        is left as it was (gradients, buffers, train/eval modes, RNG states). Measure once per model, batch
        shape and machine, and pass the result to ``plan(calibration=...)``: the predicted seconds then
        start from this machine's real step, and the plan stays deterministic given it.

        Raises:
            TypeError: if ``repeats`` is not an int or ``base`` not a ``Calibration``.
            ValueError: if ``repeats`` < 1, ``device`` is not the parameters' device type, the model's output
                needs no gradient, or the step cannot be fitted (``fitted``).

        Example:
            >>> import torch
            >>> from ckpt_wrapper.planner.cost import Calibration
            >>> model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.GELU(), torch.nn.Linear(256, 256))
            >>> fitted = Calibration.fit(model, torch.randn(64, 256), repeats=1)
            >>> fitted.seconds_per_flop > 0 and "fitted" in fitted.source
            True
        """
        from ckpt_wrapper.planner.profile import call_model, model_kept, scalar_of, wall_seconds
        from ckpt_wrapper.timeline import StepRecorder

        if not isinstance(repeats, int) or isinstance(repeats, bool):
            raise TypeError(f"repeats must be an int >= 1, got {type(repeats).__name__} {repeats!r}")
        if repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}")
        if base is not None and not isinstance(base, Calibration):
            raise TypeError(f"base must be a Calibration (Calibration.measure(device)) or None, got "
                            f"{type(base).__name__}")
        first = next(iter(model.parameters()), None)
        if device is None:
            device = first.device if first is not None else torch.device("cpu")
        device = torch.device(device)
        if first is not None and first.device.type != device.type:
            raise ValueError(f"Calibration.fit: device {device.type} given, but the model's parameters are on "
                             f"{first.device.type}; expected the device the model runs on (pass device=None, or move "
                             "the model there first)")
        base = cls.measure(device) if base is None else base
        grads = {p: p.grad for p in model.parameters()}

        def step() -> None:
            scalar_of(call_model(model, batch)).backward()
            for p in grads:
                p.grad = None

        try:
            with model_kept(model):
                for p in grads:
                    p.grad = None
                with StepRecorder(exclude=list(model.parameters()), device=device) as recorder:
                    loss = scalar_of(call_model(model, batch))
                    if not isinstance(loss, torch.Tensor) or not loss.requires_grad:
                        raise ValueError(f"Calibration.fit: {type(model).__name__} called on the batch gave no "
                                         "floating-point output that requires grad, so there is no backward to time; "
                                         "expected a model with trainable parameters, called with grad enabled")
                    loss.backward()
                    del loss
                counts = Counts(recorder.flops, recorder.bytes_touched, len(recorder.ops), 0)
                step()
                seconds = statistics.median(wall_seconds(step, device, repeats))
        finally:
            for p, g in grads.items():
                p.grad = g
        return base.fitted(counts, seconds)


class _Passthrough(TorchDispatchMode):
    """A dispatch mode that does nothing: what any Python policy mode costs per op, at least."""

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        return func(*args, **(kwargs or {}))


DEFAULT_CALIBRATIONS: dict[str, Calibration] = {
    # Calibration.measure on the development machine (x86-64, fp32, 1 thread: 6-8e-11 s/FLOP, 1.8-4.7e-10
    # s/byte, 7-9e-6 s/op, 7-10e-5 s/mode op), the FLOP figure halved for the 2 threads of the CPU
    # reference workload. The ratios decide plans; the absolute values only the predicted seconds.
    "cpu": Calibration(seconds_per_flop=3.5e-11, seconds_per_byte=2.0e-10, seconds_per_op=8.0e-6,
                       seconds_per_mode_op=8.0e-5, source="default"),
    # An H100/H200-class GPU (dense fp32/tf32 matmul throughput, HBM bandwidth, kernel launch).
    "cuda": Calibration(seconds_per_flop=2.0e-14, seconds_per_byte=4.0e-13, seconds_per_op=6.0e-6,
                        seconds_per_mode_op=2.5e-5, source="default"),
}
"""The built-in calibrations by device type, used when ``plan`` is given none."""
