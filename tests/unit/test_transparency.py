"""Contract 1, transparency: wrapping changes no name, no type identity, and nothing a user can save or load.

Every test compares a wrapped model with an unwrapped copy of the same model.
"""

from __future__ import annotations

import copy
import functools
import io

import pytest
import torch
from torch import nn
from torch.distributed.algorithms._checkpoint import checkpoint_wrapper as torch_ac

from ckpt_wrapper import (
    CheckpointImpl,
    CheckpointWrapper,
    apply_activation_checkpointing,
    by_class,
    checkpoint_wrapper,
    every_nth,
    remove_activation_checkpointing,
)
from ckpt_wrapper.testing.models import GPT, Block


def _add_buffers(model: GPT) -> GPT:
    # GPT has no buffers of its own; give every block a persistent and a non-persistent one.
    for block in model.layers:
        block.register_buffer("steps", torch.zeros((), dtype=torch.long))
        block.register_buffer("scratch", torch.ones(3), persistent=False)
    return model


def _layout(model: GPT, layout: str) -> GPT:
    if layout == "all":
        apply_activation_checkpointing(model, check_fn=by_class(Block))
    elif layout == "every_2nd":
        apply_activation_checkpointing(model, check_fn=every_nth(2, by_class(Block)))
    return model


def _step(model: GPT, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    loss = model.loss(*batch)
    loss.backward()
    return loss


def test_wrapping_keeps_parameter_buffer_and_state_dict_names(make_gpt) -> None:
    """Wrapped and unwrapped models list the same names, in the same order, for the same tensors.

    A failure means wrapping renamed something (as PyTorch's ``_checkpoint_wrapped_module.`` prefix does),
    which breaks optimizers keyed by name, FSDP, DCP and every checkpoint saved before wrapping.
    """
    reference = _add_buffers(make_gpt())
    model = copy.deepcopy(reference)
    params_before = list(model.named_parameters())
    buffers_before = list(model.named_buffers())

    assert apply_activation_checkpointing(model, check_fn=by_class(Block)) == [f"layers.{i}" for i in range(4)]

    assert [n for n, _ in model.named_parameters()] == [n for n, _ in reference.named_parameters()]
    assert [n for n, _ in model.named_buffers()] == [n for n, _ in reference.named_buffers()]
    assert list(model.state_dict()) == list(reference.state_dict())
    assert [n for n, _ in model.named_modules()] == [n for n, _ in reference.named_modules()]
    # Same objects, not copies: an optimizer built before wrapping still updates the model.
    assert all(a is b for (_, a), (_, b) in zip(model.named_parameters(), params_before))
    assert all(a is b for (_, a), (_, b) in zip(model.named_buffers(), buffers_before))


def test_wrapped_block_keeps_its_class_identity(make_gpt) -> None:
    """A wrapped block is still an instance of its class and reports the class's name, module and qualname.

    A failure breaks ``isinstance`` checks in user code and class-name-based configs (HF
    ``_no_split_modules``, accelerate ``transformer_cls_names_to_wrap``, FSDP auto-wrap by class).
    """
    model = make_gpt()
    apply_activation_checkpointing(model, check_fn=by_class(Block))
    for block in model.layers:
        assert isinstance(block, Block)
        assert isinstance(block, CheckpointWrapper)
        assert isinstance(block, nn.Module)
        assert type(block).__name__ == "Block"
        assert type(block).__qualname__ == Block.__qualname__
        assert type(block).__module__ == Block.__module__
    assert len({type(block) for block in model.layers}) == 1, "two blocks of one class got different classes"


@pytest.mark.parametrize(
    ("source", "target"),
    [("all", "none"), ("none", "all"), ("all", "every_2nd"), ("every_2nd", "all")],
)
def test_state_dict_loads_strictly_between_wrapping_layouts(make_gpt, source: str, target: str) -> None:
    """``load_state_dict(strict=True)`` works wrapped->unwrapped, unwrapped->wrapped and between layouts.

    A failure means checkpoints are tied to the wrapping layout: changing which blocks are
    checkpointed would make saved training runs unloadable.
    """
    src = _layout(make_gpt(), source)
    with torch.no_grad():
        for param in src.parameters():
            param.add_(torch.randn_like(param))  # so that a load that silently skipped a key shows
    dst = _layout(make_gpt(), target)

    result = dst.load_state_dict(src.state_dict(), strict=True)

    assert not result.missing_keys and not result.unexpected_keys
    torch.testing.assert_close(dict(dst.state_dict()), dict(src.state_dict()), rtol=0, atol=0)


def test_deepcopy_of_wrapped_model_is_wrapped_and_still_checkpoints(make_gpt, batch, block_forward_calls, assert_same_grads) -> None:
    """``copy.deepcopy`` of a wrapped model gives a model that still recomputes and matches the reference.

    A failure means copying (EMA models, ``accelerate``'s model copies, test harnesses) silently drops
    checkpointing or breaks the copy.
    """
    reference = make_gpt()
    wrapped = copy.deepcopy(reference)
    apply_activation_checkpointing(wrapped, check_fn=by_class(Block))

    clone = copy.deepcopy(wrapped)

    assert all(isinstance(b, CheckpointWrapper) and type(b).__name__ == "Block" for b in clone.layers)
    assert all(a is not b for a, b in zip(clone.parameters(), wrapped.parameters()))
    _step(reference, batch)
    _step(clone, batch)
    assert_same_grads(clone, reference)
    assert [block_forward_calls[id(b)] for b in clone.layers] == [2] * 4, "forward + recompute expected"
    assert [block_forward_calls[id(b)] for b in reference.layers] == [1] * 4


def test_whole_wrapped_module_round_trips_through_torch_save(make_gpt, batch, block_forward_calls, assert_same_grads) -> None:
    """``torch.save(model)`` / ``torch.load`` of a wrapped model (pickle) gives a wrapped, working model.

    A failure means whole-model checkpoints (and anything that pickles modules, such as
    multiprocessing) break once a model is wrapped, or come back without checkpointing.
    """
    reference = make_gpt()
    wrapped = copy.deepcopy(reference)
    apply_activation_checkpointing(wrapped, check_fn=by_class(Block))
    buffer = io.BytesIO()
    torch.save(wrapped, buffer)
    buffer.seek(0)

    loaded = torch.load(buffer, weights_only=False)

    assert all(isinstance(b, CheckpointWrapper) and isinstance(b, Block) for b in loaded.layers)
    assert all(type(b).__name__ == "Block" for b in loaded.layers)
    assert list(loaded.state_dict()) == list(reference.state_dict())
    _step(reference, batch)
    _step(loaded, batch)
    assert_same_grads(loaded, reference)
    assert [block_forward_calls[id(b)] for b in loaded.layers] == [2] * 4


def test_attribute_access_and_indexing_reach_the_inner_modules() -> None:
    """Submodules, plain attributes, methods, indexing, ``len`` and iteration of a wrapped block work.

    A failure means code that navigates the model (``block[0]``, ``block.attn.qkv``, custom methods)
    breaks once a block is wrapped, as it does with PyTorch's wrapper.
    """

    class Scaled(nn.Sequential):
        def __init__(self) -> None:
            super().__init__(nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 4))
            self.scale = 0.5

        def describe(self) -> str:
            return f"scaled by {self.scale}"

    block = Scaled()
    first, second = block[0], block[2]
    stack = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])
    members = list(stack)

    checkpoint_wrapper(block)
    checkpoint_wrapper(stack)

    assert block[0] is first and block[-1] is second and block[1].__class__ is nn.GELU
    assert len(block) == 3 and list(block)[2] is second
    assert block.scale == 0.5 and block.describe() == "scaled by 0.5"
    assert block.get_submodule("2") is second
    assert len(stack) == 3 and list(stack) == members and stack[1] is members[1]
    x = torch.randn(2, 4, requires_grad=True)
    block(x).sum().backward()
    assert first.weight.grad is not None and second.weight.grad is not None


def test_checkpoint_wrapped_module_alias_returns_the_block_itself(make_gpt) -> None:
    """``block._checkpoint_wrapped_module`` is the block (PyTorch's attribute, kept as an alias).

    A failure breaks code written against PyTorch's wrapper that reaches through it.
    """
    model = make_gpt()
    apply_activation_checkpointing(model, check_fn=by_class(Block))
    for block in model.layers:
        assert block._checkpoint_wrapped_module is block
        assert block._checkpoint_wrapped_module.attn is block.attn


def test_remove_activation_checkpointing_restores_the_original_class_exactly(make_gpt, batch, block_forward_calls, assert_same_grads) -> None:
    """After ``remove_activation_checkpointing`` each block is exactly ``Block`` again and runs once per step.

    A failure means unwrapping leaves a generated class, stray ``_ckpt_`` state or recompute behind.
    """
    reference = make_gpt()
    model = copy.deepcopy(reference)
    apply_activation_checkpointing(model, check_fn=by_class(Block))
    state_before = {id(b): set(vars(b)) for b in reference.layers}

    removed = remove_activation_checkpointing(model)

    assert removed == [f"layers.{i}" for i in range(4)]
    for block, ref_block in zip(model.layers, reference.layers):
        assert type(block) is Block
        assert not isinstance(block, CheckpointWrapper)
        assert set(vars(block)) == state_before[id(ref_block)], "wrapper state left in the block's __dict__"
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in reference.named_parameters()]
    _step(reference, batch)
    _step(model, batch)
    assert_same_grads(model, reference)
    assert [block_forward_calls[id(b)] for b in model.layers] == [1] * 4, "an unwrapped block still recomputes"
    assert remove_activation_checkpointing(model) == []


def test_instance_level_forward_is_checkpointed_and_restored_on_unwrap() -> None:
    """A forward set on the instance (as hook libraries do) is what gets checkpointed, and unwrap puts it back.

    A failure means such a forward either bypasses the checkpoint (no memory saved) or is lost on unwrap.
    """
    layer = nn.Linear(4, 4)
    calls = []

    def hooked_forward(x: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return nn.Linear.forward(layer, x) * 2

    layer.forward = hooked_forward
    checkpoint_wrapper(layer)
    out = layer(torch.randn(3, 4, requires_grad=True))
    out.sum().backward()
    assert len(calls) == 2, "the instance forward should run in forward and again in recompute"

    remove_activation_checkpointing(nn.Sequential(layer))
    assert type(layer) is nn.Linear
    assert layer.forward is hooked_forward


def test_remove_activation_checkpointing_unwraps_pytorch_checkpoint_wrapper(make_gpt, batch, assert_same_grads) -> None:
    """A model wrapped by PyTorch's own ``checkpoint_wrapper`` unwraps to the plain model, names restored.

    A failure means users cannot migrate a model (or a checkpoint of one) from PyTorch's wrapper.
    """
    reference = make_gpt()
    model = copy.deepcopy(reference)
    torch_ac.apply_activation_checkpointing(
        model, checkpoint_wrapper_fn=torch_ac.checkpoint_wrapper, check_fn=lambda m: isinstance(m, Block)
    )
    assert any("_checkpoint_wrapped_module" in n for n, _ in model.named_parameters()), "test setup: not wrapped"

    removed = remove_activation_checkpointing(model)

    assert removed == [f"layers.{i}" for i in range(4)]
    assert all(type(b) is Block for b in model.layers)
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in reference.named_parameters()]
    assert [n for n, _ in model.named_modules()] == [n for n, _ in reference.named_modules()]
    _step(reference, batch)
    _step(model, batch)
    assert_same_grads(model, reference)


@pytest.mark.parametrize("member", list(torch_ac.CheckpointImpl), ids=lambda m: m.name)
def test_pytorch_checkpoint_impl_enum_is_accepted(member) -> None:
    """``checkpoint_wrapper`` takes PyTorch's ``CheckpointImpl`` and uses the implementation it names.

    A failure means code written against PyTorch's wrapper (which passes its own enum) breaks, or
    silently gets the other implementation.
    """
    block = checkpoint_wrapper(nn.Sequential(nn.Linear(4, 4), nn.Tanh()), checkpoint_impl=member)

    assert block.checkpoint_impl is CheckpointImpl[member.name]
    out = block(torch.randn(2, 4, requires_grad=True))
    # Reentrant checkpoint is one autograd.Function node around the block; non-reentrant leaves the
    # block's own last op as the output's node.
    assert ("CheckpointFunction" in type(out.grad_fn).__name__) == (member.name == "REENTRANT"), type(out.grad_fn)
    out.sum().backward()
    assert block[0].weight.grad is not None


def test_wrapper_functools_partial_keeps_transparency(make_gpt) -> None:
    """Options passed through ``functools.partial(checkpoint_wrapper, ...)`` do not change any name.

    A failure means wrapping with options (the common way to pass them) is less transparent than
    wrapping without.
    """
    reference = make_gpt()
    model = copy.deepcopy(reference)
    wrap = functools.partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.REENTRANT, preserve_rng_state=False)
    apply_activation_checkpointing(model, checkpoint_wrapper_fn=wrap, check_fn=by_class(Block))
    assert list(model.state_dict()) == list(reference.state_dict())
    assert all(b.checkpoint_impl is CheckpointImpl.REENTRANT for b in model.layers)
