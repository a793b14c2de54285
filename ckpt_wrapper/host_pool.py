"""The host buffer pool of the offload engine: reuse, a default bound, least recently used eviction.

Pinning host memory is slow and reusing it is free, so host buffers outlive the step that filled them.
Left alone, a pool of exact sizes grows with every new batch or sequence length (dynamic padding
brings dozens), so the pool bounds itself:

- **Size classes that serve larger requests.** Sizes are rounded up to a class; a request is served
  by the smallest free buffer of its class up to twice its class, so a step at a shorter length reuses
  the buffers of a longer one instead of pinning new ones.
- **A default bound.** The pool never holds more bytes (in use plus cached) than twice the most it has
  had in use at once (its high-water mark): enough for the buffers of two steps of different shapes
  (alternating batch buckets) without pinning again, and over steps of many shapes it holds what the
  two largest needed, not the sum of every step. ``max_bytes``, when given, is the bound instead.
- **Least recently used eviction.** To stay within the bound, the buffers released longest ago go
  first.
- **What is really pinned.** PyTorch's pinned allocator rounds each allocation up to a power of two
  and keeps freed blocks in its own cache. Pinned classes are therefore powers of two, so the pool's
  byte counts are the bytes pinned, and an eviction also empties PyTorch's host cache, so evicted
  memory goes back to the system instead of lingering there.

Nothing here waits on the host: a buffer released while a copy still reads it carries that copy's
event, and the next writer orders its stream after the event (``acquire`` returns it).
"""

from __future__ import annotations

import bisect
import collections
import itertools
from typing import Any

import torch

__all__ = ["CACHE_FACTOR", "HostPool"]

CACHE_FACTOR = 2
"""Without ``max_bytes``, the pool holds at most this many times the most bytes it ever had in use at once."""
_MIN_CLASS = 1 << 12
_MIB = 1 << 20


class HostPool:
    """Host buffers kept for reuse, bounded by the pool's own high-water mark and an optional cap.

    Args:
        pin: allocate page-locked memory (only meaningful where CUDA is present).
        max_bytes: the bound on the bytes held, in use plus cached; None for the default bound
            (``CACHE_FACTOR`` times the most ever in use at once).

    Example:
        >>> from ckpt_wrapper import HostPool
        >>> pool = HostPool(pin=False, max_bytes=None)
        >>> buffer, ready = pool.acquire(5000)
        >>> buffer.numel(), pool.in_use_bytes
        (8192, 8192)
        >>> pool.release(buffer)
        >>> again, _ = pool.acquire(3000)     # a larger free buffer serves a smaller request
        >>> again is buffer, pool.total_bytes
        (True, 8192)
    """

    def __init__(self, *, pin: bool, max_bytes: int | None) -> None:
        self.pin = pin
        self.max_bytes = max_bytes
        self.in_use_bytes = 0
        """Bytes of the buffers handed out and not yet released."""
        self.cached_bytes = 0
        """Bytes of the free buffers kept for reuse."""
        self.high_water_bytes = 0
        """The most bytes ever in use at once: the default bound on ``total_bytes``."""
        self.evictions = 0
        """Free buffers dropped to stay within the bound."""
        # size -> {token: (buffer, ready event)}, most recently released last; plus one global LRU order.
        self._free: dict[int, dict[int, tuple[torch.Tensor, Any]]] = {}
        self._sizes: list[int] = []  # sorted sizes with a free buffer
        self._lru: collections.OrderedDict[int, int] = collections.OrderedDict()  # token -> size
        self._tokens = itertools.count()

    @property
    def total_bytes(self) -> int:
        """Bytes of host memory the pool holds, in use and cached."""
        return self.in_use_bytes + self.cached_bytes

    def size_class(self, nbytes: int) -> int:
        """The buffer size a request of ``nbytes`` is rounded up to.

        Pinned buffers round to powers of two, as PyTorch's pinned allocator does; unpinned ones to
        powers of two up to 1 MiB, then to whole MiB.
        """
        if self.pin or nbytes <= _MIB:
            return max(_MIN_CLASS, 1 << (max(nbytes, 1) - 1).bit_length())
        return -(-nbytes // _MIB) * _MIB

    def acquire(self, nbytes: int) -> tuple[torch.Tensor | None, Any]:
        """A uint8 host buffer of at least ``nbytes`` and the event after which it may be written.

        The event (None when nothing may still read the buffer) is that of the last copy out of it; a
        writer on another stream waits for it on the device. The buffer is None when ``max_bytes``
        forbids one even after evicting every free buffer.
        """
        size = self.size_class(nbytes)
        found = self._take_free(size)
        if found is not None:
            buffer, ready = found
            self._note_in_use(buffer.numel())
            return buffer, ready
        bound = self._bound(self.in_use_bytes + size)
        if self.total_bytes + size > bound:
            self._evict(self.total_bytes + size - bound)
            if self.total_bytes + size > bound:
                return None, None
        buffer = torch.empty(size, dtype=torch.uint8, pin_memory=self.pin)
        self._note_in_use(size)
        return buffer, None

    def release(self, buffer: torch.Tensor, ready: Any = None) -> None:
        """Return ``buffer``; ``ready`` is an event after which nothing reads or writes it (or None)."""
        size = buffer.numel()
        self.in_use_bytes -= size
        self.cached_bytes += size
        token = next(self._tokens)
        bucket = self._free.get(size)
        if bucket is None:
            bucket = self._free[size] = {}
            bisect.insort(self._sizes, size)
        bucket[token] = (buffer, ready)
        self._lru[token] = size
        limit = self._bound(0)
        if self.total_bytes > limit:  # a cap lowered since: stay within it
            self._evict(self.total_bytes - limit)

    def clear(self) -> None:
        """Drop every cached buffer (buffers in use are unaffected)."""
        self._evict(self.cached_bytes)

    def _bound(self, in_use: int) -> int:
        """The most bytes the pool may hold once ``in_use`` bytes are in use."""
        if self.max_bytes is not None:
            return self.max_bytes
        return CACHE_FACTOR * max(self.high_water_bytes, in_use)

    def _note_in_use(self, size: int) -> None:
        self.in_use_bytes += size
        self.high_water_bytes = max(self.high_water_bytes, self.in_use_bytes)

    def _take_free(self, size: int) -> tuple[torch.Tensor, Any] | None:
        index = bisect.bisect_left(self._sizes, size)
        if index == len(self._sizes) or self._sizes[index] > 2 * size:
            return None
        found = self._sizes[index]
        bucket = self._free[found]
        token, entry = bucket.popitem()  # the most recently released: warm in cache
        del self._lru[token]
        self._drop_if_empty(found)
        self.cached_bytes -= found
        return entry

    def _drop_if_empty(self, size: int) -> None:
        if not self._free[size]:
            del self._free[size]
            del self._sizes[bisect.bisect_left(self._sizes, size)]

    def _evict(self, need: int) -> None:
        evicted = 0
        while need > 0 and self._lru:
            token, size = self._lru.popitem(last=False)
            del self._free[size][token]  # a pending copy keeps its pinned block alive in PyTorch's allocator
            self._drop_if_empty(size)
            self.cached_bytes -= size
            need -= size
            evicted += 1
        self.evictions += evicted
        if evicted and self.pin:
            _empty_host_cache()


def _empty_host_cache() -> None:
    """Give the pinned blocks PyTorch's allocator cached back to the system (they would linger there)."""
    empty = getattr(torch._C, "_host_emptyCache", None)
    if empty is not None:
        empty()
