"""Tasks the rank pool runs for the planner tests: plan under a 2-rank gloo group, then train under FSDP2.

Each function runs on every rank inside an initialized process group and returns something small and
picklable (JSON text, bools, strings) for the test to compare across ranks.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.distributed as dist
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import ckpt_wrapper
from ckpt_wrapper import Plan, PlanEntry
from ckpt_wrapper.testing.models import GPT, GPTConfig

SMALL = GPTConfig(n_layer=3, d_model=32, n_head=4, seq_len=16, vocab_size=64)
MIXED_STRATEGIES = ["cheap+regions:attn", "sac:titan", "full"]
"""One block each: a composition, an op-level policy and the plain checkpoint."""


def _model(seed: int) -> GPT:
    torch.manual_seed(seed)
    return GPT(SMALL)


def _tokens(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, SMALL.vocab_size, (2, SMALL.seq_len + 1), generator=torch.Generator().manual_seed(seed))
    return tokens[:, :-1], tokens[:, 1:]


def plan_per_rank(budgets: list[float], seeds: list[int], measure: str = "held") -> dict[str, Any]:
    """Plan with this rank's own budget and model seed; return the plan and what this rank asked for."""
    rank = dist.get_rank()
    model = _model(seeds[rank])
    tokens, _ = _tokens(1000 + rank)
    plan = ckpt_wrapper.plan(model, tokens, memory_budget=budgets[rank], measure=measure, repeats=1)
    return {"json": plan.to_json(), "budget_fraction_asked": budgets[rank],
            "budget_fraction_got": plan.budget_bytes / plan.unwrapped_bytes}


def plan_infeasible() -> str:
    """Plan with a budget nothing reaches; return the ValueError's message (any other outcome raises)."""
    model = _model(0)
    tokens, _ = _tokens(1000)
    try:
        ckpt_wrapper.plan(model, tokens, memory_budget=0.001, measure="saved", cost="flops", repeats=1)
    except ValueError as error:
        return str(error)
    raise AssertionError("an infeasible budget returned a plan")


def plan_then_fsdp2_step(which: str, budget: float = 0.6) -> dict[str, Any]:
    """Plan (collectively) or build a mixed plan, apply it, shard blocks and root with ``fully_shard``, run
    one training step beside the same model unwrapped and sharded the same way; compare bitwise."""
    from torch.distributed.fsdp import fully_shard

    base = _model(0)
    tokens, targets = _tokens(2000 + dist.get_rank())  # each rank its own data, as in training
    if which == "planned":
        plan = ckpt_wrapper.plan(base, tokens, memory_budget=budget, repeats=1)
    else:
        plan = Plan(entries=[PlanEntry(f"layers.{i}", s, 0, 0.0) for i, s in enumerate(MIXED_STRATEGIES)],
                    budget_bytes=1, unwrapped_bytes=1, predicted_bytes=1, step_seconds=0.0, predicted_seconds=0.0,
                    cost_unit="flops")
    reference, model = copy.deepcopy(base), copy.deepcopy(base)
    wrapped = plan.apply(model)
    losses, grads = [], []
    for m in (reference, model):
        for layer in m.layers:
            fully_shard(layer)
        fully_shard(m)
        loss = m.loss(tokens, targets)
        loss.backward()
        losses.append(loss.detach())
        grads.append({name: p.grad.full_tensor() for name, p in m.named_parameters()})
    dist.barrier()
    differ = [name for name in grads[0] if not torch.equal(grads[0][name], grads[1][name])]
    return {"json": plan.to_json(), "wrapped": wrapped, "strategies": [str(e.strategy) for e in plan.entries],
            "loss_equal": bool(torch.equal(losses[0], losses[1])), "grads_differ": differ}


def peak_components_under_fsdp2() -> dict[str, Any]:
    """Plan for FSDP2 over this group with AdamW, shard as planned, train two steps; return the predicted
    components beside what the sharded model really holds on this rank, and both peaks."""
    from torch.distributed.fsdp import fully_shard

    from ckpt_wrapper.measure import measured_step_peak
    from ckpt_wrapper.planner.memory import StaticMemory
    from ckpt_wrapper.planner.profile import find_blocks

    base = _model(0)
    tokens, targets = _tokens(3000)
    plan = ckpt_wrapper.plan(base, tokens, memory_budget=0.5, optimizer=torch.optim.AdamW, sharding="fsdp2")
    static = StaticMemory.of(base, find_blocks(base, None), optimizer=torch.optim.AdamW, sharding="fsdp2",
                             world_size=dist.get_world_size())
    model = copy.deepcopy(base)
    plan.apply(model)
    for layer in model.layers:
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters())

    def local_bytes(tensors: Any) -> int:
        storages = {t.to_local().untyped_storage().data_ptr(): t.to_local().untyped_storage().nbytes() for t in tensors}
        return sum(storages.values())

    model.loss(tokens, targets).backward()
    grads = local_bytes(p.grad for p in model.parameters())
    optimizer.step()
    optimizer.zero_grad()

    def step() -> None:
        out = model(tokens)  # referenced until the step ends, as the planner assumes
        out.sum().backward()
        optimizer.step()
        optimizer.zero_grad()

    measured = measured_step_peak(step, model, optimizer)
    dist.barrier()
    return {"json": plan.to_json(), "predicted": plan.peak["components"], "world": plan.peak["world_size"],
            "parameters": local_bytes(model.parameters()), "gradients": grads, "static_gradients": static.gradients(),
            "optimizer_state": local_bytes(v for s in optimizer.state.values() for v in s.values() if v.dim() > 0),
            "predicted_peak": plan.peak["peak_bytes"], "measured_peak": measured}


class _CountCollectives(TorchDispatchMode):
    """Counts the c10d collectives run under it, with the bytes of each one's full tensor."""

    KINDS = {"_allgather_base_": "all_gather", "allgather_": "all_gather", "allgather_into_tensor_coalesced_": "all_gather",
             "_reduce_scatter_base_": "reduce_scatter", "reduce_scatter_tensor_coalesced_": "reduce_scatter",
             "allreduce_": "all_reduce", "broadcast_": "broadcast"}

    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[str, int] = {}
        self.bytes: dict[str, int] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func.namespace == "c10d":
            name = func.__name__.split(".")[0]
            kind = self.KINDS.get(name, name)  # an unexpected collective shows under its own name
            full = args[1] if kind == "reduce_scatter" else args[0]  # the unsharded side
            size = sum(t.numel() * t.element_size() for t in pytree.tree_leaves(full) if isinstance(t, torch.Tensor))
            self.calls[kind] = self.calls.get(kind, 0) + 1
            self.bytes[kind] = self.bytes.get(kind, 0) + size
        return func(*args, **(kwargs or {}))


class _Wide(torch.nn.Module):
    """Eight 4 MiB linear blocks (32 MiB of gradients: several DDP buckets), buffers of two dtypes, and no
    parameters of the root's own."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(1024, 1024) for _ in range(8))
        self.register_buffer("scale", torch.ones(3))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.relu(layer(x)) * self.scale[0]
        return x


def collectives_of_a_checkpointed_step(kind: str, which: str = "gpt") -> dict[str, Any]:
    """Shard a copy of the small GPT (or ``_Wide``) by ``kind`` with every block checkpointed (``full``),
    take two steps (DDP rebuilds its buckets in the second), then count the collectives of a third forward
    and backward; return them beside ``Communication.of`` for the unwrapped model's planned sharding."""
    from ckpt_wrapper.planner.communication import Communication
    from ckpt_wrapper.planner.memory import StaticMemory
    from ckpt_wrapper.planner.profile import find_blocks
    from ckpt_wrapper.testing.recipes import ShardRecipe, shard_model

    if which == "gpt":
        base: torch.nn.Module = _model(0)
        tokens, _ = _tokens(11 + dist.get_rank())
    else:
        torch.manual_seed(0)
        base = _Wide()
        tokens = torch.randn(4, 1024, generator=torch.Generator().manual_seed(11 + dist.get_rank()))
    static = StaticMemory.of(base, find_blocks(base, None), sharding=kind, world_size=dist.get_world_size())
    predicted = Communication.of(static, base)
    model = copy.deepcopy(base)
    blocks = set(model.layers)
    ckpt_wrapper.apply_activation_checkpointing(model, check_fn=lambda sub: sub in blocks)
    if kind == "fsdp2":  # fully_shard as users call it: its defaults, each block, then the root
        from torch.distributed.fsdp import fully_shard

        for block in model.layers:
            fully_shard(block)
        sharded = fully_shard(model)
    else:
        sharded = shard_model(model, ShardRecipe(kind=kind), is_block=lambda m: m in blocks,
                              apply_checkpointing=lambda m: None, device=torch.device("cpu"))
    wrapped = sum(isinstance(m, ckpt_wrapper.CheckpointWrapper) for m in sharded.modules())
    for _ in range(2):
        sharded(tokens).sum().backward()
        sharded.zero_grad()
    with _CountCollectives() as seen:
        sharded(tokens).sum().backward()
    dist.barrier()
    return {"wrapped": wrapped, "blocks": len(blocks), "seen_calls": seen.calls, "seen_bytes": seen.bytes,
            "predicted_calls": {k: v for k, v in predicted.calls.items() if v and k in seen.KINDS.values()},
            "predicted_bytes": {k: v for k, v in predicted.bytes.items() if v and k in seen.KINDS.values()}}


def measured_communication_in_a_plan() -> dict[str, Any]:
    """Measure the group's communication constants, then plan for FSDP2 with them and without sharding."""
    from ckpt_wrapper.planner.cost import Calibration

    rng = torch.random.get_rng_state()
    calibration = Calibration.default("cpu").measure_communication(repeats=2)
    rng_kept = torch.equal(torch.random.get_rng_state(), rng)
    base = _model(0)
    tokens, _ = _tokens(5)
    sharded = ckpt_wrapper.plan(base, tokens, memory_budget=0.5, sharding="fsdp2", calibration=calibration)
    alone = ckpt_wrapper.plan(base, tokens, memory_budget=0.5, calibration=calibration)
    return {"calibration": calibration.to_dict(), "json": sharded.to_json(), "alone": alone.to_json(),
            "rng_kept": rng_kept}


def fit_with_sharding(sharding: str) -> dict[str, Any]:
    """``Calibration.fit(sharding=...)`` on this group, then a plan for that sharding with it; return what
    the model looked like before and after the fit, the calibration and the plan."""
    from ckpt_wrapper.planner.cost import Calibration

    base = _model(0)
    tokens, _ = _tokens(21)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    # Constants small beside any step, so the toy model's short step always leaves FLOPs to fit
    # (Calibration.measure's per-op figure alone can exceed it on a loaded machine).
    small = Calibration(seconds_per_flop=1e-11, seconds_per_byte=1e-12, seconds_per_op=1e-7, seconds_per_mode_op=0.0)
    calibration = Calibration.fit(base, tokens, base=small, repeats=2, sharding=sharding)
    after = base.state_dict()
    unchanged = all(torch.equal(before[k], after[k]) for k in before) and all(p.grad is None for p in base.parameters())
    plan = ckpt_wrapper.plan(base, tokens, memory_budget=0.5, sharding=sharding, calibration=calibration)
    return {"unchanged": unchanged, "source": calibration.source, "json": plan.to_json(),
            "communication": calibration.communication}


def fit_with_sharding_failing_on_rank_1() -> str:
    """``Calibration.fit(sharding="ddp")`` where rank 1's own base calibration cannot fit its step (as noise
    or a per-rank ``Calibration.measure`` can make it); return what the fit raised or ``"fitted"``."""
    import dataclasses

    from ckpt_wrapper.planner.cost import Calibration

    base = Calibration.default("cpu")
    if dist.get_rank() == 1:
        base = dataclasses.replace(base, seconds_per_op=1.0)  # its ops alone model to more than the step
    tokens, _ = _tokens(31)
    try:
        Calibration.fit(_model(0), tokens, repeats=1, base=base, sharding="ddp")
    except ValueError as error:
        return f"ValueError: {error}"
    return "fitted"
