"""``PlanOptions``: the knobs of ``plan``, checked once, as one value the planner's parts share.

Example:
    >>> from ckpt_wrapper.planner import PlanOptions
    >>> options = PlanOptions(memory_budget=0.5, strategies=["none", "full"], measure="saved", cost="flops")
    >>> [str(s) for s in options.strategies], options.budget_bytes(1000)
    (['none', 'full'], 500)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import nn

from ckpt_wrapper.budget import Budget, parse_budget
from ckpt_wrapper.planner.strategy import Strategy, as_strategies
from ckpt_wrapper.selection import BlockSelector

__all__ = ["CostModel", "PlanOptions"]

CostModel = Literal["time", "flops", "flops+overhead"]
"""How profiled costs are counted once ``cost="auto"`` is resolved (see ``PlanOptions.cost_model``)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class PlanOptions:
    """What ``plan`` was asked for; invalid values are refused on construction."""

    memory_budget: float | int | str | Budget
    """A fraction of the unwrapped activation memory (a float in (0, 1], ``"50%"``), or bytes (an int, or a
    text such as ``"6GiB"``): the grammar of ``ckpt_wrapper.budget.parse_budget``."""
    check_fn: BlockSelector | Callable[[nn.Module], bool] | None = None
    """Which modules are blocks; default the children of the model's largest ``ModuleList``."""
    strategies: tuple[Strategy, ...] | None = None
    """The candidates for every block (text forms are parsed); default ``block_strategies(block)``."""
    measure: Literal["held", "saved"] = "held"
    """``held``: allocator bytes held after forward; ``saved``: live storages forward made (deterministic)."""
    cost: Literal["auto", "flops", "time"] = "auto"
    """``flops``: extra FLOPs; ``time``: measured extra seconds; ``auto``: time on CUDA, FLOPs plus overhead on CPU."""
    repeats: int = 5
    """Timing rounds (strategies are timed interleaved, round by round, and the median kept)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "memory_budget", parse_budget(self.memory_budget, name="memory_budget"))
        if self.check_fn is not None and not callable(self.check_fn):
            raise TypeError(f"check_fn must be a selector or a callable module -> bool, got "
                            f"{type(self.check_fn).__name__}; pass e.g. ckpt_wrapper.by_class_name('Block')")
        if self.strategies is not None:
            object.__setattr__(self, "strategies", as_strategies(self.strategies))
        if self.measure not in ("held", "saved"):
            raise ValueError(f"measure must be 'held' or 'saved', got {self.measure!r}; fix the spelling")
        if self.cost not in ("auto", "flops", "time"):
            raise ValueError(f"cost must be 'auto', 'flops' or 'time', got {self.cost!r}; fix the spelling")
        if isinstance(self.repeats, bool) or not isinstance(self.repeats, int) or self.repeats < 1:
            raise ValueError(f"repeats must be an int >= 1, got {self.repeats!r}; pass e.g. repeats=3")

    def budget_bytes(self, unwrapped_bytes: int) -> int:
        """The budget in bytes, given the unwrapped model's activation bytes."""
        return self.memory_budget.resolve(unwrapped_bytes)

    def cost_model(self, device: torch.device) -> CostModel:
        """``cost`` with ``auto`` resolved: ``time`` on CUDA, ``flops+overhead`` elsewhere."""
        if self.cost == "auto":
            return "time" if device.type == "cuda" else "flops+overhead"
        return self.cost

    def candidates(self, default: Sequence[Strategy]) -> list[Strategy]:
        """The strategies to profile for a block whose own are ``default``: always with ``none`` first."""
        names = list(self.strategies) if self.strategies is not None else list(default)
        if Strategy() not in names:
            names.insert(0, Strategy())
        return names
