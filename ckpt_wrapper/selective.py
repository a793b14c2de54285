"""Selective checkpointing: recompute the cheap part of a block, keep the expensive part.

Two ways, and the planner measures both per block:

- **Op-level policies** (``selective_context_fn``): the whole block is checkpointed, and a policy
  passed to ``torch.utils.checkpoint.create_selective_checkpoint_contexts`` says which op outputs to
  save. Presets: ``"matmuls"`` (save every matmul and attention output), ``"titan"`` (attention and every
  second matmul, as torchtitan does); or a list of ops, or a callable ``(ctx, op, *args, **kwargs) ->
  CheckpointPolicy | bool``. The policy runs under a ``TorchDispatchMode``: every op of the block pays a
  Python dispatch in forward and again in recompute, which on fast devices can cost as much as the
  recompute it avoids.
- **Sub-module regions** (``checkpoint_regions``): checkpoint chosen children of the block (its MLP,
  its attention) with the plain transparent wrapper. No dispatch mode; with non-reentrant early stop
  the recompute ends as soon as the last tensor backward needs is rebuilt, before the region's final
  matmul, so checkpointing an MLP reruns its first projection and activation but not its last
  projection.

Example:
    >>> import torch
    >>> from ckpt_wrapper import apply_selective_checkpointing, by_class
    >>> from ckpt_wrapper.testing.models import GPT, GPTConfig, Block
    >>> model = GPT(GPTConfig(n_layer=2, d_model=32, n_head=4, seq_len=8, vocab_size=32))
    >>> apply_selective_checkpointing(model, check_fn=by_class(Block), policy="matmuls")
    ['layers.0', 'layers.1']
    >>> model(torch.randint(0, 32, (2, 8))).sum().backward()
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from ckpt_wrapper.wrapper import checkpoint_wrapper

__all__ = ["selective_contexts", "PRESETS", "selective_context_fn", "apply_selective_checkpointing", "checkpoint_regions", "region_candidates"]

_aten = torch.ops.aten
_MATMULS = frozenset({_aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default,
                      _aten.convolution.default})
_ATTENTION = frozenset(
    getattr(_aten, name).default
    for name in ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                 "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
                 "_flash_attention_forward", "_efficient_attention_forward")
    if hasattr(_aten, name)
)

PRESETS = {
    "matmuls": "save every matmul and attention output; recompute norms, activations, dropout, adds",
    "titan": "save attention outputs and every second matmul (torchtitan's op list); recompute the rest",
}
"""Preset policy names and what each saves."""


class _Policy:
    """A policy for one checkpointed forward: fresh state (the matmul count) per call."""

    def __init__(self, save: frozenset, every_other_matmul: bool, user: Callable[..., Any] | None) -> None:
        self.save, self.every_other_matmul, self.user = save, every_other_matmul, user
        # Separate counts for forward and recompute: releases that consult the policy again during
        # recompute (ctx.is_recompute) must see the same sequence of decisions.
        self.matmuls = {False: 0, True: 0}

    def __call__(self, ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
        if self.user is not None:
            decision = self.user(ctx, op, *args, **kwargs)
            if isinstance(decision, CheckpointPolicy):
                return decision
            return CheckpointPolicy.MUST_SAVE if decision else CheckpointPolicy.PREFER_RECOMPUTE
        if op in self.save:
            if self.every_other_matmul and op in (_aten.mm.default, _aten.addmm.default):
                phase = bool(getattr(ctx, "is_recompute", False))
                self.matmuls[phase] += 1
                if self.matmuls[phase] % 2 == 0:
                    return CheckpointPolicy.PREFER_RECOMPUTE
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE


def _op_names(ops: Iterable[Any]) -> tuple[tuple[str, str, str], ...]:
    # OpOverloads do not pickle: a context_fn carries (namespace, op name, overload name) instead.
    return tuple(sorted((op.namespace, op._opname, op._overloadname) for op in ops))


def _ops(names: tuple[tuple[str, str, str], ...]) -> frozenset:
    return frozenset(getattr(getattr(getattr(torch.ops, namespace), name), overload) for namespace, name, overload in names)


def selective_contexts(save: tuple[tuple[str, str, str], ...], every_other_matmul: bool,
                       user: Callable[..., Any] | None) -> tuple[Any, Any]:
    """The (forward, recompute) contexts of one selective checkpoint: what ``selective_context_fn`` binds.

    A module-level function under ``functools.partial``: dynamo traces it (``torch.compile`` with
    ``fullgraph=True`` works, per block or whole model), and it pickles. Each call makes a fresh policy,
    so per-call state (the matmul count of the ``titan`` preset) starts over every forward.
    """
    return create_selective_checkpoint_contexts(_Policy(_ops(save), every_other_matmul, user))


def selective_context_fn(policy: str | Iterable[Any] | Callable[..., Any] = "matmuls") -> Callable[[], tuple[Any, Any]]:
    """A ``context_fn`` for ``checkpoint_wrapper`` that saves what ``policy`` names and recomputes the rest.

    Args:
        policy: a preset name from ``PRESETS``, a list of aten op overloads whose outputs to save, or a
            callable ``(ctx, op, *args, **kwargs)`` returning a ``CheckpointPolicy`` or a bool (True: save).

    Returns:
        A ``functools.partial`` of ``selective_contexts`` for ``checkpoint_wrapper(block, context_fn=...)``:
        it pickles, and ``torch.compile`` traces it (``fullgraph=True`` too).

    Raises:
        ValueError: for an unknown preset. TypeError: for a list holding something other than ops.

    Example:
        >>> import torch
        >>> from ckpt_wrapper import checkpoint_wrapper, selective_context_fn
        >>> block = checkpoint_wrapper(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU()),
        ...                            context_fn=selective_context_fn([torch.ops.aten.addmm.default]))
        >>> block(torch.randn(2, 8, requires_grad=True)).sum().backward()
    """
    user: Callable[..., Any] | None = None
    every_other_matmul = False
    if isinstance(policy, str):
        if policy not in PRESETS:
            raise ValueError(f"unknown selective preset {policy!r}; presets: {sorted(PRESETS)}, or pass a list of "
                             "ops or a policy callable")
        save = _MATMULS | _ATTENTION
        every_other_matmul = policy == "titan"
    elif callable(policy):
        save, user = frozenset(), policy
    else:
        ops = list(policy)
        bad = [op for op in ops if not isinstance(op, torch._ops.OpOverload)]
        if bad:
            raise TypeError(f"a selective op list holds aten op overloads such as torch.ops.aten.mm.default; got {bad[:3]}")
        save = frozenset(ops)
    return functools.partial(selective_contexts, _op_names(save), every_other_matmul, user)


def apply_selective_checkpointing(
    model: nn.Module,
    check_fn: Callable[[nn.Module], bool],
    *,
    policy: str | Iterable[Any] | Callable[..., Any] = "matmuls",
) -> list[str]:
    """Checkpoint the selected blocks of ``model`` with an op-level saving policy, in place.

    Args:
        model: the model to modify.
        check_fn: which blocks (a selector or ``module -> bool``), as for ``apply_activation_checkpointing``.
        policy: what to save; see ``selective_context_fn``.

    Returns:
        The fully qualified names of the blocks wrapped.

    Example:
        >>> import torch
        >>> from ckpt_wrapper import apply_selective_checkpointing, by_class
        >>> model = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU()) for _ in range(2)])
        >>> apply_selective_checkpointing(model, check_fn=by_class(torch.nn.Sequential), policy="titan")
        ['0', '1']
    """
    from ckpt_wrapper.apply import apply_activation_checkpointing

    wrapper = functools.partial(checkpoint_wrapper, context_fn=selective_context_fn(policy))
    return apply_activation_checkpointing(model, checkpoint_wrapper_fn=wrapper, check_fn=check_fn)


def region_candidates(block: nn.Module) -> list[str]:
    """Names of the block's direct children worth checkpointing as regions: those holding a matmul.

    Example:
        >>> from ckpt_wrapper import region_candidates
        >>> from ckpt_wrapper.testing.models import Block, GPTConfig
        >>> region_candidates(Block(GPTConfig(d_model=32, n_head=4)))
        ['attn', 'mlp']
    """
    return [
        name for name, child in block.named_children()
        if any(isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) or type(m).__name__ == "Conv1D" for m in child.modules())
        and not isinstance(child, (nn.Linear, nn.Conv1d, nn.Conv2d))
    ]


def checkpoint_regions(block: nn.Module, regions: Iterable[str], *, prefix: str = "") -> list[str]:
    """Checkpoint the named children of ``block`` (say ``["mlp"]``), each on its own, in place.

    Args:
        block: the block whose children to wrap.
        regions: child names, dotted for deeper modules.
        prefix: the block's fully qualified name, for names in errors and the return value.

    All or nothing: every name is resolved first, and the regions go through
    ``ckpt_wrapper.apply.wrap_blocks``, with the block as root named ``prefix``.

    Returns:
        The fully qualified names wrapped.

    Raises:
        ValueError: if a name is not a submodule of the block, or a region is wrapped already.

    Example:
        >>> from ckpt_wrapper import checkpoint_regions
        >>> from ckpt_wrapper.testing.models import Block, GPTConfig
        >>> checkpoint_regions(Block(GPTConfig(d_model=32, n_head=4)), ["mlp"], prefix="layers.0")
        ['layers.0.mlp']
    """
    from ckpt_wrapper.apply import WrapJob, wrap_blocks

    jobs = []
    for name in regions:
        try:
            child = block.get_submodule(name)
        except AttributeError:
            raise ValueError(
                f"{prefix or type(block).__name__} has no submodule {name!r}; its children are "
                f"{[n for n, _ in block.named_children()]}: name one of them (dotted for deeper modules)"
            ) from None
        jobs.append(WrapJob(f"{prefix}.{name}" if prefix else name, child, checkpoint_wrapper))
    return wrap_blocks(block, jobs, root_fqn=prefix)
