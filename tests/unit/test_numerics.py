"""Contract 2, correct by default: wrapped models give the unwrapped model's numbers.

Covers the implementation choice (non-reentrant, no warnings), call conventions (keyword arguments,
non-tensor arguments, nested outputs, ``torch.autograd.grad``, inputs without grad), RNG preservation,
autocast and grad mode in recompute, error notes, the ``no_grad`` fast path, and recovery after an error.
All comparisons are exact: the math is the same on CPU, only when it runs changes.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import traceback
import warnings

import pytest
import torch
import torch.utils.checkpoint
from torch import nn

from ckpt_wrapper import CheckpointImpl, apply_activation_checkpointing, by_class, checkpoint_wrapper
from ckpt_wrapper.testing.models import GPT, Block

IMPLS = pytest.mark.parametrize("impl", list(CheckpointImpl), ids=lambda i: i.name)


def _wrap(model: nn.Module, cls: type[nn.Module], impl: CheckpointImpl = CheckpointImpl.NO_REENTRANT) -> list[str]:
    wrapper = functools.partial(checkpoint_wrapper, checkpoint_impl=impl)
    return apply_activation_checkpointing(model, checkpoint_wrapper_fn=wrapper, check_fn=by_class(cls))


@pytest.fixture
def checkpoint_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Records the keyword arguments of every ``torch.utils.checkpoint.checkpoint`` call."""
    calls: list[dict] = []
    real = torch.utils.checkpoint.checkpoint

    def spy(fn, *args, **kwargs):
        calls.append(dict(kwargs))
        return real(fn, *args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", spy)
    return calls


# --- implementation and warnings ---------------------------------------------------------------------


def test_default_is_non_reentrant_with_use_reentrant_passed_explicitly(make_gpt, batch, checkpoint_calls) -> None:
    """By default every block runs ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``.

    A failure means the default changed to the reentrant implementation (no kwargs, no
    ``autograd.grad``) or relies on PyTorch's default, which warns and may change.
    """
    model = make_gpt()
    apply_activation_checkpointing(model, check_fn=by_class(Block))

    model.loss(*batch).backward()

    assert all(b.checkpoint_impl is CheckpointImpl.NO_REENTRANT for b in model.layers)
    assert len(checkpoint_calls) == 4
    assert all(call.get("use_reentrant", "missing") is False for call in checkpoint_calls)


@IMPLS
def test_forward_and_backward_raise_no_warning(make_gpt, batch, impl, assert_same_grads) -> None:
    """A training step of a wrapped model emits no warning at all, for both implementations.

    A failure means users see checkpoint warnings (``use_reentrant`` not passed, "none of the inputs
    have requires_grad") every step, or that a warnings-as-errors CI breaks.
    """
    reference = make_gpt()
    model = copy.deepcopy(reference)
    _wrap(model, Block, impl)
    reference.loss(*batch).backward()

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.loss(*batch).backward()

    assert_same_grads(model, reference)


# --- call conventions ---------------------------------------------------------------------------------


class KeywordBlock(nn.Module):
    """Takes a positional tensor, an optional tensor, keyword-only floats and strings; returns a pytree."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None, *, scale: float, mode: str = "sum") -> dict:
        h = torch.tanh(self.a(x)) * scale
        if bias is not None:
            h = h + bias
        y = self.b(h)
        return {"y": y, "pair": (h, y * 2), "mode": mode}


class KeywordNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 8)
        self.bias_src = nn.Linear(8, 8)
        self.block = KeywordBlock()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(self.inp(x), bias=self.bias_src(x), scale=0.5, mode="mean")
        assert out["mode"] == "mean"
        return out["y"].sum() + out["pair"][0].pow(2).sum() + out["pair"][1].mean()


@IMPLS
def test_keyword_and_non_tensor_arguments_with_nested_outputs_match_reference(impl, assert_same_grads) -> None:
    """Keyword, keyword-only and non-tensor arguments pass through; dict/tuple outputs keep gradients.

    A failure means blocks with a real-world signature (masks, flags, HF-style dict outputs) lose
    gradients or fail under one of the implementations.
    """
    torch.manual_seed(0)
    reference = KeywordNet()
    model = copy.deepcopy(reference)
    _wrap(model, KeywordBlock, impl)
    x_ref = torch.randn(4, 8, requires_grad=True)
    x = x_ref.detach().clone().requires_grad_()

    reference(x_ref).backward()
    model(x).backward()

    assert_same_grads(model, reference)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=0)


class BiasedLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, *, pos_bias: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(x) + pos_bias)


class SharedBiasNet(nn.Module):
    """A learned bias computed once and passed by keyword to every layer (T5/ALiBi/rotary style)."""

    def __init__(self) -> None:
        super().__init__()
        self.pos = nn.Embedding(4, 8)
        self.layers = nn.ModuleList(BiasedLayer() for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.pos(torch.arange(4))
        for layer in self.layers:
            x = layer(x, pos_bias=bias)
        return x.sum()


@IMPLS
def test_tensor_keyword_argument_shared_by_blocks_gets_reference_grads(impl, assert_same_grads) -> None:
    """A keyword tensor that requires grad and feeds several wrapped blocks gets the reference's gradient.

    A failure under REENTRANT with "Trying to backward through the graph a second time" means tensor
    keyword arguments are closed over instead of passed through the autograd Function, so each block's
    recompute back-propagates into (and frees) the shared tensor's history.
    """
    torch.manual_seed(0)
    reference = SharedBiasNet()
    model = copy.deepcopy(reference)
    _wrap(model, BiasedLayer, impl)
    x = torch.randn(4, 8)

    reference(x).backward()
    model(x).backward()

    assert_same_grads(model, reference)


@dataclasses.dataclass
class BlockOutput:
    hidden: torch.Tensor
    aux_loss: torch.Tensor


class DataclassBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> BlockOutput:
        h = torch.relu(self.lin(x))
        return BlockOutput(hidden=h, aux_loss=h.pow(2).mean())


def test_dataclass_outputs_keep_gradients() -> None:
    """A block returning a dataclass gives the reference's gradients through every field.

    A failure means structured outputs (HF ``ModelOutput``-like) lose gradients through the wrapper.
    """
    torch.manual_seed(0)
    reference = nn.Sequential(DataclassBlock())
    model = copy.deepcopy(reference)
    _wrap(model, DataclassBlock)
    x = torch.randn(4, 8)

    for net in (reference, model):
        out = net(x)
        assert isinstance(out, BlockOutput)
        (out.hidden.sum() + out.aux_loss).backward()

    torch.testing.assert_close(model[0].lin.weight.grad, reference[0].lin.weight.grad, rtol=0, atol=0)
    torch.testing.assert_close(model[0].lin.bias.grad, reference[0].lin.bias.grad, rtol=0, atol=0)


def test_autograd_grad_matches_reference(tiny_config) -> None:
    """``torch.autograd.grad`` through wrapped blocks returns the reference's input and parameter gradients.

    A failure means functional gradient code (gradient penalties, meta-learning, ``inputs=``) breaks.
    """
    torch.manual_seed(0)
    reference = nn.Sequential(*(Block(tiny_config) for _ in range(3)))
    model = copy.deepcopy(reference)
    _wrap(model, Block)
    x = torch.randn(2, tiny_config.seq_len, tiny_config.d_model, requires_grad=True)

    grads_ref = torch.autograd.grad(reference(x).pow(2).mean(), [x, *reference.parameters()])
    grads = torch.autograd.grad(model(x).pow(2).mean(), [x, *model.parameters()])

    assert len(grads) == len(grads_ref)
    torch.testing.assert_close(grads, grads_ref, rtol=0, atol=0)
    assert all(p.grad is None for p in model.parameters()), "autograd.grad must not accumulate into .grad"


@IMPLS
def test_frozen_embedding_block_inputs_without_grad_still_train_the_blocks(make_gpt, batch, impl, assert_same_grads) -> None:
    """With frozen embeddings (block inputs do not require grad) every block parameter gets its gradient.

    A failure under REENTRANT is PyTorch's reentrant bug (parameter gradients silently None when no
    input requires grad); under NO_REENTRANT it means inputs without grad are mishandled.
    """
    reference = make_gpt()
    reference.tok_emb.weight.requires_grad_(False)
    reference.pos_emb.weight.requires_grad_(False)
    model = copy.deepcopy(reference)
    _wrap(model, Block, impl)

    reference.loss(*batch).backward()
    model.loss(*batch).backward()

    assert_same_grads(model, reference)
    assert model.layers[0].attn.qkv.weight.grad is not None


class LoRALinear(nn.Module):
    """A frozen base weight plus a trainable low-rank update."""

    def __init__(self, width: int, rank: int = 2) -> None:
        super().__init__()
        self.base = nn.Linear(width, width)
        self.base.requires_grad_(False)
        self.down = nn.Linear(width, rank, bias=False)
        self.up = nn.Linear(rank, width, bias=False)
        nn.init.normal_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.base(x) + self.up(self.down(x)))


@IMPLS
def test_lora_style_frozen_base_with_plain_inputs_trains_the_adapters(impl, assert_same_grads) -> None:
    """Frozen base weights and inputs without grad: the low-rank adapters get the reference's gradients.

    A failure means parameter-efficient fine-tuning silently trains nothing when checkpointed (the
    reentrant case) or that frozen weights receive gradients.
    """
    torch.manual_seed(0)
    reference = nn.Sequential(*(LoRALinear(8) for _ in range(3)))
    model = copy.deepcopy(reference)
    _wrap(model, LoRALinear, impl)
    x = torch.randn(4, 8)  # raw features: no grad anywhere upstream

    reference(x).pow(2).mean().backward()
    model(x).pow(2).mean().backward()

    assert_same_grads(model, reference)
    assert all(layer.base.weight.grad is None for layer in model)


def test_reentrant_reaches_parameters_when_no_input_requires_grad(assert_same_grads) -> None:
    """REENTRANT with an input that does not require grad still gives every parameter its gradient.

    PyTorch's own reentrant checkpoint leaves these gradients None (with a warning); a failure here
    means ckpt_wrapper's fix for that regressed.
    """
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Sequential(nn.Linear(8, 8), nn.GELU()), nn.Sequential(nn.Linear(8, 8), nn.GELU()))
    model = copy.deepcopy(reference)
    apply_activation_checkpointing(
        model,
        checkpoint_wrapper_fn=functools.partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.REENTRANT),
        check_fn=lambda m: isinstance(m, nn.Sequential),
    )
    x = torch.randn(4, 8)
    assert not x.requires_grad

    reference(x).sum().backward()
    model(x).sum().backward()

    assert_same_grads(model, reference)


class PytreeBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> tuple:
        h = self.lin(x)
        return h.relu(), {"tanh": h.tanh(), "count": 3, "steps": torch.arange(3)}


@IMPLS
def test_tuple_and_dict_outputs_keep_gradients(impl, assert_same_grads) -> None:
    """Tuple outputs holding dicts, ints and integer tensors keep gradients through each float tensor.

    A failure under REENTRANT means the output pytree is not flattened for the autograd Function, so
    tensors inside containers are cut from the graph.
    """
    torch.manual_seed(0)
    reference = nn.Sequential(PytreeBlock())
    model = copy.deepcopy(reference)
    _wrap(model, PytreeBlock, impl)
    x = torch.randn(4, 8)

    for net in (reference, model):
        relu, extra = net[0](x)
        assert extra["count"] == 3 and torch.equal(extra["steps"], torch.arange(3))
        (relu.sum() + extra["tanh"].pow(2).sum()).backward()

    assert_same_grads(model, reference)


# --- RNG, autocast, grad mode ---------------------------------------------------------------------------


@IMPLS
def test_dropout_rng_is_preserved_bitwise(make_gpt, batch, impl, assert_same_grads) -> None:
    """With dropout in train mode, losses, gradients and the RNG stream afterwards equal the reference's.

    A failure means recompute draws different dropout masks than forward (wrong gradients), or that
    checkpointing consumes random numbers and shifts every later draw.
    """
    reference = make_gpt(dropout=0.1)
    model = copy.deepcopy(reference)
    _wrap(model, Block, impl)
    reference.train()
    model.train()

    torch.manual_seed(1234)
    loss_ref = reference.loss(*batch)
    loss_ref.backward()
    rng_after_ref = torch.get_rng_state()
    torch.manual_seed(1234)
    loss = model.loss(*batch)
    loss.backward()
    rng_after = torch.get_rng_state()

    torch.manual_seed(4321)
    assert not torch.equal(copy.deepcopy(reference).loss(*batch), loss_ref), "dropout inactive: test proves nothing"
    assert torch.equal(loss, loss_ref)
    assert_same_grads(model, reference)
    assert torch.equal(rng_after, rng_after_ref)


@pytest.mark.parametrize("backward_inside_autocast", [False, True], ids=["backward-outside", "backward-inside"])
def test_bf16_autocast_recompute_matches_reference(make_gpt, batch, backward_inside_autocast, assert_same_grads) -> None:
    """Under CPU bf16 autocast the recompute runs in the forward's dtypes: no CheckpointError, same grads.

    A failure (CheckpointError about tensor metadata, or different gradients) means recompute ran
    outside the autocast state forward ran in.
    """
    reference = make_gpt()
    model = copy.deepcopy(reference)
    _wrap(model, Block)

    for net in (reference, model):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = net.loss(*batch)
            if backward_inside_autocast:
                loss.backward()
        if not backward_inside_autocast:
            loss.backward()

    assert_same_grads(model, reference)


def test_backward_under_no_grad_still_recomputes_with_grad(make_gpt, batch, assert_same_grads) -> None:
    """``loss.backward()`` called inside ``torch.no_grad()`` recomputes with grad mode on, as forward ran.

    A failure means recompute inherits the grad mode of the backward call and builds no graph.
    """
    reference = make_gpt()
    model = copy.deepcopy(reference)
    _wrap(model, Block)

    for net in (reference, model):
        loss = net.loss(*batch)
        with torch.no_grad():
            loss.backward()

    assert_same_grads(model, reference)


# --- errors name the block -----------------------------------------------------------------------------


class FlakyBlock(Block):
    """A Block that raises on the ``fail_on``-th call of its forward (1 = forward, 2 = recompute)."""

    fail_on = 0
    calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.fail_on:
            raise RuntimeError(f"flaky block failed on call {self.calls}")
        return super().forward(x)


def _with_flaky_block(model: GPT, index: int, fail_on: int) -> GPT:
    flaky = model.layers[index]
    flaky.__class__ = FlakyBlock
    flaky.fail_on = fail_on
    return model


def _error_text(error: BaseException) -> str:
    return "".join(traceback.format_exception(error))


def test_error_in_forward_names_the_block(make_gpt, batch) -> None:
    """An exception raised inside a wrapped block's forward carries the block's FQN in its notes.

    A failure means users get a stack trace through checkpoint internals with no hint of which block
    of which model failed.
    """
    model = _with_flaky_block(make_gpt(), index=1, fail_on=1)
    _wrap(model, Block)

    with pytest.raises(RuntimeError, match="flaky block failed on call 1") as info:
        model.loss(*batch)

    notes = getattr(info.value, "__notes__", [])
    assert any("'layers.1'" in note for note in notes), notes
    assert "'layers.1'" in _error_text(info.value)
    assert len([note for note in notes if "ckpt_wrapper" in note]) == 1, "annotated more than once"


@IMPLS
def test_error_during_recompute_names_the_block(make_gpt, batch, impl) -> None:
    """An exception raised only when the block is recomputed (in backward) names the block's FQN.

    A failure means an error surfacing from ``loss.backward()`` gives no hint which checkpointed block
    raised it, or that it is described as a forward error.
    """
    model = _with_flaky_block(make_gpt(), index=1, fail_on=2)
    _wrap(model, Block, impl)
    loss = model.loss(*batch)  # forward succeeds

    with pytest.raises(RuntimeError, match="flaky block failed on call 2") as info:
        loss.backward()

    notes = getattr(info.value, "__notes__", [])
    assert any("'layers.1'" in note and "recomput" in note for note in notes), notes
    assert "'layers.1'" in _error_text(info.value)


# --- no_grad fast path ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode], ids=["no_grad", "inference_mode"])
def test_without_grad_the_plain_forward_runs_once(make_gpt, batch, mode, block_forward_calls, checkpoint_calls) -> None:
    """Under ``no_grad`` / ``inference_mode`` each wrapped block runs its forward once, outside checkpoint.

    A failure means evaluation pays for checkpoint machinery (or recompute) that can never be used.
    """
    reference = make_gpt()
    model = copy.deepcopy(reference)
    custom_calls: list[int] = []

    def counting_checkpoint(fn, *args, **kwargs):
        custom_calls.append(1)
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, **kwargs)

    apply_activation_checkpointing(
        model, checkpoint_wrapper_fn=functools.partial(checkpoint_wrapper, checkpoint_fn=counting_checkpoint),
        check_fn=by_class(Block),
    )
    default_model = copy.deepcopy(reference)
    _wrap(default_model, Block)
    tokens = batch[0]

    with mode():
        expected = reference(tokens)
        out_custom = model(tokens)
        out_default = default_model(tokens)

    assert custom_calls == [] and checkpoint_calls == [], "checkpoint entered without grad"
    for net in (reference, model, default_model):
        assert [block_forward_calls[id(b)] for b in net.layers] == [1] * 4
    assert torch.equal(out_custom, expected) and torch.equal(out_default, expected)
    # The same wrapped model with grad enabled does go through the custom checkpoint: the probe works.
    model(tokens).sum().backward()
    assert len(custom_calls) == 4


# --- no state left behind by an error ------------------------------------------------------------------


@IMPLS
@pytest.mark.parametrize("phase", ["forward", "recompute"])
def test_error_leaves_no_state_behind(make_gpt, batch, impl, phase, assert_same_grads) -> None:
    """After a step that raised inside a wrapped block, the next step gives the reference's loss and grads.

    A failure means an aborted checkpoint left hooks, RNG or autocast state, or a half-built graph
    behind, corrupting the training step after an error (common with OOM retries).
    """
    reference = make_gpt(dropout=0.1)
    model = copy.deepcopy(reference)
    _wrap(model, Block, impl)
    fail_on = 1 if phase == "forward" else 2
    calls = 0

    def fail_once(module: nn.Module, args: tuple) -> None:
        nonlocal calls
        calls += 1
        if calls == fail_on:
            raise RuntimeError("injected")

    # A hook on a submodule runs inside the wrapped block, so inside the checkpoint.
    handle = model.layers[2].mlp.register_forward_pre_hook(fail_once)
    with pytest.raises(RuntimeError, match="injected") as info:
        model.loss(*batch).backward()
    handle.remove()
    model.zero_grad(set_to_none=True)

    # Keep the failed step's exception (and its traceback's frames) alive during the next step.
    assert info.value is not None
    torch.manual_seed(7)
    loss_ref = reference.loss(*batch)
    loss_ref.backward()
    torch.manual_seed(7)
    loss = model.loss(*batch)
    loss.backward()

    assert torch.equal(loss, loss_ref)
    assert_same_grads(model, reference)
