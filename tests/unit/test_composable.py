"""``ckpt_wrapper.checkpoint(module)``: the composable API, on the wrapper's machinery."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn

from ckpt_wrapper import checkpoint, selective_context_fn
from ckpt_wrapper.distributed import init_distributed


class Counting(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 12), nn.Linear(12, 6)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.fc2(torch.tanh(self.fc1(x)))


def _pair() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    reference = nn.Sequential(Counting(), Counting())
    return reference, copy.deepcopy(reference)


def _grads_equal(a: nn.Module, b: nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("kwargs", [{}, {"preserve_rng_state": False}, {"determinism_check": "none"}, {"debug": False},
                                    {"early_stop": False}, {"context_fn": selective_context_fn("matmuls")}],
                         ids=["default", "no-rng", "no-determinism-check", "debug", "no-early-stop", "selective"])
def test_checkpoint_in_place_recomputes_and_keeps_names_and_gradients(kwargs: dict) -> None:
    """The module stays where it is with its names and class name, is recomputed in backward, and gives
    the unwrapped gradients, for every keyword the composable API takes."""
    reference, model = _pair()
    names = [n for n, _ in model.named_parameters()]
    assert checkpoint(model[0], **kwargs) is model[0]
    assert type(model[0]).__name__ == "Counting" and [n for n, _ in model.named_parameters()] == names
    x = torch.randn(3, 6, requires_grad=True)
    reference(x).sum().backward()
    model(x).sum().backward()
    _grads_equal(model, reference)
    assert model[0].calls == 2 and model[1].calls == 1  # forward, and the recompute


def test_state_enable_hook_turns_checkpointing_off_and_on() -> None:
    """``checkpoint.state(module).enable_hook = False`` runs the plain forward (no recompute)."""
    _, model = _pair()
    checkpoint(model[0])
    checkpoint.state(model[0]).enable_hook = False
    model(torch.randn(2, 6)).sum().backward()
    assert model[0].calls == 1
    checkpoint.state(model[0]).enable_hook = True
    model(torch.randn(2, 6)).sum().backward()
    assert model[0].calls == 3
    with pytest.raises(ValueError, match="is not checkpointed"):
        checkpoint.state(model[1])


def test_reentrant_and_unknown_keywords_are_refused() -> None:
    with pytest.raises(NotImplementedError, match="use_reentrant=True is not supported"):
        checkpoint(nn.Linear(2, 2), use_reentrant=True)
    with pytest.raises(ValueError, match="Unexpected keyword arguments: bogus"):
        checkpoint(nn.Linear(2, 2), bogus=1)


@pytest.fixture(scope="module")
def process_group():
    made = init_distributed(torch.device("cpu"))
    yield
    if made:
        dist.destroy_process_group()


@pytest.mark.parametrize("order", ["checkpoint-then-shard", "shard-then-checkpoint"])
def test_composes_with_fully_shard_in_either_order(process_group, order: str) -> None:
    """``checkpoint`` and ``fully_shard`` in either order train like the unsharded, unwrapped model."""
    from torch.distributed.fsdp import fully_shard

    reference, model = _pair()
    for block in model:
        if order == "checkpoint-then-shard":
            checkpoint(block)
            fully_shard(block)
        else:
            fully_shard(block)
            checkpoint(block)
    fully_shard(model)
    x = torch.randn(3, 6)
    reference(x).sum().backward()
    model(x).sum().backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad.full_tensor(), q.grad, msg=name)
    assert [b.calls for b in model] == [2, 2]


class Fails(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.fail = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fail:
            raise RuntimeError("boom")
        return self.fc(x)


def test_an_error_in_forward_leaves_no_state_and_the_module_trains_after() -> None:
    """What PyTorch's composable state keeps between hooks (``_ac_generator``) is never kept here, and a
    forward that raised leaves the module usable."""
    module = checkpoint(Fails())
    with pytest.raises(RuntimeError, match="boom"):
        module(torch.randn(2, 4))
    state = checkpoint.state(module)
    assert state._ac_generator is None and not state.entered
    module.fail = False
    module(torch.randn(2, 4)).sum().backward()
    assert module.fc.weight.grad is not None
