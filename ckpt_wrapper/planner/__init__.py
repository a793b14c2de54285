"""The memory-budget planner: per block, the strategy that fits the budget at the least cost."""

from ckpt_wrapper.planner.plan_impl import Plan, PlanEntry, apply_strategy, block_strategies, plan

__all__ = ["Plan", "PlanEntry", "apply_strategy", "block_strategies", "plan"]
