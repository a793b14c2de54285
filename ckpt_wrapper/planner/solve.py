"""The planner's choice: one option per block, least total cost, total saving enough for the budget.

A knapsack solved by dynamic programming over memory discretised into ``unwrapped / GRID`` units;
savings are rounded down, so rounding never pushes a plan over its budget. Among equal costs the
larger saving wins, so a smaller budget never predicts more memory.

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

from ckpt_wrapper.planner.strategy import Strategy

__all__ = ["GRID", "Option", "choose"]

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
