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

from ckpt_wrapper.planner.distribute import plan_on_rank_0
from ckpt_wrapper.planner.options import PlanOptions
from ckpt_wrapper.planner.plans import Plan, PlanEntry
from ckpt_wrapper.planner.profile import (capture_inputs, find_blocks, input_bytes, measure_model, model_kept, profile_block,
                                          signature)
from ckpt_wrapper.planner.solve import Option, choose
from ckpt_wrapper.planner.strategy import Strategy, as_strategies
from ckpt_wrapper.selection import BlockSelector

__all__ = ["plan", "plan_locally"]


def plan(
    model: nn.Module,
    example_batch: Any,
    *,
    memory_budget: float | int | str,
    check_fn: BlockSelector | Callable[[nn.Module], bool] | None = None,
    strategies: Sequence[Strategy | str] | None = None,
    measure: Literal["held", "saved"] = "held",
    cost: Literal["auto", "flops", "time"] = "auto",
    repeats: int = 5,
) -> Plan:
    """Choose per block the strategy that meets ``memory_budget`` at the least predicted step time.

    Call it on every rank under torch.distributed: rank 0 profiles and plans, the plan is broadcast.
    ``model`` is not modified (blocks are profiled on copies); apply the result with ``plan.apply(model)``.
    The keywords are those of ``PlanOptions``.

    Args:
        model: the unwrapped model, on the device it trains on.
        example_batch: what the model is called with: a tensor, a tuple (positional) or a dict (keywords).
        memory_budget: a fraction of the unwrapped activation memory (a float in (0, 1], or ``"50%"``),
            or bytes (an int, or a text such as ``"6GiB"``); see ``ckpt_wrapper.budget``.
        check_fn: which modules are blocks (a selector or ``module -> bool``); default: the children of
            the model's largest ``ModuleList``.
        strategies: restrict the candidates, as ``Strategy`` values or their text forms (default
            ``block_strategies(block)``); ``none`` is always a candidate.
        measure: ``held`` (allocator bytes held after forward: counts everything, with allocator noise)
            or ``saved`` (bytes of the storages forward created that are still alive after it: exact and
            deterministic, CPU or CUDA).
        cost: what a strategy costs: ``flops`` (extra FLOPs: deterministic, but blind to Python dispatch
            and elementwise recompute), ``time`` (measured extra seconds, least of ``repeats``), or
            ``auto``: time on CUDA; on CPU extra FLOPs plus any measured time beyond what those FLOPs
            explain (selective checkpointing's per-op dispatch, hooks), in FLOP-equivalents.
        repeats: timing rounds: strategies are timed interleaved, round by round, and the median kept.

    Returns:
        The ``Plan``; ``print(plan)`` shows the table.

    Raises:
        ValueError: if no choice of strategies fits the budget (the message says the least memory
            reachable), for a budget out of range, or for an unknown option or strategy.
        TypeError: for a ``check_fn`` or ``strategies`` of the wrong type.

    Example:
        >>> import torch
        >>> import ckpt_wrapper
        >>> from ckpt_wrapper.testing.models import GPT, GPTConfig
        >>> model = GPT(GPTConfig(n_layer=2, d_model=32, n_head=4, seq_len=16, vocab_size=64))
        >>> p = ckpt_wrapper.plan(model, torch.randint(0, 64, (2, 16)), memory_budget=0.3, measure="saved", cost="flops")
        >>> p.predicted_bytes <= p.budget_bytes, len(p.entries)
        (True, 2)
        >>> p.entries[0].strategy.main in ("none", "regions", "sac", "full")
        True
    """
    options = PlanOptions(memory_budget=memory_budget, check_fn=check_fn,
                          strategies=None if strategies is None else as_strategies(strategies),
                          measure=measure, cost=cost, repeats=repeats)
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
    blocks = find_blocks(model, options.check_fn)
    inputs = capture_inputs(model, batch, blocks)
    baseline = measure_model(model, batch, device, options)
    cost_unit: Literal["flops", "seconds"] = "seconds" if options.cost_model(device) == "time" else "flops"

    profiles: dict[str, dict[Strategy, tuple[int, float]]] = {}
    per_block: list[list[Option]] = []
    for name, block in blocks:
        args, kwargs = inputs[name]
        key = signature(block, (args, kwargs))
        if key not in profiles:
            profiles[key] = profile_block(block, args, kwargs, options=options, device=device,
                                          seconds_per_flop=baseline.seconds_per_flop)
        table = profiles[key]
        base = table[Strategy()][0]
        moved = input_bytes((args, kwargs))
        per_block.append([Option(strategy, held, extra, base - held + (moved if strategy.offloads else 0))
                          for strategy, (held, extra) in table.items()])

    unwrapped = baseline.unwrapped_bytes
    budget = options.budget_bytes(unwrapped)
    chosen = choose(per_block, unwrapped, budget)
    entries = [PlanEntry(name, option.strategy, option.held, option.cost) for (name, _), option in zip(blocks, chosen)]
    predicted_bytes = unwrapped - sum(option.saving for option in chosen)
    extra = sum(e.cost for e in entries)
    seconds_per_cost = 1.0 if cost_unit == "seconds" else baseline.seconds_per_flop
    return Plan(entries=entries, budget_bytes=budget, unwrapped_bytes=unwrapped, predicted_bytes=predicted_bytes,
                step_seconds=baseline.step_seconds, predicted_seconds=baseline.step_seconds + extra * seconds_per_cost,
                cost_unit=cost_unit,
                profile={key: {str(s): row for s, row in table.items()} for key, table in profiles.items()})
