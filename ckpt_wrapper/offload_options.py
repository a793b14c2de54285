"""What an offload engine is told (``OffloadOptions``) and what it counts (``OffloadStats``).

Example:
    >>> from ckpt_wrapper import OffloadOptions
    >>> OffloadOptions(cpu_copy=True).max_in_flight
    32
"""

from __future__ import annotations

import dataclasses
from typing import Literal

__all__ = ["OffloadOptions", "OffloadStats"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class OffloadOptions:
    """How saved tensors are chosen, bounded and moved."""

    min_bytes: int = 1 << 16
    """Tensors spanning fewer bytes than this stay on the device: their copies cost more than they free."""
    pin_memory: bool = True
    """Copy into page-locked host memory (only where an accelerator is present)."""
    cpu_copy: bool = False
    """On CPU, copy into separate host buffers anyway (a test mode: it frees nothing)."""
    max_host_bytes: int | None = None
    """The bound on host buffer bytes the pool holds (in use plus cached); None for the default bound, twice
    the most the pool ever had in use at once (``ckpt_wrapper.host_pool``)."""
    on_host_full: Literal["keep", "raise"] = "keep"
    """At the cap: keep the tensor on the device (``keep``) or raise ``RuntimeError`` (``raise``)."""
    max_in_flight: int = 32
    """Copies to the host that may be outstanding before compute waits (on the device) for the oldest."""
    prefetch: bool = True
    """In backward, copy the previous block's tensors back while the current block computes."""

    def __post_init__(self) -> None:
        for name in ("pin_memory", "cpu_copy", "prefetch"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        for name in ("min_bytes", "max_host_bytes", "max_in_flight"):
            if isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be an int, got {getattr(self, name)!r}")
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
    """Spans of storage copied to the host."""
    copied_bytes: int = 0
    """Bytes copied to the host."""
    shared: int = 0
    """Saved tensors that reused another's copy (same storage, within its span, unchanged)."""
    kept_small: int = 0
    """Tensors kept on the device for spanning fewer than ``min_bytes``."""
    kept_param: int = 0
    """Parameters, buffers, their views, other leaves that require grad, and tensor subclasses
    (DTensor and FSDP2's sharded parameters among them), kept where they are."""
    kept_layout: int = 0
    """Sparse (COO, CSR, CSC, BSR, BSC) and nested tensors, kept where they are."""
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
