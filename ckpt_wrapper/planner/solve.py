"""The planner's choice: one option per block, least total cost, total saving enough for the budget.

A knapsack solved by dynamic programming over memory discretised into ``unwrapped / GRID`` units;
savings are rounded down, so rounding never pushes a plan over its budget. Among equal costs the
larger saving wins, so a smaller budget never predicts more memory. With a peak limit
(``choose_within_limit``) the same walk over the blocks also checks, at each block, the predicted peak
of every instant whose alive blocks are known by then (``peak.PeakModel``): the state, the savings of
the blocks before, is all those instants depend on, so the walk stays exact; ``least_peak`` is the same
walk minimising the peak instead of the cost.

Example:
    >>> from ckpt_wrapper.planner import Strategy
    >>> from ckpt_wrapper.planner.solve import Option, choose
    >>> none, full = Strategy(), Strategy(main="full")
    >>> block = [Option(none, 100, 0.0, 0), Option(full, 0, 5.0, 100)]
    >>> [str(o.strategy) for o in choose([block, block], unwrapped=200, budget=100)]
    ['none', 'full']
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

from ckpt_wrapper.planner.peak import BlockFigures, PeakModel
from ckpt_wrapper.planner.strategy import Strategy

__all__ = ["GRID", "Option", "choose", "choose_within_limit", "least_peak"]

GRID = 4096
"""Memory is planned in units of unwrapped/GRID: fixed per model, so plans for all budgets agree."""


class Option(NamedTuple):
    """One strategy for one block, as the choice sees it."""

    strategy: Strategy
    """The strategy."""
    held: int
    """Activation bytes the block holds under it."""
    cost: float
    """Its extra cost over ``none``."""
    saving: int
    """Activation bytes it saves against the block unwrapped (offload also counts the block input)."""
    figures: BlockFigures | None = None
    """What the peak model needs (working sets in forward and backward); None without a peak model."""


def choose(options: Sequence[Sequence[Option]], unwrapped: int, budget: int) -> list[Option]:
    """Per block, the option of least total cost with total saving >= ``unwrapped - budget``.

    Ties go to the larger saving; among equal cost and saving, to the earlier option.

    Args:
        options: per block, its options.
        unwrapped: activation bytes of the unwrapped model.
        budget: the budget in bytes.

    Raises:
        ValueError: if no choice fits; the message says the least memory reachable.
    """
    unit = max(unwrapped / GRID, 1.0)
    need = max(0, math.ceil((unwrapped - budget) / unit))
    # dp[j]: (cost, -saving, choices) reaching at least j units of saving (capped at need).
    inf: tuple[float, int, tuple[int, ...]] = (math.inf, 0, ())
    dp: list[tuple[float, int, tuple[int, ...]]] = [inf] * (need + 1)
    dp[0] = (0.0, 0, ())
    for rows in options:
        nxt = [inf] * (need + 1)
        for j, (cost, neg_saving, picks) in enumerate(dp):
            if cost == math.inf:
                continue
            for index, option in enumerate(rows):
                k = min(need, j + max(0, math.floor(option.saving / unit)))
                cand = (cost + option.cost, neg_saving - option.saving, picks + (index,))
                if cand[:2] < nxt[k][:2]:
                    nxt[k] = cand
        dp = nxt
    if dp[need][0] == math.inf:
        best = unwrapped - sum(max(option.saving for option in rows) for rows in options)
        raise ValueError(
            f"no plan fits a budget of {budget / 2**20:.2f} MiB: the least activation memory reachable is about "
            f"{best / 2**20:.2f} MiB ({best / max(unwrapped, 1):.3f}x of unwrapped). Raise the budget, or add offload "
            "(on an accelerator) to the strategies."
        )
    return [rows[i] for rows, i in zip(options, dp[need][2])]


def _walk(options: Sequence[Sequence[Option]], unwrapped: int, model: PeakModel,
          score: str, limit: float) -> list[tuple[float, int, tuple[int, ...]]]:
    """The DP over blocks with the peak model: per saving state, the best (score, -saving, picks).

    ``score`` is ``cost`` (least cost with every instant within ``limit``) or ``peak`` (least running peak).
    """
    unit = max(unwrapped / GRID, 1.0)
    top = sum(max(math.floor(o.saving / unit) for o in rows) for rows in options) + 1
    inf: tuple[float, int, tuple[int, ...]] = (math.inf, 0, ())
    dp = [inf] * top
    start = model.outside_bound(0)
    if score == "peak":
        dp[0] = (float(start), 0, ())
    elif start <= limit:
        dp[0] = (0.0, 0, ())
    for i, rows in enumerate(options):
        bounds = [model.block_bound(i, o.figures) for o in rows]  # type: ignore[arg-type]
        after = model.outside_bound(i + 1)
        nxt = [inf] * top
        for j, (value, neg_saving, picks) in enumerate(dp):
            if value == math.inf:
                continue
            for index, option in enumerate(rows):
                k = j + max(0, math.floor(option.saving / unit))
                worst = max(bounds[index] - j * unit, after - k * unit)
                if score == "peak":
                    cand = (max(value, worst), neg_saving - option.saving, picks + (index,))
                elif worst > limit:
                    continue
                else:
                    cand = (value + option.cost, neg_saving - option.saving, picks + (index,))
                if cand[:2] < nxt[k][:2]:
                    nxt[k] = cand
        dp = nxt
    return dp


def choose_within_limit(options: Sequence[Sequence[Option]], unwrapped: int, budget: int | None, limit: int,
                        model: PeakModel) -> list[Option] | None:
    """Per block, the option of least total cost whose predicted peak stays within ``limit`` (and whose
    activation bytes after forward stay within ``budget``, if given); None if no choice does.

    Ties go to the larger saving; among equal cost and saving, to the earlier option.
    """
    if model.optimizer_phase > limit:
        return None
    unit = max(unwrapped / GRID, 1.0)
    need = 0 if budget is None else max(0, math.ceil((unwrapped - budget) / unit))
    dp = _walk(options, unwrapped, model, "cost", limit)
    best = min((entry for j, entry in enumerate(dp) if j >= need), key=lambda e: e[:2], default=None)
    if best is None or best[0] == math.inf:
        return None
    return [rows[i] for rows, i in zip(options, best[2])]


def least_peak(options: Sequence[Sequence[Option]], unwrapped: int, model: PeakModel) -> list[Option]:
    """Per block, the options giving the least predicted peak (the optimizer step aside)."""
    dp = _walk(options, unwrapped, model, "peak", math.inf)
    best = min((entry for entry in dp if entry[0] != math.inf), key=lambda e: e[:2])
    return [rows[i] for rows, i in zip(options, best[2])]
