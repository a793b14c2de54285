"""One state object per wrapped block, no shadowed attributes, and one all-or-nothing wrapping path."""

from __future__ import annotations

import copy
import functools
import pickle

import pytest
import torch
from torch import nn

from ckpt_wrapper import (
    ActivationWrapper,
    CheckpointWrapper,
    OffloadWrapper,
    apply_activation_checkpointing,
    by_class,
    cheap_recompute_wrapper,
    checkpoint_wrapper,
    offload_wrapper,
    unwrap,
    wrap_state,
)
from ckpt_wrapper.apply import WrapJob, wrap_blocks


class OwnNames(nn.Module):
    """A block that uses, for its own purposes, the names PyTorch's wrapper exposes."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.act = nn.GELU()
        self.checkpoint_fn = "mine"  # a plain attribute
        self.offload_engine = nn.Linear(4, 4)  # a submodule
        self.register_buffer("checkpoint_impl", torch.ones(1))  # a buffer

    @property
    def recompute_modules(self) -> str:  # a property of the class
        return "the block's own"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.offload_engine(self.act(self.fc(x))) * self.checkpoint_impl


WRAPPERS = {
    "checkpoint": checkpoint_wrapper,
    "offload": functools.partial(offload_wrapper, cpu_copy=True, min_bytes=0),
    "cheap": functools.partial(cheap_recompute_wrapper, modules=["act"]),
}


@pytest.mark.parametrize("kind", sorted(WRAPPERS))
def test_a_blocks_own_attributes_survive_wrapping(kind: str) -> None:
    """A block's own ``checkpoint_fn``, ``offload_engine``, ``checkpoint_impl`` and ``recompute_modules``
    read the same after wrapping, assigning them works, and the block still trains.

    Caught on the main of 2026-12-01: the wrapper's properties shadowed them (``checkpoint_fn`` read
    ``None``, ``offload_engine`` read the wrapper's engine, and assigning either raised).
    """
    block = OwnNames()
    submodule, buffer = block.offload_engine, block.checkpoint_impl
    WRAPPERS[kind](block)
    assert block.checkpoint_fn == "mine"
    assert block.offload_engine is submodule
    assert block.checkpoint_impl is buffer
    assert block.recompute_modules == "the block's own"
    block.checkpoint_fn = "changed"
    assert block.checkpoint_fn == "changed"
    block(torch.randn(2, 4, requires_grad=True)).sum().backward()
    assert block.fc.weight.grad is not None


def test_wrapping_adds_one_state_entry_and_unwrap_removes_it() -> None:
    """Wrapping adds exactly one ``__dict__`` entry, the ``WrapState``, and ``unwrap`` removes it.

    A failure means wrapper state is scattered over several attributes again, any of which could
    collide with the block's own.
    """
    block = nn.Sequential(nn.Linear(4, 4), nn.GELU())
    before = set(vars(block))
    checkpoint_wrapper(block)
    assert set(vars(block)) - before == {"__ckpt_wrapper_state__"}
    assert wrap_state(block) is vars(block)["__ckpt_wrapper_state__"]
    unwrap(block)
    assert set(vars(block)) == before


def test_the_kind_lives_on_the_generated_class() -> None:
    """The wrapper kind and the original class are attributes of the generated class itself, so a class
    swapped again on top (as ``fully_shard`` does) still answers; pickling and deepcopy keep the state.
    """
    block = offload_wrapper(nn.Linear(4, 4), cpu_copy=True)
    cls = type(block)
    assert cls.__ckpt_kind__ is OffloadWrapper and cls.__ckpt_original__ is nn.Linear
    again = type("Resharded", (cls,), {})  # what fully_shard does to a wrapped block
    block.__class__ = again
    assert wrap_state(block).kind is OffloadWrapper
    block.__class__ = cls
    for clone in (copy.deepcopy(block), pickle.loads(pickle.dumps(block))):
        assert type(clone) is cls
        assert wrap_state(clone).engine.options.cpu_copy is True


def test_type_of_a_wrapped_block_builds_a_wrapped_block_with_default_state() -> None:
    """``type(block)(...)`` runs the block's own ``__init__`` and gives a block wrapped with defaults."""
    block = checkpoint_wrapper(nn.Linear(4, 4), preserve_rng_state=False)
    fresh = type(block)(4, 4)
    assert isinstance(fresh, CheckpointWrapper)
    state = wrap_state(fresh)
    assert state.kind is CheckpointWrapper and state.options is None
    fresh(torch.randn(2, 4, requires_grad=True)).sum().backward()
    assert fresh.weight.grad is not None


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(4, 4), nn.GELU()) for _ in range(5)])


def _snapshot(model: nn.Module) -> tuple:
    return (
        [(name, type(m)) for name, m in model.named_modules()],
        {k: v.clone() for k, v in model.state_dict().items()},
        [sorted(vars(m)) for m in model.modules()],
    )


def _assert_unchanged(model: nn.Module, before: tuple) -> None:
    modules, tensors, keys = _snapshot(model)
    assert modules == before[0]
    assert tensors.keys() == before[1].keys()
    for key, value in tensors.items():
        assert torch.equal(value, before[1][key]), key
    assert keys == before[2]
    assert not any(isinstance(m, ActivationWrapper) for m in model.modules())


def test_apply_that_fails_on_the_third_block_leaves_the_model_as_it_was() -> None:
    """If wrapping the third block raises, the two wrapped before it are restored and the error names
    the third. Caught on the main of 2026-12-01: blocks 0 and 1 stayed wrapped.
    """
    model = _model()
    before = _snapshot(model)
    calls = []

    def flaky(module: nn.Module) -> nn.Module:
        calls.append(module)
        if len(calls) == 3:
            raise RuntimeError("this block cannot be wrapped")
        return checkpoint_wrapper(module)

    with pytest.raises(RuntimeError, match="cannot be wrapped") as caught:
        apply_activation_checkpointing(model, checkpoint_wrapper_fn=flaky, check_fn=by_class(nn.Sequential))
    assert any("'2'" in note and "no block was left wrapped" for note in caught.value.__notes__)
    _assert_unchanged(model, before)


def test_a_failing_job_also_restores_blocks_replaced_by_a_foreign_wrapper() -> None:
    """A wrapper function that returns a new module (PyTorch's own wrapper does) is undone too: the
    original block is put back where it was.
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper as torch_wrapper

    model = _model()
    before = _snapshot(model)
    jobs = [WrapJob(str(i), model[i], torch_wrapper) for i in range(2)]
    jobs.append(WrapJob("2", model[2], lambda m: 42))  # type: ignore[arg-type,return-value]
    with pytest.raises(TypeError, match="must return an nn.Module, got int for '2'"):
        wrap_blocks(model, jobs)
    _assert_unchanged(model, before)


def test_wrap_blocks_labels_each_block_with_its_fqn() -> None:
    """Every block wrapped through the one path knows its FQN, which errors then name."""
    model = _model()
    names = apply_activation_checkpointing(model, check_fn=by_class(nn.Sequential))
    assert [wrap_state(model.get_submodule(name)).fqn for name in names] == names
