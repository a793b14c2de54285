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

import copy
import dataclasses
import math
import statistics
import time
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ckpt_wrapper.log import get_logger
from ckpt_wrapper.planner.communication import COLLECTIVES, TERMS, Communication, shard_as_planned
from ckpt_wrapper.planner.memory import SHARDINGS, StaticMemory

__all__ = ["Calibration", "Counts", "DEFAULT_CALIBRATIONS"]

logger = get_logger(__name__)


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
    communication: dict[str, tuple[float, float]] = dataclasses.field(default_factory=dict, hash=False)
    """Per collective (``all_gather``, ``reduce_scatter``, ``all_reduce``, ``broadcast``) and for FSDP's copies
    (``copy``): seconds per call and seconds per byte each rank sends (``Communication.bus_bytes``; for
    ``copy`` per byte read and written). A collective without constants is not modelled; copies without
    them cost ``seconds_per_byte``. Measured with ``measure_communication`` on the group the model trains on."""

    def __post_init__(self) -> None:
        if not isinstance(self.communication, Mapping):
            raise ValueError(f"Calibration.communication must be a dict of collective -> (seconds per call, seconds "
                             f"per byte sent), got {type(self.communication).__name__}; pass {{}} for none")
        for collective, constants in self.communication.items():
            if (collective not in TERMS or not isinstance(constants, (tuple, list)) or len(constants) != 2
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
                               for v in constants)):
                raise ValueError(f"Calibration.communication[{collective!r}] = {constants!r}: expected a collective "
                                 f"of {list(TERMS)} mapped to (seconds per call, seconds per byte sent), both "
                                 "finite and >= 0; measure them with calibration.measure_communication()")
        object.__setattr__(self, "communication", {c: tuple(map(float, v)) for c, v in self.communication.items()})

    def seconds(self, counts: Counts) -> float:
        """The modelled seconds of ``counts``, rounded to the nanosecond (so JSON is stable across platforms)."""
        total = (counts.flops * self.seconds_per_flop + counts.bytes * self.seconds_per_byte
                 + counts.ops * self.seconds_per_op + counts.mode_ops * self.seconds_per_mode_op)
        return round(total, 9)

    def communication_seconds(self, communication: Communication) -> float:
        """The modelled seconds of a step's collectives and FSDP's copies around them, rounded to the
        nanosecond; 0 for a collective this calibration has no constants for.

        Example:
            >>> from ckpt_wrapper.planner.communication import Communication
            >>> from ckpt_wrapper.planner.cost import Calibration
            >>> calibration = Calibration(seconds_per_flop=0.0, seconds_per_byte=0.0, seconds_per_op=0.0,
            ...                           seconds_per_mode_op=0.0, communication={"all_reduce": (1e-3, 1e-9)})
            >>> comm = Communication(world_size=2, calls={"all_reduce": 2}, bytes={"all_reduce": 10**6})
            >>> calibration.communication_seconds(comm)  # 2 calls, each rank sends 2 * 1/2 * 1e6 bytes
            0.003
        """
        total = 0.0
        for term, calls in communication.calls.items():
            per_call, per_byte = self.communication.get(term, (0.0, self.seconds_per_byte if term == "copy" else 0.0))
            if calls:
                total += calls * per_call + communication.bus_bytes(term) * per_byte
        return round(total, 9)

    def to_dict(self) -> dict[str, Any]:
        """The calibration as JSON-ready values (each communication pair a list, as JSON reads it back)."""
        data = dataclasses.asdict(self)
        data["communication"] = {term: list(pair) for term, pair in self.communication.items()}
        return data

    @classmethod
    def default(cls, device: torch.device | str) -> Calibration:
        """The built-in constants for ``device``'s type (CPU ones for any type without its own)."""
        kind = torch.device(device).type
        return dataclasses.replace(DEFAULT_CALIBRATIONS.get(kind, DEFAULT_CALIBRATIONS["cpu"]))  # a copy: its dict too

    @classmethod
    def measure(cls, device: torch.device | str = "cpu", *, repeats: int = 5) -> Calibration:
        """Measure the four constants on ``device`` with small fixed kernels (a second or so).

        Each figure is the least time of ``repeats`` runs (noise on a shared machine only adds).
        Measure once per machine and pass the result to ``plan(calibration=...)``. Communication needs a
        process group: its constants stay the device's defaults until ``measure_communication``.

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
        generator = torch.Generator(device=device).manual_seed(0)  # the global RNG is the caller's, left as it was
        a, b = (torch.randn(side, side, device=device, generator=generator) for _ in range(2))
        per_flop = max(least(lambda: a @ b, 5) - per_op, 1e-9) / (2 * side**3)
        big = torch.randn(2**22 if device.type == "cuda" else 2**20, device=device, generator=generator)
        per_byte = max(least(lambda: big.mul(2.0), 5) - per_op, 1e-9) / (2 * big.numel() * big.element_size())
        threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
        return cls(seconds_per_flop=per_flop, seconds_per_byte=per_byte, seconds_per_op=per_op,
                   seconds_per_mode_op=per_mode_op, source=f"measured on {device.type}{threads}",
                   communication=cls.default(device).communication)

    def measure_communication(self, group: Any = None, *, device: torch.device | str | None = None,
                              repeats: int = 5) -> Calibration:
        """This calibration with ``communication`` measured on ``group`` (default the world); call on every rank.

        Each collective, and a copy (FSDP's copy-in and copy-out move parameters and gradients through
        memory too large for a cache), is timed on a small and a large tensor (4 KiB and 8 MiB on CPU,
        256 MiB on CUDA; the copy 32 MiB on CPU), the least of ``repeats`` runs each: the small one gives
        the seconds per call, the difference the seconds per byte sent. Then FSDP2's cost per unit beyond
        those (``fsdp_unit``) is measured on a probe of four small ``fully_shard`` units. Every rank gets
        the same constants, each the largest any rank measured (a collective waits for its slowest rank).
        Takes about a second on CPU. Timed alone, collectives miss what training adds (on CPU their
        threads compete with compute for cores; on a GPU they overlap compute): ``fit(sharding=...)``
        scales them to a real sharded step.

        Args:
            group: the process group the model trains on; default the world.
            device: where the tensors live; default CUDA for an NCCL group, else CPU.
            repeats: runs per size and collective (>= 1).

        Raises:
            ValueError: without an initialized process group of two or more ranks, or for ``repeats`` < 1.
        """
        import torch.distributed as dist

        from ckpt_wrapper.planner.profile import least_seconds

        if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
            raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
        if dist.is_available() and dist.is_initialized() and group is not None and dist.get_rank(group) < 0:
            raise ValueError("measure_communication was called on a rank outside the group it was given; call it on "
                             "the group's ranks only (all of them)")
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) < 2:
            raise ValueError("measure_communication needs an initialized process group of 2 or more ranks, called on "
                             "every rank; call it after init_process_group under torchrun (one rank communicates "
                             "nothing, and plan() then models no communication)")
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"
        device = torch.device(device)
        world = dist.get_world_size(group)
        large = (2**26 if device.type == "cuda" else 2**21) // world * world  # fp32 elements
        small = 1024 // world * world

        def timed(numel: int, copied: int) -> list[float]:
            full, shard = torch.zeros(numel, device=device), torch.zeros(numel // world, device=device)
            source, target = torch.ones(copied, device=device), torch.empty(copied, device=device)
            runs = [lambda: dist.all_gather_into_tensor(full, shard, group=group),
                    lambda: dist.reduce_scatter_tensor(shard, full, group=group),
                    lambda: dist.all_reduce(full, group=group),
                    lambda: dist.broadcast(full, src=dist.get_global_rank(group, 0) if group is not None else 0,
                                           group=group),
                    lambda: target.copy_(source)]
            for run in runs:
                run()  # warm: connections, buffers
            return [least_seconds(run, device, repeats, before=lambda: dist.barrier(group)) for run in runs]

        copied = 2**26 if device.type == "cuda" else 2**23
        small_s, large_s = timed(small, small), timed(large, copied)
        sent = {c: Communication(world_size=world, calls={}, bytes={c: 4 * large - 4 * small}).bus_bytes(c)
                for c in COLLECTIVES}
        sent["copy"] = 2 * 4 * (copied - small)  # read and written
        timed_terms = COLLECTIVES + ("copy",)
        measured = [value for c, little, big in zip(timed_terms, small_s, large_s)
                    for value in (little, max(big - little, 0.0) / sent[c])]
        agreed = torch.tensor(measured, dtype=torch.float64, device=device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX, group=group)
        values = agreed.tolist()
        constants = {c: (values[2 * i], values[2 * i + 1]) for i, c in enumerate(timed_terms)}
        constants["fsdp_unit"] = (_fsdp_unit_seconds(group, device, repeats, constants), 0.0)
        backend = dist.get_backend(group)
        return dataclasses.replace(self, communication=constants,
                                   source=f"{self.source}; communication measured on {backend}, {world} ranks")

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
            base: Calibration | None = None, repeats: int = 5, sharding: str = "none",
            check_fn: Any = None) -> Calibration:
        """Calibrate on ``model``'s own step: ``base``'s constants, the FLOP rate fitted to the measured step.

        ``base`` defaults to ``Calibration.measure(device)``. The forward and backward ``plan`` models (the
        model called on ``batch``, the sum of its floating outputs, backward) is recorded once for its
        counts and timed ``repeats`` times after one untimed run; the median is the time fitted. The model
        is left as it was (gradients, buffers, train/eval modes, RNG states). Measure once per model, batch
        shape and machine, and pass the result to ``plan(calibration=...)``: the predicted seconds then
        start from this machine's real step, and the plan stays deterministic given it.

        With ``sharding`` (``ddp``, ``fsdp1`` or ``fsdp2``; call it on every rank of the world group), the
        communication is fitted too: its constants are measured (``measure_communication``), then a copy
        of the model is sharded as ``plan`` assumes (each block, found by ``check_fn`` as ``plan`` finds
        them, its own FSDP unit, the rest the root's), its step is timed the same way (the slowest rank's
        median), and every communication constant is scaled so the step's modelled communication is what
        the sharded step took beyond the unsharded one: communication as exposed on this machine, with
        whatever overlap or contention it has. Only the terms that sharding's step runs are scaled (a DDP
        fit leaves the all-gather's measured constants as they were). The copy costs the model's
        parameters once more, until the fit returns.

        Raises:
            TypeError: if ``repeats`` is not an int or ``base`` not a ``Calibration``.
            ValueError: if ``repeats`` < 1, ``device`` is not the parameters' device type, the model's output
                needs no gradient, the step cannot be fitted (``fitted``), ``sharding`` is unknown, or is
                given without a process group of 2 or more ranks.

        Example:
            >>> import torch
            >>> from ckpt_wrapper.planner.cost import Calibration
            >>> model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.GELU(), torch.nn.Linear(256, 256))
            >>> fitted = Calibration.fit(model, torch.randn(64, 256), repeats=1)
            >>> fitted.seconds_per_flop > 0 and "fitted" in fitted.source
            True
        """
        from ckpt_wrapper.planner.profile import call_model, grads_kept, model_kept, scalar_of, wall_seconds
        from ckpt_wrapper.timeline import StepRecorder

        if not isinstance(repeats, int) or isinstance(repeats, bool):
            raise TypeError(f"repeats must be an int >= 1, got {type(repeats).__name__} {repeats!r}")
        if repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}")
        if base is not None and not isinstance(base, Calibration):
            raise TypeError(f"base must be a Calibration (Calibration.measure(device)) or None, got "
                            f"{type(base).__name__}")
        if sharding not in SHARDINGS:
            raise ValueError(f"sharding must be one of {list(SHARDINGS)}, got {sharding!r}")
        if sharding != "none":
            from ckpt_wrapper.planner.distribute import is_multi_rank

            if not is_multi_rank():
                raise ValueError(f"Calibration.fit(sharding={sharding!r}) times the sharded step, so it needs an "
                                 "initialized process group of 2 or more ranks, called on every rank; fit without "
                                 "sharding outside torch.distributed")
        first = next(iter(model.parameters()), None)
        if device is None:
            device = first.device if first is not None else torch.device("cpu")
        device = torch.device(device)
        if first is not None and first.device.type != device.type:
            raise ValueError(f"Calibration.fit: device {device.type} given, but the model's parameters are on "
                             f"{first.device.type}; expected the device the model runs on (pass device=None, or move "
                             "the model there first)")
        base = cls.measure(device) if base is None else base
        with model_kept(model), grads_kept(model) as params:

            def step() -> None:
                scalar_of(call_model(model, batch)).backward()
                for p in params:
                    p.grad = None

            def fit_locally() -> tuple[Calibration, float]:
                with StepRecorder(exclude=params, device=device) as recorder:
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
                return base.fitted(counts, seconds), seconds

            if sharding == "none":
                fitted, seconds = fit_locally()
            else:  # a rank that fails here must not leave the others waiting in the collectives that follow
                local_error: Exception | None = None
                try:
                    fitted, seconds = fit_locally()
                except Exception as error:  # re-raised below, on every rank
                    local_error = error
                _raise_if_any_rank_failed(local_error, device)
                fitted = fitted._fit_communication(model, batch, device, sharding, check_fn, repeats, seconds)
        return fitted

    def _fit_communication(self, model: torch.nn.Module, batch: Any, device: torch.device, sharding: str,
                           check_fn: Any, repeats: int, unsharded_seconds: float) -> Calibration:
        """``fit``'s sharded part: the communication constants scaled to a sharded copy's measured step."""
        import torch.distributed as dist

        from ckpt_wrapper.planner.profile import call_model, find_blocks, scalar_of, wall_seconds

        calibration = self.measure_communication(device=device, repeats=repeats)
        blocks = find_blocks(model, check_fn)
        static = StaticMemory.of(model, blocks, sharding=sharding, world_size=dist.get_world_size(), device=device)
        step_communication = Communication.of(static, model)
        modelled = calibration.communication_seconds(step_communication)
        sharded = shard_as_planned(copy.deepcopy(model), [name for name, _ in blocks], sharding, device)

        def step() -> None:
            scalar_of(call_model(sharded, batch)).backward()
            sharded.zero_grad(set_to_none=True)

        for _ in range(2):  # the first builds FSDP's state, the second DDP's rebuilt buckets
            step()
        measured = statistics.median(wall_seconds(step, device, repeats, before=dist.barrier))
        slowest = torch.tensor([measured], dtype=torch.float64, device=device)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        measured = float(slowest.item())
        exposed = max(measured - unsharded_seconds, 0.0)
        scale = exposed / modelled if modelled > 0 else 1.0
        if scale == 0.0:
            logger.warning("Calibration.fit(sharding=%r): the sharded step (%.3f ms) measured no slower than the "
                           "unsharded one (%.3f ms), so its communication is modelled as free; time a larger step or "
                           "raise repeats if that is noise", sharding, measured * 1e3, unsharded_seconds * 1e3)
        used = {term for term, calls in step_communication.calls.items() if calls}  # the others keep their measure
        scaled = {term: (per_call * scale, per_byte * scale) if term in used else (per_call, per_byte)
                  for term, (per_call, per_byte) in calibration.communication.items()}
        return dataclasses.replace(calibration, communication=scaled,
                                   source=f"{calibration.source}; communication scaled x{scale:.3f} to a "
                                          f"{measured * 1e3:.4f} ms {sharding} step")


def _raise_if_any_rank_failed(local_error: Exception | None, device: torch.device) -> None:
    """Every rank learns which ranks failed (a collective): the failed ones raise their own error, the
    others a ``ValueError`` naming them, so no rank goes on into a collective the others never reach."""
    import torch.distributed as dist

    failed = torch.zeros(dist.get_world_size(), dtype=torch.int32, device=device)
    failed[dist.get_rank()] = local_error is not None
    dist.all_reduce(failed)
    if local_error is not None:
        raise local_error
    ranks = [rank for rank, flag in enumerate(failed.tolist()) if flag]
    if ranks:
        raise ValueError(f"Calibration.fit(sharding=...): rank(s) {ranks} failed to fit the unsharded step (see "
                         "their error), so no rank times the sharded one; fix that rank's error and fit again")


def _fsdp_unit_seconds(group: Any, device: torch.device, repeats: int, constants: dict[str, tuple[float, float]]) -> float:
    """FSDP2's cost per unit and step beyond its collectives and copies, on a probe of small units.

    Four ``Linear(256, 256)`` units are stepped (forward, backward) plain and ``fully_shard``-ed over
    ``group``; the sharded step's extra time, less what ``constants`` model for its collectives and copies,
    divided by the units. Every rank returns the largest any rank measured.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    from ckpt_wrapper.planner.profile import least_seconds

    units = 4
    with torch.random.fork_rng(devices=[]):  # the probe's CPU initialisation draws; the caller's RNG stays
        plain = torch.nn.Sequential(*(torch.nn.Linear(256, 256) for _ in range(units))).to(device)
    batch = torch.randn(64, 256, generator=torch.Generator().manual_seed(0)).to(device)
    mesh = DeviceMesh.from_group(group if group is not None else dist.group.WORLD, device.type)
    sharded = copy.deepcopy(plain)
    for layer in sharded:
        fully_shard(layer, mesh=mesh)
    fully_shard(sharded, mesh=mesh)

    def stepper(model: torch.nn.Module) -> Any:
        def step() -> None:
            model(batch).sum().backward()
            model.zero_grad(set_to_none=True)
        return step

    times = []
    for model in (plain, sharded):
        step = stepper(model)
        step()  # warm: the first step builds FSDP's state and buffers
        times.append(least_seconds(step, device, repeats, before=lambda: dist.barrier(group)))
    static = StaticMemory.of(plain, [(str(i), layer) for i, layer in enumerate(plain)], sharding="fsdp2",
                             world_size=dist.get_world_size(group), device=device)
    probe = Communication.of(static)
    modelled = dataclasses.replace(Calibration.default(device), communication=constants).communication_seconds(probe)
    agreed = torch.tensor([max(times[1] - times[0] - modelled, 0.0) / units], dtype=torch.float64, device=device)
    dist.all_reduce(agreed, op=dist.ReduceOp.MAX, group=group)
    return float(agreed.item())


class _Passthrough(TorchDispatchMode):
    """A dispatch mode that does nothing: what any Python policy mode costs per op, at least."""

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        return func(*args, **(kwargs or {}))


DEFAULT_CALIBRATIONS: dict[str, Calibration] = {
    # Calibration.measure on the development machine (x86-64, fp32, 1 thread: 6-8e-11 s/FLOP, 1.8-4.7e-10
    # s/byte, 7-9e-6 s/op, 7-10e-5 s/mode op), the FLOP figure halved for the 2 threads of the CPU
    # reference workload. The ratios decide plans; the absolute values only the predicted seconds.
    # Communication: measure_communication on gloo, 2 ranks of 1 thread on a 2-core AMD EPYC VM (the
    # medians of 4 runs, rounded).
    "cpu": Calibration(seconds_per_flop=3.5e-11, seconds_per_byte=2.0e-10, seconds_per_op=8.0e-6,
                       seconds_per_mode_op=8.0e-5, source="default",
                       communication={"all_gather": (3.6e-4, 1.8e-9), "reduce_scatter": (5.0e-4, 3.0e-9),
                                      "all_reduce": (4.5e-4, 7.0e-10), "broadcast": (1.7e-4, 3.5e-10),
                                      "copy": (1.2e-5, 1.4e-10), "fsdp_unit": (5.0e-3, 0.0)}),
    # An H100/H200-class GPU (dense fp32/tf32 matmul throughput, HBM bandwidth, kernel launch). Its
    # communication constants are not measured: NCCL within one NVLink node at about 300 GB/s per rank
    # and 20-30 us per collective, FSDP2's CPU work per unit hidden behind the GPU's.
    "cuda": Calibration(seconds_per_flop=2.0e-14, seconds_per_byte=4.0e-13, seconds_per_op=6.0e-6,
                        seconds_per_mode_op=2.5e-5, source="default",
                        communication={"all_gather": (2.0e-5, 3.3e-12), "reduce_scatter": (2.5e-5, 3.3e-12),
                                       "all_reduce": (3.0e-5, 3.3e-12), "broadcast": (2.0e-5, 3.3e-12),
                                       "copy": (5.0e-6, 4.0e-13), "fsdp_unit": (5.0e-5, 0.0)}),
}
"""The built-in calibrations by device type, used when ``plan`` is given none."""
