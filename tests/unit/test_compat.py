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


def _nested() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Sequential(nn.Linear(100, 100), nn.Linear(100, 100)), nn.Linear(100, 100), nn.ReLU())


def _pytorchs_selection(policy) -> list[str]:
    model = _nested()
    torch_ac.apply_activation_checkpointing(model, auto_wrap_policy=policy)
    strip = lambda name: name.replace("._checkpoint_wrapped_module", "").replace("_checkpoint_wrapped_module.", "")
    return sorted(strip(n) for n, m in model.named_modules() if isinstance(m, torch_ac.CheckpointWrapper))


def _policies() -> dict[str, object]:
    import functools

    from torch.distributed.fsdp.wrap import (CustomPolicy, ModuleWrapPolicy, lambda_auto_wrap_policy,
                                             size_based_auto_wrap_policy, transformer_auto_wrap_policy)

    return {
        "ModuleWrapPolicy": ModuleWrapPolicy({nn.Linear}),
        "transformer_auto_wrap_policy": functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={nn.Linear}),
        "size_based_auto_wrap_policy": functools.partial(size_based_auto_wrap_policy, min_num_params=5000),
        "lambda_auto_wrap_policy": functools.partial(lambda_auto_wrap_policy, lambda_fn=lambda m: isinstance(m, nn.Sequential)),
        "lambda nested": functools.partial(lambda_auto_wrap_policy, lambda_fn=lambda m: isinstance(m, (nn.Sequential, nn.Linear))),
        "CustomPolicy": CustomPolicy(lambda m: isinstance(m, nn.Linear)),
    }


@pytest.mark.parametrize("name", sorted(_policies()))
def test_fsdp_policies_select_exactly_what_pytorch_selects(name: str) -> None:
    """Every FSDP auto-wrap policy PyTorch ships selects the same modules here as in PyTorch's
    ``apply_activation_checkpointing``, nested ones included, and training gives PyTorch's gradients.

    Caught on the main of 2026-12-01: ``size_based_auto_wrap_policy`` selected ``['0', '1']`` where
    PyTorch selects ``['0.0', '0.1', '1']``.
    """
    policy = _policies()[name]
    expected = _pytorchs_selection(policy)
    model = _nested()
    assert sorted(__import__("ckpt_wrapper").apply_activation_checkpointing(model, auto_wrap_policy=policy)) == expected
    reference = _nested()
    torch_ac.apply_activation_checkpointing(reference, auto_wrap_policy=policy)
    x = torch.randn(3, 100, requires_grad=True)
    model(x).sum().backward()
    reference(x).sum().backward()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)
