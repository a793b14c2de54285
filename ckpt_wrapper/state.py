"""The class swap every wrapper kind shares, and the one state object it keeps per wrapped block.

A block is wrapped by swapping its ``__class__`` for a generated subclass of both the wrapper kind
(``CheckpointWrapper``, ``OffloadWrapper``, ``CheapRecomputeWrapper``) and the block's own class, the
technique FSDP2's ``fully_shard`` uses. Names, state-dict keys and ``isinstance`` checks stay as they
were. Everything ckpt_wrapper keeps for the block (kind, options, FQN, offload engine, original class)
lives in one ``WrapState``, stored under one reserved ``__dict__`` key and read with ``wrap_state``, so
wrapping adds no attribute that could shadow one of the block's own. The kind and the original class
live on the generated class itself; names of the form ``__ckpt_*__`` are reserved for the wrapper.

Example:
    >>> import torch
    >>> from ckpt_wrapper import checkpoint_wrapper, wrap_state
    >>> block = checkpoint_wrapper(torch.nn.Linear(4, 4))
    >>> state = wrap_state(block)
    >>> state.kind.__name__, state.original_class.__name__
    ('CheckpointWrapper', 'Linear')
    >>> wrap_state(torch.nn.Linear(4, 4)) is None
    True
"""

from __future__ import annotations

import copyreg
import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ckpt_wrapper.replay import UpdatedBuffers

__all__ = [
    "ActivationWrapper",
    "WrapState",
    "annotate_error",
    "block_label",
    "check_unwrappable",
    "compat_attribute",
    "install",
    "original_class",
    "unwrap",
    "wrap_state",
]

_STATE_KEY = "__ckpt_wrapper_state__"


@dataclasses.dataclass(kw_only=True, eq=False)
class WrapState:
    """What ckpt_wrapper keeps for one wrapped block (one per block, reached with ``wrap_state``)."""

    kind: type[ActivationWrapper]
    """The wrapper kind: ``CheckpointWrapper``, ``OffloadWrapper`` or ``CheapRecomputeWrapper``."""
    original_class: type[nn.Module]
    """The block's class before wrapping; ``unwrap`` restores it."""
    options: Any = None
    """The kind's options (``CheckpointOptions``, ``CheapOptions``), or None for the kind's defaults."""
    fqn: str = ""
    """Fully qualified name of the block in the model it was wrapped in; ``""`` when wrapped alone."""
    engine: Any = None
    """The ``OffloadEngine`` the block offloads through, if any."""
    engine_mergeable: bool = False
    """Whether the engine was made for this block alone, so blocks wrapped together may share one."""
    inner_forward: Callable[..., Any] | None = None
    """An instance-level ``forward`` the block had before wrapping (some libraries set one)."""
    updated_buffers: UpdatedBuffers = dataclasses.field(default_factory=UpdatedBuffers)
    """Which buffers the block's forward updates in place (learned), so a recompute can undo it."""
    entered: bool = False
    """Whether the block's own forward is running (a forward or a recompute)."""
    recomputes: int = 0
    """How many times backward ran the block's forward again (a checkpointed block's count)."""
    enable_hook: bool = True
    """Whether the wrapper acts (the composable API's switch: False runs the block's plain forward)."""
    constructed: bool = False
    """Set while ``CheckpointWrapper(module)`` returns the module it wrapped (its ``__init__`` skips)."""

    @property
    def _ac_generator(self) -> None:
        # Read by code written against PyTorch's composable checkpoint state, which keeps a generator
        # between a forward's hooks; none is ever kept here.
        return None


# Generated classes, one per (wrapper kind, block class). A memo, not state: the same inputs always
# give the same class, which keeps `type(a) is type(b)` true for two wrapped blocks of one class.
_GENERATED: dict[tuple[type, type], type] = {}


def _generated_class(kind: type[ActivationWrapper], original: type[nn.Module]) -> type:
    key = (kind, original)
    cls = _GENERATED.get(key)
    if cls is None:
        # Same name, qualname and module as the block's class: configs that name blocks by class name
        # (HF `_no_split_modules`, accelerate `transformer_cls_names_to_wrap`) still find them.
        namespace: dict[str, Any] = {
            "__module__": original.__module__,
            "__qualname__": original.__qualname__,
            "__ckpt_kind__": kind,
            "__ckpt_original__": original,
        }
        # The block's own class attributes win over the wrapper's compatibility names.
        for name in _compat_names(kind):
            if _defined_on(original, name):
                namespace[name] = original.__dict__.get(name, _static_lookup(original, name))
        cls = type(original.__name__, (kind, original), namespace)
        _GENERATED[key] = cls
    return cls


def _compat_names(kind: type) -> list[str]:
    return [name for klass in kind.__mro__ for name, value in vars(klass).items() if isinstance(value, compat_attribute)]


def _defined_on(cls: type, name: str) -> bool:
    return any(name in vars(klass) for klass in cls.__mro__ if klass is not object)


def _static_lookup(cls: type, name: str) -> Any:
    return next(vars(klass)[name] for klass in cls.__mro__ if name in vars(klass))


def _rebuild(kind: type[ActivationWrapper], original: type[nn.Module]) -> ActivationWrapper:
    # Unpickling entry point: generated classes cannot be found by name, so pickle stores how to make one.
    return object.__new__(_generated_class(kind, original))


class compat_attribute:  # noqa: N801 - used like @property
    """A read-only name a wrapped block answers only when it has no attribute of that name itself.

    A non-data descriptor: the block's instance attributes, parameters, buffers and submodules of the
    same name all come first, and assigning the name sets the block's own attribute. Used for names
    code written against PyTorch's wrapper reads (``checkpoint_fn``, ``offload_engine``, ...).
    """

    def __init__(self, getter: Callable[[Any], Any]) -> None:
        self.getter = getter
        self.name = getter.__name__
        self.__doc__ = getter.__doc__

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, objtype: type | None = None) -> Any:
        if obj is None:
            return self
        for store in ("_parameters", "_buffers", "_modules"):
            found = obj.__dict__.get(store)
            if found is not None and self.name in found:
                return found[self.name]
        return self.getter(obj)


class ActivationWrapper(nn.Module):
    """Base of the transparent wrappers; a block is one once its class was swapped by ``install``.

    Subclasses implement ``__ckpt_forward__(self, state, inner, args, kwargs)``, where ``inner`` runs
    the block's own forward. Not constructed directly: use ``checkpoint_wrapper`` or ``offload_wrapper``.
    (Calling a wrapped block's class, ``type(block)(...)``, runs the block's own ``__init__`` and gives a
    block wrapped with default options.)
    """

    __ckpt_tag__ = "wrapped"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # A generated class is a technical subclass: the block's own class already ran its base
        # classes' __init_subclass__ hooks (whose keyword arguments are unknown here), and a registry
        # they keep should not list wrapper classes.
        if "__ckpt_original__" not in cls.__dict__:
            super().__init_subclass__(**kwargs)

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        if "__ckpt_original__" not in cls.__dict__:
            # A wrapper kind itself, called as PyTorch's wrapper classes are: CheckpointWrapper(module,
            # ...) wraps `module` in place and returns it (its __init__ then does nothing).
            if not args or not isinstance(args[0], nn.Module) or cls.__ckpt_wrap__ is None:
                raise TypeError(
                    f"{cls.__name__}(module, ...) wraps an nn.Module in place and returns it; got "
                    f"{type(args[0]).__name__ if args else 'no module'}. Or call checkpoint_wrapper(module) / "
                    "offload_wrapper(module)."
                )
            module = cls.__ckpt_wrap__(*args, **kwargs)
            wrap_state(module).constructed = True
            return module
        # FSDP2's classes construct their unsharded class instead (`type(block)(...)`, slicing an
        # nn.Sequential); mirror that under the wrapper, which a construction keeps, with defaults.
        target = _construction_target(cls) if args or kwargs else None
        if target is None:
            return object.__new__(cls)  # not super(): FSDP2's __new__ assumes it is first in the MRO
        block = object.__new__(target)
        block.__init__(*args, **kwargs)
        return block

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        state = self.__dict__.get(_STATE_KEY)
        if state is not None and state.constructed:  # CheckpointWrapper(module, ...) just wrapped it
            state.constructed = False
            return
        super().__init__(*args, **kwargs)  # type(block)(...): the block's own __init__

    # The factory behind calling a wrapper kind (``checkpoint_wrapper`` for ``CheckpointWrapper``).
    __ckpt_wrap__: Callable[..., nn.Module] | None = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        state = wrap_state(self)
        inner = functools.partial(_run_inner, self, state)
        if state.entered:
            # `super(self.__class__, self).forward(...)` inside the block's own forward: the block's
            # author meant the parent of the block's class, which is what runs.
            return super(state.original_class, self).forward(*args, **kwargs)
        if torch.is_grad_enabled() and state.enable_hook:
            return self.__ckpt_forward__(state, inner, args, kwargs)
        # Nothing is saved for backward, so there is nothing to drop, recompute or offload.
        try:
            return inner(*args, **kwargs)
        except BaseException as error:
            annotate_error(self, error, "running")
            raise

    def __ckpt_forward__(self, state: WrapState, inner: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        raise NotImplementedError

    def _get_name(self) -> str:
        # Shown by print(model) only; type(self).__name__ is left as the block's class name.
        return f"{type(self).__ckpt_original__.__name__}[{type(self).__ckpt_tag__}]"

    @compat_attribute
    def _checkpoint_wrapped_module(self) -> nn.Module:
        """The block itself; kept so code written against PyTorch's wrapper keeps working."""
        return self

    def __reduce_ex__(self, protocol: Any) -> Any:
        reduced = super().__reduce_ex__(protocol)
        cls = type(self)
        if isinstance(reduced, tuple) and reduced[0] is copyreg.__newobj__ and reduced[1][0] is cls:
            key = (cls.__ckpt_kind__, cls.__ckpt_original__)
            if _GENERATED.get(key) is cls:
                return (_rebuild, key, *reduced[2:])
        return reduced


def _run_inner(block: nn.Module, state: WrapState, *args: Any, **kwargs: Any) -> Any:
    state.entered = True  # a forward or a recompute of the block is running
    try:
        if state.inner_forward is not None:
            return state.inner_forward(*args, **kwargs)
        return state.original_class.forward(block, *args, **kwargs)
    finally:
        state.entered = False


def _construction_target(cls: type) -> type | None:
    original = cls.__dict__.get("__ckpt_original__")
    if original is None:
        return None
    from torch.distributed.fsdp import FSDPModule

    if issubclass(original, FSDPModule):
        # FSDP2 builds the class its own class was made from, the third in its MRO (FSDPX, FSDPModule, X).
        return _generated_class(cls.__ckpt_kind__, original.__mro__[2])
    return None


def wrap_state(module: nn.Module) -> WrapState | None:
    """The ``WrapState`` of a wrapped block, or None for a module that is not wrapped.

    A block made by calling a wrapped block's class (``type(block)(...)``) gets a default state here.

    Example:
        >>> import torch
        >>> from ckpt_wrapper import offload_wrapper, wrap_state
        >>> wrap_state(offload_wrapper(torch.nn.Linear(2, 2), cpu_copy=True)).engine.options.cpu_copy
        True
    """
    if not isinstance(module, ActivationWrapper):
        return None
    state = module.__dict__.get(_STATE_KEY)
    if state is None:
        cls = type(module)
        state = module.__dict__[_STATE_KEY] = WrapState(kind=cls.__ckpt_kind__, original_class=cls.__ckpt_original__)
    return state


def original_class(module: nn.Module) -> type[nn.Module]:
    """The class ``module`` had before wrapping (its own class when it is not wrapped)."""
    cls = type(module)
    return cls.__ckpt_original__ if issubclass(cls, ActivationWrapper) else cls


def install(kind: type[ActivationWrapper], module: nn.Module, *, options: Any = None, engine: Any = None,
            engine_mergeable: bool = False) -> WrapState:
    """Swap ``module``'s class for the generated ``kind`` subclass and give it its ``WrapState``.

    Raises:
        TypeError: if ``module`` is not an ``nn.Module``.
        ValueError: if it is wrapped already.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"expected an nn.Module to wrap, got {type(module).__name__}")
    if isinstance(module, ActivationWrapper):
        raise ValueError(
            f"module {block_label(module)} is already wrapped by {type(module).__ckpt_kind__.__name__}; "
            "wrapping twice would recompute twice. Call ckpt_wrapper.unwrap(module) first to rewrap."
        )
    state = WrapState(kind=kind, original_class=type(module), options=options, engine=engine,
                      engine_mergeable=engine_mergeable,
                      # An instance-level forward would bypass the class's forward and so the wrapper;
                      # it becomes the inner forward instead.
                      inner_forward=module.__dict__.pop("forward", None))
    module.__class__ = _generated_class(kind, type(module))
    module.__dict__[_STATE_KEY] = state
    return state


def block_label(module: nn.Module) -> str:
    """``'layers.0' (Block)``: the block's FQN and original class, for messages."""
    state = wrap_state(module)
    name = (state.fqn if state is not None else "") or "<unnamed>"
    return f"'{name}' ({original_class(module).__name__})"


def annotate_error(module: nn.Module, error: BaseException, phase: str) -> None:
    """Add a note naming the block and the phase (running, recomputing) to ``error``, once."""
    # torch signals early stop of recomputation with an internal exception: it is control flow. Ctrl-C
    # (KeyboardInterrupt), SystemExit and the like are not the block's doing: a note would mislead.
    if (not isinstance(error, Exception) or type(error).__name__ == "_StopRecomputationError"
            or getattr(error, "_ckpt_annotated", False)):
        return
    error._ckpt_annotated = True  # type: ignore[attr-defined]
    error.add_note(f"ckpt_wrapper: raised while {phase} block {block_label(module)}")


def check_unwrappable(module: nn.Module) -> None:
    """Raise unless ``module``'s class is still the generated one (``fully_shard`` swaps it again).

    Raises:
        ValueError: if the class was changed after wrapping.
    """
    cls = type(module)
    if _GENERATED.get((cls.__ckpt_kind__, cls.__ckpt_original__)) is not cls:
        raise ValueError(
            f"cannot unwrap {block_label(module)}: its class was changed again after wrapping "
            f"(now {cls.__qualname__}, e.g. by fully_shard). Remove checkpointing before "
            "sharding, or rebuild the model."
        )


def unwrap(module: nn.Module) -> nn.Module:
    """Undo ``checkpoint_wrapper`` / ``offload_wrapper`` / ``cheap_recompute_wrapper`` on one module, in place.

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
    check_unwrappable(module)
    state = module.__dict__.pop(_STATE_KEY, None)
    module.__class__ = type(module).__ckpt_original__
    if state is not None and state.inner_forward is not None:
        module.__dict__["forward"] = state.inner_forward
    return module
