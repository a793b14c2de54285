"""The memory-budget planner: per block, the strategy that fits the budget at the least cost.

``plan(model, example_batch, memory_budget=0.5)`` profiles each distinct block once under every
``Strategy`` (activation bytes held after forward, working sets in forward and backward; by default a
recompute cost modelled from exact FLOP, byte and op counts with a stored ``Calibration``, so the plan
is deterministic), then picks one strategy per block by dynamic programming: the least total cost whose
predicted activation memory is within the budget, and with ``memory_limit`` whose predicted step peak
per rank is within the limit, ties broken toward less memory (so a smaller budget never predicts more
memory). Under torch.distributed, rank 0 plans and broadcasts: every rank applies
the same plan (different plans on different ranks would hang FSDP).

The parts, one module each: ``strategy`` (``Strategy``, ``block_strategies``, ``apply_strategy``),
``options`` (``PlanOptions``), ``profile`` (measuring blocks), ``trace`` (recorded steps), ``cost``
(``Calibration``), ``memory`` (parameters, gradients, optimizer state, sharding), ``peak`` (the step's
peak), ``solve`` (the choice), ``plans`` (``Plan``, ``PlanEntry``, JSON), ``distribute`` (rank 0 plans
for all) and ``planning`` (``plan``).

Example:
    >>> import torch
    >>> import ckpt_wrapper
    >>> from ckpt_wrapper.testing.models import GPT, GPTConfig
    >>> model = GPT(GPTConfig(n_layer=2, d_model=32, n_head=4, seq_len=16, vocab_size=64))
    >>> tokens = torch.randint(0, 64, (2, 16))
    >>> p = ckpt_wrapper.plan(model, tokens, memory_budget=0.5, measure="saved")
    >>> p.predicted_bytes <= p.budget_bytes
    True
    >>> names = p.apply(model)
"""

from ckpt_wrapper.planner.cost import Calibration
from ckpt_wrapper.planner.options import PlanOptions
from ckpt_wrapper.planner.planning import plan
from ckpt_wrapper.planner.plans import Plan, PlanEntry
from ckpt_wrapper.planner.strategy import Strategy, apply_strategy, block_strategies

__all__ = ["Calibration", "Plan", "PlanEntry", "PlanOptions", "Strategy", "apply_strategy", "block_strategies", "plan"]
