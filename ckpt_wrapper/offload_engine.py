"""The offload engine: saved tensors to reusable host buffers, copied on side streams, fetched back.

One ``OffloadEngine`` serves every block that offloads through it, so they share one host buffer pool
(``ckpt_wrapper.host_pool``) and backward can prefetch one block's tensors while another computes.
The device-agnostic logic (selection, spans, de-duplication, version checks, pooling, restore and its
lifetime) runs on CPU too; CUDA adds streams and events, and nothing else. Other accelerators copy
synchronously.

On CUDA, per saved tensor:
- forward: the copy stream waits for the compute stream, copies the bytes the tensor spans into a
  pooled pinned buffer and records an event. The engine holds the device tensor until its copy is
  done (an event query, which does not wait) or until the compute stream has waited for the copy on
  the device, so its memory is reused in stream order, with no host synchronization: at most
  ``max_in_flight`` copies are outstanding before compute waits on the device for the oldest;
- backward: restored memory is allocated on the compute stream (so compute reuses it once freed) and
  filled on a second copy stream. Every stream that reads it first waits for the copy and is recorded
  with the allocator. When backward first reaches a block, the block's own tensors are fetched in the
  order backward needs them (last saved first), then those of the block before it.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import itertools
import warnings
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

from ckpt_wrapper.host_pool import HostPool
from ckpt_wrapper.offload_options import OffloadOptions, OffloadStats
from ckpt_wrapper.offload_records import KeptTensor, SavedCopy, byte_span, modified_error
from ckpt_wrapper.log import caller_stacklevel, current_rank, get_logger

logger = get_logger(__name__)

__all__ = ["OffloadOptions", "OffloadStats", "OffloadEngine", "HostPool"]


class _HostCopy:
    """The host copy of one span of one device storage, shared by the saved tensors that lie in it.

    The device copy made in backward is held strongly until every saved tensor of the span has been
    unpacked once, then only weakly: it lives exactly as long as backward still uses it, with or without
    ``retain_graph``, and a later backward over a retained graph restores it again from the host.
    """

    __slots__ = ("engine", "buffer", "nbytes", "lo", "device", "version", "d2h_done", "h2d_done",
                 "prefetched", "held", "restored", "restored_version", "waited", "live", "pending", "round",
                 "__weakref__")

    def __init__(self, engine: OffloadEngine, buffer: torch.Tensor, source: torch.Tensor, lo: int, nbytes: int) -> None:
        self.engine = engine
        self.buffer = buffer
        self.nbytes = nbytes
        self.lo = lo  # byte offset of the span in the source storage
        self.device = source.device  # the source itself is not held: freeing it is the point
        self.version = source._version
        self.d2h_done: Any = None
        self.h2d_done: Any = None
        self.prefetched: torch.Tensor | None = None
        self.held: torch.Tensor | None = None  # the device copy, until every saved tensor read it once
        self.restored: weakref.ref | None = None  # the device copy, while anything still uses it
        self.restored_version = 0  # its version when restored: a later write into it is refused
        self.waited: set[int] = set()  # streams that waited for the copy back and were recorded
        self.live = 0  # saved tensors that refer to this copy
        self.pending = 0  # of those, not yet unpacked since the last restore
        self.round = 0  # restores so far

    def __del__(self) -> None:
        # The graph that held this copy is gone (backward ran, or the forward was abandoned): the
        # buffer goes back to the pool, to be written again once the last copy reading it is done.
        try:
            self.engine.pool.release(self.buffer, self.h2d_done or self.d2h_done)
        except Exception:  # interpreter shutdown: nothing left to return buffers to
            pass


class _Frame:
    """The copies made during one forward of one block, linked to the block that ran before it."""

    __slots__ = ("engine", "module", "keep", "copies", "order", "previous", "started", "__weakref__")

    def __init__(self, engine: OffloadEngine, module: nn.Module, previous: Any) -> None:
        self.engine = engine
        self.module = weakref.ref(module)
        self.keep: set[int] = set()
        for tensor in itertools.chain(module.parameters(), module.buffers()):
            with contextlib.suppress(RuntimeError, NotImplementedError):  # tensor subclasses without storage
                self.keep.add(tensor.untyped_storage().data_ptr())
        # Keyed by a weak reference to the storage itself: alive while any view of it is, so a dead
        # first view neither hides a live storage nor lets a recycled address pose as the old one.
        self.copies: dict[StorageWeakRef, tuple[StorageWeakRef, list[weakref.ref[_HostCopy]]]] = {}
        self.order: list[weakref.ref[_HostCopy]] = []  # in the order forward saved them
        self.previous = previous  # weakref to the frame of the block that ran before, or None
        self.started = False

    def pack(self, tensor: torch.Tensor) -> Any:
        engine = self.engine
        why = engine._keep_reason(tensor, self.keep)
        if why is not None:
            setattr(engine.stats, why, getattr(engine.stats, why) + 1)
            return KeptTensor(self, tensor)
        storage = tensor.untyped_storage()
        lo, hi = byte_span(tensor, storage.nbytes())
        if hi - lo < engine.options.min_bytes:
            engine.stats.kept_small += 1
            return KeptTensor(self, tensor)
        key = StorageWeakRef(storage)
        stored_key, refs = self.copies.get(key, (None, None))
        if stored_key is not None and stored_key.expired():  # a dead storage's address handed out again
            stored_key, refs = None, None
        element = tensor.element_size()
        for ref in refs or ():
            entry = ref()
            if (entry is not None and entry.version == tensor._version and entry.lo <= lo
                    and hi <= entry.lo + entry.nbytes and (lo - entry.lo) % element == 0):
                engine.stats.shared += 1
                return SavedCopy(self, entry, tensor, tensor.storage_offset() - entry.lo // element)
        entry = engine._copy_out(tensor, storage, lo, hi)
        if entry is None:
            return KeptTensor(self, tensor)  # the host cap was reached; on_host_full="keep"
        ref = weakref.ref(entry)
        if refs is None:
            self.copies[key] = (key, [ref])
        else:
            refs.append(ref)
        self.order.append(ref)
        return SavedCopy(self, entry, tensor, tensor.storage_offset() - lo // element)

    def prefetch(self) -> None:
        for ref in reversed(self.order):  # backward needs the last saved first
            entry = ref()
            if entry is not None and _on_host_only(entry):
                self.engine._copy_in(entry, prefetch=True)


def _on_host_only(entry: _HostCopy) -> bool:
    """No device copy of ``entry`` exists: none prefetched, none held, none still in use."""
    return (entry.prefetched is None and entry.held is None
            and (entry.restored is None or entry.restored() is None))


def _unpack(packed: Any) -> torch.Tensor:
    if type(packed) is KeptTensor:
        tensor = packed.tensor
        if tensor._version != packed.version:
            raise modified_error(tensor.type(), tensor.size(), tensor._version, packed.version, packed.frame)
        return tensor
    if packed.witness._version != packed.version:
        raise modified_error(packed.witness.type(), packed.size, packed.witness._version, packed.version, packed.frame)
    frame, entry = packed.frame, packed.entry
    engine = frame.engine
    if not frame.started or _on_host_only(entry):  # backward reached this block (again, over a retained graph)
        frame.started = True
        engine._drain()
        if engine.options.prefetch:
            # This block's own tensors first, as backward needs them, then the block before it, which
            # backward needs next (and whose own first unpack then fetches the block before it).
            frame.prefetch()
            previous = frame.previous() if frame.previous is not None else None
            if previous is not None:
                previous.started = False
                previous.prefetch()
    data = engine._restore(entry, packed)
    if entry.nbytes % packed.dtype.itemsize == 0:
        tensor = data.view(packed.dtype).as_strided(packed.size, packed.stride, packed.offset)
    else:  # a span shared by tensors of another element size: rebuilt on the storage, unwatched
        tensor = torch.empty(0, dtype=packed.dtype, device=entry.device).set_(
            data.untyped_storage(), packed.offset, packed.size, packed.stride)
    engine._consume(entry, tensor)
    if packed.conj:
        tensor = tensor.conj()
    if packed.neg:
        tensor = torch._neg_view(tensor)
    return tensor


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
        # Copies out not yet waited for by the stream that produced their source: (event, source, stream).
        self._in_flight: collections.deque[tuple[Any, torch.Tensor, Any]] = collections.deque()
        self._last_frame: Any = None
        self._chain: set[int] = set()  # the blocks of the forward in progress (ids)
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
            if current_rank() != 0:  # every rank would say the same: rank 0 says it for the launch
                return False
            warnings.warn(
                "ckpt_wrapper: offload of a block in host memory has nothing to free; it runs without "
                "offload. Pass cpu_copy=True to exercise the copies on CPU.",
                UserWarning,
                stacklevel=caller_stacklevel(),
            )
        return False

    @contextlib.contextmanager
    def saving(self, module: nn.Module) -> Iterator[None]:
        """Within this context, what autograd saves goes through the engine (``module``'s own
        parameters and buffers excepted)."""
        # Frames chain block to block within one forward; a block seen again starts a new chain (the next
        # forward), so backward never prefetches another graph's tensors.
        if id(module) in self._chain:
            self._chain, self._last_frame = set(), None
        self._chain.add(id(module))
        frame = _Frame(self, module, self._last_frame)
        self._last_frame = weakref.ref(frame)
        try:
            with torch.autograd.graph.saved_tensors_hooks(frame.pack, _unpack):
                yield
        finally:
            if self._in_flight:  # free what finished copying while the block ran
                self._retire_copies_out()

    def clear_cache(self) -> None:
        """Release the pool's cached host buffers (say, before a phase without offload)."""
        self.pool.clear()

    def _keep_reason(self, tensor: torch.Tensor, keep: set[int]) -> str | None:
        if tensor.layout != torch.strided or tensor.is_nested:
            return "kept_layout"
        # Parameters are never offloaded; subclasses (DTensor, FakeTensor) manage their own storage.
        if type(tensor) is not torch.Tensor or tensor.device.type == "meta":
            return "kept_param"
        if tensor.device.type == "cpu" and not self.options.cpu_copy:
            return "kept_on_host"
        # Parameters (frozen ones passed in from outside too) and leaves that require grad (FSDP1's
        # flat parameter behind its views, a user's input) are referenced elsewhere: copying them
        # would free nothing.
        base = tensor._base if tensor._base is not None else tensor
        if isinstance(base, nn.Parameter) or (base.is_leaf and base.requires_grad) or tensor.untyped_storage().data_ptr() in keep:
            return "kept_param"
        return None

    def copy_streams(self, device: torch.device | str) -> tuple[Any, Any]:
        """The CUDA streams this engine copies on for ``device``: (to the host, back to the device).

        Made on first use. Read them to profile the copies or to order other work after them.
        """
        device = torch.device(device)
        if device.index is None:  # "cuda" is the current device; tensors name it with its index
            device = torch.device(device.type, torch.cuda.current_device())
        streams = self._streams.get(device)
        if streams is None:
            streams = (torch.cuda.Stream(device), torch.cuda.Stream(device))
            self._streams[device] = streams
        return streams

    def _copy_out(self, tensor: torch.Tensor, storage: torch.UntypedStorage, lo: int, hi: int) -> _HostCopy | None:
        nbytes = hi - lo
        cuda = tensor.device.type == "cuda"
        if cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "ckpt_wrapper offload cannot run inside CUDA graph capture (torch.compile with "
                "mode='reduce-overhead', or torch.cuda.graph): its copies go to host memory on side streams, "
                "which a graph cannot replay. Compile this model with mode='default' or "
                "'max-autotune-no-cudagraphs', or checkpoint these blocks instead of offloading them."
            )
        buffer, ready = self.pool.acquire(nbytes)
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
        entry = _HostCopy(self, buffer, tensor, lo, nbytes)
        source = torch.empty(0, dtype=torch.uint8, device=tensor.device).set_(storage, lo, (nbytes,))
        if cuda:
            d2h, _ = self.copy_streams(tensor.device)
            current = torch.cuda.current_stream(tensor.device)
            d2h.wait_stream(current)
            if ready is not None:  # the last copy back out of this buffer must have read it
                d2h.wait_event(ready)
            with torch.cuda.stream(d2h):
                buffer[:nbytes].copy_(source, non_blocking=True)
                entry.d2h_done = torch.cuda.Event()
                entry.d2h_done.record(d2h)
            # The source is held until its stream has waited for the copy: freed then, its memory is
            # reused in stream order, safely, without events for the allocator to poll.
            self._in_flight.append((entry.d2h_done, source, current))
            self._retire_copies_out()
        else:
            buffer[:nbytes].copy_(source)
        self.stats.copies += 1
        self.stats.copied_bytes += nbytes
        return entry

    def _retire_copies_out(self) -> None:
        """Drop the sources whose copies are done (a query, not a wait); past ``max_in_flight``, let the
        producing stream wait on the device for the oldest copy, and drop its source."""
        in_flight = self._in_flight
        while in_flight and in_flight[0][0].query():
            in_flight.popleft()
        while len(in_flight) > self.options.max_in_flight:
            event, _, stream = in_flight.popleft()
            stream.wait_event(event)  # on the device: the host runs on

    def _drain(self) -> None:
        """Let every stream that produced a tensor still being copied out wait for its copy, and drop it."""
        while self._in_flight:
            event, _, stream = self._in_flight.popleft()
            stream.wait_event(event)

    def _copy_in(self, entry: _HostCopy, *, prefetch: bool) -> torch.Tensor:
        # Allocated on the stream that computes, so that compute reuses the memory once it is freed.
        restored = torch.empty(entry.nbytes, dtype=torch.uint8, device=entry.device)
        if entry.device.type == "cuda":
            _, h2d = self.copy_streams(entry.device)
            h2d.wait_stream(torch.cuda.current_stream(entry.device))  # work queued before may still use it
            if entry.d2h_done is not None:
                h2d.wait_event(entry.d2h_done)
            with torch.cuda.stream(h2d):
                restored.copy_(entry.buffer[: entry.nbytes], non_blocking=True)
                entry.h2d_done = torch.cuda.Event()
                entry.h2d_done.record(h2d)
            restored.record_stream(h2d)  # freed before anything reads it: not before the copy is done
        else:
            restored.copy_(entry.buffer[: entry.nbytes])
        entry.waited = set()
        if prefetch:
            entry.prefetched = restored
            self.stats.prefetched += 1
        else:
            self.stats.restores += 1
        return restored

    def _restore(self, entry: _HostCopy, saved: SavedCopy) -> torch.Tensor:
        """The device copy of the span ``saved`` lies in (uint8): the live restored one, or a new one.

        Every tensor unpacked from it is a view of it, so they share its version counter: a write into
        one (a gradient that aliases a saved tensor, accumulated into) is seen at the next unpack.
        """
        data = entry.held
        if data is None and entry.restored is not None:
            data = entry.restored()
        if data is None:  # first use, or every earlier copy back is gone (retain_graph)
            data = entry.prefetched if entry.prefetched is not None else self._copy_in(entry, prefetch=False)
            entry.prefetched = None
            entry.held = data
            entry.round += 1
            entry.pending = entry.live
            entry.restored = weakref.ref(data)
            entry.restored_version = data._version
        elif data._version != entry.restored_version:
            raise modified_error(saved.witness.type(), saved.size, data._version, entry.restored_version, saved.frame)
        if saved.round != entry.round:
            saved.round = entry.round
            entry.pending -= 1
            if entry.pending <= 0:  # every saved tensor of the span has read it: from now on, held weakly
                entry.held = None
        return data

    def _consume(self, entry: _HostCopy, tensor: torch.Tensor) -> None:
        """Order the stream about to read ``tensor`` after its copy back, and tell the allocator it reads."""
        if entry.device.type != "cuda":
            return
        current = torch.cuda.current_stream(entry.device)
        if current.cuda_stream not in entry.waited:
            entry.waited.add(current.cuda_stream)
            current.wait_event(entry.h2d_done)
            tensor.record_stream(current)
