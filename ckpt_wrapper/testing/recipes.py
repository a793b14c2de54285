"""Sharding recipes: how a model is made data-parallel, and where checkpointing goes relative to it.

``ShardRecipe`` describes how a model is made data-parallel (none, DDP, FSDP1 with any sharding
strategy, FSDP2 ``fully_shard``) and in which order checkpointing is applied relative to it;
``shard_model`` carries a recipe out. The parity harness, the demo and the training driver all go
through these, so every path users take is the path the tests take.

Example:
    >>> from ckpt_wrapper.testing.recipes import ShardRecipe
    >>> ShardRecipe(kind="fsdp1", sharding_strategy="SHARD_GRAD_OP").describe()
    'fsdp1 SHARD_GRAD_OP use_orig_params=False, checkpoint before sharding'
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn

from ckpt_wrapper.distributed import DTYPES, resolve_dtype

__all__ = ["ShardRecipe", "shard_model", "clean_name", "SHARD_KINDS"]

SHARD_KINDS = ("none", "ddp", "fsdp1", "fsdp2")
_FSDP1_STRATEGIES = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD", "_HYBRID_SHARD_ZERO2")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ShardRecipe:
    """How a model is made data-parallel, and where checkpointing goes relative to it."""

    kind: Literal["none", "ddp", "fsdp1", "fsdp2"] = "fsdp2"
    """``none``, ``ddp``, ``fsdp1`` (FullyShardedDataParallel) or ``fsdp2`` (``fully_shard``)."""
    wrap_order: Literal["before", "after"] = "before"
    """``before``: checkpoint blocks, then shard (``FSDP(wrap(block))``); ``after``: shard, then
    checkpoint the blocks inside (``wrap(FSDP(block))``, what accelerate does)."""
    sharding_strategy: str = "FULL_SHARD"
    """FSDP1 sharding strategy name; the hybrid ones need an even world size of at least 4."""
    use_orig_params: bool = False
    """FSDP1 ``use_orig_params``."""
    cpu_offload: bool = False
    """FSDP1 ``CPUOffload(offload_params=True)``."""
    reshard_after_forward: bool = True
    """FSDP2 ``reshard_after_forward``."""
    param_dtype: str | None = None
    """Mixed precision parameter dtype (``bf16``, ``fp16``), FSDP1 and FSDP2."""
    reduce_dtype: str | None = None
    """Mixed precision gradient-reduction dtype."""
    find_unused_parameters: bool = False
    """DDP ``find_unused_parameters``."""

    def __post_init__(self) -> None:
        if self.kind not in SHARD_KINDS:
            raise ValueError(f"kind must be one of {SHARD_KINDS}, got {self.kind!r}")
        if self.wrap_order not in ("before", "after"):
            raise ValueError(f"wrap_order must be 'before' or 'after', got {self.wrap_order!r}")
        if self.sharding_strategy not in _FSDP1_STRATEGIES:
            raise ValueError(f"sharding_strategy must be one of {_FSDP1_STRATEGIES}, got {self.sharding_strategy!r}")
        for field in ("param_dtype", "reduce_dtype"):
            value = getattr(self, field)
            if value is not None and value not in DTYPES:
                raise ValueError(f"{field} must be one of {sorted(DTYPES)} or None, got {value!r}")

    def describe(self) -> str:
        """A one-line summary for reports."""
        parts = [self.kind]
        if self.kind == "fsdp1":
            parts.append(f"{self.sharding_strategy} use_orig_params={self.use_orig_params}")
            if self.cpu_offload:
                parts.append("cpu_offload")
        if self.kind == "fsdp2":
            parts.append(f"reshard_after_forward={self.reshard_after_forward}")
        if self.kind == "ddp":
            parts.append(f"find_unused_parameters={self.find_unused_parameters}")
        if self.param_dtype:
            parts.append(f"param_dtype={self.param_dtype} reduce_dtype={self.reduce_dtype}")
        return " ".join(parts) + f", checkpoint {self.wrap_order} sharding"


def shard_model(
    model: nn.Module,
    recipe: ShardRecipe,
    *,
    is_block: Callable[[nn.Module], bool],
    apply_checkpointing: Callable[[nn.Module], object],
    device: torch.device,
) -> nn.Module:
    """Shard ``model`` by ``recipe``, calling ``apply_checkpointing(model)`` before or after as it says.

    Args:
        model: the model; modified in place (and, for DDP and FSDP1, returned wrapped).
        recipe: how to shard.
        is_block: which modules are blocks (FSDP units and checkpointed blocks).
        apply_checkpointing: applies checkpointing to a model in place, e.g.
            ``lambda m: ckpt_wrapper.apply_activation_checkpointing(m, check_fn=...)``.
        device: where the sharded model lives.

    Returns:
        The model to train: ``model`` itself, or the DDP / FSDP1 module around it.
    """
    model.to(device)
    if recipe.wrap_order == "before":
        apply_checkpointing(model)
    if recipe.kind == "none":
        sharded = model
    elif recipe.kind == "ddp":
        sharded = nn.parallel.DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=recipe.find_unused_parameters,
        )
    elif recipe.kind == "fsdp2":
        sharded = _fully_shard(model, recipe, is_block, device)
    else:
        sharded = _fsdp1(model, recipe, is_block, device)
    if recipe.wrap_order == "after":
        apply_checkpointing(sharded)
    return sharded


def _fully_shard(model: nn.Module, recipe: ShardRecipe, is_block: Callable[[nn.Module], bool], device: torch.device) -> nn.Module:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(
        param_dtype=resolve_dtype(recipe.param_dtype), reduce_dtype=resolve_dtype(recipe.reduce_dtype)
    )
    options = {"reshard_after_forward": recipe.reshard_after_forward, "mp_policy": mp}
    for block in [m for m in model.modules() if m is not model and is_block(m)]:
        fully_shard(block, **options)
    fully_shard(model, **options)
    return model


def _fsdp1(model: nn.Module, recipe: ShardRecipe, is_block: Callable[[nn.Module], bool], device: torch.device) -> nn.Module:
    from torch.distributed.fsdp import CPUOffload, MixedPrecision, ShardingStrategy
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

    strategy = ShardingStrategy[recipe.sharding_strategy]
    mesh = None
    if strategy in (ShardingStrategy.HYBRID_SHARD, ShardingStrategy._HYBRID_SHARD_ZERO2):
        world = dist.get_world_size()
        if world < 4 or world % 2:
            raise ValueError(f"{recipe.sharding_strategy} needs an even world size >= 4 here, got {world}")
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device.type, (world // 2, 2), mesh_dim_names=("replicate", "shard"))
    mixed = None
    if recipe.param_dtype or recipe.reduce_dtype:
        mixed = MixedPrecision(param_dtype=resolve_dtype(recipe.param_dtype), reduce_dtype=resolve_dtype(recipe.reduce_dtype))
    return FSDP(
        model,
        auto_wrap_policy=functools.partial(lambda_auto_wrap_policy, lambda_fn=is_block),
        sharding_strategy=strategy,
        device_mesh=mesh,
        use_orig_params=recipe.use_orig_params,
        cpu_offload=CPUOffload(offload_params=True) if recipe.cpu_offload else None,
        mixed_precision=mixed,
        device_id=device,
    )


_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "module.", "_orig_mod.")


def clean_name(name: str) -> str:
    """A parameter name with the prefixes DDP, FSDP1, compile and PyTorch's own wrapper insert removed."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, stripped = name[len(prefix):], True
    return name.replace("._fsdp_wrapped_module", "").replace("._checkpoint_wrapped_module", "")
