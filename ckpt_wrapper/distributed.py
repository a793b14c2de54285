"""Devices, dtypes and process groups: the one resolver every entry point uses.

``default_device`` gives this rank's device, ``resolve_dtype`` turns ``"bf16"`` into ``torch.bfloat16``,
``init_distributed`` joins (or makes) a process group with the backend that suits the device.

Example:
    >>> from ckpt_wrapper.distributed import default_device, resolve_dtype
    >>> default_device("cpu"), resolve_dtype("bf16")
    (device(type='cpu'), torch.bfloat16)
"""

from __future__ import annotations

import datetime
import importlib
import os
import warnings
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["DTYPES", "default_device", "init_distributed", "resolve_dtype"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""The dtype names every command and recipe accepts."""


def resolve_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """``"bf16"`` -> ``torch.bfloat16``; a ``torch.dtype`` or ``None`` passes through.

    Raises:
        ValueError: for a name not in ``DTYPES``.
    """
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def default_device(requested: str | torch.device | None = None) -> torch.device:
    """This rank's device: ``requested``, with a bare ``cuda`` made ``cuda:LOCAL_RANK``; by default
    ``cuda:LOCAL_RANK`` where CUDA is available, else the CPU.

    Example:
        >>> from ckpt_wrapper.distributed import default_device
        >>> default_device("cpu")
        device(type='cpu')
    """
    device = torch.device(requested) if requested is not None else None
    if device is None and torch.cuda.is_available():
        device = torch.device("cuda")
    if device is None:
        return torch.device("cpu")
    if device.type == "cuda" and device.index is None:
        # Every rank on cuda:0 would be wrong, and torch.cuda.set_device refuses an index-less device.
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % max(torch.cuda.device_count(), 1))
    return device


def init_distributed(device: torch.device, *, timeout_s: float = 300.0) -> bool:
    """Join a process group with the backend that suits ``device``; return whether this call made it.

    Under torchrun (``RANK`` set) it joins the group the environment describes; a lone process gets a
    one-rank group on an in-memory store (no port, so nothing collides with another job), which is what
    ``fully_shard`` and DDP need. An existing group is left as it is (and ``False`` returned).

    Example:
        >>> import torch, torch.distributed as dist
        >>> from ckpt_wrapper.distributed import init_distributed
        >>> made = init_distributed(torch.device("cpu"))
        >>> dist.get_world_size(), dist.get_backend()
        (1, 'gloo')
        >>> dist.destroy_process_group()
    """
    if dist.is_initialized():
        return False
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = dist.get_default_backend_for_device(device)
    timeout = datetime.timedelta(seconds=timeout_s)
    device_id = device if device.type == "cuda" else None
    if "RANK" in os.environ:
        dist.init_process_group(backend, timeout=timeout, device_id=device_id)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout,
                                device_id=device_id)
    return True


_MOVED_TO_RECIPES = ("ShardRecipe", "shard_model", "clean_name", "SHARD_KINDS")
"""Names that lived here and moved to ``ckpt_wrapper.testing.recipes``; still found here, with a warning."""


def __getattr__(name: str) -> Any:
    """Old names: ``ckpt_wrapper.distributed.ShardRecipe`` and its siblings, from their new module.

    Example:
        >>> import warnings
        >>> import ckpt_wrapper.distributed
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     recipe_class = ckpt_wrapper.distributed.ShardRecipe
        >>> recipe_class.__module__, caught[0].category.__name__
        ('ckpt_wrapper.testing.recipes', 'FutureWarning')
    """
    if name in _MOVED_TO_RECIPES:
        warnings.warn(
            f"ckpt_wrapper.distributed.{name} moved to ckpt_wrapper.testing.recipes.{name}; import it from there "
            "(the old path will be removed in a future release).",
            FutureWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module("ckpt_wrapper.testing.recipes"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
