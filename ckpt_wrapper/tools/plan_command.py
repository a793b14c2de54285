"""``ckpt-wrapper plan``: choose a checkpointing strategy per block under a memory budget, and save the plan.

    ckpt-wrapper plan --memory-budget 0.5 --out plan.json                 # the built-in GPT
    ckpt-wrapper plan --memory-budget 50% --cost flops --measure saved --out plan.json
    ckpt-wrapper plan --memory-limit 20GiB --optimizer adamw --sharding fsdp2 --world-size 8 --out plan.json
    ckpt-wrapper plan --model mypkg.models:build --batch-fn mypkg.data:batch --blocks LlamaDecoderLayer \\
        --memory-budget 6GiB --out plan.json

It prints the plan table (``print(plan)``) and, with ``--out``, saves the JSON that ``Plan.load`` reads
and ``ckpt-wrapper parity --plan`` applies. ``--model`` names a zero-argument callable returning the
model; the example batch is the inputs of ``--batch-fn``'s step 0 (a callable ``step -> (inputs,
targets)``), or random tokens for the built-in GPT or a model with ``config.vocab_size``. The exit status
is 0 on success and 2, with one line on stderr, for bad arguments or a budget no plan reaches.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Literal

import torch

from ckpt_wrapper.budget import Budget, parse_budget
from ckpt_wrapper.distributed import default_device
from ckpt_wrapper.planner import plan
from ckpt_wrapper.selection import by_class_name
from ckpt_wrapper.testing.command import UsageError, builtin_gpt, load_callable, model_batch_fn
from ckpt_wrapper.tools import flags

__all__ = ["OPTIMIZERS", "PlanCommandOptions", "add_arguments", "add_bound_arguments", "bounds_from_args", "load",
           "optimizer_of", "options_from_args", "run"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class PlanCommandOptions:
    """Everything ``ckpt-wrapper plan`` needs.

    Example:
        >>> from ckpt_wrapper.budget import parse_budget
        >>> from ckpt_wrapper.tools.plan_command import PlanCommandOptions
        >>> options = PlanCommandOptions(memory_budget=parse_budget("6GiB"))
        >>> options.memory_budget.resolve(0), options.cost, options.measure
        (6442450944, 'model', 'saved')
    """

    model: str | None = None
    """``module:callable`` building the model; None for the built-in GPT."""
    batch: str | None = None
    """``module:callable`` giving ``step -> (inputs, targets)``; None for random tokens."""
    blocks: str | None = None
    """Class name(s) of the blocks, comma-separated; None: the children of the largest ``ModuleList``."""
    memory_budget: Budget | None = None
    """The activation memory budget (``ckpt_wrapper.budget`` grammar)."""
    memory_limit: Budget | None = None
    """The step's peak per rank, in bytes."""
    optimizer: str = "none"
    """``none``, ``adamw``, ``adam``, ``sgd`` or ``sgd-momentum``: whose state the peak counts."""
    sharding: str = "none"
    """``none``, ``ddp``, ``fsdp1`` or ``fsdp2``."""
    world_size: int | None = None
    """Ranks the model is sharded over; None: the process group's size, or 1."""
    cost: Literal["model", "flops", "time", "auto"] = "model"
    """``model``, ``flops``, ``time`` or ``auto``."""
    measure: Literal["held", "saved"] = "saved"
    """``held`` or ``saved``."""
    repeats: int = 5
    """Timing rounds."""
    out: str | None = None
    """Where to save the plan's JSON; None: print only."""
    device: str | None = None
    """Device override; default CUDA if present, else CPU."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``plan`` flags to ``parser``.

    Example:
        >>> import argparse
        >>> from ckpt_wrapper.tools.plan_command import add_arguments, options_from_args
        >>> parser = argparse.ArgumentParser()
        >>> add_arguments(parser)
        >>> options = options_from_args(parser.parse_args(["--memory-budget", "50%", "--cost", "flops"]))
        >>> options.memory_budget.resolve(1000), options.cost, options.model
        (500, 'flops', None)
    """
    parser.add_argument("--model", default="gpt",
                        help="gpt (the built-in small GPT of ckpt-wrapper parity) or module:callable returning your "
                             "model (default: gpt)")
    parser.add_argument("--batch-fn",
                        help="module:callable, step -> (inputs, targets); step 0's inputs are the example batch "
                             "(default: random tokens for the built-in GPT or a model with config.vocab_size)")
    flags.add_blocks_flag(parser, default=None, what="the children of the model's largest ModuleList")
    add_bound_arguments(parser)
    parser.add_argument("--cost", choices=("model", "flops", "time", "auto"), default="model",
                        help="what a strategy costs: model (seconds from FLOPs, bytes and ops: deterministic), extra "
                             "FLOPs, measured time, or auto (time on CUDA, FLOPs plus measured overhead on CPU) "
                             "(default: model)")
    parser.add_argument("--measure", choices=("held", "saved"), default="saved",
                        help="activation bytes as bytes of the storages forward left alive (exact, deterministic), "
                             "or allocator bytes held after forward (default: saved)")
    parser.add_argument("--repeats", type=int, default=5, help="timing rounds per strategy (default: 5)")
    parser.add_argument("--out", metavar="PLAN.json",
                        help="save the plan as JSON here, for Plan.load and ckpt-wrapper parity --plan "
                             "(default: print only)")
    flags.add_device_flag(parser)


OPTIMIZERS = {"none": None, "adamw": "AdamW", "adam": "Adam", "sgd": "SGD", "sgd-momentum": "SGD"}
"""``--optimizer`` values -> the ``torch.optim`` class whose state the peak counts."""


def optimizer_of(name: str) -> object:
    """The ``plan(optimizer=...)`` value for an ``--optimizer`` name (a class or a factory; None for none)."""
    if name == "sgd-momentum":
        return lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9)
    return None if OPTIMIZERS[name] is None else getattr(torch.optim, OPTIMIZERS[name])


def _limit_arg(text: str) -> Budget:
    try:
        return parse_budget(text, name="--memory-limit")
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_bound_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--memory-budget``, ``--memory-limit``, ``--optimizer``, ``--sharding``, ``--world-size``."""
    parser.add_argument("--memory-budget", type=flags.budget_arg, default=None,
                        help="activation memory budget: a fraction of the unwrapped model's (0.5, 50%%) or bytes "
                             "(6GiB, 512MB) (default: 0.5 unless --memory-limit is given)")
    parser.add_argument("--memory-limit", type=_limit_arg, default=None,
                        help="the predicted peak of a whole training step per rank, in bytes (20GiB): parameters, "
                             "gradients, optimizer state, sharding buffers, activations, recompute (default: none)")
    parser.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="none",
                        help="the optimizer whose state the step's peak counts (default: none)")
    parser.add_argument("--sharding", choices=("none", "ddp", "fsdp1", "fsdp2"), default="none",
                        help="how the model is made data-parallel after planning (default: none)")
    parser.add_argument("--world-size", type=int, default=None,
                        help="ranks the model is sharded over (default: the process group's size, or 1)")


def bounds_from_args(args: argparse.Namespace) -> dict[str, object]:
    """The bound flags as ``PlanCommandOptions`` fields (``--memory-budget`` 0.5 when neither bound is given).

    Raises:
        ValueError: for a fractional ``--memory-limit`` or a ``--world-size`` below 1.
    """
    if args.memory_limit is not None and args.memory_limit.nbytes is None:
        raise ValueError(f"--memory-limit: expected bytes per rank such as 20GiB, found {args.memory_limit}; "
                         "a fraction of activation memory is --memory-budget")
    if args.world_size is not None and args.world_size < 1:
        raise ValueError(f"--world-size: expected an integer >= 1, found {args.world_size}")
    budget = args.memory_budget
    if budget is None and args.memory_limit is None:
        budget = flags.budget_arg("0.5")
    return {"memory_budget": budget, "memory_limit": args.memory_limit, "optimizer": args.optimizer,
            "sharding": args.sharding, "world_size": args.world_size}


def options_from_args(args: argparse.Namespace) -> PlanCommandOptions:
    """Turn parsed flags into ``PlanCommandOptions``.

    Raises:
        ValueError: for ``--repeats`` below 1.
    """
    if args.repeats < 1:
        raise ValueError(f"--repeats: expected an integer >= 1, found {args.repeats}")
    return PlanCommandOptions(model=None if args.model == "gpt" else args.model, batch=args.batch_fn,
                              blocks=args.blocks, **bounds_from_args(args), cost=args.cost,  # type: ignore[arg-type]
                              measure=args.measure, repeats=args.repeats, out=args.out, device=args.device)


def load(options: PlanCommandOptions) -> tuple[torch.nn.Module, object, object]:
    """Build the model, its example batch and the block selector the options name.

    Raises:
        UsageError: (a ``ValueError``) for a model, batch or blocks that cannot be used.
    """
    device = default_device(options.device)
    torch.manual_seed(0)
    model = builtin_gpt() if options.model is None else load_callable(options.model, flag="--model")()
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"--model {options.model}: expected a callable returning an nn.Module, found "
                         f"{type(model).__name__}")
    model.to(device)
    batch_fn = (load_callable(options.batch, flag="--batch-fn") if options.batch is not None
                else model_batch_fn(model, rows=2, name=options.model))
    inputs = batch_fn(0)[0]
    inputs = torch.utils._pytree.tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, inputs)
    selector = by_class_name(options.blocks) if options.blocks else None
    if selector is not None and not selector.select(model):
        classes = sorted({type(m).__name__ for m in model.modules()})
        raise UsageError(f"--blocks {options.blocks}: expected the class name(s) of the model's blocks, found "
                         f"no module of that class; fix: pick from the model's classes {', '.join(classes[:12])}")
    return model, inputs, selector


def run(options: PlanCommandOptions) -> int:
    """Plan the model, print the table, save the JSON when asked.

    Returns:
        0 on success; 2 (after one line on stderr) for a model, batch or blocks that cannot be used, or a
        bound that no choice of strategies reaches.
    """
    try:
        model, inputs, selector = load(options)
        result = plan(model, inputs, memory_budget=options.memory_budget, memory_limit=options.memory_limit,
                      optimizer=optimizer_of(options.optimizer), sharding=options.sharding,
                      world_size=options.world_size, check_fn=selector, measure=options.measure, cost=options.cost,
                      repeats=options.repeats)
    except ValueError as error:  # UsageError, the planner's: no blocks, an unreachable bound
        print(f"ckpt-wrapper plan: error: {' '.join(str(error).split())}", file=sys.stderr, flush=True)
        return 2
    print(result)
    if options.out:
        result.save(options.out)
        print(f"saved the plan to {options.out}: ckpt-wrapper parity --plan {options.out} checks it")
    return 0
