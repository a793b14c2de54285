"""What a training step holds on each rank besides activations: parameters, gradients, optimizer state, sharding.

``StaticMemory.of(model, blocks, ...)`` works it out from the unsharded model (plan before sharding), for
no sharding, DDP, FSDP1 (one flat parameter per wrapped block, sharded) or FSDP2 (each parameter sharded
on dim 0, padded to equal shards). The optimizer's state is measured, not looked up: an optimizer of the
same class and settings is stepped on a scratch parameter, and the state it creates per element (AdamW:
2, SGD with momentum: 1, plain SGD: 0) and the temporaries of its step are counted. Figures are per rank.

Example:
    >>> import torch
    >>> from ckpt_wrapper.planner.memory import StaticMemory
    >>> from ckpt_wrapper.planner.profile import find_blocks
    >>> from ckpt_wrapper.testing.models import GPT, GPTConfig
    >>> model = GPT(GPTConfig(n_layer=2, d_model=32, n_head=4, seq_len=8, vocab_size=32))
    >>> static = StaticMemory.of(model, find_blocks(model, None), optimizer=torch.optim.AdamW, sharding="fsdp2",
    ...                          world_size=2)
    >>> static.optimizer_state == 2 * static.parameters
    True
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import torch
from torch import nn

from ckpt_wrapper.timeline import StepRecorder

__all__ = ["OptimizerFootprint", "SHARDINGS", "Sharding", "StaticMemory", "default_world_size", "optimizer_footprint"]

Sharding = Literal["none", "ddp", "fsdp1", "fsdp2"]
"""How the model will be made data-parallel after planning."""

SHARDINGS: tuple[str, ...] = ("none", "ddp", "fsdp1", "fsdp2")
"""Every value of ``Sharding``."""

OptimizerSpec = Any
"""An optimizer instance, an optimizer class, or a callable ``params -> Optimizer``."""


@dataclasses.dataclass(frozen=True)
class OptimizerFootprint:
    """What an optimizer keeps and makes, relative to the parameters it steps."""

    state_per_byte: float
    """Bytes of state per byte of parameter (AdamW 2.0, SGD with momentum 1.0)."""
    step_temporary_per_byte: float
    """Most temporary bytes of ``step()`` per byte of the parameters it processes at once."""
    foreach: bool
    """Whether ``step()`` processes all parameters at once (foreach), else one at a time."""


def _build(optimizer: OptimizerSpec, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    if isinstance(optimizer, torch.optim.Optimizer):
        defaults = {k: v for k, v in optimizer.defaults.items() if k != "params"}
        return type(optimizer)(params, **defaults)
    if callable(optimizer):
        built = optimizer(params)
        if isinstance(built, torch.optim.Optimizer):
            return built
    raise TypeError(f"optimizer must be a torch.optim.Optimizer, its class, or a callable params -> Optimizer, got "
                    f"{type(optimizer).__name__}; pass e.g. optimizer=torch.optim.AdamW")


def optimizer_footprint(optimizer: OptimizerSpec, *, device: torch.device,
                        dtype: torch.dtype = torch.float32) -> OptimizerFootprint:
    """Measure ``optimizer``'s state and step temporaries on scratch parameters (a few ms).

    Raises:
        TypeError: if ``optimizer`` is none of the accepted forms.
    """
    def temporaries(count: int) -> tuple[float, float]:
        params = [torch.zeros(16, 32, device=device, dtype=dtype, requires_grad=True) for _ in range(count)]
        opt = _build(optimizer, params)
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()  # the first step creates the state
        state = sum(t.untyped_storage().nbytes() for p in params for t in opt.state[p].values()
                    if isinstance(t, torch.Tensor) and t.numel() == p.numel())
        recorder = StepRecorder(exclude=params + [t for p in params for t in opt.state[p].values()
                                                  if isinstance(t, torch.Tensor)], device=device)
        with recorder:
            opt.step()
        one = params[0].untyped_storage().nbytes()
        return state / (one * count), max(recorder.samples, default=0) / one

    state, single = temporaries(1)
    _, double = temporaries(2)
    foreach = double > 1.5 * single
    return OptimizerFootprint(state_per_byte=state, step_temporary_per_byte=double / 2 if foreach else single,
                              foreach=foreach)


def _shard_bytes(p: torch.Tensor, world: int) -> int:
    """FSDP2: dim 0 chunked into ``world`` equal (padded) rows."""
    if p.dim() == 0:
        return p.element_size()
    rows = math.ceil(p.shape[0] / world)
    return rows * (p.numel() // max(p.shape[0], 1)) * p.element_size()


@dataclasses.dataclass(frozen=True, kw_only=True)
class StaticMemory:
    """Per rank: what exists besides activations, and the per-block sizes sharding works with."""

    sharding: str
    """``none``, ``ddp``, ``fsdp1`` or ``fsdp2``."""
    world_size: int
    """Ranks the model is sharded or replicated over."""
    parameters: int
    """Parameter bytes resident on this rank (sharded under FSDP)."""
    optimizer_state: int
    """Optimizer state bytes on this rank (0 without an optimizer)."""
    optimizer_step: int
    """Most temporary bytes of ``optimizer.step()`` on this rank."""
    ddp_buckets: int
    """DDP's gradient buckets (a copy of every gradient); 0 otherwise."""
    block_parameters: dict[str, int]
    """Per block (and ``""`` for the parameters outside the blocks): unsharded parameter bytes."""
    resident_parameters: dict[str, int]
    """Per block (and ``""``): parameter bytes resident on this rank (its shard under FSDP)."""
    block_gradients: dict[str, int]
    """Per block (and ``""``): unsharded bytes of the gradients it makes (trainable parameters)."""
    sharded_gradients: dict[str, int]
    """Per block (and ``""``): gradient bytes kept on this rank after reduce-scatter (unsharded without FSDP)."""

    @property
    def sharded(self) -> bool:
        """Whether parameters are sharded (FSDP1 or FSDP2)."""
        return self.sharding in ("fsdp1", "fsdp2")

    def gradients(self) -> int:
        """Gradient bytes on this rank once backward is done."""
        return sum(self.sharded_gradients.values())

    @classmethod
    def of(cls, model: nn.Module, blocks: list[tuple[str, nn.Module]], *, optimizer: OptimizerSpec | None = None,
           sharding: str = "none", world_size: int = 1, device: torch.device | None = None) -> StaticMemory:
        """Work out the static memory of ``model`` planned with ``blocks``.

        Args:
            model: the unsharded model.
            blocks: its blocks (each one FSDP unit when sharded; the rest is the root's unit).
            optimizer: an optimizer instance (its parameters are those stepped), class, or callable
                ``params -> Optimizer``; None: no optimizer state.
            sharding: ``none``, ``ddp``, ``fsdp1`` or ``fsdp2``.
            world_size: ranks; FSDP divides by it.
            device: where the model trains; default its parameters' device.

        Raises:
            ValueError: for an unknown sharding or a world size below 1, or ``fsdp2`` for a model with 0-dim
                parameters (``fully_shard`` refuses them).
        """
        if sharding not in SHARDINGS:
            raise ValueError(f"sharding must be one of {list(SHARDINGS)}, got {sharding!r}; fix the spelling")
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
        scalars = [name for name, p in model.named_parameters() if p.dim() == 0]
        if sharding == "fsdp2" and scalars:
            raise ValueError(f"sharding='fsdp2': fully_shard cannot shard 0-dim parameters, and this model has "
                             f"{len(scalars)} ({', '.join(scalars[:3])}{', ...' if len(scalars) > 3 else ''}); expected "
                             "parameters of at least one dimension (make them shape (1,)), or plan for 'fsdp1' or 'ddp'")
        params = list(model.parameters())
        device = device or (params[0].device if params else torch.device("cpu"))
        owner = {p: "" for p in params}
        for name, block in blocks:
            owner.update({p: name for p in block.parameters()})
        units = [""] + [name for name, _ in blocks]
        world = world_size if sharding in ("fsdp1", "fsdp2") else 1
        full = {u: 0 for u in units}
        grads = {u: 0 for u in units}
        resident = {u: 0 for u in units}
        numels = {u: 0 for u in units}
        element = {u: 1 for u in units}
        grad_shards = {u: 0 for u in units}  # FSDP2: each trainable parameter's own padded shard
        for p, unit in owner.items():
            full[unit] += p.numel() * p.element_size()
            grads[unit] += p.numel() * p.element_size() if p.requires_grad else 0
            resident[unit] += _shard_bytes(p, world) if sharding == "fsdp2" else 0
            grad_shards[unit] += _shard_bytes(p, world) if sharding == "fsdp2" and p.requires_grad else 0
            numels[unit] += p.numel()
            element[unit] = p.element_size()
        if sharding == "fsdp1":  # one flat parameter per unit, padded in elements to a multiple of the world size
            resident = {u: math.ceil(numels[u] / world) * element[u] for u in units}
        elif sharding != "fsdp2":
            resident = dict(full)
        if sharding == "fsdp2":
            shard_of = grad_shards
        else:
            shard_of = {u: (resident[u] * grads[u] // max(full[u], 1)) if world > 1 else grads[u] for u in units}
        stepped = [p for p in params if p.requires_grad]
        if isinstance(optimizer, torch.optim.Optimizer):
            ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
            stepped = [p for p in params if id(p) in ids]
        stepped_bytes = sum(_shard_bytes(p, world) if sharding == "fsdp2" else
                            math.ceil(p.numel() * p.element_size() / world) for p in stepped)
        state = temporary = 0
        if optimizer is not None:
            footprint = optimizer_footprint(optimizer, device=device, dtype=stepped[0].dtype if stepped else torch.float32)
            state = int(footprint.state_per_byte * stepped_bytes)
            largest = max((math.ceil(p.numel() * p.element_size() / world) for p in stepped), default=0)
            temporary = int(footprint.step_temporary_per_byte * (stepped_bytes if footprint.foreach else largest))
        return cls(sharding=sharding, world_size=world_size, parameters=sum(resident.values()), optimizer_state=state,
                   optimizer_step=temporary, ddp_buckets=sum(grads.values()) if sharding == "ddp" else 0,
                   block_parameters=full, resident_parameters=resident, block_gradients=grads, sharded_gradients=shard_of)


def default_world_size() -> int:
    """The process group's world size, or 1 without one."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

