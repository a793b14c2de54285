"""Selective checkpointing: op-level policies and sub-module regions.

Gradients are compared exactly with an unwrapped deepcopy (the same math runs on CPU, only when it runs
changes). What a policy saves is checked without allocator noise: ops run by ``backward()`` are counted
with a ``TorchDispatchMode`` (the excess over the unwrapped model's backward is what was recomputed),
and storages left alive by forward are summed exactly (``probes.live_bytes_after_forward``; it sees the
selective-checkpoint cache, which ``SavedBytes`` cannot).
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch.utils.checkpoint import CheckpointPolicy

from ckpt_wrapper import (
    PRESETS,
    CheckpointWrapper,
    apply_activation_checkpointing,
    apply_selective_checkpointing,
    by_class,
    by_name,
    checkpoint_regions,
    checkpoint_wrapper,
    region_candidates,
    selective_context_fn,
)
from ckpt_wrapper.testing.models import Block
from probes import (  # single_thread is a fixture, used through pytestmark
    MATMUL_OPS,
    live_bytes_after_forward,
    recomputed_ops,
    single_thread,
)

pytestmark = pytest.mark.usefixtures("single_thread")

aten = torch.ops.aten


# Policies at module level so that a model wrapped with them can be pickled.
def save_matmuls_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """A user policy returning ``CheckpointPolicy`` values."""
    return CheckpointPolicy.MUST_SAVE if op in (aten.mm.default, aten.addmm.default) else CheckpointPolicy.PREFER_RECOMPUTE


def save_matmuls_bool(ctx, op, *args, **kwargs) -> bool:
    """A user policy returning bools (True: save)."""
    return op in (aten.mm.default, aten.addmm.default)


POLICIES = {
    "matmuls": "matmuls",
    "titan": "titan",
    "op-list": [aten.addmm.default, aten.mm.default],
    "callable-policy": save_matmuls_policy,
    "callable-bool": save_matmuls_bool,
}
POLICY_IDS = list(POLICIES)


def _step(model, batch) -> None:
    model.loss(*batch).backward()


# --- numerics -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", POLICY_IDS)
def test_selective_policy_gives_gradients_bitwise_equal_to_unwrapped(policy, make_gpt, batch, assert_same_grads) -> None:
    """Every kind of policy (both presets, an op list, callables returning a policy or a bool) leaves every
    gradient bitwise equal to the unwrapped model's.

    A failure means a saved op output is not the one the forward produced (wrong cache entry handed back in
    recompute), or the recompute differs from the forward.
    """
    reference = make_gpt()
    model = copy.deepcopy(reference)
    assert apply_selective_checkpointing(model, by_class(Block), policy=POLICIES[policy])

    _step(reference, batch)
    _step(model, batch)

    assert_same_grads(model, reference)


@pytest.mark.parametrize("policy", POLICY_IDS)
def test_selective_policy_preserves_dropout_rng(policy, make_gpt, batch, assert_same_grads) -> None:
    """With dropout 0.1 the recomputed dropout masks equal the forward's: gradients stay bitwise equal.

    A failure means the RNG state is not restored before recompute (or dropout's output is taken from the
    wrong place), so backward used different masks from forward.
    """
    reference = make_gpt(dropout=0.1)
    model = copy.deepcopy(reference)
    apply_selective_checkpointing(model, by_class(Block), policy=POLICIES[policy])

    for m in (reference, model):
        torch.manual_seed(123)
        _step(m, batch)

    assert_same_grads(model, reference)


# --- errors -------------------------------------------------------------------------------------------


def test_unknown_preset_raises_value_error_listing_the_presets() -> None:
    """An unknown preset name is a ``ValueError`` naming the bad value and every valid preset.

    A failure means a typo silently picks some default policy, or the error does not say what to pass.
    """
    with pytest.raises(ValueError) as info:
        selective_context_fn("matmul")
    message = str(info.value)
    assert "'matmul'" in message
    for preset in PRESETS:
        assert preset in message, message


@pytest.mark.parametrize("ops", [
    [aten.mm.default, "mm"],
    [torch.mm],
    [aten.mm],  # the OpOverloadPacket, not an overload
], ids=["string", "python-function", "overload-packet"])
def test_op_list_holding_non_op_overloads_raises_type_error(ops) -> None:
    """An op list with anything but aten ``OpOverload``s is a ``TypeError`` that says what is expected.

    A failure means a list that can never match an op is accepted, so the policy silently saves nothing.
    """
    with pytest.raises(TypeError, match="overload"):
        selective_context_fn(ops)


# --- pickling -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["titan", "op-list", "callable-bool"])
def test_model_wrapped_with_selective_policy_survives_deepcopy_and_pickle(policy, make_gpt, batch, assert_same_grads) -> None:
    """A selectively checkpointed model can be deep-copied and pickled, and the copies still train bitwise
    like the unwrapped model (each forward builds fresh policy state: the titan matmul count).

    A failure means the ``context_fn`` holds a closure or lambda (pickle fails), or per-call policy state
    leaked into the copy so the copies save different ops.
    """
    reference = make_gpt()
    wrapped = copy.deepcopy(reference)
    apply_selective_checkpointing(wrapped, by_class(Block), policy=POLICIES[policy])
    _step(reference, batch)

    for clone in (copy.deepcopy(wrapped), pickle.loads(pickle.dumps(wrapped))):
        assert all(isinstance(layer, CheckpointWrapper) for layer in clone.layers)
        _step(clone, batch)
        assert_same_grads(clone, reference)


# --- what is saved and what is recomputed -------------------------------------------------------------


def _recomputed_matmuls(make_gpt, batch, wrap) -> int:
    reference = make_gpt()
    model = copy.deepcopy(reference)
    wrap(model)
    extra = recomputed_ops(lambda: model.loss(*batch), lambda: reference.loss(*batch))
    return sum(count for op, count in extra.items() if op in MATMUL_OPS)


def test_matmuls_preset_recomputes_no_matmul_titan_some_full_checkpoint_more(make_gpt, batch, tiny_config) -> None:
    """Matmuls run again in backward: none under ``"matmuls"``, one per block under ``"titan"`` (it saves
    every second matmul), and more under the plain full checkpoint.

    A failure means a preset saves something other than it documents: ``"matmuls"`` recomputing a
    projection, or ``"titan"`` saving all or none of them.
    """
    counts = {
        "matmuls": _recomputed_matmuls(make_gpt, batch, lambda m: apply_selective_checkpointing(m, by_class(Block), policy="matmuls")),
        "titan": _recomputed_matmuls(make_gpt, batch, lambda m: apply_selective_checkpointing(m, by_class(Block), policy="titan")),
        "full": _recomputed_matmuls(make_gpt, batch, lambda m: apply_activation_checkpointing(m, check_fn=by_class(Block))),
    }
    assert counts["matmuls"] == 0, counts
    assert counts["titan"] == tiny_config.n_layer, counts
    assert counts["full"] > counts["titan"], counts


def recompute_everything(ctx, op, *args, **kwargs) -> bool:
    """A user policy saving nothing."""
    return False


@pytest.mark.parametrize("policy", ["op-list", "callable-policy", "callable-bool", "save-nothing"])
def test_user_policy_decides_what_backward_recomputes(policy, make_gpt, batch, tiny_config) -> None:
    """A user policy is obeyed: saving mm/addmm (as an op list, a ``CheckpointPolicy`` callable or a bool
    callable) recomputes no matmul in backward; a callable returning False always recomputes as many as
    the full checkpoint.

    A failure means the policy's answer is misread (a bool inverted, a list ignored), which the numerics
    alone cannot show: only memory and recompute change.
    """
    chosen = recompute_everything if policy == "save-nothing" else POLICIES[policy]
    recomputed = _recomputed_matmuls(make_gpt, batch, lambda m: apply_selective_checkpointing(m, by_class(Block), policy=chosen))
    if policy == "save-nothing":
        full = _recomputed_matmuls(make_gpt, batch, lambda m: apply_activation_checkpointing(m, check_fn=by_class(Block)))
        assert recomputed == full > 0, (recomputed, full)
    else:
        assert recomputed == 0


def test_matmuls_preset_keeps_more_alive_after_forward_than_titan_than_full_checkpoint(make_gpt, batch) -> None:
    """Bytes alive after forward (selective caches included): unwrapped > "matmuls" > "titan" > full checkpoint.

    A failure means a preset's cache keeps more (or less) than its policy says, e.g. "titan" saving every
    matmul, or the cache of a finished forward not being where activations are kept.
    """
    reference = make_gpt()
    live = {"unwrapped": live_bytes_after_forward(lambda: reference(batch[0]), exclude=reference.parameters())}
    for name in ("matmuls", "titan", "full"):
        model = copy.deepcopy(reference)
        if name == "full":
            apply_activation_checkpointing(model, check_fn=by_class(Block))
        else:
            apply_selective_checkpointing(model, by_class(Block), policy=name)
        live[name] = live_bytes_after_forward(lambda: model(batch[0]), exclude=model.parameters())
    assert live["unwrapped"] > live["matmuls"] > live["titan"] > live["full"], live


# --- apply_selective_checkpointing --------------------------------------------------------------------


def test_apply_selective_checkpointing_wraps_exactly_the_selected_blocks(make_gpt, batch, block_forward_calls,
                                                                         monkeypatch) -> None:
    """Only the selected blocks become ``CheckpointWrapper``s; the returned names are theirs; each of their
    checkpoint calls gets the selective ``context_fn``; only they run forward twice in a step.

    A failure means the selection is ignored (more or fewer blocks wrapped), or the policy never reaches
    ``torch.utils.checkpoint``.
    """
    context_fns: list[object] = []
    real = torch.utils.checkpoint.checkpoint

    def spy(fn, *args, **kwargs):
        context = kwargs.get("context_fn")
        context_fns.append((getattr(context, "func", None), getattr(context, "args", None)))
        return real(fn, *args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", spy)
    model = make_gpt()
    names = apply_selective_checkpointing(model, by_name("layers.1", "layers.3"), policy="titan")

    assert names == ["layers.1", "layers.3"]
    wrapped = {name for name, m in model.named_modules() if isinstance(m, CheckpointWrapper)}
    assert wrapped == {"layers.1", "layers.3"}

    _step(model, batch)
    titan = selective_context_fn("titan")
    assert context_fns == [(titan.func, titan.args)] * 2
    calls = [block_forward_calls[id(layer)] for layer in model.layers]
    assert calls == [1, 2, 1, 2]


# --- regions ------------------------------------------------------------------------------------------


def test_region_candidates_of_gpt_block_are_attn_and_mlp(tiny_config) -> None:
    """The children of a GPT block holding a matmul are ``attn`` and ``mlp`` (not the norms).

    A failure means the planner would consider checkpointing LayerNorms as regions, or miss a sub-layer.
    """
    assert region_candidates(Block(tiny_config)) == ["attn", "mlp"]


def test_checkpoint_regions_wraps_exactly_the_named_children_and_keeps_gradients(make_gpt, batch, assert_same_grads) -> None:
    """``checkpoint_regions`` wraps the named children (dotted names too), returns their qualified names, leaves
    the block itself unwrapped, and gradients stay bitwise equal.

    A failure means the wrong module was wrapped (the whole block, or nothing), names in the result do not
    match the model's, or region recompute changes the numbers.
    """
    reference = make_gpt()
    model = copy.deepcopy(reference)
    assert checkpoint_regions(model.layers[0], ["attn"], prefix="layers.0") == ["layers.0.attn"]
    assert checkpoint_regions(model.layers[1], ["mlp", "attn.qkv"]) == ["mlp", "attn.qkv"]

    wrapped = {name for name, m in model.named_modules() if isinstance(m, CheckpointWrapper)}
    assert wrapped == {"layers.0.attn", "layers.1.mlp", "layers.1.attn.qkv"}

    _step(reference, batch)
    _step(model, batch)
    assert_same_grads(model, reference)


def test_checkpoint_regions_unknown_child_raises_value_error_listing_children(tiny_config) -> None:
    """An unknown region name is a ``ValueError`` naming it and listing the block's children, and nothing is
    wrapped.

    A failure means a typo is ignored (nothing checkpointed, no memory saved) or the message gives no fix.
    """
    block = Block(tiny_config)
    with pytest.raises(ValueError) as info:
        checkpoint_regions(block, ["mpl"], prefix="layers.0")
    message = str(info.value)
    assert "'mpl'" in message and "layers.0" in message
    for child in ("ln_1", "attn", "ln_2", "mlp"):
        assert child in message, message
    assert not any(isinstance(m, CheckpointWrapper) for m in block.modules())


@pytest.mark.parametrize("regions", [["mlp", "mpl"], ["mlp", "mlp"]], ids=["unknown-second", "same-twice"])
def test_checkpoint_regions_that_fails_on_a_later_region_wraps_none(regions, tiny_config) -> None:
    """When a later region cannot be wrapped (an unknown name, or the same child twice, which the wrapper
    refuses), ``checkpoint_regions`` raises a ``ValueError`` and the regions before it are not left wrapped.

    A failure means regions are wrapped one by one outside ``wrap_blocks``: an error leaves ``mlp``
    checkpointed, and a retry then fails with "already wrapped".
    """
    block = Block(tiny_config)
    with pytest.raises(ValueError):
        checkpoint_regions(block, regions, prefix="layers.0")
    assert not any(isinstance(m, CheckpointWrapper) for m in block.modules())


def test_selective_context_fn_works_with_plain_checkpoint_wrapper(assert_same_grads) -> None:
    """``selective_context_fn`` passed to ``checkpoint_wrapper`` directly (the docstring's usage) keeps exact
    gradients for a non-GPT module.

    A failure means the context_fn only works through ``apply_selective_checkpointing``.
    """
    torch.manual_seed(0)
    reference = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))
    model = checkpoint_wrapper(copy.deepcopy(reference), context_fn=selective_context_fn([aten.addmm.default]))
    x = torch.randn(4, 8)
    reference(x).pow(2).sum().backward()
    model(x).pow(2).sum().backward()
    assert_same_grads(model, reference)
