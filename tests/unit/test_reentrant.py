"""REENTRANT mode works for every output structure NO_REENTRANT accepts, or refuses by name, and
in-place writes to a block's inputs are refused by name in both modes."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from ckpt_wrapper import CheckpointImpl, checkpoint_wrapper


@dataclasses.dataclass
class Output:
    hidden: torch.Tensor
    extras: dict[str, torch.Tensor]


@dataclasses.dataclass(frozen=True)
class Nested:
    inner: Output
    scale: float


class Structured(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> Nested:
        h = torch.tanh(self.fc(x))
        return Nested(inner=Output(hidden=h, extras={"aux": h.square().mean()}), scale=2.0)


@pytest.mark.parametrize("impl", list(CheckpointImpl), ids=lambda i: i.name)
def test_dataclass_outputs_keep_gradients_in_both_modes(impl: CheckpointImpl) -> None:
    """Nested and frozen dataclass outputs come back as the same types, with the unwrapped gradients.

    Caught on the main of 2026-12-01: under REENTRANT the dataclass was passed through as an opaque
    object, so the block's parameters got ``None`` gradients.
    """
    torch.manual_seed(0)
    reference = Structured()
    wrapped = checkpoint_wrapper(copy.deepcopy(reference), checkpoint_impl=impl)
    x = torch.randn(3, 6)  # no input requires grad: only the parameters do
    for net in (reference, wrapped):
        out = net(x)
        assert type(out) is Nested and type(out.inner) is Output and out.scale == 2.0
        (out.inner.hidden.sum() + out.inner.extras["aux"]).backward()
    for p, q in zip(wrapped.parameters(), reference.parameters()):
        assert p.grad is not None
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)


class Opaque:
    """Not a tensor, tuple, dict or dataclass: REENTRANT cannot see the tensor inside."""

    def __init__(self, value: torch.Tensor) -> None:
        self.value = value


class ReturnsOpaque(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> Opaque:
        return Opaque(self.fc(x))


def test_reentrant_refuses_an_output_that_would_lose_gradients() -> None:
    """An object that hides tensors needing gradients is an error naming the block, not ``None`` grads."""
    block = checkpoint_wrapper(ReturnsOpaque(), checkpoint_impl=CheckpointImpl.REENTRANT)
    with pytest.raises(TypeError, match=r"\(ReturnsOpaque\) returned Opaque.*NO_REENTRANT"):
        block(torch.randn(2, 4))
    out = checkpoint_wrapper(ReturnsOpaque())(torch.randn(2, 4))  # NO_REENTRANT carries it
    out.value.sum().backward()


class WritesInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.mul_(2)
        return self.fc(x)


@pytest.mark.parametrize("requires_grad", [True, False])
@pytest.mark.parametrize("impl", list(CheckpointImpl), ids=lambda i: i.name)
def test_an_in_place_write_to_a_block_input_is_refused_by_name(impl: CheckpointImpl, requires_grad: bool) -> None:
    """The forward that writes into its input fails at once, naming the block and the fix.

    Caught on the main of 2026-12-01: NO_REENTRANT failed only in backward with PyTorch's anonymous
    version error, REENTRANT with "a leaf Variable that requires grad...", and an input that needs
    no gradient was recomputed from the modified values without any error.
    """
    block = checkpoint_wrapper(WritesInput(), checkpoint_impl=impl)
    x = torch.randn(2, 4, requires_grad=requires_grad) * 1  # not a leaf, so the write itself is allowed
    with pytest.raises(RuntimeError, match=r"\(WritesInput\) modified one of its input tensors in place.*out of place"):
        block(x)
    with torch.no_grad():  # nothing is recomputed without grad: the write is fine there
        block(torch.randn(2, 4))
