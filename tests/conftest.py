"""Fixtures shared by the unit tests: a tiny GPT, a batch for it, and ways to compare and observe it.

Everything here is CPU-only and small enough that the whole unit suite runs in about a minute on
two cores. Tests build a reference model, wrap a ``copy.deepcopy`` of it, and compare.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable

import pytest
import torch
from torch import nn

from ckpt_wrapper.testing.models import GPT, Block, GPTConfig

TINY = GPTConfig(n_layer=4, d_model=32, n_head=4, seq_len=16, vocab_size=64)
"""Four blocks of width 32: big enough to have structure, small enough to run in milliseconds."""


@pytest.fixture
def tiny_config() -> GPTConfig:
    """The configuration ``make_gpt`` builds from."""
    return TINY


@pytest.fixture
def make_gpt() -> Callable[..., GPT]:
    """``make_gpt(**overrides)``: a tiny GPT, seeded so that every call gives the same weights."""

    def make(**overrides: object) -> GPT:
        torch.manual_seed(0)
        return GPT(dataclasses.replace(TINY, **overrides))

    return make


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, targets) of shape (2, seq_len) for the tiny GPT."""
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, TINY.vocab_size, (2, TINY.seq_len), generator=generator)
    targets = torch.randint(0, TINY.vocab_size, (2, TINY.seq_len), generator=generator)
    return tokens, targets


def _same_grads(model: nn.Module, reference: nn.Module, *, exact: bool = True) -> None:
    names = [name for name, _ in model.named_parameters()]
    assert names == [name for name, _ in reference.named_parameters()], "parameter names differ"
    for (name, param), ref_param in zip(model.named_parameters(), reference.parameters()):
        if not ref_param.requires_grad:
            assert param.grad is None, f"{name} is frozen but received a gradient"
            continue
        # assert_close(None, None) passes, so a gradient that never arrived must be caught here.
        assert ref_param.grad is not None, f"reference {name} received no gradient; the test is broken"
        assert param.grad is not None, f"{name} received no gradient (the reference's has one)"
        if exact:
            torch.testing.assert_close(param.grad, ref_param.grad, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
        else:
            torch.testing.assert_close(param.grad, ref_param.grad, msg=lambda m: f"{name}: {m}")


@pytest.fixture
def assert_same_grads() -> Callable[..., None]:
    """``assert_same_grads(model, reference, exact=True)``: every trainable parameter got the reference's gradient."""
    return _same_grads


@pytest.fixture
def block_forward_calls(monkeypatch: pytest.MonkeyPatch) -> collections.Counter:
    """Counts runs of ``Block.forward`` per block object (``id(block)``): 2 per step means recomputed.

    A wrapped block looks its own forward up on its original class at call time, so patching the class
    counts the forward of wrapped, unwrapped, deep-copied and unpickled blocks alike.
    """
    calls: collections.Counter = collections.Counter()
    original = Block.forward

    def counting_forward(self: Block, *args: object, **kwargs: object) -> object:
        calls[id(self)] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Block, "forward", counting_forward)
    return calls


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test skipped without CUDA is a ``gpu`` test: ``pytest -m gpu`` (``scripts/gpu_check.py``) runs
    them all, whether they carry the marker or only a ``skipif(not torch.cuda.is_available(), reason=...)``
    whose reason names CUDA or a GPU."""
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            continue
        for mark in item.iter_markers("skipif"):
            reason = str(mark.kwargs.get("reason", ""))
            if "cuda" in reason.lower() or "gpu" in reason.lower():
                item.add_marker(pytest.mark.gpu)
                break
