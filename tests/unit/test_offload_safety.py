"""Offload keeps autograd's guarantees: versions checked, memory bounded, copies freed, every tensor kind.

Each test here failed before the engine was reworked; its docstring says how. All run on CPU with
``cpu_copy=True``, which goes through the same selection, spans, de-duplication, version checks, pool
and restore lifetime as CUDA, without the streams (``test_offload_cuda.py`` has those).
"""

from __future__ import annotations

import copy
import functools
import gc
import random

import pytest
import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

from ckpt_wrapper import (
    HostPool,
    OffloadWrapper,
    apply_activation_checkpointing,
    by_class,
    checkpoint_wrapper,
    offload_wrapper,
    OffloadOptions,
)
from ckpt_wrapper.host_pool import CACHE_FACTOR

MODIFIED = "modified by an inplace operation"
"""What autograd says when a tensor it saved was written in place before backward read it."""


def _assert_same_grads(model: nn.Module, reference: nn.Module) -> None:
    for (name, param), ref in zip(model.named_parameters(), reference.parameters()):
        assert param.grad is not None and ref.grad is not None, f"{name}: missing gradient"
        assert torch.equal(param.grad, ref.grad), f"{name}: gradients differ"


# --- in-place writes after saving --------------------------------------------------------------------------


class WritesAfterSaving(nn.Module):
    """``h * h`` saves ``h``; ``h`` (or a view of it) is then written in place."""

    def __init__(self, width: int, write: str) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)
        self.write = write

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        y = h * h
        if self.write == "tensor":
            h.add_(1)
        elif self.write == "view":
            h[:, :2].mul_(3)  # a view shares the version counter of its base
        return y.sum() + h.sum()


@pytest.mark.parametrize("write", ["tensor", "view"])
@pytest.mark.parametrize("width", [256, 4], ids=["copied", "kept-small"])
def test_in_place_write_after_saving_raises_as_it_does_without_offload(width: int, write: str) -> None:
    """PyTorch raises for this program; offload did not (its hooks bypass autograd's version check), and
    backward read the values from before the write, or for a kept tensor after it: a silent wrong
    gradient either way. The engine now checks versions itself, for tensors it copied and kept alike."""
    torch.manual_seed(0)
    reference = WritesAfterSaving(width, write)
    x = torch.randn(128, width)  # 128 KiB at width 256: above min_bytes
    with pytest.raises(RuntimeError, match=MODIFIED):
        reference(x).backward()

    block = offload_wrapper(copy.deepcopy(reference), cpu_copy=True)
    with pytest.raises(RuntimeError, match=MODIFIED) as raised:
        block(x).backward()
    assert "WritesAfterSaving" in str(raised.value) and "out of place" in str(raised.value)
    stats = block.offload_engine.stats
    assert (stats.copies > 0) == (width == 256), stats


def test_checkpoint_input_written_in_place_after_the_block_raises_as_without_offload() -> None:
    """The input a checkpoint keeps (offloaded with ``offload=True``) is written by the caller after the
    block: PyTorch's checkpoint raises, offloaded it ran on with the old input."""
    torch.manual_seed(0)
    lin = nn.Linear(256, 256)
    x = torch.randn(8, 256, requires_grad=True)
    for offload in (False, OffloadOptions(cpu_copy=True)):
        block = checkpoint_wrapper(copy.deepcopy(lin), offload=offload)
        h = x * 2
        out = block(h)
        h.add_(1)
        with pytest.raises(RuntimeError, match=MODIFIED):
            out.sum().backward()


def test_writes_before_saving_and_out_of_place_ones_are_not_refused() -> None:
    """The check has no false alarms: a tensor written before it is saved, or replaced out of place after,
    gives gradients bitwise equal to the reference."""

    class WritesBefore(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(256, 256)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.lin(x)
            h.mul_(2)  # before saving
            y = h * h
            h = h + 1  # out of place after
            return y.sum() + h.sum()

    torch.manual_seed(0)
    reference = WritesBefore()
    block = offload_wrapper(copy.deepcopy(reference), cpu_copy=True, min_bytes=0)
    x = torch.randn(8, 256)
    reference(x).backward()
    block(x).backward()
    assert block.offload_engine.stats.copies > 0
    _assert_same_grads(block, reference)


# --- host memory over many shapes --------------------------------------------------------------------------


class MLP(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.up = nn.Linear(width, 4 * width)
        self.down = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.nn.functional.gelu(self.up(x)))


WIDTH = 128
"""With batch 8, saved tensors of 0.25 to 4.6 MiB: above 1 MiB, lengths map to distinct size classes."""


def _mlp_stack(width: int = WIDTH, blocks: int = 4) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(*(MLP(width) for _ in range(blocks)))
    apply_activation_checkpointing(model, checkpoint_wrapper_fn=functools.partial(offload_wrapper, cpu_copy=True),
                                   check_fn=by_class(MLP))
    return model


def _step(model: nn.Sequential, length: int, width: int = WIDTH) -> None:
    model(torch.randn(8, length, width)).square().mean().backward()


def test_host_memory_does_not_grow_over_30_sequence_lengths() -> None:
    """Thirty steps, each at another sequence length (dynamic padding), in random order: the pool holds at
    most twice its high-water mark of bytes in use (``CACHE_FACTOR``), within twice what one step at the
    longest length needs alone (here 88 MiB against 48 MiB). Before, each length pinned a fresh set of
    buffers that nothing evicted: 123 MiB here, 4.5 times the single step on the workload first reported."""
    lengths = list(range(64, 64 + 30 * 8, 8))
    random.Random(0).shuffle(lengths)
    alone = _mlp_stack()
    _step(alone, max(lengths))
    single = alone[0].offload_engine.pool.total_bytes
    assert single > 0

    model = _mlp_stack()
    pool = model[0].offload_engine.pool
    held = []
    for length in lengths:
        _step(model, length)
        assert pool.in_use_bytes == 0
        held.append(pool.total_bytes)
    print(f"held after each step (MiB): {[round(h / 2**20, 1) for h in held]}; one step alone: {single / 2**20:.1f}")
    assert max(held) <= CACHE_FACTOR * single, (held, single)
    assert pool.total_bytes <= CACHE_FACTOR * pool.high_water_bytes and pool.evictions > 0


def test_two_alternating_shapes_are_cached_without_pinning_again() -> None:
    """Batches alternating between two bucket lengths: after the first two steps the pool serves every step
    from its cache (no eviction, no new buffer). A pool bounded by its high-water mark alone evicted one
    bucket's buffers for the other's on every step (on CUDA: a host free and a new pinned allocation each)."""
    model = _mlp_stack()
    pool = model[0].offload_engine.pool
    for step in range(8):
        _step(model, 32 if step % 2 else 256)
        if step == 1:
            settled = (pool.total_bytes, pool.evictions)
    assert (pool.total_bytes, pool.evictions) == settled, (pool.total_bytes, pool.evictions, settled)


def test_pool_serves_a_smaller_request_from_a_larger_free_buffer_and_evicts_least_recently_used() -> None:
    """A request is served by a free buffer of up to twice its class (before: only the same class), and the
    bound evicts the buffers released longest ago first (before: the largest)."""
    pool = HostPool(pin=False, max_bytes=None)
    big, _ = pool.acquire(64 << 10)
    pool.release(big)
    reused, _ = pool.acquire(40 << 10)
    assert reused is big and pool.total_bytes == 64 << 10
    pool.release(reused)
    tiny, _ = pool.acquire(8 << 10)  # more than twice smaller: a buffer of its own
    assert tiny is not big

    capped = HostPool(pin=False, max_bytes=3 * (16 << 10))
    first, second, third = (capped.acquire(16 << 10)[0] for _ in range(3))
    for buffer in (second, first, third):  # released in this order: second is the least recent
        capped.release(buffer)
    bigger, _ = capped.acquire(32 << 10)  # needs two buffers' worth evicted
    assert bigger is not None and capped.evictions == 2
    kept, _ = capped.acquire(16 << 10)
    assert kept is third, "the most recently released buffer must survive the eviction"


# --- restored copies with retain_graph ---------------------------------------------------------------------


class SeeRestored(torch.autograd.Function):
    """Identity whose backward notes weak references to the storages of what it saved."""

    seen: list[StorageWeakRef] = []

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        y = x.sin()
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (y,) = ctx.saved_tensors
        SeeRestored.seen.append(StorageWeakRef(y.untyped_storage()))
        return grad * (1 - y.square()).sqrt()


class SavesThroughFunction(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(256, 256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return SeeRestored.apply(self.lin(x))


def test_restored_copies_are_freed_after_their_backward_even_with_retain_graph() -> None:
    """With ``retain_graph=True`` every device copy restored in backward used to live as long as the graph,
    so by the end of backward everything offloaded was back on the device. Now each is freed once backward
    has read it, a second backward restores it again, and both give the reference's gradients."""
    torch.manual_seed(0)
    reference = nn.Sequential(SavesThroughFunction(), SavesThroughFunction())
    model = copy.deepcopy(reference)
    apply_activation_checkpointing(model, checkpoint_wrapper_fn=functools.partial(offload_wrapper, cpu_copy=True),
                                   check_fn=by_class(SavesThroughFunction))
    x = torch.randn(128, 256)  # 128 KiB per saved tensor: above min_bytes

    ref_loss = reference(x).sum()
    ref_loss.backward(retain_graph=True)
    ref_loss.backward()
    SeeRestored.seen.clear()
    loss = model(x).sum()
    loss.backward(retain_graph=True)
    gc.collect()
    assert len(SeeRestored.seen) == 2
    assert all(ref.expired() for ref in SeeRestored.seen), "a restored copy outlived its backward"
    loss.backward()
    _assert_same_grads(model, reference)
    stats = model[0].offload_engine.stats
    assert stats.copies >= 2 and stats.restores + stats.prefetched == 2 * stats.copies, stats


# --- the order of copies back ------------------------------------------------------------------------------


class CopiesIn(TorchDispatchMode):
    """Records the byte counts of the uint8 copies and clones (the engine's moves) in the order they run."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.copy_.default, torch.ops.aten.clone.default) and args[0].dtype == torch.uint8:
            self.sizes.append(args[0].numel())
        return func(*args, **(kwargs or {}))


class Widening(nn.Module):
    """Saves tensors of distinct sizes, in a known order."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(16, 40), nn.Linear(40, 72), nn.Linear(72, 104)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.b(self.a(x).tanh()).tanh()).tanh()


def test_copies_back_run_in_the_order_backward_needs_them() -> None:
    """Backward reads a block's tensors last saved first. The copies back used to be queued in forward
    order, so the tensor needed first arrived last."""
    torch.manual_seed(0)
    block = offload_wrapper(Widening(), cpu_copy=True, min_bytes=0)
    x = torch.randn(32, 16)
    with CopiesIn() as out_mode:
        loss = block(x).sum()
    with CopiesIn() as in_mode:
        loss.backward()
    assert len(out_mode.sizes) >= 4 and len(set(out_mode.sizes)) >= 4, out_mode.sizes
    assert in_mode.sizes == out_mode.sizes[::-1], (out_mode.sizes, in_mode.sizes)


# --- views, bits, layouts ----------------------------------------------------------------------------------


class SmallViewOfLarge(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(64, 1024)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.lin(x)[:2]  # 2 of 64 rows; the large output dies, the view keeps its storage
        return rows.sin().sum()


def test_a_small_view_of_a_large_storage_copies_only_its_own_bytes() -> None:
    """The view was judged by its size but copied, capped and restored as its whole storage (32 times its
    size here). Now only the bytes it reads travel, and gradients are unchanged."""
    torch.manual_seed(0)
    reference = SmallViewOfLarge()
    block = offload_wrapper(copy.deepcopy(reference), cpu_copy=True, min_bytes=1024)
    x = torch.randn(64, 64)
    reference(x).backward()
    block(x).backward()
    stats = block.offload_engine.stats
    assert stats.copied_bytes == 64 * 64 * 4 + 2 * 1024 * 4, stats  # the input, and the two rows
    _assert_same_grads(block, reference)


class ConjAndNeg(nn.Module):
    """Saves a conjugate view (``conj`` bit) and a negative view (``neg`` bit) for backward."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(64, dtype=torch.complex64))
        self.v = nn.Parameter(torch.randn(64))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = z * 2
        conj = h.conj()  # lazily conjugated: the bit, not the values
        neg = conj.imag  # imag of a conjugate view: the neg bit
        assert conj.is_conj() and neg.is_neg()
        return (conj * self.w).real.sum() + (neg * self.v).sum()


def test_conjugate_and_negative_views_keep_their_bits() -> None:
    """Restored without their bits, these views read as their unconjugated, unnegated values: silently
    wrong gradients for ``w`` and ``v``."""
    torch.manual_seed(0)
    reference = ConjAndNeg()
    block = offload_wrapper(copy.deepcopy(reference), cpu_copy=True, min_bytes=0)
    z = torch.randn(32, 64, dtype=torch.complex64)
    reference(z).backward()
    block(z).backward()
    assert block.offload_engine.stats.copies > 0
    _assert_same_grads(block, reference)


class SparseAndNested(nn.Module):
    """Autograd saves a CSR matrix (for ``mm``) and a nested tensor (for ``sin``)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(32, 32)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        csr = mask.to_sparse_csr()
        product = torch.mm(csr, h)
        nested = torch.nested.as_nested_tensor([h[:3], h[3:]])
        return product.sum() + nested.sin().to_padded_tensor(0.0).sum()


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta", "ignore:The PyTorch API of nested tensors")
def test_sparse_and_nested_tensors_stay_on_the_device() -> None:
    """These raised in the pack hook (they have no single storage to copy). They are now kept where they
    are, counted, and the block trains as without offload."""
    torch.manual_seed(0)
    reference = SparseAndNested()
    block = offload_wrapper(copy.deepcopy(reference), cpu_copy=True, min_bytes=0)
    x = torch.randn(8, 32)
    mask = (torch.rand(8, 8) > 0.5).float()
    reference(x, mask).backward()
    block(x, mask).backward()
    assert block.offload_engine.stats.kept_layout >= 2, block.offload_engine.stats
    _assert_same_grads(block, reference)
    assert isinstance(block, OffloadWrapper)


# --- restored copies across backward passes, and prefetch across forwards -----------------------------------


class GradIsASavedView(torch.autograd.Function):
    """Its backward returns a view of what it saved as the gradient of ``w`` (or a copy, with ``clone``)."""

    clone = False

    @staticmethod
    def forward(ctx, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return (w * x).sum(0, keepdim=True)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        return (x[0].clone() if GradIsASavedView.clone else x[0]), None


class AliasingGrad(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(16))
        self.lin = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x).exp()
        return GradIsASavedView.apply(self.w, h).sum() + h.sum()


def test_a_gradient_that_views_a_restored_copy_never_writes_into_it() -> None:
    """A backward returns a view of a saved tensor as a gradient, then backward runs three times over the
    retained graph. Offload used to let ``w.grad`` adopt a view of the restored copy and accumulate into it
    unseen, so later readers read altered values: ``w.grad`` went x, 2x, 4x and ``lin``'s gradient was
    wrong. (Without offload ``w.grad`` aliases the saved activation itself and autograd refuses the second
    backward.) Unpacked tensors are now views of one restored copy whose version the engine checks, and the
    three backwards give exactly what a backward returning a copy gives."""
    torch.manual_seed(0)
    reference = AliasingGrad()
    block = offload_wrapper(copy.deepcopy(reference), cpu_copy=True, min_bytes=0)
    x = torch.randn(8, 16)
    for model, clone in ((reference, True), (block, False)):
        GradIsASavedView.clone = clone
        loss = model(x)
        for _ in range(3):
            loss.backward(retain_graph=True)
    GradIsASavedView.clone = False
    assert block.offload_engine.stats.copies > 0
    _assert_same_grads(block, reference)


def _two_blocks() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(SavesThroughFunction(), SavesThroughFunction())
    apply_activation_checkpointing(model, checkpoint_wrapper_fn=functools.partial(offload_wrapper, cpu_copy=True),
                                   check_fn=by_class(SavesThroughFunction))
    return model


def test_backward_of_one_forward_prefetches_nothing_of_another() -> None:
    """Two forwards, then the second's backward: it used to prefetch the first forward's last block (chained
    to the second's first), which then sat on the device until the first's backward."""
    model = _two_blocks()
    engine = model[0].offload_engine
    first = model(torch.randn(128, 256)).sum()
    second = model(torch.randn(128, 256)).sum()
    copies_each = engine.stats.copies // 2
    second.backward()
    assert engine.stats.prefetched + engine.stats.restores == copies_each, engine.stats
    first.backward()
    assert engine.stats.prefetched + engine.stats.restores == 2 * copies_each, engine.stats


def test_a_second_backward_over_a_retained_graph_prefetches_again() -> None:
    """Prefetch started only at a block's first unpack ever, so a second backward over a retained graph (or
    any backward after a saved tensor was read early) restored everything on demand."""
    model = _two_blocks()
    engine = model[0].offload_engine
    loss = model(torch.randn(128, 256)).sum()
    loss.backward(retain_graph=True)
    first = (engine.stats.prefetched, engine.stats.restores)
    loss.backward()
    assert first[0] > 0 and (engine.stats.prefetched, engine.stats.restores) == (2 * first[0], 2 * first[1]), (
        first, engine.stats)


@pytest.mark.parametrize("options", [{"prefetch": "no"}, {"cpu_copy": 1}, {"min_bytes": True}, {"max_in_flight": True}])
def test_options_of_the_wrong_type_are_refused(options: dict) -> None:
    """``prefetch="no"`` was accepted (and truthy: prefetch stayed on); ``True`` passed for a byte count."""
    with pytest.raises(ValueError, match=next(iter(options))):
        OffloadOptions(**options)
