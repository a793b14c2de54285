"""Recorded steps for the planner: one block under one strategy, and the unwrapped model with block marks.

``block_step`` runs a block's forward and backward under a ``StepRecorder`` and keeps what the planner
needs: bytes held after forward, the working set at the peak of forward and of backward (above what
existed before the block ran; the block's output and its incoming gradient left out, since in the model
they belong to the neighbouring blocks), and the counts of the cost model. ``model_step`` records one
forward and backward of the whole unwrapped model and marks where each block's forward and backward
start and end, so the planner can put each block's figures back into the model's timeline.

Example:
    >>> import torch
    >>> from ckpt_wrapper.planner.trace import block_step
    >>> from ckpt_wrapper.testing.models import Block, GPTConfig
    >>> block = Block(GPTConfig(d_model=32, n_head=4, seq_len=8))
    >>> x = torch.randn(2, 8, 32, requires_grad=True)
    >>> step = block_step(block, lambda: ((x,), {}), device=torch.device("cpu"))
    >>> step.held > 0 and step.peak_backward >= step.held
    True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ckpt_wrapper.planner.cost import Counts
from ckpt_wrapper.timeline import StepRecorder

__all__ = ["BlockStep", "ModelStep", "block_step", "grad_leaves", "model_step"]


def grad_leaves(output: Any) -> list[torch.Tensor]:
    """The floating-point tensors of ``output`` that require grad: where backward starts."""
    return [t for t in pytree.tree_leaves(output)
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad]


@dataclasses.dataclass(frozen=True)
class BlockStep:
    """One block's recorded step under one strategy."""

    held: int
    """Bytes made by forward and alive after it, the output left out."""
    peak_forward: int
    """Most bytes alive during forward, made by it, the output left out."""
    peak_backward: int
    """Most bytes alive during backward that the block's step made: what forward held, the recompute,
    backward's temporaries, the block's parameter gradients and its input gradient."""
    end_backward: int
    """Bytes the block's step made that are alive once backward is done: its gradients, its input's."""
    counts: Counts
    """The cost model's counts for the whole step (``mode_ops`` not yet filled in)."""
    forward_ops: int
    """Ops run by forward alone."""


def block_step(block: nn.Module, fresh: Callable[[], tuple[tuple, dict]], *, device: torch.device) -> BlockStep:
    """Run ``block`` forward and backward on ``fresh()`` inputs, recorded; parameter gradients are kept.

    The gradients flowing into the output are ones, made outside the recording (in the model they come
    from the next block).
    """
    args, kwargs = fresh()
    exclude = list(block.parameters()) + [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    recorder = StepRecorder(exclude=exclude, device=device)
    with recorder:
        out = block(*args, **kwargs)
    forward_ops = recorder.mark()
    outs = grad_leaves(out)
    out_tensors = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
    skip = recorder.serials_of(out_tensors)
    held = recorder.live_bytes(exclude=out_tensors)
    grads = [torch.ones_like(t) for t in outs]
    with recorder:
        torch.autograd.backward(outs, grads)
    del out, outs, grads, out_tensors
    series = recorder.series(without=skip)
    return BlockStep(held=held, peak_forward=max(series[:forward_ops], default=0),
                     peak_backward=max(series[forward_ops:], default=0), end_backward=series[-1] if series else 0,
                     counts=Counts(recorder.flops, recorder.bytes_touched, len(recorder.ops), 0),
                     forward_ops=forward_ops)


@dataclasses.dataclass
class ModelStep:
    """The unwrapped model's recorded step: its timeline, split, and where each block ran."""

    activations: list[int]
    """Bytes alive after each op, parameter gradients left out."""
    gradients: dict[str, list[int]]
    """Per owner (a block's name, or ``""`` for parameters outside the blocks): bytes of parameter
    gradients alive after each op."""
    marks: dict[str, dict[str, int]]
    """Per block: ``forward_start``, ``forward_end``, ``backward_start``, ``backward_end`` as op indices."""
    held: int
    """Bytes made by forward and alive after it, the output left out (the unwrapped activation memory)."""
    counts: Counts
    """The cost model's counts for the step."""
    forward_ops: int
    """Ops run by forward."""
    recorder: StepRecorder
    """The recorder itself (allocations and ops, for reports)."""
    outputs: set[int] = dataclasses.field(default_factory=set)
    """Serial numbers (in ``recorder.allocations``) of the model output's storages."""

    @property
    def output_bytes(self) -> int:
        """Bytes of the model output's storages (still referenced by the training loop until the step ends)."""
        return sum(self.recorder.allocations[s].nbytes for s in self.outputs)


def model_step(model: nn.Module, run: Callable[[], Any], blocks: list[tuple[str, nn.Module]], *,
               device: torch.device | None, loss: Callable[[Any], torch.Tensor],
               on_module: dict[nn.Module, str] | None = None) -> ModelStep:
    """Record ``loss(run())`` and its backward on the unwrapped ``model``, marking each block's phases.

    ``model``'s gradients must be None on entry; they are left as backward made them. With
    ``on_module`` (module -> name), the recorder's ``module`` names the innermost module running.
    ``device`` None records storages on every device.
    """
    recorder = StepRecorder(exclude=list(model.parameters()), device=device)
    marks: dict[str, dict[str, int]] = {name: {} for name, _ in blocks}
    handles: list[Any] = []

    def at(name: str, key: str) -> Callable[[torch.Tensor], None]:
        def hook(grad: torch.Tensor) -> None:
            marks[name].setdefault(key, recorder.mark())
        return hook

    def first_grad_tensor(value: Any) -> torch.Tensor | None:
        leaves = grad_leaves(value)
        return leaves[0] if leaves else None

    def pre(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            marks[name].setdefault("forward_start", recorder.mark())
            x = first_grad_tensor((args, kwargs))
            if x is not None and "backward_end" not in marks[name]:
                handles.append(x.register_hook(at(name, "backward_end")))
        return hook

    def post(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            marks[name].setdefault("forward_end", recorder.mark())
            y = first_grad_tensor(output)
            if y is not None:
                handles.append(y.register_hook(at(name, "backward_start")))
        return hook

    for name, block in blocks:
        handles.append(block.register_forward_pre_hook(pre(name), with_kwargs=True))
        handles.append(block.register_forward_hook(post(name), with_kwargs=True))
    stack: list[str] = []
    if on_module:
        def enter(module: nn.Module, *_: Any) -> None:
            stack.append(on_module.get(module, stack[-1] if stack else ""))
            recorder.module = stack[-1]

        def leave(module: nn.Module, *_: Any) -> None:
            stack.pop()
            recorder.module = stack[-1] if stack else ""
        for module in on_module:
            handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    try:
        with recorder:
            output = run()
            forward_ops = recorder.mark()
            out_tensors = [t for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor)]
            held = recorder.live_bytes(exclude=out_tensors)
            outputs = recorder.serials_of(out_tensors)
            del out_tensors
            value = loss(output)
            recorder.phase, recorder.module = "backward", ""
            value.backward()  # the output stays referenced, as in `out = model(x); loss(out).backward()`
            del value, output
    finally:
        for handle in handles:
            handle.remove()
    owner = {p: "" for p in model.parameters()}
    for name, block in blocks:
        owner.update({p: name for p in block.parameters()})
    by_owner: dict[str, set[int]] = {}
    for p, name in owner.items():
        by_owner.setdefault(name, set()).update(recorder.serials_of([p.grad]))
    every = set().union(*by_owner.values()) if by_owner else set()
    return ModelStep(activations=recorder.series(without=every),
                     gradients={name: recorder.series(only=serials) for name, serials in by_owner.items()},
                     marks=marks, held=held,
                     counts=Counts(recorder.flops, recorder.bytes_touched, len(recorder.ops), 0),
                     forward_ops=forward_ops, recorder=recorder, outputs=outputs)
