"""Recompute leaves no side effect: buffers a forward updates, and explicit generators, as if unwrapped.

Each test trains a wrapped deepcopy beside the unwrapped model for a few steps and compares, bitwise,
every loss, gradient, parameter, buffer and optimizer-state tensor.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable

import pytest
import torch
from torch import nn

from ckpt_wrapper import CheckpointImpl, apply_activation_checkpointing, by_class, checkpoint_wrapper, selective_context_fn


class MLPNorm(nn.Module):
    """MLP family: linear, a batch norm of any kind, activation, linear."""

    def __init__(self, norm: Callable[[], nn.Module]) -> None:
        super().__init__()
        self.fc1, self.norm, self.act, self.fc2 = nn.Linear(6, 6), norm(), nn.GELU(), nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.act(self.norm(self.fc1(x))))


class ConvNorm(nn.Module):
    """Conv family: conv, BatchNorm2d, ReLU, conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn, self.act, self.conv2 = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.act(self.bn(self.conv1(x))))


class EMATransformer(nn.Module):
    """Transformer family: attention and MLP, with an EMA of the input scale kept as a buffer.

    The EMA is read before it is updated, so a recompute that saw the updated value would compute
    a different output (and gradient), and a recompute that updated it again would drift.
    """

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
        self.register_buffer("ema", torch.ones(8))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x * self.ema.clone()  # a copy: autograd must not save the buffer it is about to update
        with torch.no_grad():
            self.ema.mul_(0.9).add_(0.1 * x.detach().abs().mean(dim=(0, 1)))
            self.steps += 1
        y = y + self.attn(y, y, y, need_weights=False)[0]
        return y + self.mlp(y)


class ReplacingBuffer(nn.Module):
    """A forward that replaces its buffer by assignment instead of updating it in place."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.register_buffer("count", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.count = self.count + 1
        return self.fc(x) * self.count


def _stack(make: Callable[[], nn.Module], n: int = 3) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[make() for _ in range(n)])


def _inputs(family: str, step: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(100 + step)
    shape = {"conv": (4, 3, 6, 6), "transformer": (3, 5, 8)}.get(family, (8, 6))
    return torch.randn(*shape, generator=generator)


FAMILIES: dict[str, Callable[[], nn.Module]] = {
    "mlp-bn1d": lambda: MLPNorm(lambda: nn.BatchNorm1d(6)),
    "mlp-bn1d-cumulative": lambda: MLPNorm(lambda: nn.BatchNorm1d(6, momentum=None)),
    "mlp-bn1d-no-affine": lambda: MLPNorm(lambda: nn.BatchNorm1d(6, affine=False)),
    "mlp-instancenorm-tracked": lambda: MLPNorm(lambda: _Transposed(nn.InstanceNorm1d(6, track_running_stats=True))),
    "conv": ConvNorm,
    "transformer": EMATransformer,
    "replacing": ReplacingBuffer,
}


class _Transposed(nn.Module):
    """InstanceNorm1d wants (batch, channels, length): view the (batch, features) input as one."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.inner = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.unsqueeze(-1).expand(-1, -1, 2)).mean(-1)


WRAPS = {
    "non-reentrant": checkpoint_wrapper,
    "reentrant": functools.partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.REENTRANT),
    "selective": functools.partial(checkpoint_wrapper, context_fn=selective_context_fn("matmuls")),
}


def _train(model: nn.Module, family: str, steps: int) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]], torch.optim.Optimizer]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses, grads = [], []
    for step in range(steps):
        optimizer.zero_grad()
        x = _inputs(family, step).requires_grad_()
        loss = model(x).square().mean()
        loss.backward()
        losses.append(loss.detach())
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
        optimizer.step()
    return losses, grads, optimizer


def _assert_same_training(reference: nn.Module, wrapped: nn.Module, family: str, steps: int = 3) -> None:
    ref_losses, ref_grads, ref_opt = _train(reference, family, steps)
    losses, grads, opt = _train(wrapped, family, steps)
    for step in range(steps):
        torch.testing.assert_close(losses[step], ref_losses[step], rtol=0, atol=0, msg=f"loss at step {step}")
        for name, grad in ref_grads[step].items():
            torch.testing.assert_close(grads[step][name], grad, rtol=0, atol=0, msg=f"grad of {name} at step {step}")
    ref_state, state = reference.state_dict(), wrapped.state_dict()
    assert state.keys() == ref_state.keys()
    for key, value in ref_state.items():  # parameters and every buffer, num_batches_tracked included
        torch.testing.assert_close(state[key], value, rtol=0, atol=0, msg=f"state_dict[{key!r}]")
    for ref_group, group in zip(ref_opt.state.values(), opt.state.values()):
        for key, value in ref_group.items():
            torch.testing.assert_close(group[key], value, rtol=0, atol=0, msg=f"optimizer state {key!r}")


@pytest.mark.parametrize("wrap", sorted(WRAPS))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_buffers_are_updated_once_per_step(family: str, wrap: str) -> None:
    """Buffers a forward updates (BatchNorm statistics in every variant, ``num_batches_tracked``, an EMA
    read before its update, a buffer replaced by assignment) end each step as in the unwrapped model,
    and so do losses, gradients, parameters and optimizer state.

    Caught on the main of 2026-12-01: every recompute updated them a second time (``num_batches_tracked``
    2 per step, running means drifting, the EMA block's gradients wrong).
    """
    reference = _stack(FAMILIES[family])
    wrapped = copy.deepcopy(reference)
    block_class = type(reference[0])
    apply_activation_checkpointing(wrapped, checkpoint_wrapper_fn=WRAPS[wrap], check_fn=by_class(block_class))
    _assert_same_training(reference, wrapped, family)


class Noisy(nn.Module):
    """Draws from an explicit generator: a module attribute, or one passed as an argument."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.generator = torch.Generator().manual_seed(7)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.rand(x.shape, generator=generator or self.generator)
        return self.fc(x) * (noise > 0.3)


@pytest.mark.parametrize("wrap", sorted(WRAPS))
def test_draws_from_an_explicit_generator_are_replayed(wrap: str) -> None:
    """The recompute draws the same numbers from a module's own ``torch.Generator`` as the forward did,
    and leaves the generator where the forward left it.

    Caught on the main of 2026-12-01: the recompute drew new numbers (a different mask) and silently
    gave wrong gradients; torch.utils.checkpoint restores only the global RNG states.
    """
    reference = _stack(Noisy, 2)
    wrapped = copy.deepcopy(reference)
    apply_activation_checkpointing(wrapped, checkpoint_wrapper_fn=WRAPS[wrap], check_fn=by_class(Noisy))
    _assert_same_training(reference, wrapped, "mlp")
    assert torch.equal(wrapped[0].generator.get_state(), reference[0].generator.get_state())


def test_a_generator_passed_as_an_argument_is_replayed() -> None:
    """A generator passed to the block's forward is replayed too, and ends where the forward left it."""
    torch.manual_seed(0)
    reference = Noisy()
    wrapped = checkpoint_wrapper(copy.deepcopy(reference))
    x = _inputs("mlp", 0)
    g_ref, g = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    reference(x, generator=g_ref).sum().backward()
    wrapped(x, generator=g).sum().backward()
    torch.testing.assert_close(wrapped.fc.weight.grad, reference.fc.weight.grad, rtol=0, atol=0)
    assert torch.equal(g.get_state(), g_ref.get_state())


def test_eval_forward_and_no_grad_do_not_learn_or_touch_buffers() -> None:
    """Under ``no_grad`` nothing is recomputed, so buffers move exactly as in the unwrapped model."""
    reference = _stack(FAMILIES["mlp-bn1d"])
    wrapped = copy.deepcopy(reference)
    apply_activation_checkpointing(wrapped, check_fn=by_class(MLPNorm))
    with torch.no_grad():
        for step in range(2):
            torch.testing.assert_close(wrapped(_inputs("mlp", step)), reference(_inputs("mlp", step)), rtol=0, atol=0)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(wrapped.state_dict()[key], value, rtol=0, atol=0)
