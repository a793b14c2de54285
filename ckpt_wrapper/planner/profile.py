"""Profiling for the planner: find the blocks, capture their inputs, measure the model and each block.

Each distinct block (same class, input shapes and parameter shapes) is profiled once, on deep copies,
under every candidate strategy: activation bytes held after forward, and the extra cost over ``none``
(FLOPs, seconds, or FLOPs plus the time FLOPs do not explain, as ``PlanOptions.cost_model`` says).

Example:
    >>> import torch
    >>> from ckpt_wrapper.planner import PlanOptions
    >>> from ckpt_wrapper.planner.profile import capture_inputs, find_blocks, profile_block
    >>> from ckpt_wrapper.testing.models import GPT, GPTConfig
    >>> model = GPT(GPTConfig(n_layer=2, d_model=32, n_head=4, seq_len=8, vocab_size=32))
    >>> tokens = torch.randint(0, 32, (2, 8))
    >>> options = PlanOptions(memory_budget=0.5, strategies=["none", "full"], measure="saved", cost="flops")
    >>> blocks = find_blocks(model, None)
    >>> [name for name, _ in blocks]
    ['layers.0', 'layers.1']
    >>> args, kwargs = capture_inputs(model, tokens, blocks)["layers.0"]
    >>> table = profile_block(blocks[0][1], args, kwargs, options=options, device=torch.device("cpu"),
    ...                       seconds_per_flop=1e-9)
    >>> [str(s) for s in table], table[options.strategies[1]].held < table[options.strategies[0]].held
    (['none', 'full'], True)
"""

from __future__ import annotations

import contextlib

import copy
import dataclasses
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ckpt_wrapper.log import get_logger
from ckpt_wrapper.measure import held_after_forward, live_bytes_after_forward
from ckpt_wrapper.planner.cost import Calibration
from ckpt_wrapper.planner.options import PlanOptions
from ckpt_wrapper.planner.trace import BlockStep, ModelStep, block_step, model_step
from ckpt_wrapper.planner.strategy import Strategy, apply_strategy, block_strategies
from ckpt_wrapper.selection import BlockSelector

__all__ = ["BlockProfile", "ModelBaseline", "model_kept", "capture_inputs", "find_blocks", "input_bytes", "measure_model",
           "profile_block", "signature"]

logger = get_logger(__name__)

BlockInputs = tuple[tuple[Any, ...], dict[str, Any]]
"""A block's captured call: (positional arguments, keyword arguments)."""



@contextlib.contextmanager
def model_kept(model: nn.Module) -> Iterator[None]:
    """Profiling runs the model: put back every buffer it updates, its train/eval modes and the RNGs.

    Buffers come back as the same objects with the same values (BatchNorm statistics,
    ``num_batches_tracked``, EMAs), so ``plan`` leaves the model as it found it.
    """
    owners = [(module, name, buffer, buffer.detach().clone()) for module in model.modules()
              for name, buffer in module._buffers.items() if buffer is not None]
    modes = [(module, module.training) for module in model.modules()]
    cpu_rng = torch.random.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        with torch.no_grad():
            for module, name, buffer, value in owners:
                module._buffers[name] = buffer
                buffer.copy_(value)
        for module, training in modes:
            module.training = training
        torch.random.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)

@contextlib.contextmanager
def grads_kept(model: nn.Module) -> Iterator[list[nn.Parameter]]:
    """Run with every parameter's ``.grad`` None (backward accumulates into an existing one in place), and
    put the gradients the model had back afterwards; yields the parameters."""
    grads = {p: p.grad for p in model.parameters()}
    for p in grads:
        p.grad = None
    try:
        yield list(grads)
    finally:
        for p, g in grads.items():
            p.grad = g


def call_model(model: nn.Module, batch: Any) -> Any:
    """Call ``model`` with ``batch``: a dict as keywords, a tuple or list as positional arguments, else alone."""
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def scalar_of(output: Any) -> torch.Tensor:
    """The sum of every floating-point tensor in ``output``: something to call backward on."""
    leaves = [t for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return sum(t.float().sum() for t in leaves)  # type: ignore[return-value]


class _Predicate(BlockSelector):
    """A plain ``module -> bool`` check_fn as a selector, so selection is the same either way."""

    def __init__(self, check_fn: Callable[[nn.Module], bool]) -> None:
        self.check_fn = check_fn

    def matches(self, name: str, module: nn.Module) -> bool:
        return bool(self.check_fn(module))


def find_blocks(model: nn.Module, check_fn: BlockSelector | Callable[[nn.Module], bool] | None) -> list[tuple[str, nn.Module]]:
    """The (fully qualified name, module) pairs to plan: ``check_fn``'s picks, or the default blocks.

    The default is the children of the model's largest ``ModuleList`` or ``Sequential`` (by parameters).

    Raises:
        ValueError: if there are no blocks.
    """
    if check_fn is None:
        lists = [(name, m) for name, m in model.named_modules()
                 if isinstance(m, (nn.ModuleList, nn.Sequential)) and len(m) > 1]
        if not lists:
            raise ValueError(f"plan could not find the blocks of {type(model).__name__} (no ModuleList of blocks); "
                             "pass check_fn=, e.g. ckpt_wrapper.by_class_name('<block class>')")
        name, container = max(lists, key=lambda item: sum(p.numel() for p in item[1].parameters()))
        return [(f"{name}.{i}" if name else str(i), m) for i, m in enumerate(container)]
    selector = check_fn if isinstance(check_fn, BlockSelector) else _Predicate(check_fn)
    blocks = selector.select(model)
    if not blocks:
        raise ValueError("plan: check_fn selected no block; expected at least one. Pass a check_fn that matches "
                         "the model's blocks, or none for the default")
    return blocks


def capture_inputs(model: nn.Module, batch: Any, blocks: list[tuple[str, nn.Module]]) -> dict[str, BlockInputs]:
    """Each block's inputs on the first call, as copies: tensors require grad as they did in the model.

    Raises:
        ValueError: if a block is called with a KV cache (recomputing it would update the cache twice).
    """
    inputs: dict[str, BlockInputs] = {}
    needs_grad: dict[str, list[bool]] = {}

    def flags(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            needs_grad.setdefault(name, [isinstance(t, torch.Tensor) and t.requires_grad
                                         for t in pytree.tree_leaves((args, kwargs))])
        return hook

    def capture(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if name in inputs:
                return
            leaves, spec = pytree.tree_flatten((args, kwargs))
            caches = [type(x).__name__ for x in leaves if type(x).__name__.endswith("Cache")]
            if caches:
                raise ValueError(f"block {name} is called with a {caches[0]}: a recomputed block would update it "
                                 "twice. Plan (and train) with use_cache=False in the batch.")
            # Inputs require grad as they do in the model (rotary cos/sin do not: making them require grad
            # inflates what the unwrapped block saves); other state is snapshotted as the block saw it.
            leaves = [t.detach().clone().requires_grad_(g) if isinstance(t, torch.Tensor) else copy.deepcopy(t)
                      for t, g in zip(leaves, needs_grad[name])]
            inputs[name] = pytree.tree_unflatten(leaves, spec)
        return hook

    # Which inputs require grad is only known with grad on; the copies are taken with it off.
    for make_hook, grad_mode in ((flags, torch.enable_grad), (capture, torch.no_grad)):
        handles = [m.register_forward_pre_hook(make_hook(n), with_kwargs=True) for n, m in blocks]
        try:
            with grad_mode():
                call_model(model, batch)
        finally:
            for h in handles:
                h.remove()
    return inputs


def wall_seconds(fn: Callable[[], Any], device: torch.device, repeats: int,
                 before: Callable[[], Any] | None = None) -> list[float]:
    """The wall time of each of ``repeats`` calls of ``fn`` (synchronized on CUDA); ``before``, if given,
    runs untimed ahead of each call (a barrier, so every rank starts a collective together)."""
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def least_seconds(fn: Callable[[], Any], device: torch.device, repeats: int,
                  before: Callable[[], Any] | None = None) -> float:
    """The least wall time of ``repeats`` calls of ``fn`` (synchronized on CUDA; ``before`` as ``wall_seconds``)."""
    return min(wall_seconds(fn, device, repeats, before))  # noise on a shared machine only ever adds


def held_bytes(forward: Callable[[], Any], device: torch.device, options: PlanOptions, exclude: list[torch.Tensor]) -> int:
    """Activation bytes ``forward`` leaves alive, by ``options.measure``."""
    if options.measure == "saved":  # deterministic: storages made by forward and still alive after it
        return live_bytes_after_forward(forward, exclude=exclude)
    return held_after_forward(forward, device=device)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelBaseline:
    """The unwrapped model, measured: the base of budgets and of predicted step time."""

    unwrapped_bytes: int
    """Activation bytes the unwrapped model holds after forward."""
    step_flops: int
    """FLOPs of one forward and backward."""
    step_seconds: float
    """Time of one forward and backward: modelled (``cost="model"``) or the least measured."""
    step: ModelStep
    """The recorded step: timeline, block marks and counts."""

    @property
    def seconds_per_flop(self) -> float:
        """Step time per FLOP: converts FLOP costs to seconds."""
        return self.step_seconds / max(self.step_flops, 1)


def measure_model(model: nn.Module, batch: Any, device: torch.device, options: PlanOptions,
                  blocks: list[tuple[str, nn.Module]], calibration: Calibration) -> ModelBaseline:
    """Measure the unwrapped model; gradients already in ``.grad`` are put back afterwards."""
    with grads_kept(model) as params:
        torch.manual_seed(0)
        recorded = model_step(model, lambda: call_model(model, batch), blocks, device=device, loss=scalar_of)
        for p in params:
            p.grad = None
        if options.measure == "held":
            unwrapped = held_bytes(lambda: call_model(model, batch), device, options, params)
        else:
            unwrapped = recorded.held
        if options.cost_model(device) == "model":
            seconds = calibration.seconds(recorded.counts)
        else:
            step = lambda: scalar_of(call_model(model, batch)).backward()
            seconds = least_seconds(step, device, options.repeats)
    return ModelBaseline(unwrapped_bytes=unwrapped, step_flops=recorded.counts.flops, step_seconds=seconds,
                         step=recorded)


def signature(block: nn.Module, inputs: BlockInputs) -> str:
    """What makes two blocks profile alike: class, input shapes and parameter shapes."""
    shapes = [tuple(t.shape) for t in pytree.tree_leaves(inputs) if isinstance(t, torch.Tensor)]
    params = [tuple(p.shape) for p in block.parameters()]
    return f"{type(block).__qualname__}{shapes}{hash(tuple(params)) & 0xffffff:x}"


def input_bytes(inputs: BlockInputs) -> int:
    """Bytes of the floating-point tensors among a block's inputs (what offload also moves to the host)."""
    return sum(t.numel() * t.element_size() for t in pytree.tree_leaves(inputs)
               if isinstance(t, torch.Tensor) and t.is_floating_point())


@dataclasses.dataclass(frozen=True)
class BlockProfile:
    """One block under one strategy, profiled."""

    held: int
    """Activation bytes held after forward, by ``PlanOptions.measure``."""
    cost: float
    """Extra cost over ``none``, in the unit of ``PlanOptions.cost_model``."""
    step: BlockStep
    """The recorded step: working sets in forward and backward, counts."""


def _trial(trial: nn.Module, fresh: Callable[[], tuple[tuple, dict]], reference: list[torch.Tensor | None] | None,
           device: torch.device) -> tuple[BlockStep | None, list[torch.Tensor | None] | Exception | None]:
    """Run one recorded step of a strategy's trial: (the step, its gradients or the problem, or None if safe).

    The gradients come back when there is no reference yet (the ``none`` trial). The RNG is seeded alike
    for every trial, so dropout draws the same masks; on CPU the comparison is exact, as checkpointing
    promises.
    """
    torch.manual_seed(0)
    try:
        step = block_step(trial, fresh, device=device)
    except Exception as error:  # the strategy cannot run this block (an in-place module under SAC, say)
        return None, error
    grads = [None if p.grad is None else p.grad.detach().clone() for p in trial.parameters()]
    for p in trial.parameters():
        p.grad = None
    if reference is None:
        return step, grads
    if device.type == "cpu" and any(
        (a is None) != (b is None) or (a is not None and not torch.equal(a, b)) for a, b in zip(grads, reference)
    ):
        return step, ValueError("its gradients differ from the unwrapped block's")
    return step, None


def profile_block(block: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], *, options: PlanOptions,
                  device: torch.device, seconds_per_flop: float,
                  calibration: Calibration | None = None) -> dict[Strategy, BlockProfile]:
    """Per candidate strategy (``none`` first): bytes held after forward, extra cost over ``none``, the step.

    ``block`` is not modified: each strategy is applied to a deep copy.
    """
    names = options.candidates(block_strategies(block, device=device))
    cost = options.cost_model(device)
    calibration = calibration or Calibration.default(device)
    fresh = lambda: pytree.tree_map(lambda x: x if isinstance(x, torch.Tensor) else copy.deepcopy(x), (args, kwargs))
    measured: dict[Strategy, tuple[int, BlockStep, float]] = {}
    steps: dict[Strategy, Callable[[], Any]] = {}
    reference: list[torch.Tensor | None] | None = None
    for strategy in names:
        trial = copy.deepcopy(block)
        apply_strategy(trial, strategy)
        forward = lambda trial=trial: (lambda a, k: trial(*a, **k))(*fresh())
        recorded, problem = _trial(trial, fresh, reference, device)
        if isinstance(problem, list):
            reference = problem  # `none`: the gradients every other strategy must give
        elif problem is not None:
            if strategy == Strategy():
                raise problem
            logger.info("planner: strategy %s is not proposed for %s: %s", strategy, type(block).__name__, problem)
            continue
        assert recorded is not None
        if strategy.main == "sac":  # every forward op, and every recomputed one, passes the policy's mode
            extra_ops = recorded.counts.ops - measured[Strategy()][1].counts.ops
            recorded = dataclasses.replace(recorded, counts=recorded.counts._replace(
                mode_ops=recorded.forward_ops + max(extra_ops, 0)))
        steps[strategy] = lambda forward=forward: scalar_of(forward()).backward()
        held = recorded.held if options.measure == "saved" else held_after_forward(forward, device=device)
        measured[strategy] = (held, recorded, 0.0)
    if cost in ("time", "flops+overhead"):
        # Interleaved rounds, median per strategy: drift and background load hit every strategy alike,
        # where timing one strategy after another attributes them to whichever ran at the wrong moment.
        samples: dict[Strategy, list[float]] = {name: [] for name in steps}
        for _ in range(options.repeats):
            for name in steps:
                samples[name].append(least_seconds(steps[name], device, 1))
        measured = {name: (held, rec, statistics.median(samples[name])) for name, (held, rec, _) in measured.items()}
    _, base, base_seconds = measured[Strategy()]
    table: dict[Strategy, BlockProfile] = {}
    for strategy, (held, recorded, seconds) in measured.items():
        extra_flops = float(max(recorded.counts.flops - base.counts.flops, 0))
        extra_seconds = max(seconds - base_seconds, 0.0)
        if cost == "model":
            value = max(calibration.seconds(recorded.counts) - calibration.seconds(base.counts), 0.0)
            value = round(value, 9)
        elif cost == "time":
            value = extra_seconds
        elif cost == "flops":
            value = extra_flops
        else:  # FLOPs, plus the time those FLOPs do not explain, in FLOP-equivalents
            unexplained = max(extra_seconds - extra_flops * seconds_per_flop, 0.0)
            value = extra_flops + unexplained / max(seconds_per_flop, 1e-30)
        table[strategy] = BlockProfile(held, value, recorded)
    return table
