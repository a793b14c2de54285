"""Cheap-output recompute: norms and activations are rebuilt in backward instead of being kept.

Numerics are compared exactly with an unwrapped deepcopy (the rebuild reruns the same kernel on the same
inputs). That the outputs are really freed is checked three ways: weak references to the outputs of
``ln_1``, ``ln_2`` and ``mlp.act`` die with forward; storages alive after forward drop by exactly their
size (``probes.live_bytes_after_forward``, deterministic); and glibc's allocator holds at least about
that much less (``held_after_forward``, where mallinfo2 exists). What backward recomputes is counted
with a ``TorchDispatchMode``: only ``native_layer_norm`` and ``gelu``, never a matmul.
"""

from __future__ import annotations

import copy


import pytest
import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

from ckpt_wrapper import (
    ActivationWrapper,
    CheapRecomputeWrapper,
    apply_activation_checkpointing,
    by_class,
    cheap_modules,
    cheap_recompute_wrapper,
    checkpoint_regions,
    remove_activation_checkpointing,
)
from ckpt_wrapper.measure import held_after_forward
from ckpt_wrapper.testing.models import GPT, Block, GPTConfig
from probes import (  # single_thread is a fixture, used through pytestmark
    MATMUL_OPS,
    live_bytes_after_forward,
    mallinfo2_available,
    recomputed_ops,
    single_thread,
)

pytestmark = pytest.mark.usefixtures("single_thread")

aten = torch.ops.aten
CHEAP = ["ln_1", "ln_2", "mlp.act"]


def _cheap_gpt(model: GPT) -> GPT:
    apply_activation_checkpointing(model, checkpoint_wrapper_fn=cheap_recompute_wrapper, check_fn=by_class(Block))
    return model


# --- numerics -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_cheap_recompute_gives_gradients_bitwise_equal_to_unwrapped(dropout, make_gpt, batch, assert_same_grads) -> None:
    """Every block recomputing its norms and GELU gives exactly the unwrapped gradients, with dropout too.

    A failure means a rebuilt output differs from the forward's (wrong module or inputs in the recipe, a
    view rebuilt with the wrong offset or stride), or the wrapper consumed RNG and shifted dropout masks.
    """
    reference = make_gpt(dropout=dropout)
    model = _cheap_gpt(copy.deepcopy(reference))
    for m in (reference, model):
        torch.manual_seed(7)
        m.loss(*batch).backward()
    assert_same_grads(model, reference)


def test_cheap_recompute_under_cpu_bf16_autocast_matches_unwrapped_under_the_same_autocast(make_gpt, batch, assert_same_grads) -> None:
    """Under ``torch.autocast("cpu", bfloat16)`` the rebuilt outputs are bitwise the forward's (same dtypes),
    so gradients equal those of the unwrapped model under the same autocast.

    A failure means the rebuild runs without the forward's autocast state (fp32 where the forward ran bf16,
    or the reverse), which changes the numbers or trips the dtype check.
    """
    reference = make_gpt()
    model = _cheap_gpt(copy.deepcopy(reference))
    for m in (reference, model):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = m.loss(*batch)
        loss.backward()
    assert_same_grads(model, reference)


def test_cheap_recompute_rebuilds_under_the_forwards_autocast_even_when_backward_runs_outside(assert_same_grads) -> None:
    """A module whose output depends on autocast (a Linear, named in ``modules=``: bf16 under autocast, fp32
    outside) is rebuilt under the forward's autocast although backward runs with autocast off: same dtype,
    bitwise the same gradients as the unwrapped model.

    (LayerNorm and GELU give the same dtype with or without CPU autocast, so only a module like this shows
    the difference.) A failure means the rebuild uses backward-time autocast state: a dtype mismatch
    error, or different numbers.
    """
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
    model = cheap_recompute_wrapper(copy.deepcopy(reference), modules=["0", "1"])
    x = torch.randn(8, 16)
    for m in (reference, model):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(x)
        assert out.dtype == torch.bfloat16
        out.float().pow(2).sum().backward()
    assert_same_grads(model, reference)


class _Views(nn.Module):
    """GELU whose output reaches the next Linear only through offset, strided views (what the recipe must
    rebuild: the saved tensor is a view, not the whole output)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 12)
        self.act = nn.GELU()
        self.proj = nn.Linear(10, 4)
        self.other = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.fc(x))                     # (5, 12)
        a = self.proj(h[1:, 2:])                     # offset 14, row stride 12
        b = self.other(h.t()[3:9, :].t()[1:])        # a transposed view: strides (1, 12) swapped back
        return a.sum() + b.pow(2).sum()


def test_rebuilt_output_keeps_the_saved_views_offset_size_and_stride(assert_same_grads) -> None:
    """Saved tensors that are offset or strided views of a cheap output are rebuilt as the same views, so
    gradients equal the unwrapped ones.

    A failure means the recipe rebuilds the whole output (or the view at offset 0 / contiguous strides),
    so backward multiplies by the wrong elements.
    """
    torch.manual_seed(0)
    reference = _Views()
    model = cheap_recompute_wrapper(copy.deepcopy(reference))
    assert model.recompute_modules == ["act"]
    x = torch.randn(5, 8)
    reference(x).backward()
    model(x).backward()
    assert_same_grads(model, reference)


@pytest.mark.parametrize("regions", [["attn"], ["mlp"], ["attn", "mlp"]], ids="+".join)
def test_cheap_recompute_composes_with_checkpoint_regions(regions, make_gpt, batch, assert_same_grads) -> None:
    """Regions first (checkpointed children), then the cheap wrapper on the block: gradients stay bitwise equal.

    A failure means the two saved-tensor hook layers interfere: a recipe packed inside a checkpointed
    region, or a region's recompute registering cheap-module hooks twice.
    """
    reference = make_gpt()
    model = copy.deepcopy(reference)
    for i, layer in enumerate(model.layers):
        checkpoint_regions(layer, regions, prefix=f"layers.{i}")
        assert isinstance(cheap_recompute_wrapper(layer), CheapRecomputeWrapper)
    reference.loss(*batch).backward()
    model.loss(*batch).backward()
    assert_same_grads(model, reference)


# --- what it recomputes and what it frees -------------------------------------------------------------


def test_cheap_modules_of_a_gpt_block_are_its_norms_and_gelu(tiny_config) -> None:
    """``cheap_modules(Block)`` is exactly ``['ln_1', 'ln_2', 'mlp.act']``.

    A failure means a matmul-holding module is treated as cheap (an expensive recompute) or a norm is missed.
    """
    assert cheap_modules(Block(tiny_config)) == CHEAP


def test_cheap_recompute_frees_the_norm_and_gelu_outputs_after_forward(make_gpt, batch) -> None:
    """After forward no storage of an ``ln_1``, ``ln_2`` or ``mlp.act`` output is alive under the wrapper; in
    the unwrapped model (the control) all of them are.

    A failure means something still references the outputs (the recipe, a hook, the recorder), so no memory
    is saved whatever the graph looks like.
    """
    def output_refs(model: GPT) -> dict[str, StorageWeakRef]:
        refs: dict[str, StorageWeakRef] = {}
        handles = [
            model.get_submodule(f"layers.{i}.{name}").register_forward_hook(
                lambda module, args, out, key=f"layers.{i}.{name}": refs.__setitem__(key, StorageWeakRef(out.untyped_storage())))
            for i in range(len(model.layers)) for name in CHEAP
        ]
        out = model(batch[0])
        for handle in handles:
            handle.remove()
        alive = {name: not ref.expired() for name, ref in refs.items()}
        del out
        return alive

    reference = make_gpt()
    unwrapped_alive = output_refs(reference)
    assert len(unwrapped_alive) == 3 * len(reference.layers) and all(unwrapped_alive.values()), unwrapped_alive
    wrapped_alive = output_refs(_cheap_gpt(copy.deepcopy(reference)))
    assert not any(wrapped_alive.values()), [name for name, alive in wrapped_alive.items() if alive]


def test_cheap_recompute_lowers_live_bytes_by_exactly_the_cheap_outputs(make_gpt, batch, tiny_config) -> None:
    """Storages alive after forward drop by the size of every block's two LayerNorm outputs and its GELU
    output (and the wrapper keeps no tensor of its own).

    A failure below the size means an output is still kept; above it means the wrapper dropped something
    it cannot rebuild (then gradients would fail too).
    """
    reference = make_gpt()
    model = _cheap_gpt(copy.deepcopy(reference))
    tokens = batch[0]
    rows = tokens.numel()
    per_block = (2 * rows * tiny_config.d_model + rows * 4 * tiny_config.d_model) * 4  # fp32
    before = live_bytes_after_forward(lambda: reference(tokens), exclude=reference.parameters())
    after = live_bytes_after_forward(lambda: model(tokens), exclude=model.parameters())
    assert before - after == tiny_config.n_layer * per_block, (before, after)


@pytest.mark.skipif(not mallinfo2_available(), reason="held_after_forward needs glibc mallinfo2")
def test_cheap_recompute_lowers_allocator_bytes_held_after_forward(tiny_config) -> None:
    """glibc's allocator holds at least 95% of the cheap outputs' size less after forward (a block wide
    enough that allocator noise is small; 5% is left for the recipes' own bookkeeping and noise).

    A failure means the outputs stay alive through something only the allocator sees (a C++-side
    reference, a cache), or one of the three outputs is not freed (that alone would miss by >= 1/6).
    """
    config = GPTConfig(n_layer=2, d_model=128, n_head=4, seq_len=64, vocab_size=64)
    torch.manual_seed(0)
    reference = GPT(config)
    model = _cheap_gpt(copy.deepcopy(reference))
    tokens = torch.randint(0, config.vocab_size, (4, config.seq_len))
    rows = tokens.numel()
    freed = config.n_layer * (2 * rows * config.d_model + rows * 4 * config.d_model) * 4
    drop = held_after_forward(lambda: reference(tokens)) - held_after_forward(lambda: model(tokens))
    assert drop >= 0.95 * freed, (drop, freed)


def test_backward_recomputes_only_layer_norm_and_gelu_never_a_matmul(make_gpt, batch, tiny_config) -> None:
    """Compared with the unwrapped backward, the wrapped backward runs exactly two ``native_layer_norm`` and
    one ``gelu`` more per block, no extra matmul or attention, and otherwise only storage bookkeeping.

    A failure means the wrapper recomputes more than the cheap modules (a matmul: the early stop of a
    region checkpoint leaked in), or rebuilds an output more than once.
    """
    reference = make_gpt()
    model = _cheap_gpt(copy.deepcopy(reference))
    extra = recomputed_ops(lambda: model.loss(*batch), lambda: reference.loss(*batch))

    bookkeeping = {aten.empty.memory_format, aten.set_.source_Storage_storage_offset, aten.detach.default}
    compute = {op: n for op, n in extra.items() if op not in bookkeeping}
    assert compute == {aten.native_layer_norm.default: 2 * tiny_config.n_layer, aten.gelu.default: tiny_config.n_layer}, compute
    assert not MATMUL_OPS & set(extra)


# --- in-place modification ----------------------------------------------------------------------------


class _InPlace(nn.Module):
    """LayerNorm -> Linear, with an in-place op on a tensor the Linear saves, before or after it is saved."""

    def __init__(self, where: str) -> None:
        super().__init__()
        self.where = where
        self.ln = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln(x)
        if self.where == "cheap-before-save":
            y.mul_(2)  # bumps the version before fc saves y: the recipe would rebuild the un-multiplied y
        if self.where == "other-after-save":
            y = y * 2  # not a cheap module's output: saved as itself
        z = self.fc(y)
        if self.where in ("cheap-after-save", "other-after-save"):
            y.add_(1)  # modifies what fc saved: plain autograd refuses to backward through this
            return z + y
        return z


def test_cheap_output_modified_in_place_before_it_is_saved_is_kept_not_rebuilt(assert_same_grads) -> None:
    """A cheap output modified in place before a later op saves it is kept as is (version check), so the
    gradients equal the unwrapped ones.

    A failure means the wrapper rebuilt the output from the module as it was before the in-place change
    (wrong gradients, silently).
    """
    torch.manual_seed(0)
    reference = _InPlace("cheap-before-save")
    model = cheap_recompute_wrapper(copy.deepcopy(reference))
    x = torch.randn(4, 8)
    reference(x).sum().backward()
    model(x).sum().backward()
    assert_same_grads(model, reference)


def test_cheap_output_modified_in_place_after_it_is_saved_is_never_silently_wrong() -> None:
    """Documented semantics: a cheap output modified in place *after* being saved either raises autograd's
    in-place error (what the unwrapped model does) or gives the gradients of the unmodified value (the
    recipe rebuilds what the forward computed), which is the right math for ``fc``. Never anything else.

    A failure means backward used the modified value and produced wrong gradients without an error.
    """
    torch.manual_seed(0)
    base = _InPlace("cheap-after-save")
    model = cheap_recompute_wrapper(copy.deepcopy(base))
    x = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        copy.deepcopy(base)(x).sum().backward()  # the unwrapped model refuses

    try:
        model(x).sum().backward()
    except RuntimeError as error:
        assert "inplace" in str(error)
        return
    # The same math without the in-place op: z = fc(ln(x)); out = z + (ln(x) + 1).
    right = copy.deepcopy(base)
    y = right.ln(x)
    (right.fc(y) + (y + 1)).sum().backward()
    for (name, got), want in zip(model.named_parameters(), right.parameters()):
        torch.testing.assert_close(got.grad, want.grad, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")


def test_saved_non_cheap_tensor_modified_in_place_still_raises_autograds_inplace_error() -> None:
    """A tensor that is not a cheap output, saved by ``fc`` and then modified in place, makes backward raise
    autograd's usual "modified by an inplace operation" error, as it does without the wrapper.

    A failure means the wrapper's saved-tensor hooks switched off autograd's version check (PyTorch skips
    it for every tensor packed through hooks): backward then silently uses the modified tensor and
    returns wrong gradients.
    """
    torch.manual_seed(0)
    base = _InPlace("other-after-save")
    x = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        copy.deepcopy(base)(x).sum().backward()

    model = cheap_recompute_wrapper(copy.deepcopy(base))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        model(x).sum().backward()


# --- errors, removal, hooks ---------------------------------------------------------------------------


def test_module_without_cheap_submodule_raises_value_error() -> None:
    """A module with no norm or activation to recompute is a ``ValueError`` (wrapping it would do nothing).

    A failure means the wrapper is installed as a silent no-op.
    """
    block = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    with pytest.raises(ValueError, match="no norm or activation"):
        cheap_recompute_wrapper(block)
    assert not isinstance(block, ActivationWrapper)


def test_unknown_module_name_raises_value_error_listing_candidates(tiny_config) -> None:
    """``modules=`` naming a submodule the block lacks is a ``ValueError`` naming it and listing the candidates.

    A failure means the typo is ignored (nothing recomputed) or the error gives no fix.
    """
    block = Block(tiny_config)
    with pytest.raises(ValueError) as info:
        cheap_recompute_wrapper(block, modules=["ln_1", "ln_3"])
    message = str(info.value)
    assert "ln_3" in message
    for name in CHEAP:
        assert name in message, message
    assert not isinstance(block, ActivationWrapper)


def test_explicit_modules_restrict_what_is_recomputed(make_gpt, batch, tiny_config, assert_same_grads) -> None:
    """``modules=["mlp.act"]`` recomputes only the GELU: one extra ``gelu`` per block, no extra layer norm.

    A failure means ``modules=`` is ignored in favour of the defaults.
    """
    reference = make_gpt()
    model = copy.deepcopy(reference)
    for layer in model.layers:
        assert cheap_recompute_wrapper(layer, modules=["mlp.act"]).recompute_modules == ["mlp.act"]
    extra = recomputed_ops(lambda: model.loss(*batch), lambda: reference.loss(*batch))
    assert extra.get(aten.gelu.default) == tiny_config.n_layer and aten.native_layer_norm.default not in extra, extra
    assert_same_grads(model, reference)


def test_remove_activation_checkpointing_restores_the_block_class(make_gpt, batch) -> None:
    """``remove_activation_checkpointing`` turns cheap-recompute blocks back into plain ``Block``s with no
    wrapper state left, and they still run.

    A failure means the class swap is not undone (the model stays wrapped) or private state lingers.
    """
    keys_before = set(vars(make_gpt().layers[0]))
    model = _cheap_gpt(make_gpt())
    assert remove_activation_checkpointing(model) == [f"layers.{i}" for i in range(len(model.layers))]
    for layer in model.layers:
        assert type(layer) is Block
        assert set(vars(layer)) == keys_before, "wrapper state left in the block's __dict__"
    model.loss(*batch).backward()


def test_no_forward_hook_remains_after_forward_backward_or_a_failing_forward(make_gpt, batch) -> None:
    """The per-call forward hooks are gone after forward, after backward, and after a forward that raised.

    A failure means hooks leak: they accumulate per step (slower each step, growing memory) and get
    deep-copied or pickled with the model.
    """
    model = _cheap_gpt(make_gpt())

    def hooked() -> list[str]:
        return [name for name, m in model.named_modules() if m._forward_hooks or m._forward_pre_hooks]

    loss = model.loss(*batch)
    assert hooked() == []
    loss.backward()
    assert hooked() == []
    with pytest.raises(RuntimeError):
        model.layers[0](torch.randn(2, 3, 5))  # wrong width: LayerNorm raises inside the wrapped forward
    assert hooked() == []
