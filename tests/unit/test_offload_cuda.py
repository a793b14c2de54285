"""Offload on CUDA: side streams, pinned buffers, device memory freed and given back.

These run only where a CUDA device is present (``pytest -m gpu tests/unit/test_offload_cuda.py``) and are
skipped elsewhere. ``test_offload.py`` covers selection, de-duplication, pooling and restore on CPU; what
only a GPU shows is here: copies on side streams racing with compute and with the caching allocator,
device memory actually freed by forward and given back after the step, and page-locked host buffers.

Numerics are compared bitwise. Offload only moves bytes, so with deterministic kernels any difference from
the reference is an offload bug (a copy read before it was written, device memory reused too early). The
``deterministic`` fixture makes the kernels deterministic: ``torch.use_deterministic_algorithms(True)``
(with the cuBLAS workspace setting it requires) and the math attention backend (flash and
memory-efficient attention backward accumulate with atomics). For the same reason the loss is built from
``log_softmax`` and ``gather`` rather than ``cross_entropy`` (NLL loss on CUDA accumulates with atomics)
and the stress test freezes the embeddings (their backward scatters into the table). Were any kernel still
nondeterministic, deterministic mode raises rather than letting the comparison flake.
"""

from __future__ import annotations

import copy
import functools
import gc
import os
import random

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ckpt_wrapper import (
    OffloadEngine,
    OffloadWrapper,
    apply_activation_checkpointing,
    by_class,
    offload_wrapper,
)
from ckpt_wrapper.testing.models import GPT, Block, GPTConfig

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CONFIG = GPTConfig(n_layer=4, d_model=256, n_head=4, seq_len=128, vocab_size=512, dropout=0.1)
"""Small enough for 200 steps in seconds, big enough that most activations pass the 64 KiB ``min_bytes``."""
MEMORY_CONFIG = GPTConfig(n_layer=4, d_model=512, n_head=8, seq_len=256, vocab_size=1024)
"""For memory measurements: each (4, 256, 512) float32 activation is 2 MiB, far above allocator rounding."""


@pytest.fixture
def deterministic():
    """Deterministic CUDA kernels (see the module docstring), restored afterwards."""
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    previous_env = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"  # read at each cuBLAS call in deterministic mode
    torch.use_deterministic_algorithms(True)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        if previous_env is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = previous_env


@pytest.fixture
def no_gc():
    """Disable the cyclic collector: memory must come back by reference counting, promptly."""
    gc.collect()
    gc.disable()
    yield
    gc.enable()


def _gpt(config: GPTConfig) -> GPT:
    torch.manual_seed(0)
    return GPT(config).cuda()


def _offload_blocks(model: nn.Module, **options) -> OffloadEngine:
    apply_activation_checkpointing(
        model, checkpoint_wrapper_fn=functools.partial(offload_wrapper, **options), check_fn=by_class(Block)
    )
    engines = {id(b.offload_engine): b.offload_engine for b in model.modules() if isinstance(b, OffloadWrapper)}
    assert len(engines) == 1, "blocks wrapped together must share one engine"
    return next(iter(engines.values()))


def _loss(model: GPT, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token negative log-likelihood, from deterministic CUDA kernels only."""
    logits = model(tokens).float()
    return -logits.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).mean()


def _batch(config: GPTConfig, batch: int, seq: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, config.vocab_size, (2, batch, seq), generator=generator).cuda()
    return tokens[0], tokens[1]


def _assert_same_grads(model: nn.Module, reference: nn.Module, where: str = "") -> None:
    for (name, param), ref_param in zip(model.named_parameters(), reference.parameters()):
        if not ref_param.requires_grad:
            assert param.grad is None, f"{where}{name} is frozen but received a gradient"
            continue
        assert ref_param.grad is not None and param.grad is not None, f"{where}{name}: missing gradient"
        if not torch.equal(param.grad, ref_param.grad):  # assert_close only to describe the difference
            torch.testing.assert_close(param.grad, ref_param.grad, rtol=0, atol=0, msg=lambda m: f"{where}{name}: {m}")
            pytest.fail(f"{where}{name}: gradients differ (NaN in the same places?)")


def _allocated() -> int:
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated()


# --- (a) stress -------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("prefetch", [True, False], ids=["prefetch", "no-prefetch"])
def test_200_steps_of_random_shapes_match_the_reference_bitwise(deterministic, prefetch) -> None:
    """200 training steps whose batch and sequence length (so every activation's size) change every step:
    no NaN, and loss and gradients equal the non-offloaded model's bit for bit, step after step, with
    buffers of every size class reused across steps and everything given back after each backward.

    A failure means a race on the GPU: a host buffer reused while a copy still reads or writes it, device
    memory handed out again before the copy out of it finished, or compute reading a restored tensor
    before its copy in finished.
    """
    reference = _gpt(CONFIG)
    reference.tok_emb.requires_grad_(False)
    reference.pos_emb.requires_grad_(False)
    model = copy.deepcopy(reference)
    engine = _offload_blocks(model, prefetch=prefetch)
    optimizers = [torch.optim.SGD(m.parameters(), lr=1e-2) for m in (model, reference)]
    shapes = random.Random(0)
    generator = torch.Generator().manual_seed(0)
    copied_steps = small_steps = 0

    for step in range(200):
        tokens, targets = _batch(CONFIG, shapes.randint(1, 8), shapes.randint(1, CONFIG.seq_len), generator)
        engine.stats.reset()
        losses = []
        for m, optimizer in zip((model, reference), optimizers):
            optimizer.zero_grad(set_to_none=True)
            torch.manual_seed(step)  # the same dropout masks for both
            loss = _loss(m, tokens, targets)
            loss.backward()
            losses.append(loss.detach())
        assert torch.isfinite(losses[0]), f"step {step}: loss is {losses[0].item()}"
        assert torch.equal(losses[0], losses[1]), f"step {step}: {losses[0].item()} != {losses[1].item()}"
        _assert_same_grads(model, reference, where=f"step {step}, {tuple(tokens.shape)}: ")
        assert engine.pool.in_use_bytes == 0, f"step {step}: host buffers still in use after backward"
        # Every block has the same shapes, so either all copy or none; the first three are then prefetched.
        assert (engine.stats.prefetched > 0) == (prefetch and engine.stats.copies > 0), (step, engine.stats)
        copied_steps += engine.stats.copies > 0
        small_steps += engine.stats.kept_small > 0
        for optimizer in optimizers:
            optimizer.step()

    assert copied_steps > 100 and small_steps > 0, "test setup: sizes did not straddle min_bytes"
    for param, ref_param in zip(model.parameters(), reference.parameters()):
        assert torch.equal(param, ref_param)


# --- (b) memory freed by forward -------------------------------------------------------------------------


def test_forward_holds_less_device_memory_by_the_bytes_offloaded(deterministic) -> None:
    """After forward, the offloaded model holds at least 90% of ``stats.copied_bytes`` less device memory
    than the same model without offload.

    A failure means the copies are made but the device tensors stay alive (held by the engine, a stream,
    or the graph): host memory spent for nothing.
    """
    reference = _gpt(MEMORY_CONFIG)
    model = copy.deepcopy(reference)
    engine = _offload_blocks(model)  # default options: min_bytes 64 KiB, pinned buffers, prefetch
    tokens, targets = _batch(MEMORY_CONFIG, 4, MEMORY_CONFIG.seq_len, torch.Generator().manual_seed(0))
    for m in (model, reference):  # warm up: cuBLAS workspaces, the engine's streams, the host pool
        _loss(m, tokens, targets).backward()
        m.zero_grad(set_to_none=True)

    held = {}
    for name, m in (("offloaded", model), ("reference", reference)):
        engine.stats.reset()
        before = _allocated()
        loss = _loss(m, tokens, targets)
        held[name] = _allocated() - before
        if name == "offloaded":
            copied = engine.stats.copied_bytes
        loss.backward()
        del loss
        m.zero_grad(set_to_none=True)

    assert copied > 8 * 2**20, f"test setup: only {copied} bytes offloaded"
    saved = held["reference"] - held["offloaded"]
    assert saved >= 0.9 * copied, f"offloaded {copied} bytes but device memory only fell by {saved} ({held})"


# --- (c) no leaks ----------------------------------------------------------------------------------------


def _warm_model() -> tuple[GPT, OffloadEngine, tuple[torch.Tensor, torch.Tensor], int]:
    model = _gpt(MEMORY_CONFIG)
    engine = _offload_blocks(model)
    batch = _batch(MEMORY_CONFIG, 4, MEMORY_CONFIG.seq_len, torch.Generator().manual_seed(0))
    for _ in range(2):
        _loss(model, *batch).backward()
        model.zero_grad(set_to_none=True)
    return model, engine, batch, _allocated()


def test_device_and_host_memory_return_to_baseline_after_each_of_20_steps(deterministic, no_gc) -> None:
    """After each of 20 steps (gradients dropped) device memory is back to its baseline, to the byte, no
    host buffer is in use, and the host pool has not grown since the first step.

    A failure means restored tensors, prefetched copies or host buffers outlive the step: memory that
    grows until an out-of-memory error hours into training.
    """
    model, engine, batch, baseline = _warm_model()
    pool_total = engine.pool.total_bytes

    for step in range(20):
        loss = _loss(model, *batch)
        assert engine.pool.in_use_bytes > 0, "nothing offloaded: the test exercised nothing"
        loss.backward()
        del loss
        model.zero_grad(set_to_none=True)
        assert _allocated() == baseline, f"step {step}: {torch.cuda.memory_allocated() - baseline} bytes leaked"
        assert engine.pool.in_use_bytes == 0
        assert engine.pool.total_bytes == pool_total, "the host pool grew"


def test_memory_returns_to_baseline_after_a_forward_that_raised(deterministic, no_gc) -> None:
    """A forward that raises inside a wrapped block gives back the device memory and the host buffers of the
    blocks before it.

    A failure means an aborted step (OOM, a bad batch) leaks what offload did before the error.
    """
    model, engine, batch, baseline = _warm_model()

    def fail(module: nn.Module, args: tuple) -> None:
        raise RuntimeError("injected")

    handle = model.layers[2].mlp.register_forward_pre_hook(fail)
    engine.stats.reset()
    try:  # not pytest.raises: its ExceptionInfo would keep the traceback, and with it the graph, alive
        _loss(model, *batch)
    except RuntimeError as error:
        assert "injected" in str(error)
    else:
        pytest.fail("forward did not raise")
    handle.remove()

    assert engine.stats.copies > 0, "earlier blocks copied nothing: the test exercised nothing"
    assert _allocated() == baseline, f"{torch.cuda.memory_allocated() - baseline} bytes leaked"
    assert engine.pool.in_use_bytes == 0


def test_memory_returns_to_baseline_after_a_dropped_eval_forward_with_grad(deterministic, no_gc) -> None:
    """An eval-mode forward with grad enabled whose output is dropped gives everything back at once.

    A failure means validation loops that forget ``no_grad`` leak memory every batch.
    """
    model, engine, batch, baseline = _warm_model()
    model.eval()
    engine.stats.reset()

    out = model(batch[0])
    assert engine.stats.copies > 0 and engine.pool.in_use_bytes > 0
    del out

    assert _allocated() == baseline, f"{torch.cuda.memory_allocated() - baseline} bytes leaked"
    assert engine.pool.in_use_bytes == 0


# --- (d) parameters stay --------------------------------------------------------------------------------


class SaveAndReport(torch.autograd.Function):
    """Saves every tensor it is given; backward reports the data pointer of what it reads back."""

    @staticmethod
    def forward(ctx, report: list, h: torch.Tensor, *others: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(h, *others)
        ctx.report = report
        return h * 1

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.report.append([t.data_ptr() for t in ctx.saved_tensors])
        return (None, grad) + (None,) * (len(ctx.saved_tensors) - 1)


class OwnAndOutside(nn.Module):
    def __init__(self, report: list) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(256, 256))
        self.frozen = nn.Parameter(torch.randn(256, 256), requires_grad=False)
        self.register_buffer("scale", torch.randn(256, 256))
        self.report = report

    def forward(self, x: torch.Tensor, outside: torch.Tensor) -> torch.Tensor:
        h = x * 2.0  # the one activation
        kept = (self.weight, self.weight[2:], self.frozen, self.frozen.t(), self.scale, self.scale[1], outside)
        return SaveAndReport.apply(self.report, h, *kept)


def test_parameters_buffers_and_their_views_are_never_copied_on_cuda(deterministic) -> None:
    """On CUDA, parameters (own, frozen, a parent's), buffers and their views come back in backward as the
    very same device memory; only the activation goes to the host. In a GPT, the weights every linear
    layer saves are kept and gradients are exact.

    A failure means weights cross PCIe every step and take host memory, for nothing.
    """
    report: list = []
    block = offload_wrapper(OwnAndOutside(report).cuda(), min_bytes=0)
    outside = nn.Parameter(torch.randn(256, 256, device="cuda"), requires_grad=False)
    x = torch.randn(64, 256, device="cuda", requires_grad=True)
    kept = [block.weight, block.weight[2:], block.frozen, block.frozen.t(), block.scale, block.scale[1], outside]

    block(x, outside).sum().backward()

    stats = block.offload_engine.stats
    assert stats.copies == 1 and stats.copied_bytes == 64 * 256 * 4, stats
    assert stats.kept_param == len(kept), stats
    (restored,) = report
    assert restored[1:] == [t.data_ptr() for t in kept], "a parameter or buffer came back as a copy"

    reference = _gpt(MEMORY_CONFIG)
    model = copy.deepcopy(reference)
    engine = _offload_blocks(model, min_bytes=0)
    batch = _batch(MEMORY_CONFIG, 3, 100, torch.Generator().manual_seed(0))
    _loss(model, *batch).backward()
    _loss(reference, *batch).backward()
    # Each block's four linear layers save their weight (a view of it) for the input's gradient.
    assert engine.stats.kept_param >= 4 * MEMORY_CONFIG.n_layer and engine.stats.copies > 0, engine.stats
    _assert_same_grads(model, reference)


# --- (e) pinned buffers ----------------------------------------------------------------------------------


class Exp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 24, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.exp(self.lin(x))


@pytest.mark.parametrize("pin_memory", [True, False], ids=["pinned", "pageable"])
def test_host_buffers_are_pinned_on_cuda(pin_memory) -> None:
    """With a CUDA device the pool pins its buffers (unless ``pin_memory=False``): the very buffer a copy
    used is page-locked, which is what lets the copies run asynchronously on their side stream.

    A failure means every device-to-host copy synchronizes with the host: no overlap with compute.
    """
    block = offload_wrapper(Exp().cuda(), min_bytes=0, pin_memory=pin_memory)
    engine = block.offload_engine
    assert engine.pool.pin is pin_memory
    x = torch.randn(33, 16, dtype=torch.float64, device="cuda", requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()

    block(x).sum().backward()
    Exp.forward(block, x_ref).sum().backward()  # the block's own forward, without offload: the reference
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=0)

    assert engine.stats.copies == 1 and engine.pool.cached_bytes == 8192, (engine.stats, engine.pool.cached_bytes)
    buffer = engine.pool.acquire(33 * 24 * 8)  # the cached buffer the copy went through
    try:
        assert engine.pool.cached_bytes == 0, "expected the cached buffer back, not a new one"
        assert buffer.device.type == "cpu" and buffer.is_pinned() is pin_memory
    finally:
        engine.pool.release(buffer)


# --- (e) races, host synchronization, pinned memory, capture ----------------------------------------------
# Each of these caught a defect of the engine before its rework, or guards the change that fixed it; the
# CPU halves of the same checks are in test_offload_safety.py.

SLEEP_CYCLES = 200_000_000
"""About 0.1 s of GPU time: long enough that any read not ordered after a copy reads before it lands."""


def _scribble() -> None:
    """Fill the allocator's free blocks with NaN, so memory read before it is written cannot hold the old values."""
    free = torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
    if free > 0:
        torch.full((free // 4,), float("nan"), device="cuda")


class TwoStreams(nn.Module):
    """Saves one tensor from two streams: ``sin`` on a side stream, ``cos`` on the current one (a shared expert
    beside the routed ones, say). Backward unpacks it on both."""

    streams: dict[str, torch.cuda.Stream] = {}  # one side stream, made on first use (streams do not deep-copy)

    def __init__(self, width: int = 1024) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        side = self.streams.setdefault("side", torch.cuda.Stream())
        h = self.lin(x)
        main = torch.cuda.current_stream()
        side.wait_stream(main)
        with torch.cuda.stream(side):
            a = h.sin()
        h.record_stream(side)
        b = h.cos()
        main.wait_stream(side)
        a.record_stream(main)
        return a * b


def test_a_storage_unpacked_on_two_streams_is_read_after_its_copy_on_both(deterministic) -> None:
    """The second stream to unpack a restored storage did not wait for its copy back, nor was it recorded with
    the allocator: with the copy delayed, it read NaN."""
    torch.manual_seed(0)
    reference = TwoStreams().cuda()
    block = offload_wrapper(copy.deepcopy(reference), min_bytes=0, prefetch=False)
    x = torch.randn(512, 1024, device="cuda")
    reference(x).sum().backward()
    loss = block(x).sum()
    torch.cuda.synchronize()
    _scribble()
    _, copy_in = block.offload_engine.copy_streams("cuda")
    with torch.cuda.stream(copy_in):
        torch.cuda._sleep(SLEEP_CYCLES)
    loss.backward()
    torch.cuda.synchronize()
    assert block.offload_engine.stats.shared >= 1, block.offload_engine.stats
    _assert_same_grads(block, reference)


def test_copies_out_delayed_still_give_the_reference_gradients(deterministic) -> None:
    """A delay on the copy stream in forward: compute must not reuse a saved tensor's memory before its copy
    has read it (the engine holds it until the compute stream has waited for the copy)."""
    model, reference = _gpt(CONFIG), _gpt(CONFIG)
    engine = _offload_blocks(model, max_in_flight=2)
    tokens, targets = _batch(CONFIG, 4, 64, torch.Generator().manual_seed(0))
    _loss(reference, tokens, targets).backward()
    copy_out, _ = engine.copy_streams("cuda")
    with torch.cuda.stream(copy_out):
        torch.cuda._sleep(SLEEP_CYCLES)
    loss = _loss(model, tokens, targets)
    _scribble()
    loss.backward()
    torch.cuda.synchronize()
    _assert_same_grads(model, reference)


class WritesAfterSaving(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(256, 256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        y = h * h  # saves h
        h.add_(1)  # then writes it, while its copy out may still be reading it
        return y.sum() + h.sum()


def test_in_place_write_after_saving_raises_on_cuda_as_without_offload() -> None:
    """Offload's hooks bypass autograd's version check; the copy out then raced the write. Both now raise."""
    reference = WritesAfterSaving().cuda()
    x = torch.randn(256, 256, device="cuda")
    for block in (reference, offload_wrapper(copy.deepcopy(reference))):
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            block(x).backward()


def test_forward_makes_no_host_synchronization() -> None:
    """Past ``max_in_flight`` copies, forward used to wait on the host (``Event.synchronize``), and reusing a
    pooled buffer waited for its last copy; both now wait on the device only."""
    from torch.profiler import ProfilerActivity, profile

    model = _gpt(MEMORY_CONFIG)
    engine = _offload_blocks(model, max_in_flight=2)
    tokens, targets = _batch(MEMORY_CONFIG, 4, 256, torch.Generator().manual_seed(0))
    for _ in range(2):  # warm: pool, streams, kernels
        _loss(model, tokens, targets).backward()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        loss = _loss(model, tokens, targets)
    syncs = [e.name for e in prof.events() if "Synchronize" in e.name]
    loss.backward()
    assert engine.stats.copies > 2 * engine.options.max_in_flight, engine.stats
    assert syncs == [], syncs


def test_pinned_memory_does_not_grow_over_30_sequence_lengths() -> None:
    """What PyTorch's pinned allocator really holds (``host_memory_stats``, rounded to powers of two, its cache
    included) stays within 1.5 times what one step at the longest length pins. Before, every new length pinned
    more, and evicted buffers stayed in the allocator's cache."""
    def pinned() -> int:
        torch.cuda.synchronize()
        return torch.cuda.host_memory_stats()["allocated_bytes.current"]

    lengths = list(range(32, 32 + 30 * 7, 7))  # within the model's 256 positions
    random.Random(0).shuffle(lengths)
    torch._C._host_emptyCache()
    start = pinned()
    model = _gpt(MEMORY_CONFIG)
    engine = _offload_blocks(model)
    tokens, targets = _batch(MEMORY_CONFIG, 4, max(lengths), torch.Generator().manual_seed(0))
    _loss(model, tokens, targets).backward()
    single = pinned() - start
    engine.clear_cache()
    del model, engine
    gc.collect()
    torch._C._host_emptyCache()
    start = pinned()
    model = _gpt(MEMORY_CONFIG)
    engine = _offload_blocks(model)
    generator = torch.Generator().manual_seed(1)
    for length in lengths:
        tokens, targets = _batch(MEMORY_CONFIG, 4, length, generator)
        _loss(model, tokens, targets).backward()
    grown = pinned() - start
    assert single > 0 and grown <= 1.5 * single, (grown, single)
    assert engine.pool.total_bytes <= grown, (engine.pool.total_bytes, grown)


def test_offloaded_step_reserves_less_device_memory_than_the_reference() -> None:
    """``max_memory_reserved`` sees what ``memory_allocated`` cannot: memory freed late (a copy's event not
    yet polled) is still reserved. The offloaded step's peak must stay below the reference's."""
    tokens, targets = _batch(MEMORY_CONFIG, 4, 256, torch.Generator().manual_seed(0))

    def peak_reserved(offload: bool) -> int:
        model = _gpt(MEMORY_CONFIG)
        if offload:
            _offload_blocks(model)
        _loss(model, tokens, targets).backward()  # warm
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        _loss(model, tokens, targets).backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_reserved()

    reference, offloaded = peak_reserved(False), peak_reserved(True)
    assert offloaded < reference, (offloaded, reference)


def test_cuda_graph_capture_is_refused_with_the_fix() -> None:
    """Copies to host memory on side streams cannot be captured; the engine says so instead of failing inside
    the capture."""
    block = offload_wrapper(nn.Linear(512, 512).cuda(), min_bytes=0)
    x = torch.randn(256, 512, device="cuda", requires_grad=True)
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), pytest.raises(RuntimeError, match="CUDA graph capture"):
        with torch.cuda.graph(graph):
            block(x).tanh()


def test_retain_graph_frees_restored_device_copies_after_their_backward() -> None:
    """With ``retain_graph=True`` every restored copy used to stay on the device as long as the graph."""
    from test_offload_safety import SavesThroughFunction, SeeRestored  # the CPU test's block, on the GPU

    block = offload_wrapper(SavesThroughFunction().cuda(), min_bytes=0)
    x = torch.randn(512, 256, device="cuda")
    SeeRestored.seen.clear()
    loss = block(x).sum()
    loss.backward(retain_graph=True)
    torch.cuda.synchronize()
    gc.collect()
    assert SeeRestored.seen and all(ref.expired() for ref in SeeRestored.seen)
    loss.backward()
