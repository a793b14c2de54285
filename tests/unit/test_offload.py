"""Contract 5, offload: correct gradients, only the right tensors copied, restored exactly, nothing leaked.

On CPU, ``cpu_copy=True`` makes the offload engine copy saved tensors into separate host buffers, which
exercises selection, de-duplication, pooling, prefetch and restore (everything but the CUDA streams; see
``test_offload_cuda.py`` for those). The tests observe the engine only through what it makes public: the
counters in ``engine.stats`` (``OffloadStats``), the bytes of ``engine.pool`` (``HostPool``), and what
backward reads back (seen inside custom ``autograd.Function`` backwards).
"""

from __future__ import annotations

import copy
import functools
import gc
import warnings

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch import nn

import ckpt_wrapper
from ckpt_wrapper import (
    CheckpointImpl,
    CheckpointWrapper,
    OffloadEngine,
    OffloadOptions,
    OffloadWrapper,
    all_but_last,
    apply_activation_checkpointing,
    by_class,
    checkpoint_wrapper,
    every_nth,
    first_n,
    offload_wrapper,
)
from ckpt_wrapper.testing.models import Block

N_LAYER = 4  # conftest's TINY GPT
ACTIVATION_BYTES = 2 * 16 * 32 * 4  # one (batch, seq, d_model) float32 activation of the tiny GPT


def _offload_blocks(model: nn.Module, cls: type[nn.Module] = Block, **options) -> list[str]:
    options = {"cpu_copy": True, "min_bytes": 0, **options}
    return apply_activation_checkpointing(
        model, checkpoint_wrapper_fn=functools.partial(offload_wrapper, **options), check_fn=by_class(cls)
    )


def _engine_of(model: nn.Module) -> OffloadEngine:
    """The one engine every wrapped block of ``model`` shares (asserts there is exactly one)."""
    engines = {id(m.offload_engine): m.offload_engine for m in model.modules() if isinstance(m, OffloadWrapper)}
    assert len(engines) == 1, f"expected one engine shared by the wrapped blocks, found {len(engines)}"
    return next(iter(engines.values()))


def _saves(stats) -> int:
    """Saved tensors the engine accounted for: every one lands in exactly one of these counters."""
    return (stats.copies + stats.shared + stats.kept_small + stats.kept_param + stats.kept_on_host
            + stats.kept_host_full)


@pytest.fixture
def no_gc():
    """Disable the cyclic collector: host buffers must come back by reference counting, promptly."""
    gc.collect()
    gc.disable()
    yield
    gc.enable()


# --- gradients ----------------------------------------------------------------------------------------


def test_offloaded_gpt_gradients_equal_reference_bitwise(make_gpt, batch, assert_same_grads) -> None:
    """With every block offloaded (``cpu_copy=True``), loss and gradients equal the unwrapped model's exactly.

    A failure means a tensor came back from host memory different from how it was saved.
    """
    reference = make_gpt()
    model = copy.deepcopy(reference)
    assert _offload_blocks(model) == [f"layers.{i}" for i in range(N_LAYER)]
    assert all(isinstance(b, OffloadWrapper) and type(b).__name__ == "Block" for b in model.layers)
    engine = _engine_of(model)

    loss_ref = reference.loss(*batch)
    loss_ref.backward()
    loss = model.loss(*batch)
    assert engine.stats.copies > 0 and engine.pool.in_use_bytes > 0, "nothing was copied: the test exercised nothing"
    loss.backward()

    assert torch.equal(loss, loss_ref)
    assert_same_grads(model, reference)


def test_offloaded_gpt_with_dropout_gradients_equal_reference_bitwise(make_gpt, batch, assert_same_grads) -> None:
    """With dropout, the offloaded model draws the same random numbers as the reference: same loss,
    same gradients, same RNG state afterwards.

    A failure means offload consumes or reseeds the RNG (a different dropout mask), or restores the
    saved masks wrongly.
    """
    reference = make_gpt(dropout=0.1)
    model = copy.deepcopy(reference)
    _offload_blocks(model)

    torch.manual_seed(123)
    loss_ref = reference.loss(*batch)
    rng_after_ref = torch.get_rng_state()
    loss_ref.backward()
    torch.manual_seed(123)
    loss = model.loss(*batch)
    rng_after = torch.get_rng_state()
    loss.backward()

    assert _engine_of(model).stats.copies > 0
    assert torch.equal(rng_after, rng_after_ref), "offload changed the RNG state"
    assert torch.equal(loss, loss_ref)
    assert_same_grads(model, reference)


@pytest.mark.parametrize("impl", list(CheckpointImpl), ids=lambda i: i.name)
@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["no-dropout", "dropout"])
def test_checkpoint_with_offloaded_inputs_gradients_equal_reference_bitwise(
    make_gpt, batch, impl, dropout, assert_same_grads
) -> None:
    """``checkpoint_wrapper(offload=OffloadOptions(...))``: only each block's input is saved, and it goes to
    the host; loss and gradients equal the unwrapped model's exactly.

    A failure means the checkpoint's saved inputs come back wrong, or the offload hooks also catch what
    the checkpoint recomputes (copies beyond one input per block).
    """
    reference = make_gpt(dropout=dropout)
    model = copy.deepcopy(reference)
    options = OffloadOptions(cpu_copy=True, min_bytes=0)
    apply_activation_checkpointing(
        model,
        checkpoint_wrapper_fn=functools.partial(checkpoint_wrapper, checkpoint_impl=impl, offload=options),
        check_fn=by_class(Block),
    )
    assert all(isinstance(b, CheckpointWrapper) for b in model.layers)
    engine = model.layers[0].offload_engine
    assert isinstance(engine, OffloadEngine) and engine.options == options
    assert all(b.offload_engine is engine for b in model.layers), "blocks wrapped together must share one engine"

    torch.manual_seed(7)
    loss_ref = reference.loss(*batch)
    loss_ref.backward()
    torch.manual_seed(7)
    loss = model.loss(*batch)
    assert engine.stats.copies == N_LAYER, engine.stats  # one (batch, seq, d_model) input per block
    assert engine.stats.copied_bytes == N_LAYER * ACTIVATION_BYTES, engine.stats
    loss.backward()

    assert engine.stats.restores + engine.stats.prefetched == N_LAYER, engine.stats
    assert engine.pool.in_use_bytes == 0
    assert torch.equal(loss, loss_ref)
    assert_same_grads(model, reference)


def test_checkpoint_wrapper_offload_argument_forms() -> None:
    """``offload=`` takes False (no engine), True (default options), ``OffloadOptions`` or a shared
    ``OffloadEngine``; anything else is a ``TypeError`` that names the accepted forms.

    A failure means a silently ignored ``offload`` argument, or an engine that is not the one given.
    """
    assert checkpoint_wrapper(nn.Linear(2, 2)).offload_engine is None
    assert checkpoint_wrapper(nn.Linear(2, 2), offload=True).offload_engine.options == OffloadOptions()
    options = OffloadOptions(cpu_copy=True, min_bytes=0)
    assert checkpoint_wrapper(nn.Linear(2, 2), offload=options).offload_engine.options == options
    engine = OffloadEngine(options)
    first, second = (checkpoint_wrapper(nn.Linear(2, 2), offload=engine) for _ in range(2))
    assert first.offload_engine is engine and second.offload_engine is engine

    plain = nn.Linear(2, 2)
    with pytest.raises(TypeError, match="OffloadOptions or OffloadEngine"):
        checkpoint_wrapper(plain, offload="yes")
    assert not isinstance(plain, CheckpointWrapper), "a rejected call must leave the module unwrapped"


def test_no_grad_forward_offloads_nothing(make_gpt, batch) -> None:
    """Under ``no_grad`` nothing is saved, so the engine copies nothing and holds no buffer.

    A failure means inference pays for host copies it never reads back.
    """
    model = make_gpt()
    _offload_blocks(model)
    engine = _engine_of(model)

    with torch.no_grad():
        model(batch[0])

    assert _saves(engine.stats) == 0 and engine.pool.total_bytes == 0, engine.stats


# --- what is copied -------------------------------------------------------------------------------------


class SaveAndReport(torch.autograd.Function):
    """Saves every tensor it is given; backward reports the storage pointer of what it reads back."""

    @staticmethod
    def forward(ctx, report: list, h: torch.Tensor, *others: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(h, *others)
        ctx.report = report
        return h * 1

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.report.append([t.untyped_storage().data_ptr() for t in ctx.saved_tensors])
        return (None, grad) + (None,) * (len(ctx.saved_tensors) - 1)


class OwnAndOutside(nn.Module):
    """Saves an activation together with its own parameters and buffer, a parameter passed in, and views."""

    def __init__(self, report: list) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(16, 16))
        self.frozen = nn.Parameter(torch.randn(16, 16), requires_grad=False)
        self.register_buffer("scale", torch.randn(16, 16))
        self.report = report

    def forward(self, x: torch.Tensor, outside: torch.Tensor) -> torch.Tensor:
        h = x * 2.0  # the one activation (multiplying by a Python number saves nothing)
        kept = (self.weight, self.weight[2:], self.frozen, self.frozen.t(), self.scale, self.scale[1],
                outside, outside[:4])
        return SaveAndReport.apply(self.report, h, *kept)


@pytest.mark.parametrize("outside_requires_grad", [True, False], ids=["trainable-outside", "frozen-outside"])
def test_parameters_buffers_and_their_views_are_kept_not_copied(outside_requires_grad) -> None:
    """Own parameters (trainable and frozen), own buffers, a parent's parameter passed in, and views of
    each, come back in backward as the very same storage; only the activation is copied.

    A failure means offload copies weights every step: transfer time and host memory spent on tensors
    that stay resident anyway (tied/shared weights and frozen LoRA bases are the usual cases).
    """
    report: list = []
    block = offload_wrapper(OwnAndOutside(report), cpu_copy=True, min_bytes=0)
    outside = nn.Parameter(torch.randn(16, 16), requires_grad=outside_requires_grad)
    x = torch.randn(8, 16, requires_grad=True)
    originals = [block.weight, block.weight, block.frozen, block.frozen, block.scale, block.scale, outside, outside]

    block(x, outside).sum().backward()

    stats = block.offload_engine.stats
    assert stats.copies == 1 and stats.copied_bytes == 8 * 16 * 4, stats
    assert stats.kept_param == len(originals), stats
    (restored,) = report
    assert restored[0] != x.untyped_storage().data_ptr(), "the activation was not restored from a host copy"
    for index, (pointer, original) in enumerate(zip(restored[1:], originals)):
        assert pointer == original.untyped_storage().data_ptr(), f"kept tensor #{index} came back as a copy"
    torch.testing.assert_close(x.grad, torch.full_like(x, 2.0), rtol=0, atol=0)


class ExternalWeight(nn.Module):
    """Uses its own (trainable and frozen) parameters and one passed in by its parent."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 16)
        self.frozen = nn.Linear(16, 16)
        self.frozen.requires_grad_(False)

    def forward(self, x: torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.frozen(self.lin(x)))
        return torch.tanh(nn.functional.linear(h, shared))


class SharedWeightNet(nn.Module):
    def __init__(self, shared_requires_grad: bool) -> None:
        super().__init__()
        self.shared = nn.Parameter(torch.randn(16, 16) / 4, requires_grad=shared_requires_grad)
        self.blocks = nn.ModuleList(ExternalWeight() for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, self.shared)
        return x.sum()


@pytest.mark.parametrize("shared_requires_grad", [True, False], ids=["trainable-shared", "frozen-shared"])
def test_tied_and_frozen_weights_through_builtin_ops_are_never_copied(shared_requires_grad, assert_same_grads) -> None:
    """Through ordinary ``nn.Linear`` / ``F.linear``, no parameter storage is copied: every copy has the
    size of an activation (5 x 16 floats), none the size of a weight (16 x 16), and gradients are exact.

    A failure means weights (own, frozen, or a parent's tied weight) are copied to the host each step.
    """
    torch.manual_seed(0)
    reference = SharedWeightNet(shared_requires_grad)
    model = copy.deepcopy(reference)
    _offload_blocks(model, ExternalWeight)
    engine = _engine_of(model)
    x = torch.randn(5, 16)

    reference(x).backward()
    model(x).backward()

    stats = engine.stats
    assert stats.copies > 0 and stats.kept_param >= 2 * 2, stats  # at least frozen.weight and shared per block
    assert stats.copied_bytes == stats.copies * 5 * 16 * 4, f"a copy is not activation-sized: {stats}"
    assert_same_grads(model, reference)


class Exp(nn.Module):
    """``exp(linear(x))``: with ``x`` a leaf that requires grad, the only activation saved is the output."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 24, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.exp(self.lin(x))


def test_copied_bytes_equal_the_size_of_the_saved_output() -> None:
    """A block whose only saved activation is its (33, 24) float64 output copies exactly 33*24*8 bytes
    into one pooled buffer of the next power of two; the input (a leaf requiring grad) and the weight
    are kept.

    A failure means the accounting is off (so are memory estimates built on it), or the input or
    weight was copied.
    """
    block = offload_wrapper(Exp(), cpu_copy=True, min_bytes=0)
    engine = block.offload_engine
    x = torch.randn(33, 16, dtype=torch.float64, requires_grad=True)

    out = block(x)

    assert engine.stats.copies == 1 and engine.stats.copied_bytes == out.untyped_storage().nbytes() == 33 * 24 * 8
    assert engine.stats.kept_param == 2, engine.stats  # x and weight.t()
    assert engine.pool.in_use_bytes == 8192, "one buffer, rounded up to a power of two"
    out.sum().backward()
    assert engine.pool.in_use_bytes == 0 and engine.pool.cached_bytes == 8192


class BigAndSmall(nn.Module):
    """Saves two activations: ``tanh`` keeps its (big) output and so does ``sigmoid`` its (small) one."""

    def __init__(self, big: int, small: int) -> None:
        super().__init__()
        self.big, self.small = big, small

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x[: self.big] * 1).sum() + torch.sigmoid(x[: self.small] * 1).sum()


@pytest.mark.parametrize("min_bytes", [4 * 64, 4 * 64 + 1], ids=["at-threshold", "one-byte-over"])
def test_tensors_under_min_bytes_are_kept(min_bytes) -> None:
    """A tensor of fewer than ``min_bytes`` bytes stays; one of ``min_bytes`` or more is copied.

    A failure means offload pays a transfer per tiny tensor (layer-norm statistics, scalars), ignores
    the threshold, or is off by one at it.
    """
    block = offload_wrapper(BigAndSmall(big=64, small=7), cpu_copy=True, min_bytes=min_bytes)
    x = torch.randn(64, requires_grad=True)  # tanh's saved output: 64 floats = 256 bytes; sigmoid's: 28
    x_ref = x.detach().clone().requires_grad_()

    block(x).backward()
    BigAndSmall(big=64, small=7)(x_ref).backward()

    stats = block.offload_engine.stats
    if min_bytes == 4 * 64:
        assert (stats.copies, stats.copied_bytes, stats.kept_small) == (1, 256, 1), stats
    else:
        assert (stats.copies, stats.kept_small) == (0, 2), stats
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=0)


def test_small_tensors_in_a_gpt_are_kept_and_every_save_is_counted_once(make_gpt, batch, assert_same_grads) -> None:
    """With ``min_bytes=1024`` the GPT's small saved tensors (layer-norm statistics) are kept, larger ones
    copied; the saves are the same as with ``min_bytes=0``, each counted in exactly one counter.

    A failure means the threshold is ignored, or a saved tensor escapes the accounting.
    """
    reference = make_gpt()
    everything, thresholded = copy.deepcopy(reference), copy.deepcopy(reference)
    _offload_blocks(everything, min_bytes=0)
    _offload_blocks(thresholded, min_bytes=1024)

    reference.loss(*batch).backward()
    everything.loss(*batch).backward()
    thresholded.loss(*batch).backward()

    all_stats, stats = _engine_of(everything).stats, _engine_of(thresholded).stats
    assert all_stats.kept_small == 0 and stats.kept_small > 0 and stats.copies > 0, stats
    assert stats.copies < all_stats.copies and stats.copied_bytes < all_stats.copied_bytes
    assert _saves(stats) == _saves(all_stats), (stats, all_stats)
    assert_same_grads(thresholded, reference)


# --- shared storages and exact restore -------------------------------------------------------------------


class LiveViews(nn.Module):
    """Saves q, k and v: three views of one storage, alive until the forward ends."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 48)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.lin(x).split(16, dim=1)
        return q * k + v.sin()


class TemporaryViewFirst(nn.Module):
    """Saves a temporary transposed view of ``h`` first (it dies right after), then ``h`` itself."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 48)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        a = torch.sin(h.t())
        b = torch.cos(h)
        return a.t() + b


@pytest.mark.parametrize(
    ("block_cls", "shared"), [(LiveViews, 2), (TemporaryViewFirst, 1)], ids=["live-views", "temporary-view-first"]
)
def test_views_of_one_storage_are_copied_once(block_cls, shared, assert_same_grads) -> None:
    """Several saved views of one storage make one host copy, however long each view object lives:
    two copies in all (the input and the (16, 48) linear output), the other views counted as shared.

    A failure means a storage is copied once per saved view (memory and transfer multiplied); with
    ``temporary-view-first`` it means de-duplication is keyed on the first view *object* staying alive
    rather than on the storage.
    """
    torch.manual_seed(0)
    reference = nn.Sequential(block_cls())
    model = copy.deepcopy(reference)
    _offload_blocks(model, block_cls)
    x = torch.randn(16, 16)

    reference(x).sum().backward()
    model(x).sum().backward()

    stats = _engine_of(model).stats
    assert (stats.copies, stats.shared) == (2, shared), stats
    assert stats.copied_bytes == 16 * 16 * 4 + 16 * 48 * 4, stats
    assert_same_grads(model, reference)


class SaveViews(torch.autograd.Function):
    """Saves views with odd layouts and dtypes, and reports what backward gets back."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, report: list) -> torch.Tensor:
        views = (h.t(), h[1:, 2:], h[::2], h.double(), h.to(torch.bfloat16))
        ctx.save_for_backward(*views)
        ctx.expected = [(v.dtype, v.shape, v.stride(), v.storage_offset(), v.clone()) for v in views]
        # A weak reference, not the address: a freed storage's address can be handed out again.
        ctx.original_storage = StorageWeakRef(h.untyped_storage()), h.untyped_storage().data_ptr()
        ctx.report = report
        return h * 1

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.report.append((ctx.saved_tensors, ctx.expected, ctx.original_storage))
        return grad, None


class LayoutBlock(nn.Module):
    def __init__(self, report: list) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 16)
        self.report = report

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return SaveViews.apply(self.lin(x), self.report)


def _run_layout_block() -> tuple[tuple, list, int, OffloadEngine]:
    report: list = []
    block = offload_wrapper(LayoutBlock(report), cpu_copy=True, min_bytes=0)
    block(torch.randn(8, 16)).sum().backward()
    (restored, expected, original_storage), = report
    return restored, expected, original_storage, block.offload_engine


def test_restored_tensors_keep_dtype_shape_strides_offset_and_values() -> None:
    """What backward reads back has the saved dtype, shape, strides, storage offset and values, and was
    restored from a host copy (not the original storage).

    A failure means restore makes contiguous copies (wrong strides for kernels that rely on them),
    loses offsets of sliced views, or casts.
    """
    restored, expected, original_storage, engine = _run_layout_block()

    for tensor, (dtype, shape, stride, offset, values) in zip(restored, expected):
        assert tensor.dtype == dtype and tensor.shape == shape
        assert tensor.stride() == stride and tensor.storage_offset() == offset
        assert tensor.data_ptr() - tensor.untyped_storage().data_ptr() == offset * tensor.element_size()
        assert torch.equal(tensor, values)
    original, address = original_storage
    # Freed (so not what backward reads), or alive at another address.
    assert original.expired() or restored[0].untyped_storage().data_ptr() != address, "not restored from a host copy"
    # Copied: the linear's input, h, h.double() and h.to(bfloat16); h[1:, 2:] and h[::2] reuse h's copy.
    assert (engine.stats.copies, engine.stats.shared) == (4, 2), engine.stats
    assert len({t.untyped_storage().data_ptr() for t in restored[2:]}) == 3, "casts must not alias the views"


def test_views_that_shared_a_storage_share_one_after_restore() -> None:
    """``h.t()``, ``h[1:, 2:]`` and ``h[::2]`` come back as views of one restored storage, at the same
    relative addresses as before; the host copy is brought back once, not once per view.

    A failure means restore duplicates shared storages: device memory and transfer multiplied by the
    number of views, and aliasing between saved views broken.
    """
    restored, expected, original_storage, engine = _run_layout_block()

    views = restored[:3]
    storages = {t.untyped_storage().data_ptr() for t in views}
    assert len(storages) == 1, f"views of one storage came back as {len(storages)} separate storages"
    base = storages.pop()
    assert [t.data_ptr() - base for t in views] == [e[3] * 4 for e in expected[:3]]
    assert engine.stats.restores + engine.stats.prefetched == engine.stats.copies, engine.stats


class InPlaceBetweenSaves(nn.Module):
    """Saves a view of ``h``, then modifies ``h`` in place, then saves another view of it.

    The first saved view feeds only ``aside``, which the loss ignores, so the reference (which checks
    versions) never reads the stale tensor back; the second view's gradient depends on the new values.
    """

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 24)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.lin(x)
        aside = torch.sin(h.t())  # saves h.t() before the change
        h.mul_(2)  # bumps the version counter of the storage
        return torch.cos(h[2:]), aside  # saves h[2:] after the change


def test_storage_modified_in_place_after_save_is_copied_again(assert_same_grads) -> None:
    """A storage saved, changed in place and saved again is copied twice, and gradients use the new values.

    A failure means de-duplication ignores the version counter: backward reads the stale copy and
    computes wrong gradients, silently (offload hooks bypass autograd's own version check).
    """
    torch.manual_seed(0)
    reference = InPlaceBetweenSaves()
    block = offload_wrapper(copy.deepcopy(reference), cpu_copy=True, min_bytes=0)
    x = torch.randn(8, 16)

    out_ref, aside_ref = reference(x)
    out_ref.sum().backward()
    out, aside = block(x)
    out.sum().backward()

    stats = block.offload_engine.stats
    assert (stats.copies, stats.shared) == (3, 0), stats  # x, h before the change, h after it
    assert stats.copied_bytes == 8 * 16 * 4 + 2 * 8 * 24 * 4, stats
    assert_same_grads(block, reference)
    del aside, aside_ref


# --- pool reuse and leaks --------------------------------------------------------------------------------


def test_pool_buffers_are_reused_every_step_and_released_by_backward(make_gpt, batch, no_gc) -> None:
    """Over 20 steps, buffers are in use between forward and backward only, and the pool never grows after
    the first step: each step reuses the buffers of the last.

    A failure means host (pinned, on GPU machines) memory grows step after step, is only returned when
    the cyclic garbage collector happens to run, or is held until the loss is deleted.
    """
    model = make_gpt(n_layer=2)
    _offload_blocks(model)
    engine = _engine_of(model)
    totals, copies = [], []

    for _ in range(20):
        engine.stats.reset()
        loss = model.loss(*batch)
        assert engine.pool.in_use_bytes > 0, "nothing held between forward and backward"
        assert engine.pool.in_use_bytes >= engine.stats.copied_bytes
        loss.backward()
        assert engine.pool.in_use_bytes == 0, "buffers still in use after backward"
        del loss
        model.zero_grad(set_to_none=True)
        assert engine.pool.in_use_bytes == 0
        totals.append(engine.pool.total_bytes)
        copies.append(engine.stats.copies)

    assert len(set(copies)) == 1 and copies[0] > 0
    assert len(set(totals)) == 1, f"the pool grew: {totals}"
    assert engine.pool.cached_bytes == totals[0]


def test_no_host_buffers_held_after_a_step_whose_forward_raised(make_gpt, batch, no_gc) -> None:
    """When forward raises inside a later block, buffers filled by earlier blocks go back with the error,
    and the error names the block.

    A failure means an aborted step (OOM, a bad batch) leaks the copies made before the error.
    """
    model = make_gpt()
    _offload_blocks(model)
    engine = _engine_of(model)

    def fail(module: nn.Module, args: tuple) -> None:
        raise RuntimeError("injected")

    handle = model.layers[2].mlp.register_forward_pre_hook(fail)
    try:  # not pytest.raises: its ExceptionInfo would keep the traceback, and with it the graph, alive
        model.loss(*batch)
    except RuntimeError as error:
        assert "injected" in str(error)
        assert any("'layers.2'" in note for note in getattr(error, "__notes__", []))
    else:
        pytest.fail("forward did not raise")
    handle.remove()

    assert engine.stats.copies > 0, "earlier blocks copied nothing: the test exercised nothing"
    assert engine.pool.in_use_bytes == 0
    assert engine.pool.cached_bytes > 0


def test_no_host_buffers_held_after_a_dropped_eval_forward_with_grad(make_gpt, batch, no_gc) -> None:
    """An eval-mode forward with grad enabled whose output is dropped gives its buffers back at once.

    A failure means validation loops that forget ``no_grad`` leak host memory every batch.
    """
    model = make_gpt()
    _offload_blocks(model)
    engine = _engine_of(model)
    model.eval()

    out = model(batch[0])
    assert engine.pool.in_use_bytes > 0
    del out

    assert engine.pool.in_use_bytes == 0


def test_clear_cache_drops_cached_buffers_only(make_gpt, batch, assert_same_grads) -> None:
    """``clear_cache()`` releases cached buffers (to zero) and leaves buffers in use alone; training goes on.

    A failure means memory cannot be handed back between phases, or clearing breaks a step in flight.
    """
    reference = make_gpt()
    model = copy.deepcopy(reference)
    _offload_blocks(model)
    engine = _engine_of(model)
    model.loss(*batch).backward()
    assert engine.pool.cached_bytes > 0

    engine.clear_cache()
    assert engine.pool.cached_bytes == 0 and engine.pool.total_bytes == 0

    model.zero_grad(set_to_none=True)
    loss = model.loss(*batch)
    in_use = engine.pool.in_use_bytes
    engine.clear_cache()  # mid-step: only cached buffers may go
    assert engine.pool.in_use_bytes == in_use > 0 and engine.pool.cached_bytes == 0
    loss.backward()
    reference.loss(*batch).backward()
    assert engine.pool.in_use_bytes == 0
    assert_same_grads(model, reference)


# --- host cap --------------------------------------------------------------------------------------------


def test_host_cap_keeps_tensors_on_the_device_and_is_never_exceeded(make_gpt, batch, assert_same_grads) -> None:
    """With ``max_host_bytes`` below what a step needs and ``on_host_full="keep"``, the pool stays under the
    cap at every block boundary, the rest stays on the device, and gradients are exact.

    A failure means the cap is not enforced (host OOM on big models), or tensors kept at the cap come
    back wrong.
    """
    cap = 64 * 1024
    reference = make_gpt()
    model = copy.deepcopy(reference)
    _offload_blocks(model, max_host_bytes=cap, on_host_full="keep")
    engine = _engine_of(model)
    seen: list[int] = []
    for block in model.layers:
        block.register_forward_hook(lambda *_: seen.append(engine.pool.total_bytes))

    for _ in range(3):
        engine.stats.reset()
        for m in (model, reference):
            m.zero_grad(set_to_none=True)
            m.loss(*batch).backward()
        seen.append(engine.pool.total_bytes)
        assert engine.stats.kept_host_full > 0 and engine.stats.copies > 0, engine.stats
        assert_same_grads(model, reference)

    assert max(seen) <= cap, f"pool held {max(seen)} bytes over the {cap}-byte cap"
    assert engine.pool.in_use_bytes == 0


def test_zero_host_cap_copies_nothing(make_gpt, batch, assert_same_grads) -> None:
    """``max_host_bytes=0`` keeps every candidate on the device (and not as a crash).

    A failure means an edge of the cap arithmetic.
    """
    reference = make_gpt()
    model = copy.deepcopy(reference)
    _offload_blocks(model, max_host_bytes=0)
    engine = _engine_of(model)

    model.loss(*batch).backward()
    reference.loss(*batch).backward()

    assert engine.stats.copies == 0 and engine.stats.kept_host_full > 0 and engine.pool.total_bytes == 0
    assert_same_grads(model, reference)


def test_host_cap_with_on_host_full_raise_says_how_to_fix(make_gpt, batch, no_gc) -> None:
    """At the cap, ``on_host_full="raise"`` raises ``RuntimeError`` naming ``max_host_bytes`` and the ways
    out, the pool stays under the cap, and the buffers already filled go back.

    A failure means an unhelpful error, or a leak when a step dies at the cap.
    """
    cap = 64 * 1024
    model = make_gpt()
    _offload_blocks(model, max_host_bytes=cap, on_host_full="raise")
    engine = _engine_of(model)

    try:
        model.loss(*batch)
    except RuntimeError as error:
        message = str(error)
        assert f"max_host_bytes={cap}" in message
        assert "Raise max_host_bytes" in message and "on_host_full='keep'" in message
        assert any("ckpt_wrapper: raised while running block 'layers." in n for n in getattr(error, "__notes__", []))
    else:
        pytest.fail("the cap was not enforced")

    assert 0 < engine.pool.total_bytes <= cap
    assert engine.pool.in_use_bytes == 0


# --- engines and prefetch --------------------------------------------------------------------------------


def test_blocks_wrapped_together_share_one_engine_unless_options_differ(make_gpt) -> None:
    """One ``apply_activation_checkpointing`` call gives its blocks one engine; a separate call, or other
    options, gives another.

    A failure means one pool per block (no reuse between blocks) and no prefetch across blocks.
    """
    model = make_gpt()
    _offload_blocks(model)
    engine = _engine_of(model)
    assert engine.options == OffloadOptions(cpu_copy=True, min_bytes=0)

    other = make_gpt()
    _offload_blocks(other)
    assert _engine_of(other) is not engine

    mixed = make_gpt()
    thresholds = iter([1, 0, 0, 0])  # layers.0 gets other options than the rest
    apply_activation_checkpointing(
        mixed,
        checkpoint_wrapper_fn=lambda b: offload_wrapper(b, cpu_copy=True, min_bytes=next(thresholds)),
        check_fn=by_class(Block),
    )
    assert mixed.layers[0].offload_engine is not mixed.layers[1].offload_engine
    assert len({id(b.offload_engine) for b in mixed.layers[1:]}) == 1


def test_an_explicit_engine_is_used_by_every_block(make_gpt, batch, assert_same_grads) -> None:
    """``functools.partial(offload_wrapper, engine=engine)`` makes every block, of every model wrapped so,
    offload through that engine.

    A failure means the user's engine is silently replaced (its stats and pool show nothing).
    """
    engine = OffloadEngine(OffloadOptions(cpu_copy=True, min_bytes=0))
    reference = make_gpt()
    models = [copy.deepcopy(reference), copy.deepcopy(reference)]
    for model in models:
        apply_activation_checkpointing(
            model, checkpoint_wrapper_fn=functools.partial(offload_wrapper, engine=engine), check_fn=by_class(Block)
        )
        assert all(b.offload_engine is engine for b in model.layers)

    reference.loss(*batch).backward()
    for model in models:
        model.loss(*batch).backward()
        assert_same_grads(model, reference)
    assert engine.stats.copies > 0 and engine.stats.copies % 2 == 0


def _per_block_copies(model: nn.Module, engine: OffloadEngine) -> list[int]:
    """Copies made by each block's forward, in order, recorded with forward hooks."""
    counts: list[int] = []
    for block in model.layers:
        block.register_forward_pre_hook(lambda *_: counts.append(-engine.stats.copies))
        block.register_forward_hook(lambda *_: counts.__setitem__(-1, counts[-1] + engine.stats.copies))
    return counts


def test_prefetch_brings_each_block_back_before_its_backward_begins(make_gpt, batch, assert_same_grads) -> None:
    """With ``prefetch=True`` (the default), when backward reaches a block, that block's host copies have
    been prefetched already (all but the last block's, which backward needs first), and no block further
    back has been; gradients are exact.

    A failure means no overlap of transfers with compute on GPUs (every block waits for its copies), or
    prefetch running so far ahead that restored activations pile up on the device.
    """
    reference = make_gpt()
    model = copy.deepcopy(reference)
    _offload_blocks(model, prefetch=True)
    engine = _engine_of(model)
    per_block = _per_block_copies(model, engine)
    reached: dict[int, int] = {}  # block index -> stats.prefetched when backward reached its output

    def watch(index: int):
        def on_output(module, args, output) -> None:
            output.register_hook(lambda grad: reached.__setitem__(index, engine.stats.prefetched))
        return on_output

    for index, block in enumerate(model.layers):
        block.register_forward_hook(watch(index))

    model.loss(*batch).backward()
    reference.loss(*batch).backward()

    assert len(per_block) == N_LAYER and sum(per_block) == engine.stats.copies and min(per_block) > 0
    assert sorted(reached) == list(range(N_LAYER))
    for index in range(N_LAYER):
        earliest, latest = sum(per_block[index : N_LAYER - 1]), sum(per_block[index:])
        assert earliest <= reached[index] <= latest, (
            f"when backward reached layers.{index}, {reached[index]} copies were prefetched; expected "
            f"{earliest}..{latest} (copies per block {per_block})"
        )
    assert engine.stats.prefetched >= sum(per_block[:-1]), engine.stats
    assert_same_grads(model, reference)


@pytest.mark.parametrize("prefetch", [True, False], ids=["prefetch", "no-prefetch"])
def test_every_host_copy_of_a_gpt_is_brought_back_exactly_once(make_gpt, batch, prefetch, assert_same_grads) -> None:
    """Each host copy comes back to the device once: ``prefetched + restores == copies``; without prefetch
    nothing is prefetched.

    A failure means some storages are copied back more than once: extra transfers and, on GPUs, a
    synchronous copy on demand that prefetch was meant to hide (see the next test for the simplest case).
    """
    reference = make_gpt()
    model = copy.deepcopy(reference)
    _offload_blocks(model, prefetch=prefetch)
    engine = _engine_of(model)

    model.loss(*batch).backward()
    reference.loss(*batch).backward()

    stats = engine.stats
    assert stats.shared > 0, "test setup: no storage was saved twice"
    if not prefetch:
        assert stats.prefetched == 0, stats
    assert stats.prefetched + stats.restores == stats.copies, stats
    assert_same_grads(model, reference)


class TwoOps(nn.Module):
    """``h`` is saved by two operations, whose backwards run one after the other."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        return torch.sin(h) + torch.cos(h)


@pytest.mark.parametrize("prefetch", [True, False], ids=["prefetch", "no-prefetch"])
def test_a_storage_saved_by_two_operations_is_brought_back_once(prefetch, assert_same_grads) -> None:
    """A storage saved by two operations (one host copy, shared) is copied back once, not once per
    operation: the device copy the first backward restored must serve the second.

    A failure means the restored storage is freed between the two backwards and copied back again.
    Without offload the storage lives until the second backward, so keeping the restored copy that long
    costs no more memory than the model without offload. In a transformer this is, for example, the
    attention output: saved by attention and, as a view, by the output projection.
    """
    torch.manual_seed(0)
    reference = TwoOps()
    block = offload_wrapper(copy.deepcopy(reference), cpu_copy=True, min_bytes=0, prefetch=prefetch)
    x = torch.randn(8, 16)

    reference(x).sum().backward()
    block(x).sum().backward()

    stats = block.offload_engine.stats
    assert (stats.copies, stats.shared) == (2, 1), stats  # x, and h saved twice
    assert stats.prefetched + stats.restores == stats.copies, stats
    assert_same_grads(block, reference)


# --- CPU without cpu_copy ------------------------------------------------------------------------------


def test_without_cpu_copy_on_cpu_warns_once_per_engine_and_is_a_noop(make_gpt, batch, assert_same_grads) -> None:
    """On CPU without ``cpu_copy``, each engine warns exactly once (even with warnings always shown) over
    several steps of several blocks, copies nothing, and changes no number.

    A failure means a silent no-op (users think they offload), a warning every step and block, or that
    the no-op path differs numerically from the plain model.
    """
    reference = make_gpt()
    model = copy.deepcopy(reference)
    apply_activation_checkpointing(model, checkpoint_wrapper_fn=offload_wrapper, check_fn=by_class(Block))
    engine = _engine_of(model)
    other = make_gpt()
    apply_activation_checkpointing(other, checkpoint_wrapper_fn=offload_wrapper, check_fn=by_class(Block))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            model.zero_grad(set_to_none=True)
            model.loss(*batch).backward()
        ours = [w for w in caught if "offload" in str(w.message)]
        assert len(ours) == 1, [str(w.message) for w in caught]
        other.loss(*batch).backward()
        other.loss(*batch).backward()
    reference.loss(*batch).backward()

    ours = [w for w in caught if "offload" in str(w.message)]
    assert len(ours) == 2, "a second engine must say it once too"
    assert issubclass(ours[0].category, UserWarning) and "cpu_copy=True" in str(ours[0].message)
    assert _saves(engine.stats) == 0 and engine.pool.total_bytes == 0, engine.stats
    assert_same_grads(model, reference)


def test_no_accelerator_warning_points_at_the_caller() -> None:
    """The warning is attributed to the code that called the block, not to PyTorch's module machinery.

    A failure means users see ``torch/nn/modules/module.py`` as the source of the warning and cannot
    filter it by their own module.
    """
    block = offload_wrapper(nn.Linear(4, 4))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        block(torch.randn(2, 4))

    (warning,) = caught
    assert warning.filename == __file__, f"attributed to {warning.filename}:{warning.lineno}"


# --- options ---------------------------------------------------------------------------------------------


BAD_OPTIONS = [
    {"min_bytes": -1},
    {"min_bytes": 1.5},
    {"min_bytes": "0"},
    {"max_host_bytes": -1},
    {"max_host_bytes": 1e9},
    {"on_host_full": "drop"},
    {"on_host_full": None},
    {"max_in_flight": 0},
    {"max_in_flight": 2.5},
]


@pytest.mark.parametrize("options", BAD_OPTIONS, ids=lambda o: "-".join(f"{k}={v!r}" for k, v in o.items()))
def test_out_of_range_options_raise_value_error(options) -> None:
    """Out-of-range options raise ``ValueError`` naming the option and the value, from ``OffloadOptions``
    and from ``offload_wrapper`` alike, and the module is left unwrapped.

    A failure means a nonsensical option is accepted and misbehaves later, or a half-wrapped module.
    """
    (name, value), = options.items()
    with pytest.raises(ValueError, match=name) as info:
        OffloadOptions(**options)
    assert repr(value) in str(info.value)
    module = nn.Linear(2, 2)
    with pytest.raises(ValueError, match=name):
        offload_wrapper(module, **options)
    assert not isinstance(module, OffloadWrapper)


def test_unknown_option_raises_type_error_listing_the_known_ones() -> None:
    """A misspelt option is a ``TypeError`` that lists every option ``offload_wrapper`` knows.

    A failure means typos like ``cpu_cpy=True`` are ignored or give an unhelpful message.
    """
    module = nn.Linear(2, 2)
    with pytest.raises(TypeError, match="cpu_cpy") as info:
        offload_wrapper(module, cpu_cpy=True)
    for known in ("min_bytes", "pin_memory", "cpu_copy", "max_host_bytes", "on_host_full", "max_in_flight", "prefetch"):
        assert known in str(info.value)
    assert not isinstance(module, OffloadWrapper)


def test_engine_with_options_or_a_non_engine_raises_type_error() -> None:
    """``engine=`` together with options, or something that is not an ``OffloadEngine``, is a ``TypeError``.

    A failure means options silently ignored in favour of the engine's own.
    """
    engine = OffloadEngine()
    module = nn.Linear(2, 2)
    with pytest.raises(TypeError, match="either engine= or offload options"):
        offload_wrapper(module, engine=engine, cpu_copy=True)
    with pytest.raises(TypeError, match="OffloadEngine"):
        offload_wrapper(module, engine=OffloadOptions())
    assert not isinstance(module, OffloadWrapper)
    assert offload_wrapper(module, engine=engine).offload_engine is engine


# --- selection helpers for offload -----------------------------------------------------------------------


def _names_wrapped(make_gpt, selector) -> list[str]:
    model = make_gpt()
    names = apply_activation_checkpointing(
        model, checkpoint_wrapper_fn=functools.partial(offload_wrapper, cpu_copy=True), check_fn=selector
    )
    assert [n for n, m in model.named_modules() if isinstance(m, OffloadWrapper)] == names
    return names


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        (first_n(1, by_class(Block)), ["layers.0"]),
        (first_n(3, by_class(Block)), ["layers.0", "layers.1", "layers.2"]),
        (first_n(4, by_class(Block)), ["layers.0", "layers.1", "layers.2", "layers.3"]),
        (first_n(99, by_class(Block)), ["layers.0", "layers.1", "layers.2", "layers.3"]),
        (all_but_last(0, by_class(Block)), ["layers.0", "layers.1", "layers.2", "layers.3"]),
        (all_but_last(1, by_class(Block)), ["layers.0", "layers.1", "layers.2"]),
        (all_but_last(3, by_class(Block)), ["layers.0"]),
        (first_n(1, every_nth(2, by_class(Block), offset=1)), ["layers.1"]),
        (all_but_last(1, every_nth(2, by_class(Block))), ["layers.0"]),
    ],
    ids=lambda v: v.describe() if hasattr(v, "describe") else None,
)
def test_first_n_and_all_but_last_choose_blocks_in_module_order(make_gpt, selector, expected) -> None:
    """``first_n`` keeps the first ``n`` blocks of its selector, ``all_but_last`` drops the last ``k``.

    A failure means offload lands on the wrong blocks (the last ones leave no compute to hide transfers).
    """
    assert _names_wrapped(make_gpt, selector) == expected


@pytest.mark.parametrize(
    "selector", [first_n(0, by_class(Block)), all_but_last(4, by_class(Block)), all_but_last(99, by_class(Block))],
    ids=lambda s: s.describe(),
)
def test_first_n_and_all_but_last_selecting_nothing_is_an_error(make_gpt, selector) -> None:
    """A selection left empty raises the usual "matched no module" ``ValueError``, naming the selector.

    A failure means a silently unwrapped model.
    """
    with pytest.raises(ValueError, match="matched no module") as info:
        _names_wrapped(make_gpt, selector)
    assert selector.describe() in str(info.value)


@pytest.mark.parametrize("helper", [first_n, all_but_last], ids=lambda h: h.__name__)
def test_first_n_and_all_but_last_reject_bad_input(helper) -> None:
    """Negative or non-integer counts are ``ValueError``; a non-selector is ``TypeError``; used as a plain
    ``check_fn`` (no order known) they raise ``TypeError`` instead of guessing.

    A failure means a typo selects an unexpected set of blocks.
    """
    assert helper in (ckpt_wrapper.first_n, ckpt_wrapper.all_but_last)
    assert helper.__name__ in ckpt_wrapper.__all__
    for count in (-1, 1.5, "2"):
        with pytest.raises(ValueError, match=helper.__name__):
            helper(count, by_class(Block))
    with pytest.raises(TypeError, match="selector"):
        helper(1, Block)
    with pytest.raises(TypeError, match="order"):
        helper(1, by_class(Block))(nn.Linear(1, 1))
