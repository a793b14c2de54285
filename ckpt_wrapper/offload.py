"""Offload of saved activations to host memory: ``OffloadWrapper`` and ``offload_wrapper``.

A wrapped block runs its forward under ``saved_tensors_hooks`` that move what autograd saves to host
memory and bring it back in backward. Parameters, buffers, views of either and small tensors stay
where they are; tensors that share storage are copied once and come back sharing it, with their
device, dtype, shape and strides. Copies here are synchronous and correct; overlapping them with
compute is the job of the stream-based path (see docs/offload.md).

On a machine whose block lives in host memory already there is nothing to gain, so the wrapper is a
no-op that says so once, unless ``cpu_copy=True`` asks it to copy into separate host buffers anyway:
that mode exists so that selection, de-duplication and restore are exercised on CPU-only machines.

Example:
    >>> import torch
    >>> from ckpt_wrapper import offload_wrapper
    >>> block = offload_wrapper(torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU()),
    ...                         cpu_copy=True, min_bytes=0)
    >>> block(torch.randn(32, 64, requires_grad=True)).sum().backward()
    >>> block[0].weight.grad.shape
    torch.Size([64, 64])
"""

from __future__ import annotations

import dataclasses
import itertools
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ckpt_wrapper.wrapper import ActivationWrapper, _register_kind

__all__ = ["OffloadOptions", "OffloadWrapper", "offload_wrapper"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class OffloadOptions:
    """How an ``OffloadWrapper`` chooses and moves saved tensors."""

    min_bytes: int = 1 << 16
    """Tensors smaller than this stay on the device: their copies cost more than they free."""
    pin_memory: bool = True
    """Copy into page-locked host memory (only where an accelerator is present)."""
    cpu_copy: bool = False
    """On CPU, copy into separate host buffers anyway (a test mode: it frees nothing)."""

    def __post_init__(self) -> None:
        if not isinstance(self.min_bytes, int) or self.min_bytes < 0:
            raise ValueError(f"min_bytes must be a non-negative int, got {self.min_bytes!r}")


class _HostCopy:
    """One host copy of (part of) a storage, shared by every saved tensor that views it."""

    __slots__ = ("host", "device", "source", "version", "restored")

    def __init__(self, host: torch.Tensor, device: torch.device, source: torch.Tensor) -> None:
        self.host = host
        self.device = device
        # Weak: holding the source would keep the device memory alive, which offload exists to free.
        self.source = weakref.ref(source)
        self.version = source._version
        self.restored: Callable[[], torch.Tensor | None] = lambda: None

    def to_device(self) -> torch.Tensor:
        restored = self.restored()
        if restored is None:
            restored = self.host.to(self.device, non_blocking=False)
            self.restored = weakref.ref(restored)
        return restored


class _Packer:
    """The pack/unpack pair for one forward of one block."""

    def __init__(self, module: nn.Module, options: OffloadOptions) -> None:
        self.options = options
        self.keep: set[int] = set()
        for tensor in itertools.chain(module.parameters(), module.buffers()):
            try:
                self.keep.add(tensor.untyped_storage().data_ptr())
            except (RuntimeError, NotImplementedError):  # tensor subclasses without a storage
                pass
        self.copies: dict[int, _HostCopy] = {}
        self.copied_bytes = 0

    def _should_offload(self, tensor: torch.Tensor) -> bool:
        # Parameters are never offloaded; subclasses (DTensor, FakeTensor) manage their own storage.
        if type(tensor) is not torch.Tensor or tensor.is_sparse or tensor.device.type == "meta":
            return False
        if tensor.device.type == "cpu" and not self.options.cpu_copy:
            return False
        if tensor.numel() * tensor.element_size() < self.options.min_bytes:
            return False
        # A leaf that requires grad (a parameter, FSDP1's flat parameter behind its views, a user's
        # input) is referenced elsewhere anyway: copying it would free nothing.
        base = tensor._base if tensor._base is not None else tensor
        if base.is_leaf and base.requires_grad:
            return False
        return tensor.untyped_storage().data_ptr() not in self.keep

    def pack(self, tensor: torch.Tensor) -> Any:
        if not self._should_offload(tensor):
            return tensor
        storage = tensor.untyped_storage()
        entry = self.copies.get(storage.data_ptr())
        # Reuse only while the storage is provably the same one (a live view of it) and unchanged since.
        source = entry.source() if entry is not None else None
        if source is None or source.untyped_storage().data_ptr() != storage.data_ptr() or entry.version != tensor._version:
            pin = self.options.pin_memory and tensor.device.type != "cpu" and torch.cuda.is_available()
            flat = torch.empty(0, dtype=torch.uint8, device=tensor.device).set_(storage)
            host = torch.empty(storage.nbytes(), dtype=torch.uint8, pin_memory=pin)
            host.copy_(flat)
            entry = _HostCopy(host, tensor.device, tensor)
            self.copies[storage.data_ptr()] = entry
            self.copied_bytes += storage.nbytes()
        return (entry, tensor.dtype, tensor.storage_offset(), tensor.size(), tensor.stride())

    @staticmethod
    def unpack(packed: Any) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        entry, dtype, offset, size, stride = packed
        raw = entry.to_device().untyped_storage()
        return torch.empty(0, dtype=dtype, device=entry.device).set_(raw, offset, size, stride)


@_register_kind
class OffloadWrapper(ActivationWrapper):
    """A block whose saved activations live in host memory between forward and backward.

    Built by ``offload_wrapper(module)`` or ``apply_activation_checkpointing(model,
    checkpoint_wrapper_fn=offload_wrapper, ...)``; like ``CheckpointWrapper``, it keeps the block's
    names and class.

    Example:
        >>> import torch
        >>> from ckpt_wrapper import offload_wrapper, OffloadWrapper
        >>> layer = offload_wrapper(torch.nn.Linear(4, 4))
        >>> isinstance(layer, OffloadWrapper), isinstance(layer, torch.nn.Linear)
        (True, True)
    """

    _ckpt_repr_tag = "offloaded"

    @property
    def offload_options(self) -> OffloadOptions:
        """The options this block offloads with."""
        return self.__dict__.get("_ckpt_offload_options") or OffloadOptions()

    def _wrapped_forward(self, inner: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        options = self.offload_options
        packer = _Packer(self, options)
        if not options.cpu_copy and not _has_accelerator_tensor(self, args, kwargs):
            warnings.warn(
                "ckpt_wrapper: offload_wrapper on a block in host memory has nothing to offload; it runs "
                "the plain forward. Pass cpu_copy=True to exercise the copies on CPU.",
                UserWarning,
                stacklevel=2,
            )
            return inner(*args, **kwargs)
        with torch.autograd.graph.saved_tensors_hooks(packer.pack, packer.unpack):
            try:
                return inner(*args, **kwargs)
            except BaseException as error:
                self._ckpt_annotate(error, "running")
                raise


def _has_accelerator_tensor(module: nn.Module, args: tuple, kwargs: dict) -> bool:
    tensors = itertools.chain(
        module.parameters(),
        (t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)),
    )
    return any(t.device.type not in ("cpu", "meta") for t in tensors)


def offload_wrapper(
    module: nn.Module,
    *,
    min_bytes: int = OffloadOptions.min_bytes,
    pin_memory: bool = OffloadOptions.pin_memory,
    cpu_copy: bool = OffloadOptions.cpu_copy,
) -> OffloadWrapper:
    """Make ``module`` keep its saved activations in host memory between forward and backward.

    A drop-in for PyTorch's private ``offload_wrapper``; the module is converted in place.

    Args:
        module: the block to offload. Modified in place.
        min_bytes: tensors smaller than this stay on the device.
        pin_memory: copy into page-locked host memory when an accelerator is present.
        cpu_copy: on CPU, copy into separate host buffers anyway (a test mode).

    Returns:
        ``module`` itself, now also an instance of ``OffloadWrapper``.

    Raises:
        ValueError: if the module is already wrapped or ``min_bytes`` is negative.

    Example:
        >>> import torch
        >>> from ckpt_wrapper import offload_wrapper
        >>> layer = offload_wrapper(torch.nn.Linear(4, 4), cpu_copy=True)
        >>> layer.offload_options.cpu_copy
        True
    """
    options = OffloadOptions(min_bytes=min_bytes, pin_memory=pin_memory, cpu_copy=cpu_copy)
    wrapped = OffloadWrapper._install(module)
    wrapped.__dict__["_ckpt_offload_options"] = options
    return wrapped  # type: ignore[return-value]
