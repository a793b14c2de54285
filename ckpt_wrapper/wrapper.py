"""Transparent activation wrappers: ``CheckpointWrapper`` and the machinery it shares with offload.

PyTorch's ``checkpoint_wrapper`` puts the block inside a new module, so every name below it gains a
``_checkpoint_wrapped_module.`` prefix that FSDP, DCP, accelerate and torchtitan each strip by hand.
Here the block *becomes* the wrapper instead: its ``__class__`` is swapped for a generated subclass of
both the wrapper kind and the block's own class (the technique FSDP2's ``fully_shard`` uses). Names,
state-dict keys, ``isinstance`` checks and ``type(block).__name__`` stay exactly as they were, and
``unwrap`` restores the original class.

Example:
    >>> import torch
    >>> from ckpt_wrapper import checkpoint_wrapper, CheckpointWrapper
    >>> block = torch.nn.Linear(4, 4)
    >>> wrapped = checkpoint_wrapper(block)
    >>> wrapped is block, isinstance(block, torch.nn.Linear), isinstance(block, CheckpointWrapper)
    (True, True, True)
    >>> sorted(name for name, _ in block.named_parameters())
    ['bias', 'weight']
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.utils.checkpoint as torch_checkpoint
from torch import nn

from ckpt_wrapper.offload_engine import OffloadEngine, OffloadOptions
from ckpt_wrapper.reentrant import reentrant_checkpoint
from ckpt_wrapper.replay import ForwardRecord
from ckpt_wrapper.state import ActivationWrapper, WrapState, annotate_error, block_label, compat_attribute, install, unwrap, wrap_state

__all__ = ["CheckpointImpl", "CheckpointOptions", "CheckpointWrapper", "ActivationWrapper", "checkpoint_wrapper", "unwrap"]


class CheckpointImpl(enum.Enum):
    """Which ``torch.utils.checkpoint`` implementation a ``CheckpointWrapper`` uses.

    ``NO_REENTRANT`` (the default) supports keyword arguments, ``torch.autograd.grad``, nested
    structures and inputs that do not require grad. ``REENTRANT`` exists for code written against it;
    ckpt_wrapper still keeps gradients flowing when no input requires grad. PyTorch's own
    ``torch.distributed.algorithms._checkpoint.checkpoint_wrapper.CheckpointImpl`` values are accepted
    wherever this enum is.
    """

    REENTRANT = enum.auto()
    NO_REENTRANT = enum.auto()

    @classmethod
    def coerce(cls, value: Any) -> CheckpointImpl:
        """Return ``value`` as a ``CheckpointImpl``; accepts PyTorch's enum and member names.

        Raises:
            TypeError: if ``value`` names no implementation.
        """
        if isinstance(value, cls):
            return value
        name = value.name if isinstance(value, enum.Enum) else value
        if isinstance(name, str) and name.upper() in cls.__members__:
            return cls[name.upper()]
        raise TypeError(
            f"checkpoint_impl must be a CheckpointImpl (REENTRANT or NO_REENTRANT); got {value!r}. "
            "Pass ckpt_wrapper.CheckpointImpl.NO_REENTRANT (the default) or CheckpointImpl.REENTRANT."
        )


_CHECKPOINT_OPTIONS = frozenset(
    name
    for name in inspect.signature(torch_checkpoint.checkpoint).parameters
    if name not in {"function", "args", "kwargs", "use_reentrant"}
) | {"preserve_rng_state"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckpointOptions:
    """How a ``CheckpointWrapper`` checkpoints (kept in the block's ``WrapState.options``)."""

    impl: CheckpointImpl = CheckpointImpl.NO_REENTRANT
    """The ``torch.utils.checkpoint`` implementation."""
    fn: Callable[..., Any] | None = None
    """The user's replacement for ``torch.utils.checkpoint.checkpoint``, if one was given."""
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Options passed to the checkpoint function (``preserve_rng_state``, ``context_fn``, ...)."""


_DEFAULT_OPTIONS = CheckpointOptions()


class CheckpointWrapper(ActivationWrapper):
    """A block whose activations are dropped in forward and recomputed in backward.

    A wrapped block is the same object with the same names and parameters; only its class changed, to
    a subclass of both ``CheckpointWrapper`` and its original class. Build one with
    ``checkpoint_wrapper(module)`` or ``apply_activation_checkpointing(model, ...)``.

    Example:
        >>> import torch
        >>> from ckpt_wrapper import checkpoint_wrapper
        >>> block = checkpoint_wrapper(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU()))
        >>> block(torch.randn(2, 8, requires_grad=True)).sum().backward()
        >>> block[0].weight.grad.shape
        torch.Size([8, 8])
    """

    __ckpt_tag__ = "checkpointed"

    @compat_attribute
    def checkpoint_impl(self) -> CheckpointImpl:
        """The checkpoint implementation in use (as on PyTorch's wrapper)."""
        return (wrap_state(self).options or _DEFAULT_OPTIONS).impl

    @compat_attribute
    def offload_engine(self) -> OffloadEngine | None:
        """The engine the block's saved inputs are offloaded through, when ``offload`` was asked for."""
        return wrap_state(self).engine

    @compat_attribute
    def checkpoint_fn(self) -> Callable[..., Any] | None:
        """The user's replacement for ``torch.utils.checkpoint.checkpoint``, if one was given."""
        return (wrap_state(self).options or _DEFAULT_OPTIONS).fn

    def __ckpt_forward__(self, state: WrapState, inner: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        options = state.options or _DEFAULT_OPTIONS
        calls = 0
        record: ForwardRecord | None = None
        # A selective policy caches op outputs; a module that then writes into one in place
        # (ReLU(inplace=True)) would corrupt the cache. Out of place, the values are the same.
        out_of_place = (
            _OutOfPlace(self) if "context_fn" in options.kwargs and not torch.compiler.is_compiling() else _NO_CONTEXT
        )

        def run(*call_args: Any, **call_kwargs: Any) -> Any:
            nonlocal calls, record
            replay: Any = _NO_CONTEXT
            # Side effects dynamo cannot trace inside the checkpoint op; compiled graphs apply buffer
            # mutations once, after the forward graph, so there is nothing to undo there.
            if not torch.compiler.is_compiling():
                calls += 1
                if calls == 1:
                    record = ForwardRecord(self, state.updated_buffers, call_args, call_kwargs)
                else:
                    state.recomputes += 1
                    if record is not None and record.needed:
                        replay = record.replay()
            try:
                with replay, out_of_place:
                    out = inner(*call_args, **call_kwargs)
            except BaseException as error:
                annotate_error(self, error, "running" if calls <= 1 else "recomputing")
                if isinstance(out_of_place, _OutOfPlace):
                    out_of_place.explain(error)
                raise
            if calls == 1 and record is not None and record.finish_forward():
                raise RuntimeError(
                    f"block {block_label(self)} modified one of its input tensors in place (an in-place op such as "
                    "x.mul_() or x += ...), so its recompute in backward would start from other values. Make that op "
                    "out of place (x = x * ...), or leave this block unwrapped."
                )
            return out

        engine = state.engine
        saving = engine.saving(self) if engine is not None and engine.active_for(self, args, kwargs) else _NO_CONTEXT
        with saving:  # only what the checkpoint itself saves (the block's inputs) passes through it
            if options.impl is CheckpointImpl.REENTRANT and options.fn is None:
                return reentrant_checkpoint(run, args, kwargs, options.kwargs, label=block_label(self))
            # Keyword arguments travel in a closure: passed to checkpoint(), they could collide with its
            # own options (a block taking `debug=` or `context_fn=`).
            bound = functools.partial(_call_with, run, kwargs)
            return (options.fn or _non_reentrant)(bound, *args, **options.kwargs)


_NO_CONTEXT = contextlib.nullcontext()


# In-place forms whose backward differs from the out-of-place one (it reads the output, not the
# input), so switching them would change gradients in the last bits: they stay in place.
_OWN_INPLACE_BACKWARD = (nn.ELU, nn.CELU, nn.SELU)


class _OutOfPlace:
    """Within the context, the block's modules flagged ``inplace=True`` run out of place."""

    def __init__(self, block: nn.Module) -> None:
        flagged = [(name, m) for name, m in block.named_modules() if getattr(m, "inplace", None) is True]
        self.modules = [m for _, m in flagged if not isinstance(m, _OWN_INPLACE_BACKWARD)]
        self.kept = [f"'{name}' ({type(m).__name__})" for name, m in flagged if isinstance(m, _OWN_INPLACE_BACKWARD)]

    def explain(self, error: BaseException) -> None:
        """Name the in-place modules left in place when selective checkpointing saw a cached tensor change."""
        if self.kept and "has been mutated" in str(error):
            error.add_note(
                f"ckpt_wrapper: in-place module(s) {', '.join(self.kept)} wrote into a tensor the selective policy "
                "saved; construct them with inplace=False, or checkpoint this block fully."
            )

    def __enter__(self) -> None:
        for module in self.modules:
            module.inplace = False

    def __exit__(self, *exc: Any) -> None:
        for module in self.modules:
            module.inplace = True


def _call_with(run: Callable[..., Any], kwargs: dict, *args: Any) -> Any:
    return run(*args, **kwargs)


def _non_reentrant(fn: Callable[..., Any], *args: Any, **options: Any) -> Any:
    return torch_checkpoint.checkpoint(fn, *args, use_reentrant=False, **options)


def checkpoint_wrapper(
    module: nn.Module,
    checkpoint_impl: CheckpointImpl = CheckpointImpl.NO_REENTRANT,
    checkpoint_fn: Callable[..., Any] | None = None,
    *,
    offload: bool | OffloadOptions | OffloadEngine = False,
    **checkpoint_fn_kwargs: Any,
) -> CheckpointWrapper:
    """Make ``module`` drop its activations in forward and recompute them in backward.

    A drop-in for PyTorch's private ``checkpoint_wrapper`` with the same signature, except that the
    module is converted in place and returned, so parameter and state-dict names do not change.

    Args:
        module: the block to checkpoint. Modified in place.
        checkpoint_impl: ``CheckpointImpl.NO_REENTRANT`` (default) or ``REENTRANT``; PyTorch's enum is
            accepted too.
        checkpoint_fn: a replacement for ``torch.utils.checkpoint.checkpoint``, called as
            ``checkpoint_fn(fn, *args, **checkpoint_fn_kwargs)``; ``checkpoint_impl`` is then unused.
        offload: also move what the checkpoint still saves (the block's inputs) to host memory:
            ``True`` for default ``OffloadOptions``, an ``OffloadOptions``, or an ``OffloadEngine``
            to share with other blocks.
        **checkpoint_fn_kwargs: options for ``torch.utils.checkpoint.checkpoint`` such as
            ``preserve_rng_state`` (default True), ``context_fn``, ``determinism_check``, ``debug``.

    Returns:
        ``module`` itself, now also an instance of ``CheckpointWrapper``.

    Raises:
        TypeError: for an unknown ``checkpoint_impl`` or option, or a non-module.
        ValueError: if the module is already wrapped, or ``use_reentrant`` contradicts ``checkpoint_impl``.

    Example:
        >>> import torch
        >>> from ckpt_wrapper import checkpoint_wrapper, unwrap
        >>> layer = checkpoint_wrapper(torch.nn.Linear(4, 2))
        >>> layer(torch.randn(3, 4)).shape
        torch.Size([3, 2])
        >>> type(unwrap(layer)) is torch.nn.Linear
        True
    """
    impl = CheckpointImpl.coerce(checkpoint_impl)
    options = dict(checkpoint_fn_kwargs)
    if checkpoint_fn is None:
        if "use_reentrant" in options:
            wanted = CheckpointImpl.REENTRANT if options.pop("use_reentrant") else CheckpointImpl.NO_REENTRANT
            if wanted is not impl:
                raise ValueError(
                    f"use_reentrant={wanted is CheckpointImpl.REENTRANT} contradicts "
                    f"checkpoint_impl={impl.name}; pass only checkpoint_impl."
                )
        unknown = sorted(set(options) - _CHECKPOINT_OPTIONS)
        if unknown:
            raise TypeError(
                f"unknown checkpoint option(s) {unknown}; torch.utils.checkpoint.checkpoint accepts "
                f"{sorted(_CHECKPOINT_OPTIONS)}."
            )
        if impl is CheckpointImpl.REENTRANT:
            reentrant_unsupported = sorted(set(options) - {"preserve_rng_state"})
            if reentrant_unsupported:
                raise ValueError(
                    f"option(s) {reentrant_unsupported} need CheckpointImpl.NO_REENTRANT; "
                    "reentrant checkpoint only takes preserve_rng_state."
                )
    elif not callable(checkpoint_fn):
        raise TypeError(f"checkpoint_fn must be callable, got {type(checkpoint_fn).__name__}")
    engine, private = None, False
    if isinstance(offload, OffloadEngine):
        engine = offload
    elif isinstance(offload, OffloadOptions):
        engine, private = OffloadEngine(offload), True
    elif offload is True:
        engine, private = OffloadEngine(), True
    elif offload is not False:
        raise TypeError(f"offload must be a bool, OffloadOptions or OffloadEngine; got {type(offload).__name__}")
    install(CheckpointWrapper, module, options=CheckpointOptions(impl=impl, fn=checkpoint_fn, kwargs=options),
            engine=engine, engine_mergeable=private)
    return module  # type: ignore[return-value]


# PyTorch's wrapper classes are called to wrap; so are these: CheckpointWrapper(module, ...).
CheckpointWrapper.__ckpt_wrap__ = staticmethod(checkpoint_wrapper)  # type: ignore[assignment]

# Names FSDP-era code imports from PyTorch's checkpoint_wrapper module. No name carries the prefix
# here; code that strips it finds nothing to strip.
_CHECKPOINT_WRAPPED_MODULE = "_checkpoint_wrapped_module"
_CHECKPOINT_PREFIX = _CHECKPOINT_WRAPPED_MODULE + "."
