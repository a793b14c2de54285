"""``ckpt-wrapper inspect``: what one training step saves, recomputes and offloads, before and after a plan.

    ckpt-wrapper inspect                                            # the built-in GPT, unwrapped only
    ckpt-wrapper inspect --memory-budget 0.3 --optimizer adamw --png step.png
    ckpt-wrapper inspect --model mypkg.models:build --blocks LlamaDecoderLayer --memory-limit 20GiB

It prints ``ckpt_wrapper.report``'s tables: per block the bytes forward saves (unwrapped and planned),
the ops recomputed and the bytes offloaded; the largest saved tensors with the op and module that made
them; the measured step peak against the plan's prediction. ``--png`` writes the memory timeline (needs
matplotlib: without it, one line says so and the tables still print). A plan is made when a bound is
given (``--memory-budget`` or ``--memory-limit``), or read with ``--plan``. Exit status 0, or 2 with one
line on stderr for bad arguments or an unreachable bound.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from ckpt_wrapper.planner import Plan
from ckpt_wrapper.report import report
from ckpt_wrapper.tools import flags, plan_command

__all__ = ["InspectOptions", "add_arguments", "options_from_args", "run"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class InspectOptions:
    """Everything ``ckpt-wrapper inspect`` needs.

    Example:
        >>> from ckpt_wrapper.tools.inspect_command import InspectOptions
        >>> InspectOptions().png is None
        True
    """

    source: plan_command.PlanCommandOptions = dataclasses.field(default_factory=plan_command.PlanCommandOptions)
    """The model, batch, blocks and bounds, as ``ckpt-wrapper plan`` reads them."""
    planned: bool = False
    """Whether a bound was given, so a plan is made."""
    plan: str | None = None
    """A plan JSON to report on instead of planning."""
    png: str | None = None
    """Where to write the memory timeline PNG; None: no PNG."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``inspect`` flags to ``parser``."""
    parser.add_argument("--model", default="gpt", help="gpt (the built-in small GPT) or module:callable returning your "
                                                       "model (default: gpt)")
    parser.add_argument("--batch-fn", help="module:callable, step -> (inputs, targets); step 0's inputs are the batch "
                                           "(default: random tokens for a model with config.vocab_size)")
    flags.add_blocks_flag(parser, default=None, what="the children of the model's largest ModuleList")
    plan_command.add_bound_arguments(parser)
    parser.add_argument("--plan", metavar="PLAN.json", help="report on this saved plan instead of planning")
    parser.add_argument("--png", metavar="STEP.png", help="write the memory timeline here (needs matplotlib)")
    flags.add_device_flag(parser)


def options_from_args(args: argparse.Namespace) -> InspectOptions:
    """Turn parsed flags into ``InspectOptions``.

    Raises:
        ValueError: for a fractional ``--memory-limit`` or a bad ``--world-size``.
    """
    planned = args.memory_budget is not None or args.memory_limit is not None
    source = plan_command.PlanCommandOptions(model=None if args.model == "gpt" else args.model, batch=args.batch_fn,
                                             blocks=args.blocks, device=args.device,
                                             **plan_command.bounds_from_args(args))  # type: ignore[arg-type]
    return InspectOptions(source=source, planned=planned, plan=args.plan, png=args.png)


def run(options: InspectOptions) -> int:
    """Report on the model; print the tables, write the PNG when asked.

    Returns:
        0 on success; 2 (after one line on stderr) for unusable arguments or an unreachable bound.
    """
    source = options.source
    try:
        model, inputs, selector = plan_command.load(source)
        optimizer = plan_command.optimizer_of(source.optimizer)
        keywords = {}
        if options.planned and options.plan is None:
            keywords = dict(memory_budget=source.memory_budget, memory_limit=source.memory_limit,
                            sharding=source.sharding, world_size=source.world_size)
        if selector is not None:
            keywords["check_fn"] = selector
        given = Plan.load(options.plan) if options.plan else None
        result = report(model, inputs, plan=given, optimizer=optimizer, **keywords)
    except (ValueError, OSError) as error:
        print(f"ckpt-wrapper inspect: error: {' '.join(str(error).split())}", file=sys.stderr, flush=True)
        return 2
    print(result)
    if options.png:
        try:
            result.save_timeline(options.png)
            print(f"wrote the memory timeline to {options.png}")
        except RuntimeError as error:  # no matplotlib: the tables above are the report
            print(f"ckpt-wrapper inspect: no PNG: {error}", flush=True)
    return 0
