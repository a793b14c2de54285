"""ckpt_wrapper: transparent activation checkpointing and offload for PyTorch.

Wrapped blocks keep their parameter names, state-dict keys and classes, so sharding, saving,
loading and compiling behave as if the model had not been touched, except that activation memory
went down.

Example:
    >>> import torch
    >>> from ckpt_wrapper import apply_activation_checkpointing, by_class
    >>> model = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU()) for _ in range(3)])
    >>> apply_activation_checkpointing(model, check_fn=by_class(torch.nn.Sequential))
    ['0', '1', '2']
    >>> model(torch.randn(4, 8)).sum().backward()
"""

from ckpt_wrapper import log  # noqa: F401  (gives the package logger its NullHandler: silent until configured)
from ckpt_wrapper.apply import apply_activation_checkpointing, remove_activation_checkpointing
from ckpt_wrapper.composable import checkpoint
from ckpt_wrapper.offload import HostPool, OffloadEngine, OffloadOptions, OffloadStats, OffloadWrapper, offload_wrapper
from ckpt_wrapper.selection import BlockSelector, all_but_last, by_class, by_class_name, by_name, every_nth, first_n
from ckpt_wrapper.planner import Plan, PlanEntry, PlanOptions, Strategy, plan
from ckpt_wrapper.report import MemoryReport, report
from ckpt_wrapper.cheap_recompute import CheapOptions, CheapRecomputeWrapper, cheap_modules, cheap_recompute_wrapper
from ckpt_wrapper.selective import PRESETS, apply_selective_checkpointing, checkpoint_regions, region_candidates, selective_context_fn
from ckpt_wrapper.state import ActivationWrapper, WrapState, unwrap, wrap_state
from ckpt_wrapper.wrapper import CheckpointImpl, CheckpointOptions, CheckpointWrapper, checkpoint_wrapper

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "ActivationWrapper",
    "all_but_last",
    "apply_selective_checkpointing",
    "BlockSelector",
    "CheapOptions",
    "CheapRecomputeWrapper",
    "CheckpointImpl",
    "CheckpointOptions",
    "CheckpointWrapper",
    "HostPool",
    "MemoryReport",
    "OffloadEngine",
    "OffloadOptions",
    "OffloadStats",
    "OffloadWrapper",
    "Plan",
    "PlanEntry",
    "PlanOptions",
    "Strategy",
    "apply_activation_checkpointing",
    "by_class",
    "by_class_name",
    "by_name",
    "cheap_modules",
    "cheap_recompute_wrapper",
    "checkpoint",
    "checkpoint_regions",
    "checkpoint_wrapper",
    "every_nth",
    "first_n",
    "offload_wrapper",
    "plan",
    "region_candidates",
    "report",
    "remove_activation_checkpointing",
    "selective_context_fn",
    "unwrap",
    "WrapState",
    "wrap_state",
]
