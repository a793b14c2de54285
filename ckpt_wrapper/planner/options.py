"""``PlanOptions``: the knobs of ``plan``, checked once, as one value the planner's parts share.

Example:
    >>> from ckpt_wrapper.planner import PlanOptions
    >>> options = PlanOptions(memory_budget=0.5, strategies=["none", "full"], measure="saved", cost="flops")
    >>> [str(s) for s in options.strategies], options.budget_bytes(1000)
    (['none', 'full'], 500)
    >>> PlanOptions(memory_limit="20GiB", sharding="fsdp2").limit_bytes()
    21474836480
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import nn

from ckpt_wrapper.budget import Budget, parse_budget
from ckpt_wrapper.planner.cost import Calibration
from ckpt_wrapper.planner.memory import SHARDINGS
from ckpt_wrapper.planner.strategy import Strategy, as_strategies
from ckpt_wrapper.selection import BlockSelector

__all__ = ["CostModel", "PlanOptions"]

CostModel = Literal["model", "time", "flops", "flops+overhead"]
"""How profiled costs are counted once ``cost="auto"`` is resolved (see ``PlanOptions.cost_model``)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class PlanOptions:
    """What ``plan`` was asked for; invalid values are refused on construction."""

    memory_budget: float | int | str | Budget | None = None
    """Activation memory after forward: a fraction of the unwrapped model's (a float in (0, 1], ``"50%"``),
    or bytes (an int, or a text such as ``"6GiB"``): the grammar of ``ckpt_wrapper.budget.parse_budget``."""
    memory_limit: int | str | Budget | None = None
    """The predicted peak of a whole training step on each rank, in bytes (``"20GiB"``): parameters,
    gradients, optimizer state, sharding buffers, activations and recompute. At least one of
    ``memory_budget`` and ``memory_limit`` is given."""
    optimizer: Any = None
    """For ``memory_limit``: the optimizer (an instance, its class, or ``params -> Optimizer``); None: no state."""
    sharding: str = "none"
    """For ``memory_limit``: how the model will be sharded: ``none``, ``ddp``, ``fsdp1`` or ``fsdp2``."""
    world_size: int | None = None
    """For ``memory_limit``: the ranks FSDP shards over; default the process group's size (1 without one)."""
    calibration: Calibration | None = None
    """For ``cost="model"``: the constants of the cost model; default ``Calibration.default(device)``."""
    check_fn: BlockSelector | Callable[[nn.Module], bool] | None = None
    """Which modules are blocks; default the children of the model's largest ``ModuleList``."""
    strategies: tuple[Strategy, ...] | None = None
    """The candidates for every block (text forms are parsed); default ``block_strategies(block)``."""
    measure: Literal["held", "saved"] = "saved"
    """``saved``: bytes of the storages forward made and left alive (deterministic); ``held``: allocator bytes."""
    cost: Literal["model", "auto", "flops", "time"] = "model"
    """``model``: modelled seconds from FLOPs, bytes and ops (deterministic); ``flops``: extra FLOPs;
    ``time``: measured extra seconds; ``auto``: time on CUDA, FLOPs plus measured overhead on CPU."""
    repeats: int = 5
    """Timing rounds (strategies are timed interleaved, round by round, and the median kept)."""

    def __post_init__(self) -> None:
        if self.memory_budget is None and self.memory_limit is None:
            raise ValueError("plan needs memory_budget= (activation memory: 0.5, '6GiB') or memory_limit= (the "
                             "step's peak per rank: '20GiB'); pass one or both")
        if self.memory_budget is not None:
            object.__setattr__(self, "memory_budget", parse_budget(self.memory_budget, name="memory_budget"))
        if self.memory_limit is not None:
            limit = parse_budget(self.memory_limit, name="memory_limit")
            if limit.nbytes is None:
                raise ValueError(f"memory_limit={self.memory_limit!r}: the limit is bytes per rank, such as '20GiB' "
                                 "or 20 * 2**30; a fraction of activation memory is memory_budget=")
            object.__setattr__(self, "memory_limit", limit)
        if self.sharding not in SHARDINGS:
            raise ValueError(f"sharding must be one of {list(SHARDINGS)}, got {self.sharding!r}; fix the spelling")
        if self.world_size is not None and (isinstance(self.world_size, bool) or not isinstance(self.world_size, int)
                                            or self.world_size < 1):
            raise ValueError(f"world_size must be an int >= 1 or None, got {self.world_size!r}")
        if self.calibration is not None and not isinstance(self.calibration, Calibration):
            raise TypeError(f"calibration must be a ckpt_wrapper.planner.Calibration, got "
                            f"{type(self.calibration).__name__}; make one with Calibration.measure(device)")
        if self.check_fn is not None and not callable(self.check_fn):
            raise TypeError(f"check_fn must be a selector or a callable module -> bool, got "
                            f"{type(self.check_fn).__name__}; pass e.g. ckpt_wrapper.by_class_name('Block')")
        if self.strategies is not None:
            object.__setattr__(self, "strategies", as_strategies(self.strategies))
        if self.measure not in ("held", "saved"):
            raise ValueError(f"measure must be 'held' or 'saved', got {self.measure!r}; fix the spelling")
        if self.cost not in ("model", "auto", "flops", "time"):
            raise ValueError(f"cost must be 'model', 'auto', 'flops' or 'time', got {self.cost!r}; fix the spelling")
        if isinstance(self.repeats, bool) or not isinstance(self.repeats, int) or self.repeats < 1:
            raise ValueError(f"repeats must be an int >= 1, got {self.repeats!r}; pass e.g. repeats=3")

    def budget_bytes(self, unwrapped_bytes: int) -> int | None:
        """The activation budget in bytes, given the unwrapped model's activation bytes; None if not given."""
        return None if self.memory_budget is None else self.memory_budget.resolve(unwrapped_bytes)

    def limit_bytes(self) -> int | None:
        """The peak limit per rank in bytes; None if not given."""
        return None if self.memory_limit is None else self.memory_limit.resolve(0)

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
