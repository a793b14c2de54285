"""Reentrant checkpoint that carries every structure non-reentrant checkpoint accepts.

Reentrant checkpoint is an ``autograd.Function``: it sees only tensors passed positionally and
connects only tensors it returns directly. Here non-tensor inputs are bound in a closure, outputs are
flattened (dataclasses included, which ``torch.utils._pytree`` leaves whole), and a one-element
tensor that requires grad is passed along so the Function is always part of the graph (otherwise
parameter gradients silently become None when no input requires grad). An output object that holds
tensors in a way that cannot be flattened is refused, naming the block, instead of losing gradients.

Example:
    >>> import torch
    >>> from ckpt_wrapper import CheckpointImpl, checkpoint_wrapper
    >>> block = checkpoint_wrapper(torch.nn.Linear(4, 4), checkpoint_impl=CheckpointImpl.REENTRANT)
    >>> block(torch.randn(2, 4)).sum().backward()  # no input requires grad: the weight still gets one
    >>> block.weight.grad is not None
    True
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch.utils import _pytree as pytree
from torch.utils.checkpoint import CheckpointFunction

__all__ = ["reentrant_checkpoint"]


class _DataclassNode:
    """A dataclass instance taken apart: a shallow copy to refill, and its fields' values."""

    def __init__(self, template: Any, values: dict[str, Any]) -> None:
        self.template, self.values = template, values

    def rebuild(self) -> Any:
        rebuilt = copy.copy(self.template)
        for name, value in self.values.items():
            object.__setattr__(rebuilt, name, _collapse(value))  # frozen dataclasses too
        return rebuilt


pytree.register_pytree_node(
    _DataclassNode,
    lambda node: (list(node.values.values()), (node.template, list(node.values))),
    lambda children, context: _DataclassNode(context[0], dict(zip(context[1], children))),
)


def _expand(output: Any) -> Any:
    """Replace dataclass instances that pytree leaves whole by nodes it can walk into."""

    def visit(leaf: Any) -> Any:
        if dataclasses.is_dataclass(leaf) and not isinstance(leaf, type):
            values = {f.name: _expand(getattr(leaf, f.name)) for f in dataclasses.fields(leaf)}
            return _DataclassNode(leaf, values)
        return leaf

    return pytree.tree_map(visit, output)


def _collapse(output: Any) -> Any:
    def is_node(x: Any) -> bool:
        return isinstance(x, _DataclassNode)

    return pytree.tree_map(lambda x: x.rebuild() if is_node(x) else x, output, is_leaf=is_node)


def _hidden_tensors(leaf: Any) -> bool:
    """Whether a leaf that is not a tensor still holds tensors (the reentrant forward runs without
    grad, so whether they will need gradients cannot be told there)."""
    if isinstance(leaf, torch.Tensor) or not hasattr(leaf, "__dict__"):
        return False
    return any(isinstance(v, torch.Tensor) for v in vars(leaf).values())


class _NamedCheckpointFunction(CheckpointFunction):
    """PyTorch's reentrant checkpoint, whose backward errors name the block and the fix."""

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> Any:  # type: ignore[override]
        try:
            return CheckpointFunction.backward(ctx, *grads)
        except RuntimeError as error:
            if "ready only once" in str(error) or "marked ready twice" in str(error):
                error.add_note(
                    f"ckpt_wrapper: block {ctx.run_function.label} uses CheckpointImpl.REENTRANT under DDP with "
                    "find_unused_parameters=True, which marks its parameters ready twice (once in the nested "
                    "backward). Use CheckpointImpl.NO_REENTRANT (the default), or DDP(static_graph=True)."
                )
            raise


def reentrant_checkpoint(run: Callable[..., Any], args: tuple, kwargs: dict, options: dict, *, label: str) -> Any:
    """Run ``run(*args, **kwargs)`` under reentrant checkpoint; return its output, any structure.

    Args:
        run: the block's forward.
        args: positional arguments.
        kwargs: keyword arguments.
        options: ``preserve_rng_state`` only (what reentrant checkpoint takes).
        label: the block's name, for errors.

    Raises:
        TypeError: if the output holds tensors inside an object that cannot be taken apart (their
            gradients would be lost).
    """
    leaves, spec = pytree.tree_flatten((args, kwargs))
    tensor_slots = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
    out_spec: list[pytree.TreeSpec] = []

    def flat_run(_anchor: torch.Tensor, *tensors: torch.Tensor) -> tuple:
        rebuilt = list(leaves)
        for slot, tensor in zip(tensor_slots, tensors):
            rebuilt[slot] = tensor
        call_args, call_kwargs = pytree.tree_unflatten(rebuilt, spec)
        out_leaves, spec_out = pytree.tree_flatten(_expand(run(*call_args, **call_kwargs)))
        hidden = [type(leaf).__name__ for leaf in out_leaves if _hidden_tensors(leaf)]
        if hidden:
            raise TypeError(
                f"block {label} returned {hidden[0]}, an object holding tensors, which "
                "CheckpointImpl.REENTRANT cannot see into (their gradients would be lost). Return tensors in "
                "tuples, lists, dicts or dataclasses, or use CheckpointImpl.NO_REENTRANT (the default)."
            )
        out_spec[:] = [spec_out]
        return tuple(out_leaves)

    flat_run.label = label  # type: ignore[attr-defined]
    anchor = torch.empty(0, requires_grad=True)
    out = _NamedCheckpointFunction.apply(
        flat_run, options.get("preserve_rng_state", True), anchor, *(leaves[i] for i in tensor_slots)
    )
    return _collapse(pytree.tree_unflatten(list(out), out_spec[0]))
