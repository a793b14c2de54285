"""Recompute cheap outputs on demand: the norm or activation before a linear, rebuilt in backward.

A linear layer saves its input for backward. When that input is the output of a cheap, deterministic
module whose own backward already keeps *its* input (LayerNorm, RMSNorm, GELU, SiLU), keeping the
output as well is waste: it can be recomputed from what is kept anyway for the price of one elementwise
pass. ``cheap_recompute_wrapper`` does that for a block. Inside the block's forward, saved tensors that
are outputs of those modules are packed as a recipe (the module and its inputs, which are held anyway)
and rebuilt on unpack under the forward's autocast state. It is the effect of checkpointing a norm
with the linear after it, where non-reentrant early stop ends the recompute before the matmul, without
needing the two modules to be one callable: no dispatch mode, no recompute of anything else.

Example:
    >>> import torch
    >>> from ckpt_wrapper import cheap_recompute_wrapper
    >>> mlp = cheap_recompute_wrapper(torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 8)))
    >>> mlp(torch.randn(4, 8, requires_grad=True)).sum().backward()
    >>> mlp.recompute_modules
    ['1']
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

from ckpt_wrapper.state import ActivationWrapper, WrapState, annotate_error, compat_attribute, install, wrap_state

__all__ = ["CheapOptions", "CheapRecomputeWrapper", "cheap_recompute_wrapper", "cheap_modules"]

# Modules whose backward keeps their input (so a recipe holding it costs nothing) and that are pure
# functions of input and parameters (so the recompute is bitwise the forward). ReLU and Tanh are not
# here: their backward keeps the output, which would then be held twice.
_CHEAP_TYPES: tuple[type, ...] = (nn.LayerNorm, nn.GELU, nn.SiLU, nn.GroupNorm) + (
    (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()
)
_CHEAP_NAMES = ("RMSNorm", "LayerNorm", "GELUActivation", "NewGELUActivation", "SiLUActivation", "PytorchGELUTanh")


def cheap_modules(block: nn.Module) -> list[str]:
    """Names (relative to ``block``) of the submodules whose outputs can be recomputed cheaply.

    Example:
        >>> from ckpt_wrapper import cheap_modules
        >>> from ckpt_wrapper.testing.models import Block, GPTConfig
        >>> cheap_modules(Block(GPTConfig(d_model=32, n_head=4)))
        ['ln_1', 'ln_2', 'mlp.act']
    """
    return [
        name for name, module in block.named_modules()
        if name and (isinstance(module, _CHEAP_TYPES) or type(module).__name__.endswith(_CHEAP_NAMES))
        # An in-place module overwrites its input, the one thing its output would be rebuilt from.
        and not getattr(module, "inplace", False)
    ]


def _autocast_state(device_type: str) -> list[tuple[str, bool, torch.dtype]]:
    types = {device_type, "cpu"}
    return [(t, torch.is_autocast_enabled(t), torch.get_autocast_dtype(t)) for t in sorted(types)
            if torch.amp.is_autocast_available(t)]


class _Recipe:
    """How to rebuild one saved tensor: call ``module`` on ``args`` again and view the result."""

    __slots__ = ("module", "args", "versions", "autocast", "dtype", "offset", "size", "stride", "nbytes")

    def __init__(self, module: nn.Module, args: tuple, versions: tuple, autocast: list, tensor: torch.Tensor) -> None:
        self.module, self.args, self.versions, self.autocast = module, args, versions, autocast
        self.dtype, self.offset, self.size, self.stride = tensor.dtype, tensor.storage_offset(), tensor.size(), tensor.stride()
        self.nbytes = tensor.untyped_storage().nbytes()

    def rebuild(self) -> torch.Tensor:
        if _versions(self.args) != self.versions:
            # The inputs no longer hold what the forward saw: rebuilding would give other values.
            raise RuntimeError(
                f"ckpt_wrapper: cannot recompute the output of {type(self.module).__name__}: one of its inputs was "
                "modified in place after the forward used it (so its own backward would fail too). Make the "
                "in-place op out of place, or leave the module out of cheap_recompute_wrapper(modules=...)."
            )
        contexts = [torch.autocast(device_type, dtype=dtype, enabled=enabled) for device_type, enabled, dtype in self.autocast]
        with torch.no_grad():
            for context in contexts:
                context.__enter__()
            try:
                out = self.module.forward(*self.args)
            finally:
                for context in reversed(contexts):
                    context.__exit__(None, None, None)
        storage = out.untyped_storage()
        if out.dtype != self.dtype or storage.nbytes() != self.nbytes:
            raise RuntimeError(
                f"ckpt_wrapper: recomputing the output of {type(self.module).__name__} gave {out.dtype} with "
                f"{storage.nbytes()} bytes of storage where the forward gave {self.dtype} with {self.nbytes}; "
                "the module is not a pure function of its inputs. Leave it out of cheap_recompute_wrapper(modules=...)."
            )
        return torch.empty(0, dtype=self.dtype, device=out.device).set_(storage, self.offset, self.size, self.stride)


def _versions(args: tuple) -> tuple:
    return tuple(a._version if isinstance(a, torch.Tensor) else None for a in args)


class _Recorder:
    """One forward of one block: which storages are cheap outputs, and the pack/unpack pair."""

    def __init__(self) -> None:
        self.outputs: dict[StorageWeakRef, tuple[StorageWeakRef, nn.Module, tuple, tuple, list, int]] = {}
        self.entry_versions: dict[int, list[tuple]] = {}

    def pre_hook(self, module: nn.Module, args: tuple) -> None:
        # Versions before the module runs: a module that writes into its input (inplace=True) changes them.
        self.entry_versions.setdefault(id(module), []).append(_versions(args))

    def hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        before = self.entry_versions.get(id(module), [])
        versions = before.pop() if before else None
        if type(output) is not torch.Tensor or not output.requires_grad or versions != _versions(args):
            return  # an in-place module: its input is gone, so its output cannot be rebuilt from it
        if any(isinstance(a, torch.Tensor) and a.untyped_storage().data_ptr() == output.untyped_storage().data_ptr()
               for a in args):
            return  # output shares its input's memory: same reason
        if all(type(a) is torch.Tensor or not isinstance(a, torch.Tensor) for a in args):
            key = StorageWeakRef(output.untyped_storage())
            # Inputs weakly: they are kept alive by the module's own backward when it matters, and a
            # recorder must never be what keeps an activation alive.
            weak_args = tuple(weakref.ref(a) if isinstance(a, torch.Tensor) else a for a in args)
            self.outputs[key] = (key, module, weak_args, versions, _autocast_state(output.device.type), output._version)

    def pack(self, tensor: torch.Tensor) -> Any:
        if type(tensor) is not torch.Tensor:
            return _Kept(tensor)
        found = self.outputs.get(StorageWeakRef(tensor.untyped_storage()))
        # The stored key, not a new one: a dead storage's address may have been handed out again. A
        # version other than the recorded one means the output was modified in place since (by an
        # in-place activation after a norm, say): the tensor is kept as it is.
        if found is None or found[0].expired() or found[5] != tensor._version:
            return _Kept(tensor)
        _, module, weak_args, versions, autocast, _ = found
        args = tuple(a() if isinstance(a, weakref.ref) else a for a in weak_args)
        if any(a is None for a in args) or _versions(args) != versions:
            return _Kept(tensor)
        return _Recipe(module, args, versions, autocast, tensor)

    @staticmethod
    def unpack(packed: Any) -> torch.Tensor:
        return packed.rebuild() if isinstance(packed, _Recipe) else packed.unpack()


class _Kept:
    """A tensor saved as it is, with its version at save time.

    Autograd skips its in-place check for every tensor that goes through saved-tensor hooks
    (SavedVariable::unpack only checks versions without hooks), so the check is done here.
    """

    __slots__ = ("tensor", "version")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor, self.version = tensor, tensor._version

    def unpack(self) -> torch.Tensor:
        if self.tensor._version != self.version:
            raise RuntimeError(
                "one of the variables needed for gradient computation has been modified by an inplace operation: "
                f"[{self.tensor.type()} {list(self.tensor.shape)}] is at version {self.tensor._version}; expected "
                f"version {self.version} instead (checked by ckpt_wrapper's cheap_recompute_wrapper, whose "
                "saved-tensor hooks replace autograd's own check)."
            )
        return self.tensor


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheapOptions:
    """What a ``CheapRecomputeWrapper`` rebuilds (kept in the block's ``WrapState.options``)."""

    modules: tuple[str, ...]
    """Names, relative to the block, of the submodules whose outputs are rebuilt in backward."""


def _modules_of(block: nn.Module, state: WrapState) -> list[str]:
    # A block made by calling its class has no options yet: the default choice.
    return list(state.options.modules) if state.options is not None else cheap_modules(block)


class CheapRecomputeWrapper(ActivationWrapper):
    """A block that keeps no output of its cheap modules for backward, and rebuilds them on demand.

    Build with ``cheap_recompute_wrapper(block)``; names and class are kept, as for every wrapper.
    """

    __ckpt_tag__ = "cheap-recompute"

    @compat_attribute
    def recompute_modules(self) -> list[str]:
        """Names (relative to the block) of the modules whose outputs are recomputed."""
        return _modules_of(self, wrap_state(self))

    def __ckpt_forward__(self, state: WrapState, inner: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        if torch.compiler.is_compiling():
            # A compiled graph's partitioner already chooses to recompute cheap pointwise outputs
            # (norms, activations) instead of saving them; hooks cannot be registered while tracing.
            return inner(*args, **kwargs)
        recorder = _Recorder()
        # Hooks live only for this call: nothing persistent to deep-copy, pickle or leak.
        modules = [self.get_submodule(name) for name in _modules_of(self, state)]
        handles = [m.register_forward_pre_hook(recorder.pre_hook) for m in modules]
        handles += [m.register_forward_hook(recorder.hook) for m in modules]
        try:
            with torch.autograd.graph.saved_tensors_hooks(recorder.pack, recorder.unpack):
                return inner(*args, **kwargs)
        except BaseException as error:
            annotate_error(self, error, "running")
            raise
        finally:
            for handle in handles:
                handle.remove()


def cheap_recompute_wrapper(module: nn.Module, *, modules: Iterable[str] | None = None) -> CheapRecomputeWrapper:
    """Make ``module`` recompute the outputs of its norms and activations in backward instead of keeping them.

    Args:
        module: the block, modified in place.
        modules: names of the submodules to recompute (relative to ``module``); default ``cheap_modules(module)``.

    Returns:
        ``module`` itself, now also a ``CheapRecomputeWrapper``.

    Raises:
        ValueError: if a name is not a submodule, or the block has no cheap module at all.

    Example:
        >>> import torch
        >>> from ckpt_wrapper import cheap_recompute_wrapper
        >>> from ckpt_wrapper.testing.models import Block, GPTConfig
        >>> block = cheap_recompute_wrapper(Block(GPTConfig(d_model=32, n_head=4)))
        >>> block(torch.randn(2, 8, 32, requires_grad=True)).sum().backward()
        >>> block.recompute_modules
        ['ln_1', 'ln_2', 'mlp.act']
    """
    names = list(modules) if modules is not None else cheap_modules(module)
    known = {name for name, _ in module.named_modules()}
    missing = [name for name in names if name not in known]
    if missing or not names:
        raise ValueError(
            f"cheap_recompute_wrapper: {type(module).__name__} has "
            + (f"no submodule(s) {missing}" if missing else "no norm or activation module to recompute")
            + f"; candidates found: {cheap_modules(module)}"
        )
    install(CheapRecomputeWrapper, module, options=CheapOptions(modules=tuple(names)))
    return module  # type: ignore[return-value]


CheapRecomputeWrapper.__ckpt_wrap__ = staticmethod(cheap_recompute_wrapper)  # type: ignore[assignment]
