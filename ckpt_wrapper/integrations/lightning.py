"""Checkpointing for PyTorch Lightning: a callback, or one call in ``configure_model``.

Two ways, one machinery (``ckpt_wrapper.apply_activation_checkpointing`` or ``Plan.apply``):

- ``CheckpointingCallback(check_fn=..., **options)``: ``Trainer(callbacks=[...])``. It wraps the
  LightningModule's blocks in the ``setup`` hook, which Lightning runs before ``configure_model`` and
  before the strategy shards or wraps the model, so ``DDPStrategy``, ``FSDPStrategy`` (its
  ``auto_wrap_policy`` still matches the blocks: classes are kept) and ``ModelParallelStrategy``
  (``fully_shard`` in ``configure_model``, after checkpointing) all see the blocks they expect.
  Without ``check_fn`` under ``FSDPStrategy``, the blocks are those its ``auto_wrap_policy`` shards.
- ``apply_checkpointing(module, check_fn=..., **options)``: for blocks built inside
  ``configure_model``; call it there, before ``fully_shard``.

Compared with ``FSDPStrategy(activation_checkpointing_policy=...)`` (PyTorch's private wrapper):
parameter and checkpoint names carry no ``_checkpoint_wrapped_module.`` prefix, any selection, selective
policy, offload or plan can be used, and it works under every strategy, not FSDP1 alone. The two are
never stacked: the callback refuses a strategy whose ``activation_checkpointing_policy`` is set.

Example::

    import lightning.pytorch as pl
    from ckpt_wrapper import by_class_name
    from ckpt_wrapper.integrations.lightning import CheckpointingCallback

    trainer = pl.Trainer(strategy="ddp", callbacks=[CheckpointingCallback(check_fn=by_class_name("Block"))])
    trainer.fit(module)

Lightning (``lightning.pytorch``, the ``lightning`` package) is imported only when the callback is
created; tested with lightning 2.6.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from torch import nn

from ckpt_wrapper.integrations.blocks import checkpoint_blocks
from ckpt_wrapper.log import get_logger
from ckpt_wrapper.planner import Plan

__all__ = ["CheckpointingCallback", "apply_checkpointing"]

logger = get_logger(__name__)


def _lightning() -> Any:
    try:
        import lightning.pytorch as pl
    except ImportError as error:
        raise ImportError(
            "ckpt_wrapper.integrations.lightning needs PyTorch Lightning, which is not installed "
            f"({error}). Install it with: pip install 'lightning>=2.4' (or ckpt_wrapper's [integrations] extra)"
        ) from error
    return pl


def apply_checkpointing(
    module: nn.Module,
    *,
    check_fn: Callable[[nn.Module], bool] | None = None,
    plan: Plan | str | None = None,
    checkpoint_wrapper_fn: Callable[[nn.Module], nn.Module] | None = None,
    **checkpoint_options: Any,
) -> list[str]:
    """Checkpoint the blocks of ``module`` in place, from ``LightningModule.configure_model``.

    Call it before ``fully_shard`` (``ModelParallelStrategy``) on the blocks just built; under the other
    strategies anywhere before training starts. Lightning itself is not needed for this function.

    Args:
        module: the LightningModule or the model inside it; modified in place.
        check_fn: which blocks (a selector such as ``by_class_name("Block")`` or ``module -> bool``).
        plan: a ``ckpt_wrapper.Plan`` (or the path of a saved one) instead of ``check_fn`` and options.
        checkpoint_wrapper_fn: applied to each block; default ``checkpoint_wrapper`` with
            ``checkpoint_options``. ``offload_wrapper`` or a ``functools.partial`` work too.
        **checkpoint_options: options for the default ``checkpoint_wrapper`` (``offload=True``,
            ``context_fn=selective_context_fn("titan")``, ...).

    Returns:
        The fully qualified names of the blocks wrapped.

    Raises:
        ValueError: for ``preserve_rng_state=False``, no selection, or a selection matching nothing.
        TypeError: for a plan with a selection, or options with a wrapper.

    Example:
        >>> import torch
        >>> from ckpt_wrapper import by_class
        >>> from ckpt_wrapper.integrations.lightning import apply_checkpointing
        >>> model = torch.nn.Sequential(torch.nn.Sequential(torch.nn.Linear(4, 4)), torch.nn.Linear(4, 2))
        >>> apply_checkpointing(model, check_fn=by_class(torch.nn.Sequential))
        ['0']
    """
    return checkpoint_blocks(module, where="lightning", check_fn=check_fn, plan=plan,
                             checkpoint_wrapper_fn=checkpoint_wrapper_fn, checkpoint_options=checkpoint_options)


def _refuse_strategy_checkpointing(strategy: Any) -> None:
    # FSDPStrategy keeps its activation_checkpointing_policy here and applies PyTorch's wrapper in setup;
    # it only looks for PyTorch's CheckpointWrapper, so it would wrap ours again (every block twice).
    if getattr(strategy, "_activation_checkpointing_kwargs", None):
        raise ValueError(
            f"{type(strategy).__name__} has activation_checkpointing_policy set, so Lightning would wrap the blocks "
            "again with PyTorch's checkpoint_wrapper and recompute each twice. Drop activation_checkpointing_policy "
            "from the strategy to keep CheckpointingCallback (names and RNG kept), or drop the callback."
        )


def _strategy_policy(strategy: Any) -> Any:
    """The auto-wrap policy an FSDPStrategy shards with (its blocks), or None."""
    return (getattr(strategy, "kwargs", None) or {}).get("auto_wrap_policy")


@functools.cache
def _callback_class() -> type:
    pl = _lightning()

    class CheckpointingCallback(pl.Callback):
        """A Lightning callback that checkpoints the LightningModule's blocks before the strategy sets up.

        Wrapping happens once, in ``setup`` (before ``configure_model`` and before DDP, FSDP or
        ``fully_shard`` wrap the model), under every strategy. Parameter, state-dict and checkpoint names
        stay those of the unwrapped model.

        Args:
            check_fn: which blocks (a selector or ``module -> bool``). Default under ``FSDPStrategy``: the
                blocks its ``auto_wrap_policy`` shards; elsewhere required.
            plan: a ``ckpt_wrapper.Plan`` or the path of a saved one, instead of ``check_fn`` and options.
            checkpoint_wrapper_fn: applied to each block (default ``checkpoint_wrapper`` with the options).
            **checkpoint_options: options for the default ``checkpoint_wrapper`` (``offload=True``,
                ``context_fn=...``); ``preserve_rng_state=False`` is refused.

        Raises:
            ValueError: in ``setup``, if the strategy checkpoints too (``activation_checkpointing_policy``),
                or nothing matches (blocks built in ``configure_model``: call ``apply_checkpointing`` there).
        """

        def __init__(self, *, check_fn: Callable[[nn.Module], bool] | None = None, plan: Plan | str | None = None,
                     checkpoint_wrapper_fn: Callable[[nn.Module], nn.Module] | None = None,
                     **checkpoint_options: Any) -> None:
            super().__init__()
            self.check_fn, self.plan = check_fn, plan
            self.checkpoint_wrapper_fn, self.checkpoint_options = checkpoint_wrapper_fn, checkpoint_options
            self.wrapped: list[str] | None = None
            """The blocks wrapped in ``setup`` (None before it ran)."""

        def setup(self, trainer: Any, pl_module: nn.Module, stage: str) -> None:
            if self.wrapped is not None:  # fit then validate or test: wrapped once
                return
            _refuse_strategy_checkpointing(trainer.strategy)
            policy = _strategy_policy(trainer.strategy) if self.check_fn is None and self.plan is None else None
            try:
                self.wrapped = checkpoint_blocks(
                    pl_module, where="lightning", check_fn=self.check_fn, plan=self.plan,
                    checkpoint_wrapper_fn=self.checkpoint_wrapper_fn, checkpoint_options=dict(self.checkpoint_options),
                    auto_wrap_policy=policy)
            except ValueError as error:
                if "matched no module" in str(error):
                    error.add_note("ckpt_wrapper: if the blocks are built in configure_model, call "
                                   "ckpt_wrapper.integrations.lightning.apply_checkpointing there (before fully_shard) "
                                   "instead of using the callback")
                raise
            logger.info("checkpointed %d block(s) before %s set up: %s", len(self.wrapped),
                        type(trainer.strategy).__name__, self.wrapped)

    CheckpointingCallback.__module__, CheckpointingCallback.__qualname__ = __name__, "CheckpointingCallback"
    return CheckpointingCallback


def __getattr__(name: str) -> Any:
    # The callback subclasses lightning's Callback, so it is made on first use: importing this module
    # (pytest's doctest collection included) needs no Lightning.
    if name == "CheckpointingCallback":
        return _callback_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
