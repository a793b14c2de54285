"""Offload of saved activations to host memory: ``OffloadWrapper``, ``offload_wrapper``, engines.

A wrapped block runs its forward under ``saved_tensors_hooks`` that move what autograd saves into
reusable host buffers and bring it back in backward (see ``ckpt_wrapper.offload_engine`` for the streams).
Parameters, buffers, views of either and small tensors stay where they are; tensors that share storage
are copied once and come back sharing it, with their device, dtype, shape and strides.

Blocks wrapped by one ``apply_activation_checkpointing`` call share one engine (one buffer pool, and
backward prefetches each block's tensors while the block after it computes); pass ``engine=`` to
share one explicitly, and read its ``stats`` and ``pool``.

On a machine whose block lives in host memory there is nothing to free, so offload is a no-op that
says so once, unless ``cpu_copy=True`` asks for copies into separate host buffers anyway: that mode
exists so selection, de-duplication, pooling and restore are exercised on CPU-only machines.

Example:
    >>> import torch
    >>> from ckpt_wrapper import offload_wrapper
    >>> block = offload_wrapper(torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU()),
    ...                         cpu_copy=True, min_bytes=0)
    >>> block(torch.randn(32, 64, requires_grad=True)).sum().backward()
    >>> block[0].weight.grad.shape, block.offload_engine.stats.copies > 0
    (torch.Size([64, 64]), True)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from torch import nn

from ckpt_wrapper.offload_engine import HostPool, OffloadEngine, OffloadOptions, OffloadStats
from ckpt_wrapper.state import ActivationWrapper, WrapState, annotate_error, compat_attribute, install, wrap_state

__all__ = ["HostPool", "OffloadEngine", "OffloadOptions", "OffloadStats", "OffloadWrapper", "offload_wrapper"]


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

    __ckpt_tag__ = "offloaded"

    @compat_attribute
    def offload_engine(self) -> OffloadEngine:
        """The engine this block offloads through (shared with the blocks wrapped beside it)."""
        return _engine_of(wrap_state(self))

    @compat_attribute
    def offload_options(self) -> OffloadOptions:
        """The options this block offloads with."""
        return _engine_of(wrap_state(self)).options

    def __ckpt_forward__(self, state: WrapState, inner: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        engine = _engine_of(state)
        if not engine.active_for(self, args, kwargs):
            return inner(*args, **kwargs)
        with engine.saving(self):
            try:
                return inner(*args, **kwargs)
            except BaseException as error:
                annotate_error(self, error, "running")
                raise


def _engine_of(state: WrapState) -> OffloadEngine:
    if state.engine is None:  # a block built by calling its class: default options
        state.engine = OffloadEngine()
    return state.engine


def _engine_for(engine: OffloadEngine | None, options: dict[str, Any]) -> tuple[OffloadEngine, bool]:
    """The engine to use and whether it was made here (and so may be merged with its siblings')."""
    if engine is not None:
        if options:
            raise TypeError(
                f"pass either engine= or offload options, not both (got engine and {sorted(options)}); "
                "the engine's own options apply to every block it serves"
            )
        if not isinstance(engine, OffloadEngine):
            raise TypeError(f"engine must be an OffloadEngine, got {type(engine).__name__}")
        return engine, False
    try:
        return OffloadEngine(OffloadOptions(**options)), True
    except TypeError as error:
        known = [f.name for f in dataclasses.fields(OffloadOptions)]
        raise TypeError(f"{error}; offload options are {known}") from None


def offload_wrapper(module: nn.Module, *, engine: OffloadEngine | None = None, **options: Any) -> OffloadWrapper:
    """Make ``module`` keep its saved activations in host memory between forward and backward.

    A drop-in for PyTorch's private ``offload_wrapper``; the module is converted in place.

    Args:
        module: the block to offload. Modified in place.
        engine: an ``OffloadEngine`` to share with other blocks; by default a new one, merged with the
            others made by the same ``apply_activation_checkpointing`` call.
        **options: ``OffloadOptions`` fields: ``min_bytes``, ``pin_memory``, ``cpu_copy``,
            ``max_host_bytes``, ``on_host_full``, ``max_in_flight``, ``prefetch``.

    Returns:
        ``module`` itself, now also an instance of ``OffloadWrapper``.

    Raises:
        ValueError: if the module is already wrapped or an option is out of range.
        TypeError: for an unknown option, or ``engine`` together with options.

    Example:
        >>> import torch
        >>> from ckpt_wrapper import offload_wrapper
        >>> layer = offload_wrapper(torch.nn.Linear(4, 4), cpu_copy=True)
        >>> layer.offload_options.cpu_copy
        True
    """
    chosen, made_here = _engine_for(engine, options)
    install(OffloadWrapper, module, engine=chosen, engine_mergeable=made_here)
    return module  # type: ignore[return-value]


OffloadWrapper.__ckpt_wrap__ = staticmethod(offload_wrapper)  # type: ignore[assignment]
