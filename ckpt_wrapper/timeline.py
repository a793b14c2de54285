"""``StepRecorder``: one step, op by op: FLOPs, bytes touched, and every storage made and freed.

The planner's deterministic measure of memory and cost, and the source of ``ckpt_wrapper.report``'s
tables and timeline. A ``TorchDispatchMode`` sees every aten op, in forward, in backward and in a
checkpoint's recompute. For each op it records its FLOPs (PyTorch's own formulas, those of
``FlopCounterMode``), the bytes of its tensor inputs and outputs (none for a view op, which moves no
data), the storages it created (size, shape, dtype, the op, the module running and the phase), and which
earlier storages had been freed when it started. Nothing here reads a clock or an allocator, so the same
step records the same way every time.

What it cannot see: memory a kernel allocates and frees inside one op (workspaces), and storages made
outside the dispatcher. Storages alive before recording began (parameters, inputs) are not counted.

Example:
    >>> import torch
    >>> from ckpt_wrapper.timeline import StepRecorder
    >>> layer = torch.nn.Linear(16, 16)
    >>> x = torch.randn(4, 16, requires_grad=True)
    >>> with StepRecorder() as recorder:
    ...     out = torch.nn.functional.gelu(layer(x))
    >>> recorder.live_bytes() - out.untyped_storage().nbytes()  # what forward keeps for backward
    256
    >>> recorder.flops
    2048
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["Allocation", "StepRecorder", "flop_formulas", "storage_key"]

_QUERIES = {"sym_is_contiguous", "is_contiguous", "is_strides_like_format", "is_non_overlapping_and_dense", "size",
            "sym_size", "stride", "sym_stride", "storage_offset", "sym_storage_offset", "numel", "sym_numel", "dim",
            "layout"}
"""Metadata queries: not kernels, so neither ops nor overhead."""


def flop_formulas() -> dict[Any, Callable[..., int]]:
    """PyTorch's FLOP formulas by op packet (``FlopCounterMode``'s), plus the CPU flash-attention kernel's."""
    from torch.utils import flop_counter

    from ckpt_wrapper.measure import _cpu_attention_flops

    formulas = dict(flop_counter.flop_registry)
    formulas.update({op._overloadpacket if hasattr(op, "_overloadpacket") else op: flop_counter.shape_wrapper(fn)
                     for op, fn in _cpu_attention_flops().items()})
    return formulas


def storage_key(tensor: torch.Tensor) -> int:
    """An id of ``tensor``'s storage, the same for every view of it while it lives."""
    return StorageWeakRef(tensor.untyped_storage()).cdata


@dataclasses.dataclass
class Allocation:
    """One storage made during recording."""

    nbytes: int
    """Its size in bytes."""
    op: str
    """The aten op that made it (``aten.mm``)."""
    shape: tuple[int, ...]
    """Shape of the tensor the op returned on it."""
    dtype: str
    """Its dtype (``float32``)."""
    module: str
    """The module running when it was made (``""`` if none was named), as ``StepRecorder.module`` said."""
    phase: str
    """``StepRecorder.phase`` when it was made (``forward``, ``backward``, or what the caller set)."""
    made: int
    """Index of the op that made it."""
    device: str = "cpu"
    """The device type it lives on (host copies of offloaded activations are ``cpu`` beside a ``cuda`` model)."""
    freed: int | None = None
    """Index of the first op that started after it was freed; None while alive."""


class StepRecorder(TorchDispatchMode):
    """Records every op run inside the ``with`` block; see the module docstring.

    Args:
        exclude: tensors whose storages are never counted as made here (parameters, inputs whose
            views an op may return).
        device: count only storages on this device (offloaded host copies are not device memory);
            default every device.

    Attributes set by the caller while recording, copied into each ``Allocation``: ``module`` (a
    name) and ``phase`` (a word).
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = (), *, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.device = None if device is None else torch.device(device)
        self.allocations: dict[int, Allocation] = {}
        """Every storage made, by the order it was made (keys are serial numbers, not storage ids)."""
        self.samples: list[int] = []
        """Bytes alive just after each op, its outputs included: the memory timeline, one point per op."""
        self.ops: list[str] = []
        """The op names, in order."""
        self.op_context: list[tuple[str, str]] = []
        """Per op, (``phase``, ``module``) when it ran."""
        self.flops = 0
        """FLOPs of every op with a formula (matmuls, convolutions, attention)."""
        self.bytes_touched = 0
        """Bytes of every op's tensor inputs and outputs, storages counted once per op; view ops count none."""
        self.module = ""
        self.phase = "forward"
        self._formulas = flop_formulas()
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}  # storage id -> (weak ref, serial number)
        self._excluded = {storage_key(t) for t in exclude}
        self._alive_bytes = 0

    def _prune(self) -> None:
        gone = [key for key, (ref, _) in self._live.items() if ref.expired()]
        for key in gone:
            _, serial = self._live.pop(key)
            allocation = self.allocations[serial]
            allocation.freed = len(self.ops)
            self._alive_bytes -= allocation.nbytes

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func._overloadpacket.__name__
        if name in _QUERIES:
            return out
        self._prune()
        ins = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        outs = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        if not func.is_view:  # a view (t, transpose, split, detach, ...) reads and writes no data
            touched: dict[int, int] = {}
            for t in ins + outs:
                touched.setdefault(storage_key(t), t.untyped_storage().nbytes())
            self.bytes_touched += sum(touched.values())
        formula = self._formulas.get(func._overloadpacket)
        if formula is not None:
            self.flops += int(formula(*args, **kwargs, out_val=out))
        inputs = {storage_key(t) for t in ins}
        for t in outs:
            key = storage_key(t)
            if key in inputs or key in self._excluded or key in self._live or (
                    self.device is not None and t.device.type != self.device.type):
                continue  # a view, an in-place result, or a storage counted already
            serial = len(self.allocations)
            nbytes = t.untyped_storage().nbytes()
            self.allocations[serial] = Allocation(nbytes, f"aten.{name}", tuple(t.shape), str(t.dtype).removeprefix(
                "torch."), self.module, self.phase, len(self.ops), device=t.device.type)
            self._live[key] = (StorageWeakRef(t.untyped_storage()), serial)
            self._alive_bytes += nbytes
        self.ops.append(f"aten.{name}")
        self.op_context.append((self.phase, self.module))
        self.samples.append(self._alive_bytes)
        return out

    def mark(self) -> int:
        """The index the next op will get: call it between ops to cut the timeline into phases."""
        return len(self.ops)

    def alive(self, exclude: Iterable[torch.Tensor] = ()) -> list[Allocation]:
        """The storages made here that are alive now, less those of ``exclude`` (an output, say)."""
        self._prune()
        skip = {storage_key(t) for t in exclude}
        return [self.allocations[serial] for key, (_, serial) in self._live.items() if key not in skip]

    def live_bytes(self, exclude: Iterable[torch.Tensor] = ()) -> int:
        """Bytes of the storages made here and alive now, less those of ``exclude``."""
        return sum(a.nbytes for a in self.alive(exclude))

    def serials_of(self, tensors: Iterable[torch.Tensor | None]) -> set[int]:
        """Serial numbers (keys of ``allocations``) of the live storages behind ``tensors``."""
        keys = {storage_key(t) for t in tensors if t is not None}
        return {serial for key, (ref, serial) in self._live.items() if key in keys and not ref.expired()}

    def series(self, without: set[int] = frozenset(), only: set[int] | None = None) -> list[int]:
        """The timeline (bytes alive after each op) counting only some storages.

        Args:
            without: serial numbers to leave out (gradients, to be accounted as sharded, say).
            only: if given, count only these serial numbers.
        """
        delta = [0] * (len(self.ops) + 1)
        for serial, a in self.allocations.items():
            if serial in without or (only is not None and serial not in only):
                continue
            delta[a.made] += a.nbytes
            if a.freed is not None:
                delta[a.freed] -= a.nbytes
        out, alive = [], 0
        for i in range(len(self.ops)):
            alive += delta[i]
            out.append(alive)
        return out
