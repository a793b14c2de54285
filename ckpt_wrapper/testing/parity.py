"""The parity harness: prove that checkpointing a sharded model changes nothing it learns.

Every rank calls ``check_parity`` (under torchrun, or a pool of spawned ranks). It builds a reference
model and a copy, checkpoints and shards the copy by a ``ShardRecipe``, trains both for a few
optimizer steps on the same global batches (each rank its slice), and compares losses, outputs,
gathered gradients and parameters, returning per-parameter worst differences.

The reference is either ``"unsharded"`` (a plain model that sees the whole global batch: proves
sharding plus checkpointing equals single-process training, to float32 reduction-order tolerances) or
``"sharded"`` (the same recipe without checkpointing, on the same slice: the math is the same, so
results must be bitwise equal; this is the reference for dropout and mixed precision).

Example (two ranks on CPU)::

    torchrun --nproc_per_node 2 -m ckpt_wrapper parity --shard fsdp2 --blocks Block

Example (in code, on every rank)::

    report = check_parity(lambda: MyModel(), my_batches, wrap=lambda m: apply_activation_checkpointing(
        m, check_fn=by_class_name("MyBlock")), is_block=by_class_name("MyBlock"), shard=ShardRecipe(kind="ddp"))
    report.assert_ok()
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ckpt_wrapper.log import get_logger
from ckpt_wrapper.state import ActivationWrapper, wrap_state
from ckpt_wrapper.testing.data import lm_loss
from ckpt_wrapper.testing.recipes import ShardRecipe, clean_name, shard_model
from ckpt_wrapper.wrapper import CheckpointWrapper

__all__ = ["ParityConfig", "ParityReport", "check_parity", "default_loss"]

logger = get_logger(__name__)

Batch = tuple[Any, torch.Tensor]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ParityConfig:
    """How long to train and how closely results must agree."""

    steps: int = 3
    """Optimizer steps to compare (each: forward, backward, step)."""
    lr: float = 0.05
    """SGD learning rate (SGD: differences are not amplified the way Adam's normalisation would)."""
    momentum: float = 0.9
    """SGD momentum: gives the optimizer state to compare (its momentum buffers)."""
    seed: int = 0
    """Seed for the model's initialisation and for each step's RNG (dropout)."""
    reference: Literal["unsharded", "sharded"] = "unsharded"
    """Compare against a plain model on the global batch, or the same recipe without checkpointing."""
    micro_batches: int = 1
    """Gradient accumulation: micro-batches per step, gradient sync skipped on all but the last
    (``no_sync`` for DDP and FSDP1, ``set_requires_gradient_sync`` for FSDP2)."""
    eval_between: bool = False
    """After each step, an eval-mode forward under ``no_grad`` on both models, outputs compared."""
    rtol: float | None = None
    """Relative tolerance; default 0 against a sharded reference (bitwise), 1e-5 otherwise."""
    atol: float | None = None
    """Absolute tolerance; default 0 against a sharded reference (bitwise), 1e-6 otherwise."""

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.micro_batches < 1:
            raise ValueError(f"micro_batches must be >= 1, got {self.micro_batches}")
        if self.reference not in ("unsharded", "sharded"):
            raise ValueError(f"reference must be 'unsharded' or 'sharded', got {self.reference!r}")

    def tolerances(self) -> tuple[float, float]:
        """The (rtol, atol) in force."""
        exact = self.reference == "sharded"
        return (
            self.rtol if self.rtol is not None else (0.0 if exact else 1e-5),
            self.atol if self.atol is not None else (0.0 if exact else 1e-6),
        )


@dataclasses.dataclass
class ParityReport:
    """What ``check_parity`` found on this rank: worst differences, and what exceeded tolerance."""

    recipe: str
    reference: str
    tolerances: tuple[float, float]
    losses: list[tuple[float, float]] = dataclasses.field(default_factory=list)
    """Per step: (reference loss, checkpointed loss averaged over ranks)."""
    max_diff: dict[str, float] = dataclasses.field(default_factory=dict)
    """Worst absolute difference over all steps, keyed ``loss``, ``output``, ``grad:NAME``, ``param:NAME``."""
    failures: list[str] = dataclasses.field(default_factory=list)
    """One line per comparison that exceeded tolerance."""
    grads_compared: bool = True
    """False where gradients cannot be gathered (FSDP1 with use_orig_params=False): parameters
    after each step are compared instead, which any gradient difference would change."""
    world_size: int = 1
    """Ranks that took part; 1 means sharding across ranks was not exercised."""
    wrapped: list[str] = dataclasses.field(default_factory=list)
    """Blocks the ``wrap`` wrapped (their FQNs), and recomputes seen in the first backward."""
    recomputes: int = 0
    """Block forwards run again in backward during the first step (all checkpointed blocks)."""

    @property
    def ok(self) -> bool:
        """Whether every comparison was within tolerance."""
        return not self.failures

    def worst(self, count: int = 5) -> list[tuple[str, float]]:
        """The ``count`` largest differences."""
        return sorted(self.max_diff.items(), key=lambda item: -item[1])[:count]

    def __str__(self) -> str:
        rtol, atol = self.tolerances
        ranks = (f"on {self.world_size} ranks" if self.world_size > 1 else
                 "on 1 rank only (sharding across ranks was not exercised)")
        lines = [
            f"parity: {self.recipe} vs {self.reference} reference, {ranks} (rtol={rtol:g}, atol={atol:g}): "
            + ("OK" if self.ok else f"FAILED ({len(self.failures)} comparisons)"),
            f"checked after every step: loss, outputs, gradients, parameters, every buffer, optimizer state; "
            f"{len(self.wrapped)} block(s) wrapped, {self.recomputes} recompute(s) in the first backward",
            "step | reference loss | checkpointed loss",
        ]
        lines += [f"{i:4d} | {ref:.8f} | {test:.8f}" for i, (ref, test) in enumerate(self.losses)]
        if not self.grads_compared:
            lines.append("gradients not gatherable for this recipe; parameters after each step compared")
        lines.append("largest differences: " + ", ".join(f"{k}={v:.3g}" for k, v in self.worst()))
        lines += [f"  {f}" for f in self.failures[:10]]
        return "\n".join(lines)

    def assert_ok(self) -> None:
        """Raise ``AssertionError`` with the report when anything exceeded tolerance."""
        if not self.ok:
            raise AssertionError(str(self))


def default_loss(output: Any, targets: torch.Tensor) -> torch.Tensor:
    """``lm_loss`` (cross-entropy over the last dimension) for integer targets, mean squared error otherwise."""
    if not targets.is_floating_point():
        return lm_loss(output, targets)
    return F.mse_loss(output.float(), targets.float())


def _rank_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _local(batch: Batch, rank: int, world: int) -> Batch:
    def take(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        if t.shape[0] % world:
            raise ValueError(f"global batch dimension {t.shape[0]} is not divisible by the world size {world}")
        return t.chunk(world)[rank]

    return torch.utils._pytree.tree_map(take, batch)


def _full(t: torch.Tensor | None) -> torch.Tensor | None:
    if t is None:
        return None
    full_tensor = getattr(t, "full_tensor", None)  # DTensor (FSDP2)
    return (full_tensor() if full_tensor is not None else t).detach().float().clone()


@contextlib.contextmanager
def _gathered(model: nn.Module, recipe: ShardRecipe, *, grads: bool) -> Iterator[dict[str, torch.Tensor | None]]:
    """Full parameters (or gradients) by clean name, on every rank."""
    context = contextlib.nullcontext()
    if recipe.kind == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        context = FSDP.summon_full_params(model, writeback=False, with_grads=grads)
    with context:
        yield {clean_name(n): _full(p.grad if grads else p) for n, p in model.named_parameters()}


def _record(report: ParityReport, key: str, ref: torch.Tensor | None, test: torch.Tensor | None) -> None:
    rtol, atol = report.tolerances
    if ref is None or test is None:
        if (ref is None) != (test is None):
            report.failures.append(f"{key}: present in only one model (reference {ref is not None}, checkpointed {test is not None})")
        return
    ref, test = ref.detach().float(), test.detach().float()
    if ref.shape != test.shape:
        report.failures.append(f"{key}: shape {tuple(test.shape)} != reference {tuple(ref.shape)}")
        return
    diff = (ref - test).abs()
    worst = float(diff.max()) if diff.numel() else 0.0
    report.max_diff[key] = max(report.max_diff.get(key, 0.0), worst)
    if bool((diff > atol + rtol * ref.abs()).any()) or not torch.isfinite(test).all():
        report.failures.append(f"{key}: max abs diff {worst:.3g} exceeds rtol={rtol:g}, atol={atol:g}")


def check_parity(
    model_fn: Callable[[], nn.Module],
    batch_fn: Callable[[int], Batch],
    *,
    wrap: Callable[[nn.Module], object],
    is_block: Callable[[nn.Module], bool],
    shard: ShardRecipe = ShardRecipe(),
    forward_fn: Callable[[nn.Module, Any], Any] = lambda model, inputs: model(inputs),
    loss_fn: Callable[[Any, torch.Tensor], torch.Tensor] = default_loss,
    config: ParityConfig = ParityConfig(),
    device: torch.device | None = None,
) -> ParityReport:
    """Train a checkpointed, sharded model beside a reference and compare them; call on every rank.

    Args:
        model_fn: builds the model (called once, after seeding; the checkpointed copy is a deepcopy).
        batch_fn: ``step -> (inputs, targets)``, the global batch, the same on every rank; dimension 0
            is split across ranks.
        wrap: applies checkpointing to a model in place (e.g. a call to ``apply_activation_checkpointing``).
        is_block: which modules are blocks: FSDP units, and what ``wrap`` is expected to wrap.
        shard: the sharding recipe and the order of checkpointing and sharding.
        forward_fn: ``(model, inputs) -> output``.
        loss_fn: ``(output, targets) -> scalar loss``; must average over the batch.
        config: steps, learning rate, seed, reference kind and tolerances.
        device: where to train; default CUDA (this rank's) if available, else CPU.

    Returns:
        This rank's ``ParityReport``; ``report.assert_ok()`` raises when anything differed.
    """
    from ckpt_wrapper.distributed import default_device

    device = device or default_device()
    rank, world = _rank_world()
    report = ParityReport(recipe=shard.describe(), reference=config.reference, tolerances=config.tolerances())
    torch.manual_seed(config.seed)
    reference = model_fn().to(device)
    checkpointed = shard_model(copy.deepcopy(reference), shard, is_block=is_block, apply_checkpointing=wrap, device=device)
    if config.reference == "sharded":
        reference = shard_model(reference, shard, is_block=is_block, apply_checkpointing=lambda m: None, device=device)
    report.grads_compared = not (shard.kind == "fsdp1" and not shard.use_orig_params)
    report.world_size = world
    report.wrapped = _wrapped_blocks(checkpointed)
    if not report.wrapped:
        report.failures.append("this wrap did not checkpoint any block: nothing was compared against checkpointing")
    optimizers = [torch.optim.SGD(m.parameters(), lr=config.lr, momentum=config.momentum)
                  for m in (reference, checkpointed)]

    for step in range(config.steps):
        global_batch = torch.utils._pytree.tree_map(
            lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, batch_fn(step)
        )
        local_batch = _local(global_batch, rank, world)
        micro = config.micro_batches
        ref_losses, test_losses = [], []
        for index in range(micro):
            test_part = _local(local_batch, index, micro)
            if config.reference == "sharded":
                ref_part = test_part
            else:  # micro-batch `index` of every rank's slice, so both sides sum the same gradients
                ref_part = _concat([_local(_local(global_batch, r, world), index, micro) for r in range(world)])
            last = index == micro - 1
            outputs = []
            for model, part, sink in ((reference, ref_part, ref_losses), (checkpointed, test_part, test_losses)):
                torch.manual_seed(config.seed + 1 + step * micro + index)  # the same dropout masks for both
                with _gradient_sync(model, enabled=last):
                    output = forward_fn(model, part[0])
                    loss = loss_fn(output, part[1])
                    loss.backward()
                outputs.append(output)
                sink.append(loss.detach().float())
            ref_out = outputs[0] if config.reference == "sharded" else _local((outputs[0],), rank, world)[0]
            _record(report, "output", ref_out, outputs[1])
        ref_loss = _mean_over_ranks(torch.stack(ref_losses).sum(), config.reference == "sharded")
        test_loss = _mean_over_ranks(torch.stack(test_losses).sum(), True)
        _record(report, "loss", ref_loss, test_loss)
        report.losses.append((float(ref_loss), float(test_loss)))
        logger.debug("parity step %d: reference loss %.6g, checkpointed loss %.6g", step, *report.losses[-1])
        ref_recipe = shard if config.reference == "sharded" else ShardRecipe(kind="none")
        if report.grads_compared:
            with _gathered(reference, ref_recipe, grads=True) as ref_grads:
                with _gathered(checkpointed, shard, grads=True) as test_grads:
                    _compare_named(report, "grad", ref_grads, test_grads)
        if step == 0:
            report.recomputes = _recomputes(checkpointed)
            if _checkpoints(checkpointed) and not report.recomputes:
                report.failures.append(
                    f"this wrap recomputed nothing: the {len(report.wrapped)} wrapped block(s) never ran again in "
                    "backward (are they on the forward path, with grad enabled?)"
                )
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        with _gathered(reference, ref_recipe, grads=False) as ref_params:
            with _gathered(checkpointed, shard, grads=False) as test_params:
                _compare_named(report, "param", ref_params, test_params)
        _compare_named(report, "buffer", _buffers(reference), _buffers(checkpointed))
        if report.grads_compared:  # optimizer state lives in flat parameters where gradients do
            _compare_named(report, "optimizer", _optimizer_state(reference, optimizers[0]),
                           _optimizer_state(checkpointed, optimizers[1]))
        if config.eval_between:
            _compare_eval(report, reference, checkpointed, ref_batch=local_batch if config.reference == "sharded"
                          else global_batch, test_batch=local_batch, forward_fn=forward_fn, rank=rank, world=world,
                          sliced=config.reference != "sharded")
    return report


def _wrapped_blocks(model: nn.Module) -> list[str]:
    # ckpt_wrapper's wrappers, and PyTorch's (which hold the block as a child).
    return [clean_name(name) for name, m in model.named_modules()
            if isinstance(m, ActivationWrapper) or "_checkpoint_wrapped_module" in m._modules]


def _recomputes(model: nn.Module) -> int:
    states = [wrap_state(m) for m in model.modules() if isinstance(m, ActivationWrapper)]
    foreign = any("_checkpoint_wrapped_module" in m._modules for m in model.modules())
    # PyTorch's wrappers keep no count: trust them to recompute.
    return sum(state.recomputes for state in states if state is not None) + (1 if foreign else 0)


def _checkpoints(model: nn.Module) -> bool:
    # Offload and cheap recompute do not run the block again; checkpointing does.
    return any(isinstance(m, CheckpointWrapper) for m in model.modules())


def _buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    # Buffers are never sharded (FSDP1, FSDP2 and DDP keep them whole on every rank).
    return {clean_name(name): b.detach().float().clone() for name, b in model.named_buffers() if b is not None}


def _optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Every tensor of the optimizer's state by ``PARAM_FQN:KEY``, full (gathered) on every rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    state = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))["state"]
    return {f"{clean_name(str(fqn))}:{key}": _full(value) for fqn, values in state.items()
            for key, value in values.items() if isinstance(value, torch.Tensor)}


def _concat(parts: list[Batch]) -> Batch:
    return torch.utils._pytree.tree_map(lambda *ts: torch.cat(ts) if isinstance(ts[0], torch.Tensor) else ts[0], *parts)


def _mean_over_ranks(value: torch.Tensor, reduce: bool) -> torch.Tensor:
    if reduce and dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value


@contextlib.contextmanager
def _gradient_sync(model: nn.Module, *, enabled: bool) -> Iterator[None]:
    if enabled:
        yield
    elif hasattr(model, "no_sync"):  # DDP, FSDP1
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def _compare_eval(report: ParityReport, reference: nn.Module, checkpointed: nn.Module, *, ref_batch: Batch,
                  test_batch: Batch, forward_fn: Callable[[nn.Module, Any], Any], rank: int, world: int,
                  sliced: bool) -> None:
    outputs = []
    for model, batch in ((reference, ref_batch), (checkpointed, test_batch)):
        model.eval()
        with torch.no_grad():
            outputs.append(forward_fn(model, batch[0]))
        model.train()
    ref_out = _local((outputs[0],), rank, world)[0] if sliced else outputs[0]
    _record(report, "eval_output", ref_out, outputs[1])


def _compare_named(report: ParityReport, kind: str, ref: dict, test: dict) -> None:
    if set(ref) != set(test):
        report.failures.append(
            f"{kind} names differ: only in reference {sorted(set(ref) - set(test))[:5]}, "
            f"only in checkpointed {sorted(set(test) - set(ref))[:5]}"
        )
    for name in sorted(set(ref) & set(test)):
        _record(report, f"{kind}:{name}", ref[name], test[name])
