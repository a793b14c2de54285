"""One way for an integration to say which blocks get which checkpointing (Lightning's uses it).

An integration receives either a ``Plan`` (from ``ckpt_wrapper.plan``, or a path to its JSON) or a
selection (``check_fn``) with a wrapper or ``checkpoint_wrapper`` options, and wraps through the core's
one path (``apply_activation_checkpointing`` or ``Plan.apply``). It refuses what would change what the
model learns (``preserve_rng_state=False``) and options that contradict each other.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from torch import nn

from ckpt_wrapper.apply import apply_activation_checkpointing
from ckpt_wrapper.planner import Plan
from ckpt_wrapper.wrapper import checkpoint_wrapper

__all__ = ["checkpoint_blocks", "resolve_wrapper"]


def checkpoint_blocks(
    model: nn.Module,
    *,
    where: str,
    check_fn: Callable[[nn.Module], bool] | None,
    plan: Plan | str | None,
    checkpoint_wrapper_fn: Callable[[nn.Module], nn.Module] | None,
    checkpoint_options: dict[str, Any],
    auto_wrap_policy: Any = None,
) -> list[str]:
    """Wrap ``model``'s blocks in place, as a plan or a selection says; return the names wrapped.

    Args:
        model: the model (or the part of it that holds the blocks).
        where: the integration's name, for error messages (``"lightning"``).
        check_fn: which blocks; needed unless ``plan`` is given.
        plan: a ``Plan``, or the path of one saved with ``Plan.save``.
        checkpoint_wrapper_fn: applied to each selected block (default ``checkpoint_wrapper``).
        checkpoint_options: options for the default ``checkpoint_wrapper`` (``offload=True``,
            ``context_fn=selective_context_fn("titan")``, ...).
        auto_wrap_policy: an FSDP auto-wrap policy the framework shards with: the blocks when
            ``check_fn`` is not given.

    Raises:
        ValueError: for ``preserve_rng_state=False``, or when nothing says which blocks to wrap.
        TypeError: for a plan together with a selection or wrapper, or options with a wrapper.
    """
    if checkpoint_options.get("preserve_rng_state", True) is False:
        raise ValueError(
            f"ckpt_wrapper.integrations.{where}: preserve_rng_state=False makes the recompute draw other dropout "
            "masks than the forward, so gradients change. This integration keeps RNG state preserved; call "
            "ckpt_wrapper.apply_activation_checkpointing directly if you really want it off."
        )
    if plan is not None:
        if check_fn is not None or checkpoint_wrapper_fn is not None or checkpoint_options:
            raise TypeError(
                f"ckpt_wrapper.integrations.{where}: a plan says which block gets which strategy by itself; pass "
                "plan alone, or check_fn with checkpoint_wrapper_fn or checkpoint options, not both"
            )
        if isinstance(plan, str):
            plan = Plan.load(plan)
        if not isinstance(plan, Plan):
            raise TypeError(f"plan must be a ckpt_wrapper.Plan or the path of a saved plan, got {type(plan).__name__}")
        return plan.apply(model)
    if check_fn is None and auto_wrap_policy is None:
        raise ValueError(
            f"ckpt_wrapper.integrations.{where}: say which blocks to checkpoint, e.g. "
            "check_fn=ckpt_wrapper.by_class_name('Block'), or pass plan=ckpt_wrapper.plan(...)"
        )
    checkpoint_wrapper_fn = resolve_wrapper(checkpoint_wrapper_fn, checkpoint_options)
    if check_fn is None:
        return apply_activation_checkpointing(model, checkpoint_wrapper_fn=checkpoint_wrapper_fn,
                                              auto_wrap_policy=auto_wrap_policy)
    return apply_activation_checkpointing(model, checkpoint_wrapper_fn=checkpoint_wrapper_fn, check_fn=check_fn)


def resolve_wrapper(checkpoint_wrapper_fn: Callable[[nn.Module], nn.Module] | None,
                    checkpoint_options: dict[str, Any]) -> Callable[[nn.Module], nn.Module]:
    """The wrapper an integration applies to each block: ``checkpoint_wrapper`` with ``checkpoint_options``,
    or ``checkpoint_wrapper_fn`` as given.

    Raises:
        TypeError: for both at once (options belong in the wrapper, bound with ``functools.partial``).
    """
    if checkpoint_wrapper_fn is None:
        return functools.partial(checkpoint_wrapper, **checkpoint_options)
    if checkpoint_options:
        raise TypeError(
            f"pass either checkpoint_wrapper_fn or checkpoint options, not both (got {sorted(checkpoint_options)}); "
            "bind options into the wrapper with functools.partial"
        )
    return checkpoint_wrapper_fn
