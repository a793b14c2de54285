"""The memory-budget planner: per block, the strategy that fits the budget at the least cost.

``plan(model, example_batch, memory_budget=0.5)`` profiles each distinct block once under every
strategy (activation bytes held after forward; recompute cost as extra FLOPs on CPU, measured time on
CUDA), then picks one strategy per block by dynamic programming: the least total cost whose predicted
activation memory is within the budget, ties broken toward less memory (so a smaller budget never
predicts more memory). Under torch.distributed, rank 0 plans and broadcasts: every rank applies the
same plan (different plans on different ranks would hang FSDP).

Strategies: ``none``; ``cheap`` (recompute norm and activation outputs, see ``cheap_recompute_wrapper``);
``regions:NAMES`` (checkpoint those children, e.g. ``regions:mlp``), optionally with ``cheap+``;
``sac:matmuls`` and ``sac:titan`` (op-level selective checkpointing); ``full``; on CUDA also
``offload`` and ``full+offload``.

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

from __future__ import annotations

import copy
import dataclasses
import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

from ckpt_wrapper.measure import held_after_forward, live_bytes_after_forward, step_flops
from ckpt_wrapper.cheap_recompute import cheap_modules, cheap_recompute_wrapper
from ckpt_wrapper.selective import checkpoint_regions, region_candidates, selective_context_fn
from ckpt_wrapper.wrapper import checkpoint_wrapper

__all__ = ["Plan", "PlanEntry", "plan", "block_strategies", "apply_strategy"]

_GRID = 4096  # memory is planned in units of total/_GRID: fixed per model, so plans for all budgets agree


@dataclasses.dataclass(frozen=True)
class PlanEntry:
    """One block's choice."""

    name: str
    """Fully qualified name of the block."""
    strategy: str
    """The strategy chosen."""
    bytes: int
    """Activation bytes the block holds under it (from the profile)."""
    cost: float
    """Its extra cost over ``none``: FLOPs or seconds, as ``Plan.cost_unit`` says."""


@dataclasses.dataclass
class Plan:
    """A plan: a strategy per block, what it should cost, and how to apply it."""

    entries: list[PlanEntry]
    budget_bytes: int
    unwrapped_bytes: int
    """Activation bytes of the unwrapped model (the base of fractional budgets)."""
    predicted_bytes: int
    step_seconds: float
    """Measured step time of the unwrapped model."""
    predicted_seconds: float
    cost_unit: Literal["flops", "seconds"]
    profile: dict[str, dict[str, tuple[int, float]]] = dataclasses.field(default_factory=dict)
    """Per block signature: strategy -> (bytes held, extra cost)."""

    def apply(self, model: nn.Module) -> list[str]:
        """Wrap ``model``'s blocks as planned, in place; returns the names of the modules wrapped."""
        from ckpt_wrapper.offload import OffloadEngine

        engine = OffloadEngine()  # one pool for every offloading block, so backward can prefetch
        blocks = []
        for entry in self.entries:  # resolve every block first: a failed apply must leave the model as it was
            try:
                blocks.append(model.get_submodule(entry.name))
            except AttributeError:
                raise ValueError(f"the plan names block {entry.name!r}, which this model does not have; "
                                 "plan and model must match") from None
        wrapped: list[str] = []
        for entry, block in zip(self.entries, blocks):
            wrapped += apply_strategy(block, entry.strategy, fqn=entry.name, engine=engine)
        return wrapped

    def to_json(self) -> str:
        """The plan as JSON (``Plan.from_json`` reads it back)."""
        data = dataclasses.asdict(self)
        data["entries"] = [dataclasses.asdict(e) for e in self.entries]
        return json.dumps({"ckpt_wrapper_plan": 1, **data}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        """Read a plan written by ``to_json``.

        Raises:
            ValueError: if the text is not a ckpt_wrapper plan.
        """
        data = json.loads(text)
        if not isinstance(data, dict) or data.pop("ckpt_wrapper_plan", None) != 1:
            raise ValueError("not a ckpt_wrapper plan (expected the JSON written by Plan.to_json / Plan.save)")
        try:
            data["entries"] = [PlanEntry(**e) for e in data["entries"]]
            data["profile"] = {k: {s: tuple(v) for s, v in d.items()} for k, d in data.get("profile", {}).items()}
            return cls(**data)
        except (KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"malformed ckpt_wrapper plan ({error}); expected the JSON written by Plan.to_json") from None

    def save(self, path: str) -> None:
        """Write the plan to ``path`` as JSON."""
        with open(path, "w") as handle:
            handle.write(self.to_json())

    @classmethod
    def load(cls, path: str) -> Plan:
        """Read a plan saved with ``save``."""
        with open(path) as handle:
            return cls.from_json(handle.read())

    def __str__(self) -> str:
        mib = 2**20
        unit = "GFLOP" if self.cost_unit == "flops" else "ms"
        scale = 1e-9 if self.cost_unit == "flops" else 1e3
        width = max([len(e.name) for e in self.entries] + [5])
        lines = [f"{'block':<{width}}  {'strategy':<24} {'MiB held':>9} {'extra ' + unit:>12}"]
        for e in self.entries:
            lines.append(f"{e.name:<{width}}  {e.strategy:<24} {e.bytes / mib:>9.2f} {e.cost * scale:>12.3f}")
        total_cost = sum(e.cost for e in self.entries)
        lines.append(f"{'total':<{width}}  {'':<24} {sum(e.bytes for e in self.entries) / mib:>9.2f} {total_cost * scale:>12.3f}")
        lines.append(
            f"activation memory: predicted {self.predicted_bytes / mib:.2f} MiB "
            f"({self.predicted_bytes / max(self.unwrapped_bytes, 1):.3f}x of unwrapped {self.unwrapped_bytes / mib:.2f} MiB), "
            f"budget {self.budget_bytes / mib:.2f} MiB"
        )
        lines.append(
            f"step time: predicted {self.predicted_seconds * 1e3:.1f} ms "
            f"({self.predicted_seconds / max(self.step_seconds, 1e-12):.3f}x of unwrapped {self.step_seconds * 1e3:.1f} ms)"
        )
        return "\n".join(lines)


def block_strategies(block: nn.Module, *, device: torch.device) -> list[str]:
    """The strategies the planner considers for ``block``, cheapest first.

    Example:
        >>> import torch
        >>> from ckpt_wrapper.planner import block_strategies
        >>> from ckpt_wrapper.testing.models import Block, GPTConfig
        >>> block_strategies(Block(GPTConfig(d_model=32, n_head=4)), device=torch.device("cpu"))[:4]
        ['none', 'cheap', 'regions:attn', 'cheap+regions:attn']
    """
    strategies = ["none"]
    has_cheap = bool(cheap_modules(block))
    if has_cheap:
        strategies.append("cheap")
    regions = region_candidates(block)
    groups = [[r] for r in regions] + ([regions] if len(regions) > 1 else [])
    for group in groups:
        strategies.append(f"regions:{'+'.join(group)}")
        if has_cheap:
            strategies.append(f"cheap+regions:{'+'.join(group)}")
    strategies += ["sac:matmuls", "sac:titan", "full"]
    if device.type == "cuda":
        strategies += ["offload", "full+offload"]
    return strategies


def apply_strategy(block: nn.Module, strategy: str, *, fqn: str = "", engine: Any = None) -> list[str]:
    """Wrap ``block`` (in place) as ``strategy`` says; returns the fully qualified names wrapped.

    Raises:
        ValueError: for an unknown strategy.
    """
    from ckpt_wrapper.offload import offload_wrapper

    cheap = strategy == "cheap" or strategy.startswith("cheap+")
    main = "none" if strategy == "cheap" else strategy.removeprefix("cheap+")
    wrapped: list[str] = []
    if main.startswith("regions:"):
        wrapped += checkpoint_regions(block, main[len("regions:"):].split("+"), prefix=fqn)
    elif main != "none":
        if main == "full":
            checkpoint_wrapper(block)
        elif main.startswith("sac:"):
            checkpoint_wrapper(block, context_fn=selective_context_fn(main[len("sac:"):]))
        elif main == "offload":
            offload_wrapper(block, **({"engine": engine} if engine is not None else {}))
        elif main == "full+offload":
            checkpoint_wrapper(block, offload=engine if engine is not None else True)
        else:
            raise ValueError(f"unknown strategy {strategy!r} for block {fqn or type(block).__name__}")
        block.__dict__["_ckpt_fqn"] = fqn
        wrapped.append(fqn)
    if cheap:
        cheap_recompute_wrapper(block).__dict__["_ckpt_fqn"] = fqn
        wrapped.append(fqn)
    return wrapped


def _call(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _scalar(output: Any) -> torch.Tensor:
    leaves = [t for t in torch.utils._pytree.tree_leaves(output) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return sum(t.float().sum() for t in leaves)  # type: ignore[return-value]


def _default_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.ModuleList, nn.Sequential)) and len(m) > 1]
    if not lists:
        raise ValueError(f"plan could not find the blocks of {type(model).__name__} (no ModuleList of blocks); pass check_fn=")
    name, blocks = max(lists, key=lambda item: sum(p.numel() for p in item[1].parameters()))
    return [(f"{name}.{i}" if name else str(i), m) for i, m in enumerate(blocks)]


def _signature(block: nn.Module, args: tuple, kwargs: dict) -> str:
    shapes = [tuple(t.shape) for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    params = [tuple(p.shape) for p in block.parameters()]
    return f"{type(block).__qualname__}{shapes}{hash(tuple(params)) & 0xffffff:x}"


def _least_seconds(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times)  # noise on a shared machine only ever adds


def _held(forward: Callable[[], Any], device: torch.device, measure: str, exclude: Any) -> int:
    if measure == "saved":  # deterministic: storages made by forward and still alive after it
        return live_bytes_after_forward(forward, exclude=exclude)
    return held_after_forward(forward, device=device)


def plan(
    model: nn.Module,
    example_batch: Any,
    *,
    memory_budget: float | int,
    check_fn: Callable[[nn.Module], bool] | None = None,
    strategies: Sequence[str] | None = None,
    measure: Literal["held", "saved"] = "held",
    cost: Literal["auto", "flops", "time"] = "auto",
    repeats: int = 5,
) -> Plan:
    """Choose per block the strategy that meets ``memory_budget`` at the least predicted step time.

    Call it on every rank under torch.distributed: rank 0 profiles and plans, the plan is broadcast.
    ``model`` is not modified (blocks are profiled on copies); apply the result with ``plan.apply(model)``.

    Args:
        model: the unwrapped model, on the device it trains on.
        example_batch: what the model is called with: a tensor, a tuple (positional) or a dict (keywords).
        memory_budget: a fraction of the unwrapped activation memory (a number in (0, 1]), or bytes
            (a number above 1).
        check_fn: which modules are blocks (a selector or ``module -> bool``); default: the children of
            the model's largest ``ModuleList``.
        strategies: restrict the candidates (default ``block_strategies(block)``).
        measure: ``held`` (allocator bytes held after forward: counts everything, with allocator noise)
            or ``saved`` (bytes of the storages forward created that are still alive after it: exact and
            deterministic, CPU or CUDA).
        cost: what a strategy costs: ``flops`` (extra FLOPs: deterministic, but blind to Python dispatch
            and elementwise recompute), ``time`` (measured extra seconds, least of ``repeats``), or
            ``auto``: time on CUDA; on CPU extra FLOPs plus any measured time beyond what those FLOPs
            explain (selective checkpointing's per-op dispatch, hooks), in FLOP-equivalents.
        repeats: timing rounds: strategies are timed interleaved, round by round, and the median kept.

    Returns:
        The ``Plan``; ``print(plan)`` shows the table.

    Raises:
        ValueError: if no choice of strategies fits the budget (the message says the least memory
            reachable), or for a budget out of range.

    Example:
        >>> import torch
        >>> import ckpt_wrapper
        >>> from ckpt_wrapper.testing.models import GPT, GPTConfig
        >>> model = GPT(GPTConfig(n_layer=2, d_model=32, n_head=4, seq_len=16, vocab_size=64))
        >>> p = ckpt_wrapper.plan(model, torch.randint(0, 64, (2, 16)), memory_budget=0.3, measure="saved", cost="flops")
        >>> p.predicted_bytes <= p.budget_bytes, len(p.entries)
        (True, 2)
    """
    if (isinstance(memory_budget, bool) or not isinstance(memory_budget, (int, float))
            or not math.isfinite(memory_budget) or memory_budget <= 0):
        raise ValueError(f"memory_budget must be a fraction in (0, 1] or a number of bytes > 1, got {memory_budget!r}")
    if cost not in ("auto", "flops", "time"):
        raise ValueError(f"cost must be 'auto', 'flops' or 'time', got {cost!r}")
    if measure not in ("held", "saved"):
        raise ValueError(f"measure must be 'held' or 'saved', got {measure!r}")
    if dist.is_initialized() and dist.get_world_size() > 1:
        payload: list[Any] = [None]
        if dist.get_rank() == 0:
            try:
                payload = [("plan", _plan_here(model, example_batch, memory_budget, check_fn, strategies, measure, cost,
                                               repeats).to_json())]
            except BaseException as error:  # every rank must leave the broadcast, with the same outcome
                dist.broadcast_object_list([("error", f"{type(error).__name__}: {error}")], src=0)
                raise
        dist.broadcast_object_list(payload, src=0)
        kind, text = payload[0]
        if kind == "error":
            raise (ValueError if text.startswith("ValueError: ") else RuntimeError)(f"rank 0 failed to plan: {text}")
        return Plan.from_json(text)
    return _plan_here(model, example_batch, memory_budget, check_fn, strategies, measure, cost, repeats)


def _plan_here(model: nn.Module, batch: Any, memory_budget: float | int, check_fn: Any, strategies: Any,
               measure: str, cost: str, repeats: int) -> Plan:
    from ckpt_wrapper.selection import BlockSelector, walk

    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    if check_fn is None:
        blocks = _default_blocks(model)
    elif isinstance(check_fn, BlockSelector):
        blocks = check_fn.select(model)
    else:
        blocks = list(walk(model, lambda name, module: bool(check_fn(module))))
    if not blocks:
        raise ValueError("plan: check_fn selected no block")

    inputs: dict[str, tuple[tuple, dict]] = {}

    needs_grad: dict[str, list[bool]] = {}

    def flags(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            needs_grad.setdefault(name, [isinstance(t, torch.Tensor) and t.requires_grad
                                         for t in torch.utils._pytree.tree_leaves((args, kwargs))])
        return hook

    def capture(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if name in inputs:
                return
            leaves, spec = torch.utils._pytree.tree_flatten((args, kwargs))
            caches = [type(x).__name__ for x in leaves if type(x).__name__.endswith("Cache")]
            if caches:
                raise ValueError(f"block {name} is called with a {caches[0]}: a recomputed block would update it "
                                 "twice. Plan (and train) with use_cache=False in the batch.")
            # Inputs require grad as they do in the model (rotary cos/sin do not: making them require grad
            # inflates what the unwrapped block saves); other state is snapshotted as the block saw it.
            leaves = [t.detach().clone().requires_grad_(g) if isinstance(t, torch.Tensor) else copy.deepcopy(t)
                      for t, g in zip(leaves, needs_grad[name])]
            inputs[name] = torch.utils._pytree.tree_unflatten(leaves, spec)
        return hook

    # Which inputs require grad is only known with grad on; the copies are taken with it off.
    for make_hook, grad_mode in ((flags, torch.enable_grad), (capture, torch.no_grad)):
        handles = [m.register_forward_pre_hook(make_hook(n), with_kwargs=True) for n, m in blocks]
        try:
            with grad_mode():
                _call(model, batch)
        finally:
            for h in handles:
                h.remove()

    unwrapped = _held(lambda: _call(model, batch), device, measure, list(model.parameters()))
    step = lambda: _scalar(_call(model, batch)).backward()
    if cost == "auto":
        cost = "time" if device.type == "cuda" else "flops+overhead"
    cost_unit = "seconds" if cost == "time" else "flops"
    # Profiling runs backward on the user's model: their gradients are put back afterwards.
    grads = {p: p.grad for p in model.parameters()}
    for p in grads:  # backward accumulates into an existing .grad in place: start from none
        p.grad = None
    try:
        model_flops = step_flops(step)
        step_seconds = _least_seconds(step, device, repeats)
    finally:
        for p, g in grads.items():
            p.grad = g

    profile: dict[str, dict[str, tuple[int, float]]] = {}
    options: list[list[tuple[str, int, float, int]]] = []  # per block: (strategy, held, cost, saving)
    for name, block in blocks:
        args, kwargs = inputs[name]
        key = _signature(block, args, kwargs)
        if key not in profile:
            profile[key] = _profile_block(block, args, kwargs, strategies, device, measure, repeats, cost,
                                          step_seconds / max(model_flops, 1))
        table = profile[key]
        base = table["none"][0]
        input_bytes = sum(t.numel() * t.element_size() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                          if isinstance(t, torch.Tensor) and t.is_floating_point())
        rows = []
        for strategy, (held, cost) in table.items():
            saving = base - held + (input_bytes if "offload" in strategy else 0)
            rows.append((strategy, held, cost, saving))
        options.append(rows)

    budget = int(memory_budget * unwrapped) if memory_budget <= 1 else int(memory_budget)
    chosen = _choose(options, unwrapped, budget)
    entries = [PlanEntry(name, s, held, cost) for (name, _), (s, held, cost, _) in zip(blocks, chosen)]
    predicted_bytes = unwrapped - sum(row[3] for row in chosen)
    extra = sum(e.cost for e in entries)
    seconds_per_cost = 1.0 if cost_unit == "seconds" else step_seconds / max(model_flops, 1)
    return Plan(entries=entries, budget_bytes=budget, unwrapped_bytes=unwrapped, predicted_bytes=predicted_bytes,
                step_seconds=step_seconds, predicted_seconds=step_seconds + extra * seconds_per_cost,
                cost_unit=cost_unit, profile=profile)


def _profile_block(block: nn.Module, args: tuple, kwargs: dict, strategies: Sequence[str] | None,
                   device: torch.device, measure: str, repeats: int, cost: str,
                   seconds_per_flop: float) -> dict[str, tuple[int, float]]:
    names = list(strategies) if strategies is not None else block_strategies(block, device=device)
    if "none" not in names:
        names.insert(0, "none")
    fresh = lambda: torch.utils._pytree.tree_map(
        lambda x: x if isinstance(x, torch.Tensor) else copy.deepcopy(x), (args, kwargs))
    measured: dict[str, tuple[int, float, float]] = {}
    steps: dict[str, Callable[[], Any]] = {}
    for strategy in names:
        trial = copy.deepcopy(block)
        apply_strategy(trial, strategy)
        forward = lambda trial=trial: (lambda a, k: trial(*a, **k))(*fresh())
        steps[strategy] = step = lambda forward=forward: _scalar(forward()).backward()
        held = _held(forward, device, measure, list(trial.parameters()))
        flops = float(step_flops(step)) if cost != "time" else 0.0
        measured[strategy] = (held, flops, 0.0)
    if cost != "flops":
        # Interleaved rounds, median per strategy: drift and background load hit every strategy alike,
        # where timing one strategy after another attributes them to whichever ran at the wrong moment.
        samples: dict[str, list[float]] = {name: [] for name in names}
        for _ in range(max(repeats, 1)):
            for name in names:
                samples[name].append(_least_seconds(steps[name], device, 1))
        measured = {name: (held, flops, statistics.median(samples[name])) for name, (held, flops, _) in measured.items()}
    _, base_flops, base_seconds = measured["none"]
    table: dict[str, tuple[int, float]] = {}
    for strategy, (held, flops, seconds) in measured.items():
        extra_flops, extra_seconds = max(flops - base_flops, 0.0), max(seconds - base_seconds, 0.0)
        if cost == "time":
            table[strategy] = (held, extra_seconds)
        elif cost == "flops":
            table[strategy] = (held, extra_flops)
        else:  # FLOPs, plus the time those FLOPs do not explain, in FLOP-equivalents
            unexplained = max(extra_seconds - extra_flops * seconds_per_flop, 0.0)
            table[strategy] = (held, extra_flops + unexplained / max(seconds_per_flop, 1e-30))
    return table


def _choose(options: list[list[tuple[str, int, float, int]]], unwrapped: int, budget: int) -> list[tuple[str, int, float, int]]:
    """Least total cost with total saving >= unwrapped - budget; ties go to the larger saving."""
    unit = max(unwrapped / _GRID, 1.0)
    need = max(0, math.ceil((unwrapped - budget) / unit))
    # dp[j]: (cost, -saving, choices) reaching at least j units of saving (capped at need).
    inf = (math.inf, 0, ())
    dp: list[tuple[float, int, tuple[int, ...]]] = [inf] * (need + 1)
    dp[0] = (0.0, 0, ())
    for rows in options:
        nxt = [inf] * (need + 1)
        for j, (cost, neg_saving, picks) in enumerate(dp):
            if cost == math.inf:
                continue
            for index, (_, _, extra, saving) in enumerate(rows):
                k = min(need, j + max(0, math.floor(saving / unit)))
                cand = (cost + extra, neg_saving - saving, picks + (index,))
                if cand[:2] < nxt[k][:2]:
                    nxt[k] = cand
        dp = nxt
    if dp[need][0] == math.inf:
        best = unwrapped - sum(max(row[3] for row in rows) for rows in options)
        raise ValueError(
            f"no plan fits a budget of {budget / 2**20:.2f} MiB: the least activation memory reachable is about "
            f"{best / 2**20:.2f} MiB ({best / max(unwrapped, 1):.3f}x of unwrapped). Raise the budget, or add offload "
            "(on an accelerator) to the strategies."
        )
    return [rows[i] for rows, i in zip(options, dp[need][2])]
