"""Devices, dtypes and process groups: the one resolver every entry point uses.

``default_device`` gives this rank's device, ``resolve_dtype`` turns ``"bf16"`` into ``torch.bfloat16``,
``init_distributed`` joins (or makes) a process group with the backend that suits the device;
``shutdown_distributed`` leaves it so that the process can exit cleanly.

Example:
    >>> from ckpt_wrapper.distributed import default_device, resolve_dtype
    >>> default_device("cpu"), resolve_dtype("bf16")
    (device(type='cpu'), torch.bfloat16)
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import importlib
import os
import sys
import time
import warnings
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["DTYPES", "default_device", "init_distributed", "resolve_dtype", "shutdown_distributed"]

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


_GLOO_THREADS = ("pt_gloo_runloop", "gloo_tcp_loop")
"""Names (``/proc/self/task/*/comm``) of the threads a gloo process group runs until its C++ object is freed."""


def _gloo_threads() -> int:
    """How many gloo worker and transport threads this process runs (0 where ``/proc`` cannot tell)."""
    count = 0
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return 0
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/comm") as comm:
                count += comm.read().strip() in _GLOO_THREADS
        except OSError:  # the thread ended while we looked
            pass
    return count


def _unpin_default_arguments() -> None:
    """Drop the default group that ``torch.distributed.nn.functional`` captured when it was imported.

    Its functions are declared ``def all_reduce(tensor, op=..., group=group.WORLD)``: the default is
    evaluated at import, and the module is imported lazily, by ``torch._dynamo`` (which building any
    ``torch.optim`` optimizer imports). Imported after ``init_process_group``, every such default holds
    the default group for the life of the interpreter, and with it its gloo threads, past
    ``destroy_process_group``. ``None`` is what those defaults are when the module is imported before any
    group exists, and means the default group of the moment.
    """
    functional = sys.modules.get("torch.distributed.nn.functional")
    if functional is None:
        return
    for value in list(vars(functional).values()):
        while callable(value):
            for attribute in ("__defaults__", "__kwdefaults__"):
                defaults = getattr(value, attribute, None)
                if isinstance(defaults, tuple) and any(isinstance(d, dist.ProcessGroup) for d in defaults):
                    setattr(value, attribute, tuple(None if isinstance(d, dist.ProcessGroup) else d for d in defaults))
                elif isinstance(defaults, dict) and any(isinstance(d, dist.ProcessGroup) for d in defaults.values()):
                    setattr(value, attribute, {k: None if isinstance(d, dist.ProcessGroup) else d
                                               for k, d in defaults.items()})
            value = getattr(value, "__wrapped__", None)


def _release_destroyed_groups() -> None:
    """Drop what still points at the (destroyed) process groups once the caller's objects are gone.

    DTensor caches its sharding decisions keyed by DTensor specs, and every spec holds its DeviceMesh,
    which holds its process groups (``DeviceMesh._pg_registry``): after an FSDP2 or ``init_device_mesh``
    run those caches keep every mesh's groups, and their gloo threads, alive until interpreter shutdown.
    Called after ``destroy_process_group``, when no mesh can be used again anyway.
    """
    try:
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.tensor import DTensor
    except ImportError:  # a build without torch.distributed.tensor: no meshes, no caches
        return
    propagator = getattr(getattr(DTensor, "_op_dispatcher", None), "sharding_propagator", None)
    for name in ("propagate_op_sharding", "_propagate_tensor_meta_cached"):
        with contextlib.suppress(Exception):  # private to PyTorch: clear what this version has
            getattr(propagator, name).cache_clear()
    for obj in gc.get_objects():
        if isinstance(obj, DeviceMesh) and isinstance(getattr(obj, "_pg_registry", None), dict):
            obj._pg_registry.clear()


def shutdown_distributed(*, barrier: bool = True, wait_s: float = 10.0) -> int:
    """Leave the process group so that the process exits with status 0: call it once training is done and
    the model, optimizer and meshes are out of scope (after the function that held them has returned).

    In order: a ``barrier`` (every rank has finished its collectives before any tears its group down),
    ``destroy_process_group`` (the default group and every subgroup, including a ``DeviceMesh``'s), then a
    garbage collection so that the process groups' C++ objects are freed now, on this thread, while the
    interpreter is fully alive.

    Why more than ``destroy_process_group``: it only unregisters the groups. A gloo group's worker threads
    run until its last Python reference is gone, and after a run references remain: in reference cycles
    (FSDP state, modules), in ``torch.distributed.nn.functional``'s default arguments (``group=group.WORLD``,
    evaluated when ``torch._dynamo`` imports the module, which building any optimizer does) and in DTensor's
    sharding caches (spec -> DeviceMesh -> its groups). Left to interpreter shutdown, the threads outlive
    the interpreter's start of finalization; a worker that then releases its last work object frees tensors
    whose Python objects need the GIL, and a thread taking the GIL during finalization is ended with
    ``pthread_exit``, whose unwinding through a ``noexcept`` destructor calls ``std::terminate``: "terminate
    called without an active exception", SIGABRT after a successful run. See docs/reliability.md.

    Safe without a group (it only collects) and on one rank (no barrier). Do not call it on a failure path
    where another rank may be stuck in a collective: use ``destroy_process_group()`` there.

    Args:
        barrier: synchronize the ranks first (``False`` where they are known to be in step, or on failure).
        wait_s: how long to wait for the gloo threads to end once their groups are freed.

    Returns:
        The gloo threads still running (0 where every group was freed; more where something outside the
        caller's frames still holds a group or a mesh: a global, a cache, an object kept for later).

    Example:
        >>> import torch
        >>> from ckpt_wrapper.distributed import init_distributed, shutdown_distributed
        >>> init_distributed(torch.device("cpu"))
        True
        >>> shutdown_distributed()
        0
    """
    if dist.is_initialized():
        if barrier and dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()
    gc.collect()  # the cycles (FSDP state, modules, optimizers) that hold meshes and groups
    _unpin_default_arguments()
    _release_destroyed_groups()
    gc.collect()  # the groups themselves: their destructors join the worker threads, here and now
    deadline = time.monotonic() + wait_s
    left = _gloo_threads()
    while left and time.monotonic() < deadline:
        time.sleep(0.01)
        left = _gloo_threads()
    return left


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
