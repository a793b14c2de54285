"""``checkpoint(module)``: the composable API of ``torch.distributed._composable.checkpoint``.

PyTorch's composable checkpoint keeps the module in place (no wrapper module, no name changes) and
keeps its state behind ``checkpoint.state(module)``, the way FSDP2's ``fully_shard`` does. ckpt_wrapper's
wrapper has those properties already, so ``checkpoint`` is the same machinery as ``checkpoint_wrapper``
with the composable API's keyword arguments and refusals; ``checkpoint.state(module)`` is the block's
``WrapState``, whose ``enable_hook`` turns checkpointing off and on. It composes with ``fully_shard`` in
either order.

Example:
    >>> import torch
    >>> from ckpt_wrapper import checkpoint
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 8))
    >>> layer = checkpoint(model[0])
    >>> layer is model[0], type(layer).__name__, checkpoint.state(layer).enable_hook
    (True, 'Linear', True)
    >>> model(torch.randn(2, 8)).sum().backward()
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ckpt_wrapper.state import WrapState, wrap_state
from ckpt_wrapper.wrapper import checkpoint_wrapper

__all__ = ["checkpoint"]

_ACCEPTED = ("preserve_rng_state", "context_fn", "determinism_check", "debug", "early_stop")


def checkpoint(module: nn.Module, **kwargs: Any) -> nn.Module:
    """Checkpoint ``module`` in place, as ``torch.distributed._composable.checkpoint`` does.

    Args:
        module: the model or sub-module; modified in place (its names and class name stay).
        **kwargs: ``preserve_rng_state`` (default True), ``context_fn`` (selective checkpointing),
            ``determinism_check``, ``debug``, ``early_stop``; ``use_reentrant=True`` is refused.

    Returns:
        ``module`` itself.

    Raises:
        NotImplementedError: for ``use_reentrant=True`` (as PyTorch's composable API).
        ValueError: for any other keyword argument.
    """
    if kwargs.pop("use_reentrant", False):
        raise NotImplementedError(
            "use_reentrant=True is not supported in composable checkpoint. Please use "
            "torch.utils.checkpoint.checkpoint instead (or ckpt_wrapper.checkpoint_wrapper(module, "
            "checkpoint_impl=CheckpointImpl.REENTRANT))."
        )
    unexpected = sorted(set(kwargs) - set(_ACCEPTED))
    if unexpected:
        raise ValueError(f"Unexpected keyword arguments: {','.join(unexpected)}; checkpoint(module) accepts {list(_ACCEPTED)}")
    return checkpoint_wrapper(module, **kwargs)


def _state(module: nn.Module) -> WrapState:
    """The checkpointed module's state (``enable_hook`` turns checkpointing off and on).

    Raises:
        ValueError: if ``checkpoint(module)`` was not applied to ``module``.
    """
    state = wrap_state(module)
    if state is None:
        raise ValueError(f"{type(module).__name__} is not checkpointed; call ckpt_wrapper.checkpoint(module) first")
    return state


checkpoint.state = _state  # type: ignore[attr-defined]
