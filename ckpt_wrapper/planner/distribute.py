"""One plan for every rank: under torch.distributed rank 0 plans and broadcasts the plan, or its error.

Plans that differ across ranks would make FSDP's collectives disagree and hang, so every rank returns
rank 0's plan; when rank 0 fails, every rank raises, none is left waiting in the broadcast.

Example:
    >>> from ckpt_wrapper.planner import Plan
    >>> from ckpt_wrapper.planner.distribute import plan_on_rank_0
    >>> made = Plan(entries=[], budget_bytes=1, unwrapped_bytes=1, predicted_bytes=1, step_seconds=0.0,
    ...             predicted_seconds=0.0, cost_unit="flops")
    >>> plan_on_rank_0(lambda: made) is made  # without a process group: planned here
    True
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.distributed as dist

from ckpt_wrapper.planner.plans import Plan

__all__ = ["is_multi_rank", "plan_on_rank_0"]


def is_multi_rank() -> bool:
    """Whether a process group of more than one rank is initialized."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def plan_on_rank_0(make_plan: Callable[[], Plan]) -> Plan:
    """``make_plan()`` on rank 0, broadcast to every rank as JSON; without a group, ``make_plan()`` here.

    Call it on every rank. Rank 0 re-raises its own error; the other ranks raise a ``ValueError``
    (rank 0 raised one) or a ``RuntimeError`` saying what rank 0 raised.
    """
    if not is_multi_rank():
        return make_plan()
    payload: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            payload = [("plan", make_plan().to_json())]
        except BaseException as error:  # every rank must leave the broadcast, with the same outcome
            dist.broadcast_object_list([("error", f"{type(error).__name__}: {error}")], src=0)
            raise
    dist.broadcast_object_list(payload, src=0)
    kind, text = payload[0]
    if kind == "error":
        raise (ValueError if text.startswith("ValueError: ") else RuntimeError)(f"rank 0 failed to plan: {text}")
    return Plan.from_json(text)
