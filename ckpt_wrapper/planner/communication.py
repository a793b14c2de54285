"""What a data-parallel forward and backward communicates on each rank, counted from the planned sharding.

Checkpointing does not change it: FSDP gathers a block's parameters for its backward whether or not the
block recomputes, and DDP reduces the same gradients. So the communication is one term of the step's time,
the same under every plan, and ``plan`` adds its modelled seconds (``Calibration.communication_seconds``)
to the unwrapped and the predicted step time alike. What is counted, per rank and step:

- **FSDP2 and FSDP1** (each block its own unit, the rest the root's, with ``fully_shard``'s and
  ``FULL_SHARD``'s defaults, as ``shard_as_planned`` shards): an all-gather per unit in forward; one per
  block again in backward (the root keeps its parameters unsharded between forward and backward); a
  reduce-scatter per unit with gradients. Bytes are the unsharded (padded) sizes. FSDP2 also copies the
  shards into the all-gather's input and its output out into the parameters, the gradients into the
  reduce-scatter's input and its output into the gradient shards (``copy``: bytes read and written).
- **FSDP's fixed cost per unit** (``fsdp_unit``): one per unit with parameters and step.
- **DDP**: an all-reduce per gradient bucket (filled from the last parameter back, the first closed at
  1 MiB, the rest at 25 MiB, DDP's defaults) and the buffers' broadcast in forward, one per dtype.
- **none**, or one rank: nothing.

Example:
    >>> import torch
    >>> from ckpt_wrapper.planner.communication import Communication
    >>> from ckpt_wrapper.planner.memory import StaticMemory
    >>> from ckpt_wrapper.planner.profile import find_blocks
    >>> from ckpt_wrapper.testing.models import GPT, GPTConfig
    >>> model = GPT(GPTConfig(n_layer=2, d_model=32, n_head=4, seq_len=8, vocab_size=32))
    >>> static = StaticMemory.of(model, find_blocks(model, None), sharding="fsdp2", world_size=2)
    >>> comm = Communication.of(static)
    >>> comm.calls["all_gather"], comm.calls["reduce_scatter"]   # 3 units: root + 2 blocks
    (5, 3)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from ckpt_wrapper.planner.memory import StaticMemory

__all__ = ["COLLECTIVES", "TERMS", "Communication", "shard_as_planned"]

COLLECTIVES: tuple[str, ...] = ("all_gather", "reduce_scatter", "all_reduce", "broadcast")
"""The collectives counted."""

TERMS: tuple[str, ...] = COLLECTIVES + ("copy", "fsdp_unit")
"""What ``Communication`` counts and ``Calibration.communication`` times: the collectives, FSDP's copies
around them (``copy``), and FSDP's fixed cost per unit and step beyond those (``fsdp_unit``: its hooks,
the waits of ranks for each other at each collective)."""

_DDP_FIRST_BUCKET = 2**20
_DDP_BUCKET = 25 * 2**20
_DDP_BROADCAST_BUCKET = 250 * 2**20


def _ddp_buckets(model: nn.Module) -> int:
    """How many gradient buckets DDP makes of ``model``'s trainable parameters (its default limits)."""
    open_bytes: dict[tuple[torch.dtype, torch.device], int] = {}
    closed: dict[tuple[torch.dtype, torch.device], int] = {}
    for p in reversed([p for p in model.parameters() if p.requires_grad]):
        key = (p.dtype, p.device)
        open_bytes[key] = open_bytes.get(key, 0) + p.numel() * p.element_size()
        limit = _DDP_FIRST_BUCKET if closed.get(key, 0) == 0 else _DDP_BUCKET
        if open_bytes[key] >= limit:
            closed[key] = closed.get(key, 0) + 1
            open_bytes[key] = 0
    return sum(closed.values()) + sum(1 for nbytes in open_bytes.values() if nbytes)


def _bytes_by_dtype(tensors: Iterable[torch.Tensor]) -> dict[torch.dtype, int]:
    totals: dict[torch.dtype, int] = {}
    for t in tensors:
        totals[t.dtype] = totals.get(t.dtype, 0) + t.numel() * t.element_size()
    return totals


@dataclasses.dataclass(frozen=True)
class Communication:
    """Per rank and forward-and-backward: the collectives run, their bytes, and FSDP's copies around them."""

    world_size: int
    """Ranks the collectives span."""
    calls: dict[str, int]
    """Per term (``TERMS``): how many a step runs (a copy: one per pass over a unit's tensors)."""
    bytes: dict[str, int]
    """Per term, summed over its calls: the bytes of the full tensor (an all-gather's output, a
    reduce-scatter's input, an all-reduced or broadcast tensor); for ``copy`` the bytes read and written."""

    @classmethod
    def none(cls) -> Communication:
        """No communication (no sharding, or one rank)."""
        return cls(world_size=1, calls=dict.fromkeys(TERMS, 0), bytes=dict.fromkeys(TERMS, 0))

    @classmethod
    def of(cls, static: StaticMemory, model: nn.Module | None = None) -> Communication:
        """What a step communicates under ``static``'s sharding and world size.

        Under DDP, ``model`` (the unsharded model ``static`` was worked out from) gives the buckets: its
        trainable parameters in reverse order, one series of buckets per dtype, each closed once it holds
        its limit (1 MiB, then 25 MiB), as DDP assigns them; and its buffers, which DDP broadcasts in
        every forward, one call per dtype and 250 MiB. Without it, the gradient bytes are divided into
        full buckets and no buffers are counted.
        """
        world = static.world_size
        if static.sharding == "none" or world == 1:
            return cls.none()
        calls = dict.fromkeys(TERMS, 0)
        sizes = dict.fromkeys(TERMS, 0)
        if static.sharded:
            for unit, resident in static.resident_parameters.items():
                if resident == 0:
                    continue  # a unit without parameters gathers nothing
                calls["fsdp_unit"] += 1
                gathered = resident * world  # equal (padded) shards
                gathers = 1 if unit == "" else 2  # the root stays unsharded from forward to backward
                calls["all_gather"] += gathers
                sizes["all_gather"] += gathers * gathered
                if static.block_gradients[unit]:
                    grads = static.sharded_gradients[unit] * world
                    calls["reduce_scatter"] += 1
                    sizes["reduce_scatter"] += grads
                    if static.sharding == "fsdp2":  # gradients into the flat input, the shard out of the output
                        calls["copy"] += 2
                        sizes["copy"] += 2 * grads + 2 * static.sharded_gradients[unit]
                if static.sharding == "fsdp2":  # shards into the input, the output out into the parameters
                    calls["copy"] += 2 * gathers
                    sizes["copy"] += gathers * (2 * resident + 2 * gathered)
        else:  # ddp
            grads = sum(static.block_gradients.values())
            if grads:
                calls["all_reduce"] = (_ddp_buckets(model) if model is not None else
                                       1 + math.ceil(max(grads - _DDP_FIRST_BUCKET, 0) / _DDP_BUCKET))
                sizes["all_reduce"] = grads
            for nbytes in _bytes_by_dtype(model.buffers() if model is not None else ()).values():
                calls["broadcast"] += math.ceil(nbytes / _DDP_BROADCAST_BUCKET)
                sizes["broadcast"] += nbytes
        return cls(world_size=world, calls=calls, bytes=sizes)

    def bus_bytes(self, term: str) -> int:
        """Bytes each rank sends for ``term`` over its calls, as a ring runs it: an all-gather or a
        reduce-scatter ``(world - 1) / world`` of the full bytes, an all-reduce twice that, a broadcast
        the full bytes; for ``copy`` the bytes read and written (``fsdp_unit`` has none)."""
        if term in ("copy", "fsdp_unit"):
            return self.bytes.get(term, 0)
        if self.world_size == 1:
            return 0
        share = (self.world_size - 1) / self.world_size
        factor = {"all_gather": share, "reduce_scatter": share, "all_reduce": 2 * share, "broadcast": 1.0}[term]
        return int(self.bytes.get(term, 0) * factor)

    def to_dict(self) -> dict[str, object]:
        """As JSON-ready values."""
        return dataclasses.asdict(self)


def shard_as_planned(model: nn.Module, blocks: Sequence[str], sharding: str, device: torch.device) -> nn.Module:
    """``model`` made data-parallel over the world group the way ``plan`` models it, in place.

    FSDP2: ``fully_shard`` with its defaults on each block named in ``blocks``, then on the root (which
    then keeps its parameters gathered from forward into backward). FSDP1: ``FULL_SHARD`` with each block
    its own unit. DDP: ``DistributedDataParallel``. Returns the module to train (the model itself for FSDP2).

    Raises:
        ValueError: for a sharding other than ``ddp``, ``fsdp1`` or ``fsdp2``.
    """
    if sharding == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for name in blocks:
            fully_shard(model.get_submodule(name))
        return fully_shard(model)
    if sharding not in ("ddp", "fsdp1"):
        raise ValueError(f"sharding must be 'ddp', 'fsdp1' or 'fsdp2' to shard, got {sharding!r}")
    from ckpt_wrapper.testing.recipes import ShardRecipe, shard_model

    units = {model.get_submodule(name) for name in blocks}
    return shard_model(model, ShardRecipe(kind=sharding), is_block=lambda m: m in units,
                       apply_checkpointing=lambda m: None, device=device)
