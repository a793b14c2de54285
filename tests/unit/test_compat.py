"""Code written against PyTorch's private checkpoint_wrapper module runs against ckpt_wrapper."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn
from torch.distributed.algorithms._checkpoint import checkpoint_wrapper as torch_ac

from ckpt_wrapper import CheckpointImpl, CheckpointWrapper, OffloadWrapper, unwrap, wrap_state
from ckpt_wrapper import wrapper as ours


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.scale = 2.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * self.scale


@pytest.mark.parametrize("impl", [CheckpointImpl.NO_REENTRANT, CheckpointImpl.REENTRANT, torch_ac.CheckpointImpl.REENTRANT])
def test_checkpoint_wrapper_class_constructs_like_pytorchs(impl) -> None:
    """``CheckpointWrapper(module, checkpoint_impl, checkpoint_fn=None, **kwargs)`` wraps ``module`` in
    place and returns it, with the options given; attributes of the module read through it.

    Caught on the main of 2026-12-01: the class could not be called (``TypeError``), which PyTorch's own
    test_checkpoint_wrapper.py does in test_forward_missing_attributes.
    """
    net = Net()
    wrapped = CheckpointWrapper(net, impl, preserve_rng_state=False)
    assert wrapped is net and isinstance(wrapped, CheckpointWrapper)
    assert wrapped.checkpoint_impl.name == impl.name
    assert wrap_state(wrapped).options.kwargs == {"preserve_rng_state": False}
    assert wrapped.lin is net.lin and wrapped.scale == 2.0 and wrapped._checkpoint_wrapped_module is net
    wrapped(torch.randn(2, 4)).sum().backward()
    assert net.lin.weight.grad is not None
    assert type(unwrap(wrapped)) is Net


def test_offload_wrapper_class_constructs_like_pytorchs() -> None:
    """``OffloadWrapper(module)`` wraps ``module`` in place and returns it."""
    net = Net()
    wrapped = OffloadWrapper(net)
    assert wrapped is net and isinstance(wrapped, OffloadWrapper)
    with pytest.warns(UserWarning, match="nothing to free"):  # on CPU, as PyTorch's offload_wrapper is
        wrapped(torch.randn(2, 4, requires_grad=True)).sum().backward()


def test_the_signatures_accept_what_pytorchs_accept() -> None:
    """Every parameter of PyTorch's ``checkpoint_wrapper`` exists here under the same name."""
    theirs = inspect.signature(torch_ac.checkpoint_wrapper).parameters
    mine = inspect.signature(ours.checkpoint_wrapper).parameters
    assert [n for n in theirs if n != "checkpoint_fn_kwargs"] == [n for n in mine if n in theirs and n != "checkpoint_fn_kwargs"]
    assert list(inspect.signature(torch_ac.apply_activation_checkpointing).parameters)[:4] == \
        list(inspect.signature(__import__("ckpt_wrapper").apply_activation_checkpointing).parameters)[:4]


def test_compatibility_constants_exist_and_equal_pytorchs() -> None:
    """FSDP-era code imports these names; here no name carries the prefix, so stripping it is a no-op."""
    assert ours._CHECKPOINT_WRAPPED_MODULE == torch_ac._CHECKPOINT_WRAPPED_MODULE
    assert ours._CHECKPOINT_PREFIX == torch_ac._CHECKPOINT_PREFIX


def test_calling_a_wrapper_class_without_a_module_is_a_clear_error() -> None:
    with pytest.raises(TypeError, match=r"CheckpointWrapper\(module, \.\.\.\) wraps an nn.Module"):
        CheckpointWrapper(5)
    with pytest.raises(ValueError, match="already wrapped"):
        CheckpointWrapper(CheckpointWrapper(Net()))
