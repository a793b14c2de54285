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
import copyreg
import enum
import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.utils.checkpoint as torch_checkpoint
from torch import nn
from torch.utils import _pytree as pytree

from ckpt_wrapper.offload_engine import OffloadEngine, OffloadOptions

__all__ = ["CheckpointImpl", "CheckpointWrapper", "ActivationWrapper", "checkpoint_wrapper", "unwrap"]


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


# Generated classes, one per (wrapper kind, block class). A memo, not state: the same inputs always
# give the same class, which keeps `type(a) is type(b)` true for two wrapped blocks of one class.
_GENERATED: dict[tuple[type, type], type] = {}


def _generated_class(kind: type[ActivationWrapper], original: type[nn.Module]) -> type:
    key = (kind, original)
    cls = _GENERATED.get(key)
    if cls is None:
        # Same name, qualname and module as the block's class: configs that name blocks by class name
        # (HF `_no_split_modules`, accelerate `transformer_cls_names_to_wrap`) still find them.
        namespace = {
            "__module__": original.__module__,
            "__qualname__": original.__qualname__,
            "_ckpt_original_class": original,
        }
        cls = type(original.__name__, (kind, original), namespace)
        _GENERATED[key] = cls
    return cls


def _rebuild(kind: type[ActivationWrapper], original: type[nn.Module]) -> ActivationWrapper:
    # Unpickling entry point: generated classes cannot be found by name, so pickle stores how to make one.
    return object.__new__(_generated_class(kind, original))


class ActivationWrapper(nn.Module):
    """Base of the transparent wrappers; a block is one when its class was swapped by ``_install``.

    Subclasses implement ``_wrapped_forward(inner, args, kwargs)``, where ``inner`` runs the block's
    own forward. Not constructed directly: use ``checkpoint_wrapper`` or ``offload_wrapper``. (Calling a
    wrapped block's class, ``type(block)(...)``, runs the block's own ``__init__`` and gives a block
    wrapped with default options.)
    """

    _ckpt_original_class: type[nn.Module]
    _ckpt_fqn: str

    @classmethod
    def _install(cls, module: nn.Module, fqn: str | None = None) -> ActivationWrapper:
        if not isinstance(module, nn.Module):
            raise TypeError(f"expected an nn.Module to wrap, got {type(module).__name__}")
        if isinstance(module, ActivationWrapper):
            raise ValueError(
                f"module {module._ckpt_label()} is already wrapped by {_kind_of(type(module)).__name__}; "
                "wrapping twice would recompute twice. Call ckpt_wrapper.unwrap(module) first to rewrap."
            )
        module.__class__ = _generated_class(cls, type(module))
        # An instance-level forward (set by hooks some libraries install) would bypass the class's
        # forward and so the checkpoint; absorb it as the inner forward instead.
        module.__dict__["_ckpt_inner_forward"] = module.__dict__.pop("forward", None)
        module.__dict__["_ckpt_fqn"] = fqn if fqn is not None else ""
        return module  # type: ignore[return-value]

    def _ckpt_label(self) -> str:
        name = self.__dict__.get("_ckpt_fqn") or "<unnamed>"
        return f"'{name}' ({self._ckpt_original_class.__name__})"

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        inner = self.__dict__.get("_ckpt_inner_forward") or functools.partial(
            self._ckpt_original_class.forward, self
        )
        if torch.is_grad_enabled():
            return self._wrapped_forward(inner, args, kwargs)
        # Nothing is saved for backward, so there is nothing to drop, recompute or offload.
        try:
            return inner(*args, **kwargs)
        except BaseException as error:
            self._ckpt_annotate(error, "running")
            raise

    def _wrapped_forward(self, inner: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        raise NotImplementedError

    def _get_name(self) -> str:
        # Shown by print(model) only; type(self).__name__ is left as the block's class name.
        return f"{self._ckpt_original_class.__name__}[{self._ckpt_repr_tag}]"

    _ckpt_repr_tag = "wrapped"

    @property
    def _checkpoint_wrapped_module(self) -> nn.Module:
        """The block itself; kept so code written against PyTorch's wrapper keeps working."""
        return self

    def __reduce_ex__(self, protocol: Any) -> Any:
        reduced = super().__reduce_ex__(protocol)
        cls = type(self)
        if isinstance(reduced, tuple) and reduced[0] is copyreg.__newobj__ and reduced[1][0] is cls:
            key = (_kind_of(cls), self._ckpt_original_class)
            if _GENERATED.get(key) is cls:
                return (_rebuild, key, *reduced[2:])
        return reduced

    def _ckpt_annotate(self, error: BaseException, phase: str) -> None:
        # torch signals early stop of recomputation with an internal exception: it is control flow.
        if type(error).__name__ == "_StopRecomputationError" or getattr(error, "_ckpt_annotated", False):
            return
        error._ckpt_annotated = True  # type: ignore[attr-defined]
        error.add_note(f"ckpt_wrapper: raised while {phase} block {self._ckpt_label()}")


_KINDS: set[type] = set()


def _register_kind(cls: type[ActivationWrapper]) -> type[ActivationWrapper]:
    _KINDS.add(cls)
    return cls


def _kind_of(cls: type) -> type[ActivationWrapper]:
    return next(c for c in cls.__mro__ if c in _KINDS)


_CHECKPOINT_OPTIONS = frozenset(
    name
    for name in inspect.signature(torch_checkpoint.checkpoint).parameters
    if name not in {"function", "args", "kwargs", "use_reentrant"}
) | {"preserve_rng_state"}


@_register_kind
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

    _ckpt_repr_tag = "checkpointed"

    @property
    def checkpoint_impl(self) -> CheckpointImpl:
        """The checkpoint implementation in use (as on PyTorch's wrapper)."""
        return self.__dict__.get("_ckpt_impl", CheckpointImpl.NO_REENTRANT)

    @property
    def offload_engine(self) -> OffloadEngine | None:
        """The engine the block's saved inputs are offloaded through, when ``offload`` was asked for."""
        return self.__dict__.get("_ckpt_offload_engine")

    @property
    def checkpoint_fn(self) -> Callable[..., Any] | None:
        """The user's replacement for ``torch.utils.checkpoint.checkpoint``, if one was given."""
        return self.__dict__.get("_ckpt_fn")

    def _wrapped_forward(self, inner: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        options = self.__dict__.get("_ckpt_options", {})
        calls = 0

        def run(*call_args: Any, **call_kwargs: Any) -> Any:
            nonlocal calls
            if not torch.compiler.is_compiling():  # a side effect dynamo cannot trace inside the checkpoint op
                calls += 1
            try:
                return inner(*call_args, **call_kwargs)
            except BaseException as error:
                self._ckpt_annotate(error, "running" if calls <= 1 else "recomputing")
                raise

        engine = self.__dict__.get("_ckpt_offload_engine")
        saving = engine.saving(self) if engine is not None and engine.active_for(self, args, kwargs) else _NO_CONTEXT
        with saving:  # only what the checkpoint itself saves (the block's inputs) passes through it
            if self.checkpoint_impl is CheckpointImpl.REENTRANT and self.checkpoint_fn is None:
                return _reentrant(run, args, kwargs, options)
            # Keyword arguments travel in a closure: passed to checkpoint(), they could collide with its
            # own options (a block taking `debug=` or `context_fn=`).
            bound = functools.partial(_call_with, run, kwargs)
            return (self.checkpoint_fn or _non_reentrant)(bound, *args, **options)


_NO_CONTEXT = contextlib.nullcontext()


def _call_with(run: Callable[..., Any], kwargs: dict, *args: Any) -> Any:
    return run(*args, **kwargs)


def _non_reentrant(fn: Callable[..., Any], *args: Any, **options: Any) -> Any:
    return torch_checkpoint.checkpoint(fn, *args, use_reentrant=False, **options)


def _reentrant(run: Callable[..., Any], args: tuple, kwargs: dict, options: dict) -> Any:
    """Reentrant checkpoint that keeps gradients when no input requires grad and returns any pytree.

    Reentrant checkpoint is an autograd.Function: it only sees tensors passed positionally and only
    connects tensors it returns directly. Non-tensor inputs are bound in a closure, outputs are
    flattened, and a one-element tensor that requires grad is passed along so the Function is always
    part of the graph (otherwise parameter gradients silently become None).
    """
    leaves, spec = pytree.tree_flatten((args, kwargs))
    tensor_slots = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
    out_spec: list[pytree.TreeSpec] = []

    def flat_run(_anchor: torch.Tensor, *tensors: torch.Tensor) -> tuple:
        rebuilt = list(leaves)
        for slot, tensor in zip(tensor_slots, tensors):
            rebuilt[slot] = tensor
        call_args, call_kwargs = pytree.tree_unflatten(rebuilt, spec)
        out_leaves, spec_out = pytree.tree_flatten(run(*call_args, **call_kwargs))
        out_spec[:] = [spec_out]
        return tuple(out_leaves)

    anchor = torch.empty(0, requires_grad=True)
    out = torch_checkpoint.checkpoint(
        flat_run, anchor, *(leaves[i] for i in tensor_slots), use_reentrant=True, **options
    )
    return pytree.tree_unflatten(list(out), out_spec[0])


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
    wrapped = CheckpointWrapper._install(module)
    wrapped.__dict__.update(_ckpt_impl=impl, _ckpt_fn=checkpoint_fn, _ckpt_options=options,
                            _ckpt_offload_engine=engine, _ckpt_engine_private=private)
    return wrapped  # type: ignore[return-value]


def _check_unwrappable(module: ActivationWrapper) -> None:
    if _GENERATED.get((_kind_of(type(module)), module._ckpt_original_class)) is not type(module):
        raise ValueError(
            f"cannot unwrap {module._ckpt_label()}: its class was changed again after wrapping "
            f"(now {type(module).__qualname__}, e.g. by fully_shard). Remove checkpointing before "
            "sharding, or rebuild the model."
        )


def unwrap(module: nn.Module) -> nn.Module:
    """Undo ``checkpoint_wrapper`` / ``offload_wrapper`` on one module, in place, and return it.

    Modules that are not wrapped are returned unchanged.

    Raises:
        ValueError: if the block's class was changed again after wrapping (``fully_shard`` does this).

    Example:
        >>> import torch
        >>> from ckpt_wrapper import checkpoint_wrapper, unwrap, CheckpointWrapper
        >>> layer = checkpoint_wrapper(torch.nn.Linear(2, 2))
        >>> isinstance(unwrap(layer), CheckpointWrapper)
        False
    """
    if not isinstance(module, ActivationWrapper):
        return module
    _check_unwrappable(module)
    state = module.__dict__
    inner_forward = state.pop("_ckpt_inner_forward", None)
    for key in [k for k in state if k.startswith("_ckpt_")]:
        del state[key]
    module.__class__ = module._ckpt_original_class
    if inner_forward is not None:
        state["forward"] = inner_forward
    return module
