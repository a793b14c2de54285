"""Measure what activation checkpointing changes: memory held after forward, bytes saved, FLOPs.

The measures behind the demo, the benchmarks and the memory tests, public so users can measure
their own models the same way:

- ``held_after_forward``: bytes the allocator holds after forward, minus the output (glibc's
  ``mallinfo2`` on CPU, ``torch.cuda.memory_allocated`` on CUDA). It counts whatever keeps
  activations alive: autograd saves, selective-checkpoint caches, offload buffers.
- ``SavedBytes``: bytes that reach autograd's pack hook, parameters excluded. Cheap and exact for
  what it sees, but blind to anything packed by an inner hook (the checkpoint's own, say).
- ``live_bytes_after_forward``: bytes of the storages forward created that are still alive after it:
  exact and deterministic on any device, and it sees what inner hooks keep.
- ``step_flops``: FLOPs of forward plus backward, so recompute shows up as extra forward FLOPs.
- ``measured_step_peak``: the peak memory of one training step, measured independently of the
  planner: PyTorch's ``MemTracker`` on CPU, ``torch.cuda.max_memory_allocated`` on CUDA.

Example:
    >>> import torch
    >>> from ckpt_wrapper.measure import SavedBytes
    >>> layer = torch.nn.Linear(16, 16)
    >>> with SavedBytes(exclude=layer.parameters()) as saved:
    ...     out = layer(torch.randn(4, 16, requires_grad=True))
    >>> saved.bytes
    256
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["SavedBytes", "held_after_forward", "host_allocated_bytes", "live_bytes_after_forward", "measured_step_peak",
           "step_flops"]


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost",
    )]


@functools.cache
def _mallinfo2() -> Callable[[], _MallInfo2] | None:
    path = ctypes.util.find_library("c")
    try:
        fn = ctypes.CDLL(path).mallinfo2 if path else None
    except (OSError, AttributeError):  # not glibc, or glibc older than 2.33
        return None
    if fn is not None:
        fn.restype = _MallInfo2
    return fn


def host_allocated_bytes() -> int:
    """Bytes glibc's allocator has handed out and not taken back (``uordblks + hblkhd``).

    Raises:
        RuntimeError: where the C library has no ``mallinfo2`` (non-glibc systems).
    """
    fn = _mallinfo2()
    if fn is None:
        raise RuntimeError("host_allocated_bytes needs glibc >= 2.33 (mallinfo2); it is not available here")
    info = fn()
    return int(info.uordblks + info.hblkhd)


def _allocated(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.memory_allocated(device)
    return host_allocated_bytes()


def _output_bytes(output: Any) -> int:
    tensors = [t for t in torch.utils._pytree.tree_leaves(output) if isinstance(t, torch.Tensor)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def held_after_forward(forward: Callable[[], Any], *, device: torch.device | str = "cpu", repeats: int = 3) -> int:
    """Bytes that ``forward()`` leaves allocated (its output excluded), the least of ``repeats`` runs.

    ``forward`` must build a fresh autograd graph each call; the graph is dropped between runs. One
    warm-up call comes first so that lazily created state (workspaces, caches) is not counted.

    Args:
        forward: a callable running the forward pass and returning its output.
        device: where activations live; CPU uses ``mallinfo2``, CUDA ``memory_allocated``.
        repeats: runs to take the least of (allocator noise only ever adds).

    Returns:
        The bytes held, never negative.
    """
    device = torch.device(device)
    forward()
    best: int | None = None
    for _ in range(repeats):
        before = _allocated(device)
        output = forward()
        held = _allocated(device) - before - _output_bytes(output)
        del output
        best = held if best is None else min(best, held)
    return max(best or 0, 0)


class _StorageTracker(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[StorageWeakRef] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        self.refs += [StorageWeakRef(t.untyped_storage()) for t in torch.utils._pytree.tree_leaves(out)
                      if isinstance(t, torch.Tensor)]
        return out


def live_bytes_after_forward(forward: Callable[[], Any], *, exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the storages ``forward()`` created that are still alive after it, each counted once.

    The output's storages and those of ``exclude`` (pass the parameters: ``weight.t()`` is a view of
    one) are not counted. Unlike ``SavedBytes`` it sees what checkpoints, selective-checkpoint caches and
    other inner hooks keep; unlike ``held_after_forward`` it has no allocator noise.

    Example:
        >>> import torch
        >>> from ckpt_wrapper.measure import live_bytes_after_forward
        >>> layer = torch.nn.Linear(16, 16)
        >>> x = torch.randn(4, 16, requires_grad=True)
        >>> live_bytes_after_forward(lambda: torch.nn.functional.gelu(layer(x)), exclude=layer.parameters())
        256
    """
    with _StorageTracker() as tracker:
        output = forward()
    skip = {StorageWeakRef(t.untyped_storage()).cdata
            for t in torch.utils._pytree.tree_leaves((output, list(exclude))) if isinstance(t, torch.Tensor)}
    alive = {ref.cdata: torch.UntypedStorage._new_with_weak_ptr(ref.cdata).nbytes()
             for ref in tracker.refs if not ref.expired() and ref.cdata not in skip}
    return sum(alive.values())


class SavedBytes(torch.autograd.graph.saved_tensors_hooks):
    """Counts bytes packed for backward inside the ``with`` block, storages counted once.

    Args:
        exclude: tensors (parameters, typically) whose storages are not counted.
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()) -> None:
        self._exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self._seen: set[int] = set()
        self.bytes = 0
        super().__init__(self._pack, lambda packed: packed)

    def __enter__(self) -> SavedBytes:
        super().__enter__()
        return self

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in self._exclude and key not in self._seen and not isinstance(tensor, torch.nn.Parameter):
            self._seen.add(key)
            self.bytes += storage.nbytes()
        return tensor


def _cpu_attention_flops() -> dict[Any, Any]:
    # FlopCounterMode knows the CUDA attention kernels but not the CPU flash kernel; without these the
    # recompute of attention would look free on CPU.
    from torch.utils import flop_counter

    def forward(query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
        return flop_counter.sdpa_flop_count(query, key, value)

    def backward(grad_out: Any, query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
        return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)

    aten = torch.ops.aten
    if not hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        return {}
    return {aten._scaled_dot_product_flash_attention_for_cpu: forward,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: backward}


def step_flops(step: Callable[[], Any]) -> int:
    """Total FLOPs counted by ``FlopCounterMode`` while ``step()`` runs (forward and backward).

    Attention counts as dense (causal masking is not discounted), as in PyTorch's own formulas.
    """
    with FlopCounterMode(display=False, custom_mapping=_cpu_attention_flops()) as counter:
        step()
    return int(counter.get_total_flops())


def measured_step_peak(step: Callable[[], Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
                       device: torch.device | str = "cpu") -> int:
    """The peak bytes of one call of ``step()`` (a whole training step: forward, backward, optimizer).

    On CUDA, ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``: everything allocated
    on the device. Elsewhere PyTorch's ``torch.distributed._tools.mem_tracker.MemTracker``, which counts
    the live storages of parameters, gradients, optimizer state and every other tensor the step makes:
    a measure independent of the planner's. Run a step before, so optimizer state exists.

    Example:
        >>> import torch
        >>> from ckpt_wrapper.measure import measured_step_peak
        >>> model = torch.nn.Linear(256, 256)
        >>> measured_step_peak(lambda: model(torch.randn(8, 256)).sum().backward(), model) >= 2 * 257 * 256 * 4
        True
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    tracker.track_external(*([model] + ([optimizer] if optimizer is not None else [])))
    with tracker:
        step()
    snapshot = tracker.get_tracker_snapshot("peak")
    return int(sum(stats["Total"] for stats in snapshot.values()))
