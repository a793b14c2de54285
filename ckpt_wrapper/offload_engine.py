"""The offload engine: saved tensors to reusable host buffers, copied on side streams, prefetched back.

One ``OffloadEngine`` serves every block that offloads through it, so they share one host buffer pool
and backward can prefetch the next block's tensors while the current one computes. Device-agnostic
logic (selection, de-duplication, pooling, restore, accounting) runs on CPU too; the CUDA parts are
the streams and events, and nothing else.

On CUDA, per saved tensor:
- forward: the copy stream waits for the compute stream, copies the tensor's storage into a pooled
  pinned buffer, records an event; ``record_stream`` tells the caching allocator the device memory is in
  use by the copy, so it is reused once the copy is done and not before, and the GPU tensor itself is
  released at once;
- backward: the first time a block's tensors are needed, the previous block's are prefetched on a second
  stream; the compute stream waits only on the events of the tensors it uses.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import itertools
import os
import sys
import warnings
import weakref
from collections.abc import Iterator
from typing import Any, Literal

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

from ckpt_wrapper.log import get_logger

logger = get_logger(__name__)

__all__ = ["OffloadOptions", "OffloadStats", "OffloadEngine", "HostPool"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class OffloadOptions:
    """How saved tensors are chosen, bounded and moved."""

    min_bytes: int = 1 << 16
    """Tensors smaller than this stay on the device: their copies cost more than they free."""
    pin_memory: bool = True
    """Copy into page-locked host memory (only where an accelerator is present)."""
    cpu_copy: bool = False
    """On CPU, copy into separate host buffers anyway (a test mode: it frees nothing)."""
    max_host_bytes: int | None = None
    """Cap on host buffer bytes the pool holds (in use plus cached); None for no cap."""
    on_host_full: Literal["keep", "raise"] = "keep"
    """At the cap: keep the tensor on the device (``keep``) or raise ``RuntimeError`` (``raise``)."""
    max_in_flight: int = 32
    """Device-to-host copies that may be outstanding before the next one waits for the oldest."""
    prefetch: bool = True
    """In backward, copy the previous block's tensors back while the current block computes."""

    def __post_init__(self) -> None:
        if not isinstance(self.min_bytes, int) or self.min_bytes < 0:
            raise ValueError(f"min_bytes must be a non-negative int, got {self.min_bytes!r}")
        if self.max_host_bytes is not None and (not isinstance(self.max_host_bytes, int) or self.max_host_bytes < 0):
            raise ValueError(f"max_host_bytes must be None or a non-negative int, got {self.max_host_bytes!r}")
        if self.on_host_full not in ("keep", "raise"):
            raise ValueError(f"on_host_full must be 'keep' or 'raise', got {self.on_host_full!r}")
        if not isinstance(self.max_in_flight, int) or self.max_in_flight < 1:
            raise ValueError(f"max_in_flight must be an int >= 1, got {self.max_in_flight!r}")


@dataclasses.dataclass
class OffloadStats:
    """Counters an engine keeps; ``reset()`` zeroes them."""

    copies: int = 0
    """Storages copied to the host."""
    copied_bytes: int = 0
    """Bytes copied to the host."""
    shared: int = 0
    """Saved tensors that reused another's copy (same storage, unchanged)."""
    kept_small: int = 0
    """Tensors kept on the device for being under ``min_bytes``."""
    kept_param: int = 0
    """Parameters, buffers, their views and other leaves that require grad, kept where they are."""
    kept_on_host: int = 0
    """Tensors already in host memory (nothing to gain from copying them)."""
    kept_host_full: int = 0
    """Tensors kept on the device because the host cap was reached."""
    restores: int = 0
    """Host-to-device copies made when a tensor was needed and not prefetched."""
    prefetched: int = 0
    """Host-to-device copies started ahead of need."""

    def reset(self) -> None:
        """Zero every counter."""
        for field in dataclasses.fields(self):
            setattr(self, field.name, 0)


class HostPool:
    """Host buffers kept for reuse: pinning memory is slow, reusing it is free.

    Sizes are rounded up (powers of two to 1 MiB, then 1 MiB steps) so buffers fit later tensors
    of about the same size. A buffer is reused only once the last copy out of it has finished.
    """

    def __init__(self, *, pin: bool, max_bytes: int | None) -> None:
        self.pin = pin
        self.max_bytes = max_bytes
        self._free: dict[int, list[tuple[torch.Tensor, Any]]] = collections.defaultdict(list)
        self.in_use_bytes = 0
        self.cached_bytes = 0

    @property
    def total_bytes(self) -> int:
        """Bytes of host memory the pool holds, in use and cached."""
        return self.in_use_bytes + self.cached_bytes

    @staticmethod
    def _size_class(nbytes: int) -> int:
        if nbytes <= 1 << 20:
            return max(1 << 12, 1 << (max(nbytes, 1) - 1).bit_length())
        return -(-nbytes // (1 << 20)) * (1 << 20)

    def acquire(self, nbytes: int) -> torch.Tensor | None:
        """A uint8 host buffer of at least ``nbytes``, or None when the cap forbids one."""
        size = self._size_class(nbytes)
        free = self._free.get(size)
        if free:
            buffer, ready = free.pop()
            if ready is not None:
                ready.synchronize()
            self.cached_bytes -= size
            self.in_use_bytes += size
            return buffer
        if self.max_bytes is not None and self.total_bytes + size > self.max_bytes:
            self._evict(self.total_bytes + size - self.max_bytes)
            if self.total_bytes + size > self.max_bytes:
                return None
        buffer = torch.empty(size, dtype=torch.uint8, pin_memory=self.pin)
        self.in_use_bytes += size
        return buffer

    def release(self, buffer: torch.Tensor, ready: Any = None) -> None:
        """Return ``buffer``; ``ready`` is an event after which nothing reads or writes it."""
        size = buffer.numel()
        self.in_use_bytes -= size
        self.cached_bytes += size
        self._free[size].append((buffer, ready))

    def _evict(self, need: int) -> None:
        for size in sorted(self._free, reverse=True):
            while self._free[size] and need > 0:
                buffer, ready = self._free[size].pop()
                if ready is not None:
                    ready.synchronize()
                self.cached_bytes -= size
                need -= size

    def clear(self) -> None:
        """Drop every cached buffer (buffers in use are unaffected)."""
        self._evict(self.cached_bytes + 1)
        self._free.clear()


class _HostCopy:
    """The host copy of one device storage, shared by every saved tensor that views it."""

    __slots__ = ("engine", "buffer", "nbytes", "device", "version", "d2h_done", "h2d_done",
                 "prefetched", "restored", "__weakref__")

    def __init__(self, engine: OffloadEngine, buffer: torch.Tensor, source: torch.Tensor, nbytes: int) -> None:
        self.engine = engine
        self.buffer = buffer
        self.nbytes = nbytes
        self.device = source.device  # the source itself is not held: freeing it is the point
        self.version = source._version
        self.d2h_done: Any = None
        self.h2d_done: Any = None
        self.prefetched: torch.Tensor | None = None
        # The device copy, once backward has asked for it. Held as long as this entry is, i.e. until the
        # last saved view of the storage is released: the lifetime the storage had without offload, and
        # a second node saving a view of it finds it here instead of copying it back again.
        self.restored: torch.Tensor | None = None

    def __del__(self) -> None:
        # The graph that held this copy is gone (backward ran, or the forward was abandoned): the
        # buffer goes back to the pool, to be reused once the last copy touching it has finished.
        try:
            self.engine.pool.release(self.buffer, self.h2d_done or self.d2h_done)
        except Exception:  # interpreter shutdown: nothing left to return buffers to
            pass


class _Frame:
    """The copies made during one forward of one block, linked to the block that ran before it."""

    __slots__ = ("engine", "keep", "copies", "previous", "started", "__weakref__")

    def __init__(self, engine: OffloadEngine, module: nn.Module, previous: Any) -> None:
        self.engine = engine
        self.keep: set[int] = set()
        for tensor in itertools.chain(module.parameters(), module.buffers()):
            with contextlib.suppress(RuntimeError, NotImplementedError):  # tensor subclasses without storage
                self.keep.add(tensor.untyped_storage().data_ptr())
        # Keyed by a weak reference to the storage itself: alive while any view of it is, so a dead
        # first view neither hides a live storage nor lets a recycled address pose as the old one.
        self.copies: dict[StorageWeakRef, tuple[StorageWeakRef, weakref.ref[_HostCopy]]] = {}
        self.previous = previous  # weakref to the frame of the block that ran before, or None
        self.started = False

    def pack(self, tensor: torch.Tensor) -> Any:
        engine = self.engine
        why = engine._keep_reason(tensor, self.keep)
        if why is not None:
            setattr(engine.stats, why, getattr(engine.stats, why) + 1)
            return tensor
        storage = tensor.untyped_storage()
        key = StorageWeakRef(storage)
        stored_key, entry_ref = self.copies.get(key, (None, None))
        # The stored key, not the new one: a dead storage's address may have been handed out again.
        entry = entry_ref() if stored_key is not None and not stored_key.expired() else None
        if entry is not None and entry.version == tensor._version:
            engine.stats.shared += 1
        else:
            entry = engine._copy_out(tensor, storage)
            if entry is None:
                return tensor  # the host cap was reached; on_host_full="keep"
            self.copies[key] = (key, weakref.ref(entry))
        return (self, entry, tensor.dtype, tensor.storage_offset(), tensor.size(), tensor.stride())

    def prefetch(self) -> None:
        for _, ref in self.copies.values():
            entry = ref()
            if entry is not None and entry.prefetched is None and entry.restored is None:
                self.engine._copy_in(entry, prefetch=True)


def _unpack(packed: Any) -> torch.Tensor:
    if isinstance(packed, torch.Tensor):
        return packed
    frame, entry, dtype, offset, size, stride = packed
    engine = frame.engine
    if not frame.started:
        frame.started = True
        if engine.options.prefetch:
            # This block's own tensors first: backward needs them now, and copies back run in order
            # on one stream. Then the block before it, which backward needs next.
            frame.prefetch()
            previous = frame.previous() if frame.previous is not None else None
            if previous is not None:
                previous.prefetch()
    raw = engine._device_storage(entry)
    return torch.empty(0, dtype=dtype, device=entry.device).set_(raw, offset, size, stride)


class OffloadEngine:
    """Moves saved tensors of the blocks it serves to host buffers and back.

    Share one engine among the blocks of a model (``offload_wrapper(block, engine=engine)``) so they
    share one buffer pool and each block's tensors are prefetched while the next computes.

    Args:
        options: what to offload and the bounds; defaults to ``OffloadOptions()``.

    Example:
        >>> import torch
        >>> from ckpt_wrapper import OffloadEngine, OffloadOptions
        >>> engine = OffloadEngine(OffloadOptions(cpu_copy=True, min_bytes=0))
        >>> layer = torch.nn.Linear(32, 32)
        >>> with engine.saving(layer):
        ...     loss = torch.tanh(layer(torch.randn(8, 32))).sum()
        >>> engine.stats.copies > 0, engine.pool.in_use_bytes > 0
        (True, True)
        >>> loss.backward(); del loss
        >>> engine.pool.in_use_bytes
        0
    """

    def __init__(self, options: OffloadOptions | None = None) -> None:
        self.options = options or OffloadOptions()
        self.stats = OffloadStats()
        pin = self.options.pin_memory and torch.cuda.is_available()
        self.pool = HostPool(pin=pin, max_bytes=self.options.max_host_bytes)
        self._streams: dict[torch.device, tuple[Any, Any]] = {}
        self._in_flight: collections.deque[Any] = collections.deque()
        self._last_frame: Any = None
        self._said_no_accelerator = False

    def __getstate__(self) -> dict[str, Any]:
        # Options and counters travel; the pool, streams and frames of a step in progress are this
        # process's working state (weak references, pinned buffers), rebuilt empty on the other side.
        return {"options": self.options, "stats": copy.copy(self.stats)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["options"])  # type: ignore[misc]
        self.stats = state["stats"]

    def active_for(self, module: nn.Module, args: tuple, kwargs: dict) -> bool:
        """Whether offloading this call could free anything; says once per engine when it cannot.

        Where the block and its inputs live in host memory there is nothing to free, unless
        ``cpu_copy`` asks for copies anyway.
        """
        if self.options.cpu_copy:
            return True
        tensors = itertools.chain(
            module.parameters(), (t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor))
        )
        if any(t.device.type not in ("cpu", "meta") for t in tensors):
            return True
        if not self._said_no_accelerator:
            self._said_no_accelerator = True
            if not _on_rank_zero():  # every rank would say the same: rank 0 says it for the launch
                return False
            warnings.warn(
                "ckpt_wrapper: offload of a block in host memory has nothing to free; it runs without "
                "offload. Pass cpu_copy=True to exercise the copies on CPU.",
                UserWarning,
                stacklevel=_caller_stacklevel(),
            )
        return False

    @contextlib.contextmanager
    def saving(self, module: nn.Module) -> Iterator[None]:
        """Within this context, what autograd saves goes through the engine (``module``'s own
        parameters and buffers excepted)."""
        frame = _Frame(self, module, self._last_frame)
        self._last_frame = weakref.ref(frame)
        with torch.autograd.graph.saved_tensors_hooks(frame.pack, _unpack):
            yield

    def _keep_reason(self, tensor: torch.Tensor, keep: set[int]) -> str | None:
        # Parameters are never offloaded; subclasses (DTensor, FakeTensor) manage their own storage.
        if type(tensor) is not torch.Tensor or tensor.is_sparse or tensor.device.type == "meta":
            return "kept_param"
        if tensor.device.type == "cpu" and not self.options.cpu_copy:
            return "kept_on_host"
        # Parameters (frozen ones passed in from outside too) and leaves that require grad (FSDP1's
        # flat parameter behind its views, a user's input) are referenced elsewhere: copying them
        # would free nothing.
        base = tensor._base if tensor._base is not None else tensor
        if isinstance(base, nn.Parameter) or (base.is_leaf and base.requires_grad) or tensor.untyped_storage().data_ptr() in keep:
            return "kept_param"
        if tensor.numel() * tensor.element_size() < self.options.min_bytes:
            return "kept_small"
        return None

    def _streams_for(self, device: torch.device) -> tuple[Any, Any]:
        streams = self._streams.get(device)
        if streams is None:
            streams = (torch.cuda.Stream(device), torch.cuda.Stream(device))
            self._streams[device] = streams
        return streams

    def _copy_out(self, tensor: torch.Tensor, storage: torch.UntypedStorage) -> _HostCopy | None:
        nbytes = storage.nbytes()
        buffer = self.pool.acquire(nbytes)
        if buffer is None:
            if self.options.on_host_full == "raise":
                raise RuntimeError(
                    f"ckpt_wrapper offload: the host buffer cap (max_host_bytes={self.options.max_host_bytes}) "
                    f"is full ({self.pool.total_bytes} bytes held) and {nbytes} more are needed. Raise "
                    "max_host_bytes, offload fewer blocks, or pass on_host_full='keep' to keep such tensors "
                    "on the device."
                )
            self.stats.kept_host_full += 1
            logger.debug("host buffer cap %s reached (%d bytes held): %d bytes stay on %s",
                         self.options.max_host_bytes, self.pool.total_bytes, nbytes, tensor.device)
            return None
        entry = _HostCopy(self, buffer, tensor, nbytes)
        flat = torch.empty(0, dtype=torch.uint8, device=tensor.device).set_(storage)
        if tensor.device.type == "cuda":
            d2h, _ = self._streams_for(tensor.device)
            d2h.wait_stream(torch.cuda.current_stream(tensor.device))
            with torch.cuda.stream(d2h):
                buffer[:nbytes].copy_(flat, non_blocking=True)
                entry.d2h_done = torch.cuda.Event()
                entry.d2h_done.record(d2h)
            # The caching allocator may hand this memory out again only after the copy has read it.
            flat.record_stream(d2h)
            self._in_flight.append(entry.d2h_done)
            while self._in_flight and (len(self._in_flight) > self.options.max_in_flight or self._in_flight[0].query()):
                self._in_flight.popleft().synchronize()
        else:
            buffer[:nbytes].copy_(flat)
        self.stats.copies += 1
        self.stats.copied_bytes += nbytes
        return entry

    def _copy_in(self, entry: _HostCopy, *, prefetch: bool) -> torch.Tensor:
        if entry.device.type == "cuda":
            _, h2d = self._streams_for(entry.device)
            with torch.cuda.stream(h2d):
                if entry.d2h_done is not None:
                    h2d.wait_event(entry.d2h_done)
                restored = torch.empty(entry.nbytes, dtype=torch.uint8, device=entry.device)
                restored.copy_(entry.buffer[: entry.nbytes], non_blocking=True)
                entry.h2d_done = torch.cuda.Event()
                entry.h2d_done.record(h2d)
        else:
            restored = entry.buffer[: entry.nbytes].clone()
        if prefetch:
            entry.prefetched = restored
            self.stats.prefetched += 1
        else:
            self.stats.restores += 1
        return restored

    def _device_storage(self, entry: _HostCopy) -> torch.UntypedStorage:
        if entry.restored is not None:  # another view of this storage was unpacked already
            return entry.restored.untyped_storage()
        restored = entry.prefetched if entry.prefetched is not None else self._copy_in(entry, prefetch=False)
        entry.prefetched = None
        entry.restored = restored
        if entry.device.type == "cuda":
            current = torch.cuda.current_stream(entry.device)
            current.wait_event(entry.h2d_done)
            restored.record_stream(current)
        return restored.untyped_storage()

    def clear_cache(self) -> None:
        """Release the pool's cached host buffers (say, before a phase without offload)."""
        self.pool.clear()


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_CONSUMER_DIRS = tuple(os.path.join(_PACKAGE_DIR, sub) + os.sep for sub in ("testing", "tools"))
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep


def _internal(filename: str) -> bool:
    """Frames a warning should not be attributed to: ckpt_wrapper's library code and PyTorch's.

    ``ckpt_wrapper.testing`` and ``ckpt_wrapper.tools`` call blocks as user code does (their models,
    the driver), so their frames count as the caller.
    """
    path = os.path.abspath(filename) if not filename.startswith("<") else filename
    if path.startswith(_TORCH_DIR):
        return True
    return path.startswith(_PACKAGE_DIR) and not path.startswith(_CONSUMER_DIRS)


def _caller_stacklevel() -> int:
    """The ``stacklevel`` for a ``warnings.warn`` in the caller of this function that names the first frame
    outside ckpt_wrapper and PyTorch (the code that called the block), however many hooks lie between.
    """
    frame = sys._getframe(1)  # the function that will call warnings.warn: stacklevel 1
    level = 1
    while frame is not None and _internal(frame.f_code.co_filename):
        frame = frame.f_back
        level += 1
    return level


def _on_rank_zero() -> bool:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"
