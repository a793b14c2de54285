"""``plan``: profile the blocks, choose a strategy each, and agree on the result across ranks.

Example:
    >>> import torch
    >>> from ckpt_wrapper.planner import PlanOptions
    >>> from ckpt_wrapper.planner.planning import plan_locally
    >>> from ckpt_wrapper.testing.models import GPT, GPTConfig
    >>> model = GPT(GPTConfig(n_layer=2, d_model=32, n_head=4, seq_len=8, vocab_size=32))
    >>> options = PlanOptions(memory_budget=0.5, measure="saved", cost="flops", repeats=1)
    >>> p = plan_locally(model, torch.randint(0, 32, (2, 8)), options)
    >>> p.predicted_bytes <= p.budget_bytes
    True
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import nn

from ckpt_wrapper.planner.communication import Communication
from ckpt_wrapper.planner.cost import Calibration
from ckpt_wrapper.planner.distribute import plan_on_rank_0
from ckpt_wrapper.planner.memory import StaticMemory, default_world_size
from ckpt_wrapper.planner.options import PlanOptions
from ckpt_wrapper.planner.peak import BlockFigures, PeakModel
from ckpt_wrapper.planner.plans import Plan, PlanEntry
from ckpt_wrapper.planner.profile import (BlockProfile, capture_inputs, find_blocks, input_bytes, measure_model, model_kept,
                                          profile_block, signature)
from ckpt_wrapper.planner.solve import Option, choose, choose_within_limit, least_peak
from ckpt_wrapper.planner.strategy import Strategy, as_strategies
from ckpt_wrapper.selection import BlockSelector

__all__ = ["plan", "plan_locally"]


def plan(
    model: nn.Module,
    example_batch: Any,
    *,
    memory_budget: float | int | str | None = None,
    memory_limit: int | str | None = None,
    optimizer: Any = None,
    sharding: str = "none",
    world_size: int | None = None,
    check_fn: BlockSelector | Callable[[nn.Module], bool] | None = None,
    strategies: Sequence[Strategy | str] | None = None,
    measure: Literal["held", "saved"] = "saved",
    cost: Literal["model", "auto", "flops", "time"] = "model",
    calibration: Calibration | None = None,
    repeats: int = 5,
) -> Plan:
    """Choose per block the strategy that meets the memory bound at the least predicted step time.

    Call it on every rank under torch.distributed: rank 0 profiles and plans, the plan is broadcast.
    ``model`` is not modified (blocks are profiled on copies); apply the result with ``plan.apply(model)``.
    The keywords are those of ``PlanOptions``. With the defaults the plan is deterministic: the same
    model, batch and options give byte-identical JSON.

    Args:
        model: the unwrapped, unsharded model, on the device it trains on.
        example_batch: what the model is called with: a tensor, a tuple (positional) or a dict (keywords).
        memory_budget: activation memory after forward: a fraction of the unwrapped model's (a float in
            (0, 1], or ``"50%"``), or bytes (an int, or a text such as ``"6GiB"``); see ``ckpt_wrapper.budget``.
        memory_limit: the predicted peak of a whole training step per rank, in bytes (``"20GiB"``):
            parameters, gradients, optimizer state, sharding buffers, activations, recompute. Give this,
            ``memory_budget``, or both.
        optimizer: the optimizer the step uses, for its state: an instance, its class (``torch.optim.AdamW``)
            or a callable ``params -> Optimizer``. None: no optimizer state counted.
        sharding: how the model is made data-parallel after planning: ``none``, ``ddp``, ``fsdp1`` or
            ``fsdp2`` (each block its own FSDP unit, the rest the root's).
        world_size: the ranks it is sharded over; default the process group's size (1 without one).
        check_fn: which modules are blocks (a selector or ``module -> bool``); default: the children of
            the model's largest ``ModuleList``.
        strategies: restrict the candidates, as ``Strategy`` values or their text forms (default
            ``block_strategies(block)``); ``none`` is always a candidate.
        measure: ``saved`` (bytes of the storages forward made that are still alive after it: exact and
            deterministic, CPU or CUDA) or ``held`` (allocator bytes held after forward, with its noise).
        cost: what a strategy costs: ``model`` (seconds modelled from its FLOPs, bytes moved and ops run,
            with ``calibration``: deterministic), ``flops`` (extra FLOPs), ``time`` (measured extra seconds,
            median of ``repeats``), or ``auto``: time on CUDA; on CPU extra FLOPs plus measured time beyond.
        calibration: the cost model's constants (``Calibration.measure(device)``, once per machine);
            default ``Calibration.default(device)``. Stored in the plan.
        repeats: timing rounds (``time``, ``auto``): strategies are timed interleaved and the median kept.

    Returns:
        The ``Plan``; ``print(plan)`` shows the table, the activation memory and the step's peak.

    Raises:
        ValueError: if no choice of strategies fits (the message says the least memory or peak reachable
            and what would lower it), for a bound out of range, or an unknown option or strategy.
        TypeError: for a ``check_fn``, ``strategies``, ``optimizer`` or ``calibration`` of the wrong type.

    Example:
        >>> import torch
        >>> import ckpt_wrapper
        >>> from ckpt_wrapper.testing.models import GPT, GPTConfig
        >>> model = GPT(GPTConfig(n_layer=2, d_model=32, n_head=4, seq_len=16, vocab_size=64))
        >>> p = ckpt_wrapper.plan(model, torch.randint(0, 64, (2, 16)), memory_budget=0.3)
        >>> p.predicted_bytes <= p.budget_bytes, len(p.entries)
        (True, 2)
        >>> p.entries[0].strategy.main in ("none", "regions", "sac", "full")
        True
    """
    options = PlanOptions(memory_budget=memory_budget, memory_limit=memory_limit, optimizer=optimizer,
                          sharding=sharding, world_size=world_size, check_fn=check_fn,
                          strategies=None if strategies is None else as_strategies(strategies),
                          measure=measure, cost=cost, calibration=calibration, repeats=repeats)
    return plan_on_rank_0(lambda: plan_locally(model, example_batch, options))


def plan_locally(model: nn.Module, batch: Any, options: PlanOptions) -> Plan:
    """Plan on this process alone: profile each distinct block, then choose (see ``plan``).

    The model is left as it was: buffers its forward updates, train/eval modes, RNG states and
    gradients are put back.
    """
    with model_kept(model):
        return _plan_kept(model, batch, options)


def _plan_kept(model: nn.Module, batch: Any, options: PlanOptions) -> Plan:
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    calibration = options.calibration or Calibration.default(device)
    blocks = find_blocks(model, options.check_fn)
    inputs = capture_inputs(model, batch, blocks)
    baseline = measure_model(model, batch, device, options, blocks, calibration)
    cost_model = options.cost_model(device)
    cost_unit: Literal["flops", "seconds"] = "seconds" if cost_model in ("time", "model") else "flops"

    profiles: dict[str, dict[Strategy, BlockProfile]] = {}
    per_block: list[list[Option]] = []
    for name, block in blocks:
        args, kwargs = inputs[name]
        key = signature(block, (args, kwargs))
        if key not in profiles:
            profiles[key] = profile_block(block, args, kwargs, options=options, device=device,
                                          seconds_per_flop=baseline.seconds_per_flop, calibration=calibration)
        table = profiles[key]
        base = table[Strategy()].held
        moved = input_bytes((args, kwargs))
        rows = []
        for strategy, row in table.items():
            saving = base - row.held + (moved if strategy.offloads else 0)
            figures = BlockFigures(held=row.held, saving=saving, peak_forward=row.step.peak_forward,
                                   peak_backward=row.step.peak_backward, end_backward=row.step.end_backward)
            rows.append(Option(strategy, row.held, row.cost, saving, figures))
        per_block.append(rows)

    unwrapped = baseline.unwrapped_bytes
    budget = options.budget_bytes(unwrapped)
    limit = options.limit_bytes()
    world = options.world_size or default_world_size()
    static = StaticMemory.of(model, blocks, optimizer=options.optimizer, sharding=options.sharding, world_size=world,
                             device=device)
    try:
        peaks: PeakModel | None = PeakModel(baseline.step, [name for name, _ in blocks],
                                            [rows[0].figures for rows in per_block], static,
                                            prefetch_forward=device.type == "cuda")
    except ValueError:
        if limit is not None:
            raise
        peaks = None  # a block the step does not run in order: the activation budget alone is planned
    if limit is None or peaks is None:
        chosen = choose(per_block, unwrapped, budget)  # type: ignore[arg-type]
    else:
        chosen = choose_within_limit(per_block, unwrapped, budget, limit, peaks) or _refuse(
            per_block, unwrapped, budget, limit, peaks, options, world)
    communication = Communication.of(static, model)
    comm_seconds = calibration.communication_seconds(communication)
    report = None if peaks is None else peaks.evaluate([option.figures for option in chosen])  # type: ignore[misc]
    entries = [PlanEntry(name, option.strategy, option.held, option.cost,
                         None if peaks is None else option.figures.peak_backward)  # type: ignore[union-attr]
               for (name, _), option in zip(blocks, chosen)]
    predicted_bytes = unwrapped - sum(option.saving for option in chosen)
    extra = sum(e.cost for e in entries)
    seconds_per_cost = 1.0 if cost_unit == "seconds" else baseline.seconds_per_flop
    peak = None if report is None else {**report.to_dict(), "sharding": options.sharding, "world_size": world,
                                        "optimizer": _optimizer_name(options.optimizer)}
    step_seconds = baseline.step_seconds + comm_seconds
    return Plan(entries=entries, budget_bytes=budget, unwrapped_bytes=unwrapped, predicted_bytes=predicted_bytes,
                step_seconds=step_seconds, predicted_seconds=step_seconds + extra * seconds_per_cost,
                cost_unit=cost_unit,
                profile={key: {str(s): (row.held, row.cost) for s, row in table.items()} for key, table in profiles.items()},
                limit_bytes=limit, peak=peak, calibration=calibration.to_dict() if cost_model == "model" else None,
                communication=None if communication.world_size == 1 else
                {"seconds": comm_seconds, "sharding": options.sharding, **communication.to_dict()})


def _optimizer_name(optimizer: Any) -> str | None:
    if optimizer is None:
        return None
    if isinstance(optimizer, torch.optim.Optimizer):
        return type(optimizer).__name__
    return getattr(optimizer, "__name__", type(optimizer).__name__)


def _size(nbytes: float) -> str:
    return f"{nbytes / 2**30:.3f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.2f} MiB"


def _refuse(per_block: list[list[Option]], unwrapped: int, budget: int | None, limit: int, peaks: PeakModel,
            options: PlanOptions, world: int) -> list[Option]:
    """Raise the ``ValueError`` for a limit no plan reaches: the least peak, what it is made of, what lowers it."""
    least = peaks.evaluate([o.figures for o in least_peak(per_block, unwrapped, peaks)])  # type: ignore[misc]
    parts = ", ".join(f"{name} {_size(value)}" for name, value in least.components.items())
    if options.sharding in ("fsdp1", "fsdp2"):
        lowers = [f"more ranks (FSDP divides parameters, gradients and optimizer state by the world size, {world} now)"]
    else:
        lowers = ["sharding with FSDP over more ranks (sharding='fsdp2', world_size=N divides parameters, "
                  "gradients and optimizer state by N)"]
    if least.at == "optimizer step":  # activations are gone by then: only the static parts matter
        lowers.append("activations do not set this peak, so offload or a smaller batch would not lower it")
    else:
        lowers += ["offloading activations (strategies 'offload' or 'full+offload', on an accelerator)",
                   "a smaller batch (activations scale with it)"]
    if options.optimizer is not None:
        lowers.append("an optimizer with less state (SGD with momentum keeps 1 per parameter, AdamW 2)")
    raise ValueError(
        f"no plan fits memory_limit={_size(limit)} per rank: the least peak reachable is {_size(least.peak_bytes)}, "
        f"at {least.at} ({parts}). What would lower it: " + "; ".join(lowers)
        + (f". The activation budget of {_size(budget)} applies as well" if budget is not None else "")
    )
