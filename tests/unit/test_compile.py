"""``torch.compile`` of a wrapped model: same numbers as eager, and traced like the unwrapped model.

``aot_eager`` runs the traced graphs with eager kernels, so it is fast and checks tracing; inductor
generates kernels and is marked slow (a cold compile takes tens of seconds on two cores).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F

from ckpt_wrapper import apply_activation_checkpointing, by_class
from ckpt_wrapper.testing.models import GPT, Block


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch, so graphs and guards from one test do not leak into the next."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compiled_step(model: GPT, batch: tuple[torch.Tensor, torch.Tensor], **compile_options) -> torch.Tensor:
    compiled = torch.compile(model, **compile_options)
    tokens, targets = batch
    loss = F.cross_entropy(compiled(tokens).flatten(0, 1), targets.flatten())
    loss.backward()
    return loss


def _compare_with_eager(make_gpt, batch, assert_same_grads, **compile_options) -> None:
    reference = make_gpt(n_layer=2)
    model = copy.deepcopy(reference)
    apply_activation_checkpointing(model, check_fn=by_class(Block))

    loss_ref = reference.loss(*batch)
    loss_ref.backward()
    loss = _compiled_step(model, batch, **compile_options)

    torch.testing.assert_close(loss, loss_ref)
    assert_same_grads(model, reference, exact=False)


def test_compiled_wrapped_model_matches_eager_aot_eager(make_gpt, batch, assert_same_grads) -> None:
    """``torch.compile(wrapped, backend="aot_eager")`` gives the unwrapped eager model's loss and grads.

    A failure means tracing the wrapper (its checkpoint region, its class swap) changes the numbers.
    """
    _compare_with_eager(make_gpt, batch, assert_same_grads, backend="aot_eager")


def test_compiled_wrapped_model_traces_into_one_graph(make_gpt, batch, assert_same_grads) -> None:
    """A wrapped model compiles with ``fullgraph=True``, as the unwrapped model does.

    A failure (``torch._dynamo.exc.Unsupported``) means the wrapper causes a graph break; in a model
    that loops over its blocks, dynamo then gives up on the whole forward and runs it eagerly, so the
    user silently gets no compilation at all.
    """
    _compiled_step(make_gpt(n_layer=2), batch, backend="aot_eager", fullgraph=True)  # the unwrapped baseline
    torch._dynamo.reset()
    _compare_with_eager(make_gpt, batch, assert_same_grads, backend="aot_eager", fullgraph=True)


@pytest.mark.slow
def test_compiled_wrapped_model_matches_eager_inductor(make_gpt, batch, assert_same_grads) -> None:
    """``torch.compile(wrapped)`` with the default inductor backend matches eager within float tolerance.

    A failure means generated kernels for the checkpointed region (forward or recompute) compute
    something different from eager.
    """
    _compare_with_eager(make_gpt, batch, assert_same_grads)


def _assert_compiled_like_eager(model, reference, batch, assert_same_grads, *, backend: str, scope: str) -> None:
    """Compile ``model`` with ``fullgraph=True`` per block (torchtitan's recipe) or whole; a step gives
    the eager ``reference``'s loss and gradients."""
    loss_ref = reference.loss(*batch)
    loss_ref.backward()
    if scope == "per-block":
        for block in model.layers:
            block.compile(backend=backend, fullgraph=True)
        loss = model.loss(*batch)
        loss.backward()
    else:
        loss = _compiled_step(model, batch, backend=backend, fullgraph=True)
    torch.testing.assert_close(loss, loss_ref)
    assert_same_grads(model, reference, exact=False)


def _selective(preset):
    import functools

    from ckpt_wrapper import checkpoint_wrapper, selective_context_fn

    return functools.partial(checkpoint_wrapper, context_fn=selective_context_fn(preset))


def _save_matmuls(ctx, op, *args, **kwargs) -> bool:
    return op in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)


# aot_eager checks tracing for every form; inductor (slow: a cold compile takes seconds) for the presets.
_SELECTIVE_CASES = [pytest.param(preset, "aot_eager", id=f"{preset}-aot_eager") for preset in ("matmuls", "titan", "op-list", "callable")]
_SELECTIVE_CASES += [pytest.param(preset, "inductor", id=f"{preset}-inductor", marks=pytest.mark.slow) for preset in ("matmuls", "titan")]


@pytest.mark.parametrize("scope", ["per-block", "whole-model"])
@pytest.mark.parametrize("preset, backend", _SELECTIVE_CASES)
def test_selective_checkpointing_compiles_with_fullgraph(make_gpt, batch, assert_same_grads, preset, scope, backend) -> None:
    """Selective checkpointing (every preset, an op list, a policy callable) compiles with ``fullgraph=True``, per block
    (torchtitan's recipe) and whole model, and gives eager's gradients.

    Caught on the main of 2026-12-01: dynamo refused the picklable callable class that built the contexts
    ("checkpoint not implemented for ... context_fn"), even without fullgraph.
    """
    policy = {"op-list": [torch.ops.aten.mm.default, torch.ops.aten.addmm.default],
              "callable": _save_matmuls}.get(preset, preset)
    reference = make_gpt(n_layer=2)
    model = copy.deepcopy(reference)
    apply_activation_checkpointing(model, checkpoint_wrapper_fn=_selective(policy), check_fn=by_class(Block))
    _assert_compiled_like_eager(model, reference, batch, assert_same_grads, backend=backend, scope=scope)


def test_selective_context_fn_pickles() -> None:
    """Plans and policies stay picklable without costing traceability."""
    import pickle

    from ckpt_wrapper import selective_context_fn

    for policy in ("matmuls", "titan", [torch.ops.aten.mm.default]):
        restored = pickle.loads(pickle.dumps(selective_context_fn(policy)))
        forward_context, recompute_context = restored()
        assert forward_context is not None and recompute_context is not None


def _strategy_cases() -> list:
    from ckpt_wrapper.planner import block_strategies
    from ckpt_wrapper.testing.models import GPTConfig

    names = [str(s) for s in block_strategies(Block(GPTConfig(d_model=32, n_head=4)), device=torch.device("cpu"))]
    cases = [pytest.param(name, "aot_eager", id=f"{name}-aot_eager") for name in names]
    cases += [pytest.param(name, "inductor", id=f"{name}-inductor", marks=pytest.mark.slow)
              for name in ("cheap", "cheap+regions:mlp")]
    return cases


@pytest.mark.parametrize("scope", ["per-block", "whole-model"])
@pytest.mark.parametrize("strategy, backend", _strategy_cases())
def test_every_planner_strategy_compiles_with_fullgraph(make_gpt, batch, assert_same_grads, strategy, backend, scope) -> None:
    """Every strategy the planner can choose on CPU (none, cheap, regions, cheap+regions, sac, full)
    compiles with ``fullgraph=True``, per block and whole model, with eager's gradients.

    Caught on the main of 2026-12-01: cheap recompute registered hooks while dynamo traced
    (``setattr() on unsupported type``) and the sac strategies failed as selective checkpointing did.
    """
    from ckpt_wrapper.planner import apply_strategy

    reference = make_gpt(n_layer=2)
    model = copy.deepcopy(reference)
    for i, block in enumerate(model.layers):
        apply_strategy(block, strategy, fqn=f"layers.{i}")
    _assert_compiled_like_eager(model, reference, batch, assert_same_grads, backend=backend, scope=scope)


@pytest.mark.parametrize("kind", ["offload", "checkpoint+offload"])
def test_offload_compiles_where_pytorchs_offload_does(make_gpt, batch, assert_same_grads, kind) -> None:
    """Offload (its saved-tensor hooks run between graphs) compiles without ``fullgraph``, as PyTorch's own
    ``offload_wrapper`` does (neither traces into one graph), with eager's gradients."""
    import functools
    import warnings

    from ckpt_wrapper import OffloadOptions, checkpoint_wrapper, offload_wrapper

    wrap = (functools.partial(offload_wrapper, cpu_copy=True, min_bytes=0) if kind == "offload" else
            functools.partial(checkpoint_wrapper, offload=OffloadOptions(cpu_copy=True, min_bytes=0)))
    reference = make_gpt(n_layer=2)
    model = copy.deepcopy(reference)
    apply_activation_checkpointing(model, checkpoint_wrapper_fn=wrap, check_fn=by_class(Block))
    loss_ref = reference.loss(*batch)
    loss_ref.backward()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss = _compiled_step(model, batch, backend="aot_eager")
    torch.testing.assert_close(loss, loss_ref)
    assert_same_grads(model, reference, exact=False)
