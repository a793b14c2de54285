"""Class-swap edge cases: FSDP2 in either order, __init_subclass__ keywords, parametrizations,
super(self.__class__, self), and offloaded models pickled at any point of training."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.utils import parametrize

from ckpt_wrapper import (
    CheckpointWrapper,
    apply_activation_checkpointing,
    by_class,
    checkpoint_wrapper,
    offload_wrapper,
    unwrap,
    wrap_state,
)
from ckpt_wrapper.distributed import init_distributed


@pytest.fixture(scope="module")
def process_group():
    made = init_distributed(torch.device("cpu"))  # one rank, in memory: what fully_shard needs
    yield
    if made:
        dist.destroy_process_group()


def _stack() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(4, 4), nn.GELU()) for _ in range(3)])


@pytest.mark.parametrize("order", ["wrap-then-shard", "shard-then-wrap"])
def test_fully_shard_in_either_order_keeps_construction_and_slicing(process_group, order: str) -> None:
    """``type(block)(...)`` builds a block, a wrapped ``nn.Sequential`` block slices, and the model trains.

    Caught on the main of 2026-12-01: after ``fully_shard(block)`` then wrapping, both raised
    ``TypeError`` (FSDP2's ``__new__`` assumes its class is first in the MRO).
    """
    from torch.distributed.fsdp import fully_shard

    model = _stack()
    for block in model:
        if order == "wrap-then-shard":
            checkpoint_wrapper(block)
            fully_shard(block)
        else:
            fully_shard(block)
            checkpoint_wrapper(block)
    block = model[0]
    fresh = type(block)(nn.Linear(4, 4), nn.GELU())
    assert isinstance(fresh, nn.Sequential) and isinstance(fresh, CheckpointWrapper)
    part = block[0:1]
    assert isinstance(part, nn.Sequential) and len(part) == 1
    model(torch.randn(2, 4, requires_grad=True)).sum().backward()
    assert all(b[0].weight.grad is not None for b in model)


class Registry(nn.Module):
    """A base class whose subclasses must name a key (a registry pattern)."""

    known: dict[str, type] = {}

    def __init_subclass__(cls, *, key: str, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        Registry.known[key] = cls


class Registered(Registry, key="registered"):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.fc(x))


def test_a_base_with_init_subclass_keywords_can_be_wrapped() -> None:
    """Caught on the main of 2026-12-01: ``TypeError: __init_subclass__() missing ... 'key'``. The
    generated class does not register itself in the user's registry either."""
    block = checkpoint_wrapper(Registered())
    block(torch.randn(2, 4, requires_grad=True)).sum().backward()
    assert Registry.known == {"registered": Registered}
    assert type(unwrap(block)) is Registered


class Base(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class Child(Base):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(super(self.__class__, self).forward(x))  # the old-style spelling


def test_super_of_self_class_runs_the_parent_forward() -> None:
    """``super(self.__class__, self).forward`` inside a block means its parent's forward, wrapped or not.
    Caught on the main of 2026-12-01: infinite recursion."""
    torch.manual_seed(0)
    reference = Child()
    wrapped = checkpoint_wrapper(copy.deepcopy(reference))
    x = torch.randn(3, 4)
    reference(x).sum().backward()
    wrapped(x).sum().backward()
    torch.testing.assert_close(wrapped.fc.weight.grad, reference.fc.weight.grad, rtol=0, atol=0)


class Symmetric(nn.Module):
    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.triu() + weight.triu(1).transpose(-1, -2)


@pytest.mark.parametrize("order", ["parametrize-then-wrap", "wrap-then-parametrize"])
def test_parametrizations_inside_a_block_work_in_either_order(order: str) -> None:
    """A parametrized submodule (``torch.nn.utils.parametrize``) trains as unwrapped, and unwraps."""
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(4, 4), nn.GELU())
    parametrize.register_parametrization(reference[0], "weight", Symmetric())
    block = nn.Sequential(nn.Linear(4, 4), nn.GELU())
    block.load_state_dict({k.replace("parametrizations.weight.original", "weight"): v
                           for k, v in reference.state_dict().items()})
    if order == "parametrize-then-wrap":
        parametrize.register_parametrization(block[0], "weight", Symmetric())
        checkpoint_wrapper(block)
    else:
        checkpoint_wrapper(block)
        parametrize.register_parametrization(block[0], "weight", Symmetric())
    x = torch.randn(3, 4)
    reference(x).sum().backward()
    block(x).sum().backward()
    torch.testing.assert_close(block[0].parametrizations.weight.original.grad,
                               reference[0].parametrizations.weight.original.grad, rtol=0, atol=0)
    assert type(unwrap(block)) is nn.Sequential


def test_a_parametrized_block_itself_wraps_and_unwraps_to_its_parametrized_class() -> None:
    """Wrapping the parametrized module itself keeps its ``Parametrized*`` class; parametrizing a wrapped
    block afterwards works, and unwrapping it then is refused with a message (its class changed again)."""
    layer = nn.Linear(4, 4)
    parametrize.register_parametrization(layer, "weight", Symmetric())
    parametrized = type(layer)
    checkpoint_wrapper(layer)(torch.randn(2, 4, requires_grad=True)).sum().backward()
    assert type(unwrap(layer)) is parametrized
    later = checkpoint_wrapper(nn.Linear(4, 4))
    parametrize.register_parametrization(later, "weight", Symmetric())
    later(torch.randn(2, 4, requires_grad=True)).sum().backward()
    with pytest.raises(ValueError, match="class was changed again after wrapping"):
        unwrap(later)


def _offloaded() -> nn.Sequential:
    model = _stack()
    apply_activation_checkpointing(model, checkpoint_wrapper_fn=lambda b: offload_wrapper(b, cpu_copy=True, min_bytes=0),
                                   check_fn=by_class(nn.Sequential))
    return model


def _roundtrip(model: nn.Module) -> nn.Module:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    copy_ = torch.load(buffer, weights_only=False)
    assert pickle.loads(pickle.dumps(model)) is not None
    return copy_


@pytest.mark.parametrize("stage", ["fresh", "after a step", "between forward and backward"])
def test_offloaded_models_pickle_at_any_point_of_training(stage: str) -> None:
    """``torch.save`` and pickle work at any point; the copy has the same options, one engine shared by
    its blocks, and trains. Caught on the main of 2026-12-01: after one step, "cannot pickle
    'weakref.ReferenceType' object" (the engine kept a weak reference to the last frame)."""
    model = _offloaded()
    pending = None
    if stage == "after a step":
        model(torch.randn(2, 4)).sum().backward()
    elif stage == "between forward and backward":
        pending = model(torch.randn(2, 4, requires_grad=True))
    restored = _roundtrip(model)
    if pending is not None:
        pending.sum().backward()  # the original's step completes
    engines = {id(wrap_state(b).engine) for b in restored}
    assert len(engines) == 1 and wrap_state(restored[0]).engine.options.cpu_copy
    restored(torch.randn(2, 4)).sum().backward()
    assert wrap_state(restored[0]).engine.pool.in_use_bytes == 0
