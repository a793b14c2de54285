"""What the offload engine's pack hook returns, and the checks its unpack hook makes.

``SavedCopy`` records where a moved tensor's bytes went and how to rebuild it (dtype, offset, size,
strides, conjugate and negative bits), with a witness of its version counter; ``KeptTensor`` is a
tensor left where it was, with its version at saving. Saved-tensor hooks bypass autograd's own check
that a saved tensor was not written in place before backward read it, so these records carry the
versions and ``modified_error`` says what autograd would have said.

Example:
    >>> import torch
    >>> from ckpt_wrapper.offload_records import byte_span
    >>> storage = torch.empty(64, 64)
    >>> byte_span(storage[:2], storage.untyped_storage().nbytes())   # 2 of 64 rows: only their bytes
    (0, 512)
    >>> byte_span(storage.t(), storage.untyped_storage().nbytes())   # the whole storage
    (0, 16384)
"""

from __future__ import annotations

from typing import Any

import torch

from ckpt_wrapper.state import block_label

__all__ = ["KeptTensor", "SavedCopy", "byte_span", "modified_error"]


class SavedCopy:
    """What the pack hook returns for a tensor it moved: where its bytes are and how to rebuild it.

    ``frame`` is the block's frame, ``entry`` the host copy of the span the tensor lies in, and
    ``el_offset`` the tensor's offset (in elements) within that span.
    """

    __slots__ = ("frame", "entry", "witness", "version", "dtype", "offset", "size", "stride", "conj", "neg",
                 "round")

    def __init__(self, frame: Any, entry: Any, tensor: torch.Tensor, el_offset: int) -> None:
        self.frame = frame
        self.entry = entry
        # Shares the tensor's version counter but not its storage: in-place writes after saving are seen
        # without keeping the memory alive. Re-pointing it must not bump the counter others check.
        self.version = tensor._version
        witness = tensor.detach()
        witness.set_()
        torch._C._autograd._unsafe_set_version_counter((witness,), (self.version,))
        self.witness = witness
        self.dtype = tensor.dtype
        self.offset = el_offset
        self.size = tensor.size()
        self.stride = tensor.stride()
        self.conj = tensor.is_conj()
        self.neg = tensor.is_neg()
        self.round = 0
        entry.live += 1

    def __del__(self) -> None:
        self.entry.live -= 1


class KeptTensor:
    """A tensor the pack hook left where it was, with its version at saving (hooks bypass autograd's check)."""

    __slots__ = ("frame", "tensor", "version")

    def __init__(self, frame: Any, tensor: torch.Tensor) -> None:
        self.frame = frame
        self.tensor = tensor
        self.version = tensor._version


def byte_span(tensor: torch.Tensor, storage_bytes: int) -> tuple[int, int]:
    """The byte range of its storage that ``tensor`` reads: the whole storage when it reads half or more
    (views of one storage then share one copy), else only its own range."""
    if tensor.numel() == 0:
        return 0, 0
    element = tensor.element_size()
    extent = 1 + sum((size - 1) * stride for size, stride in zip(tensor.size(), tensor.stride()))
    lo = tensor.storage_offset() * element
    hi = lo + extent * element
    if 2 * (hi - lo) >= storage_bytes:
        return 0, storage_bytes
    return lo, hi


def modified_error(tensor_type: str, size: torch.Size, now: int, saved: int, frame: Any) -> RuntimeError:
    """Autograd's error for a saved tensor written in place (``now`` is its version, ``saved`` the one it
    was saved at), naming the block of ``frame`` and the fix."""
    module = frame.module()
    label = ""
    if module is not None:
        label = f" in block {block_label(module)}"
    return RuntimeError(
        "one of the variables needed for gradient computation has been modified by an inplace operation: "
        f"[{tensor_type} {list(size)}] is at version {now}; expected version {saved} instead. "
        f"ckpt_wrapper offload: it was saved by the forward{label} and written in place afterwards, which "
        "would make backward read other values than forward used. Make that write out of place "
        "(y = x * 2 instead of x.mul_(2)), or clone the tensor before writing into it."
    )
