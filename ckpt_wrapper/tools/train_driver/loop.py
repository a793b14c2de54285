"""The driver's run: set up (checkpoint, compile, shard), train, save, summarise.

Example:
    >>> from ckpt_wrapper.tools.train_driver.loop import main
    >>> main(["--parallel", "fsdp2", "--sharding-strategy", "HYBRID_SHARD"])
    Traceback (most recent call last):
    ...
    SystemExit: 2
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ckpt_wrapper import by_class_name, every_nth
from ckpt_wrapper.distributed import default_device, init_distributed, resolve_dtype, shutdown_distributed
from ckpt_wrapper.testing.data import lm_loss
from ckpt_wrapper.testing.recipes import shard_model
from ckpt_wrapper.tools import flags
from ckpt_wrapper.tools.train_driver.args import UsageError, build_parser, check_args
from ckpt_wrapper.tools.train_driver.checkpoints import Checkpoints
from ckpt_wrapper.tools.train_driver.modes import (
    Batches, block_names, build_model, compile_blocks, learning_rate, make_checkpointing, model_logits, wrapper_for,
)
from ckpt_wrapper.tools.train_driver.progress import MiB, Progress, peak_memory, summary_text

__all__ = ["Setup", "main", "run", "setup"]


@dataclasses.dataclass
class Setup:
    """A model ready to train and what was done to it."""

    model: nn.Module
    """The model to train (sharded, or the DDP / FSDP1 / accelerate module around it)."""
    optimizer: Any
    """Its AdamW (accelerate's wrapper under ``--parallel accelerate``)."""
    wrapped: list[str]
    """The names of the checkpointed blocks."""
    described: str
    """One line on the parallelism, for the log and the summary."""
    accelerator: Any = None
    """The ``accelerate.Accelerator`` under ``--parallel accelerate``, else None."""


def setup(args: argparse.Namespace, model: nn.Module, names: list[str], batches: Batches, device: torch.device,
          rank: int) -> Setup:
    """Checkpoint, compile and shard ``model`` as the flags say."""
    rows = slice(rank * args.batch, (rank + 1) * args.batch)
    ac = make_checkpointing(args, names, lambda: batches(1)[0][rows].to(device), rank)
    if args.parallel == "accelerate":
        return _setup_accelerate(args, model, names)
    wrapped: list[str] = []

    def checkpoint_then_compile(target: nn.Module) -> None:
        wrapped.extend(ac(target))
        if args.compile:
            compile_blocks(target, names, args.compile_backend)

    recipe = flags.recipe_from_args(args)
    if recipe.kind in ("ddp", "none"):  # their mixed precision is autocast in the loop
        recipe = dataclasses.replace(recipe, param_dtype=None, reduce_dtype=None)
    model = shard_model(model, recipe, is_block=by_class_name(*names), apply_checkpointing=checkpoint_then_compile,
                        device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    return Setup(model, optimizer, wrapped, recipe.describe())


def _setup_accelerate(args: argparse.Namespace, model: nn.Module, names: list[str]) -> Setup:
    from accelerate import Accelerator

    from ckpt_wrapper.integrations.accelerate import apply_checkpointing

    options = {} if args.param_dtype is None else {"mixed_precision": {"fp32": "no"}.get(args.param_dtype,
                                                                                       args.param_dtype)}
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), **options)
    # Declared as HF models do: accelerate's FSDP plugin makes these FSDP units unless its config names others.
    model._no_split_modules = list(names)
    wrapped: list[str] = []
    if args.ac != "none":
        selector = by_class_name(*names) if args.every == 1 else every_nth(args.every, by_class_name(*names))
        wrapped = apply_checkpointing(accelerator, model, check_fn=selector, checkpoint_wrapper_fn=wrapper_for(args))
    if getattr(accelerator, "is_fsdp2", False):  # FSDP2 prepares model and optimizer together
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
        model, optimizer = accelerator.prepare(model, optimizer)
    else:  # FSDP1 flattens parameters: the optimizer must be built on the prepared model
        model = accelerator.prepare(model)
        optimizer = accelerator.prepare(torch.optim.AdamW(model.parameters(), lr=args.lr))
    kind = str(accelerator.distributed_type).rsplit(".", 1)[-1]
    note = " (accelerate runs its FSDP plugin on accelerators only)" if kind == "MULTI_CPU" and os.environ.get(
        "ACCELERATE_USE_FSDP", "").lower() == "true" else ""
    return Setup(model, optimizer, wrapped, f"accelerate {kind}{note}", accelerator)


def run(args: argparse.Namespace) -> int:
    """Train as the flags say; return the exit status.

    Raises:
        UsageError: when the flags describe a run that cannot work (found before the first step).
    """
    device = default_device(args.device)
    owns_group = False
    if args.parallel != "accelerate":
        owns_group = init_distributed(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    try:
        status = _train(args, device, rank, world)
    except BaseException:
        # No barrier: a rank stuck in a collective would never reach it; torchrun stops the rest.
        if owns_group:
            dist.destroy_process_group()
        raise
    if owns_group or args.parallel == "accelerate":
        shutdown_distributed()  # barrier, destroy, and free the groups now: see its docstring for why
    elif dist.is_initialized():
        dist.barrier()  # the caller's group: leave together, and leave it to the caller to shut down
    return status


def _reduce(value: torch.Tensor, op: Any) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value, op=op)
    return value


def _train(args: argparse.Namespace, device: torch.device, rank: int, world: int) -> int:
    log: Callable[[str], None] = (lambda line: print(line, flush=True)) if rank == 0 else (lambda line: None)
    try:  # everything up to the first step: a ValueError here means the flags cannot work
        check_args(args, world)
        model, names = build_model(args), block_names(args)
        n_params = sum(p.numel() for p in model.parameters())
        batches = Batches(args, args.batch * world)
        ready = setup(args, model, names, batches, device, rank)
        model, optimizer = ready.model, ready.optimizer
        device = ready.accelerator.device if ready.accelerator is not None else device
        torch.manual_seed(args.seed + 1 + rank)  # each rank's dropout stream; restored from a checkpoint on resume
        checkpoints = Checkpoints(args.checkpoint_dir, rank, world) if args.checkpoint_dir else None
        first, resumed_from = 1, None
        latest = checkpoints.latest() if checkpoints is not None and not args.no_resume else None
        if latest is not None:
            first = checkpoints.load(latest[1], model, optimizer, device)
            resumed_from = latest[0]
    except ValueError as error:
        raise UsageError(str(error)) from error
    last = args.stop_after or args.steps
    log(f"train: {args.model} {args.n_layer} layers, width {args.d_model}; {ready.described}; --ac {args.ac}: "
        f"{len(ready.wrapped)} block(s) wrapped; {world} rank(s) on {device}; data: {batches.source}; "
        + (f"resuming at step {first} from {latest[1]}" if latest else "from step 1"))
    if first > last:
        log(f"nothing to do: the checkpoint is at step {first - 1}, the run ends at step {last}")

    autocasts = args.param_dtype in ("bf16", "fp16") and args.parallel in ("ddp", "none")
    autocast = (torch.autocast(device.type, dtype=resolve_dtype(args.param_dtype)) if autocasts
                else contextlib.nullcontext())
    rows = slice(rank * args.batch, (rank + 1) * args.batch)
    tokens_per_step = args.batch * world * args.seq_len
    progress = Progress(args.progress, first, last, args.log_every, enabled=rank == 0)
    losses: dict[int, float] = {}
    times: list[float] = []
    saved: pathlib.Path | None = None
    model.train()
    for step in range(first, last + 1):
        started = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args)
        tokens, targets = (t[rows].to(device) for t in batches(step))
        with autocast:
            loss = lm_loss(model_logits(model, tokens, args.model), targets)
        if ready.accelerator is not None:
            ready.accelerator.backward(loss)
        else:
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        mean = _reduce(loss.detach().float().clone(), dist.ReduceOp.SUM) / world  # gloo has no AVG
        losses[step] = mean.item()  # .item() waits for the step: the timing below is honest on GPUs too
        times.append(time.perf_counter() - started)
        progress.update(step, losses[step], tokens_per_step / times[-1], peak_memory(device))
        if checkpoints is not None and (step == last or (args.save_every and step % args.save_every == 0)):
            saved = checkpoints.save(step, model, optimizer, device)
    progress.close()

    peak = int(_reduce(torch.tensor([peak_memory(device)], dtype=torch.float64, device=device),
                       dist.ReduceOp.MAX).item())
    later = sorted(times[1:] or times)
    median = later[len(later) // 2] if later else float("nan")
    precision = "no" if args.param_dtype is None else (
        f"{args.param_dtype} autocast" if autocasts else f"{args.param_dtype} (reduce {args.reduce_dtype or 'same'})")
    summary = [
        ("model", f"{args.model}, {args.n_layer} layers, width {args.d_model}, {n_params / 1e6:.2f} M parameters"),
        ("parallelism", f"{ready.described}; {world} rank(s), "
                        f"{dist.get_backend() if dist.is_initialized() else 'no process group'} on {device}"),
        ("checkpointing", f"{args.ac}: {len(ready.wrapped)} block(s) wrapped ({', '.join(names)}"
                          f"{f', every {args.every}' if args.every > 1 else ''})"),
        ("mixed precision / compile", f"{precision} / {args.compile_backend if args.compile else 'no'}"),
        ("steps", f"{first}-{last} of {args.steps}" + (f" (resumed from step {resumed_from})" if resumed_from else "")),
        ("loss first / last", f"{losses[first]:.4f} / {losses[last]:.4f}" if losses else "-"),
        ("step time (median after the first)", f"{median:.3f} s"),
        ("tokens/s (global)", f"{tokens_per_step / median:,.0f}" if losses else "-"),
        ("peak memory (max over ranks)",
         f"{peak / MiB:,.1f} MiB {'allocated' if device.type == 'cuda' else 'resident'}"),
        ("checkpoint", str(saved) if saved else "-"),
    ]
    if rank == 0:
        print(summary_text(summary), flush=True)
        if args.metrics_out is not None:
            args.metrics_out.write_text(json.dumps({
                "losses": {str(step): value for step, value in losses.items()}, "first_step": first,
                "last_step": last, "resumed_from": resumed_from, "wrapped": ready.wrapped, "world_size": world,
                "parallel": ready.described, "tokens_per_s": tokens_per_step / median if losses else None,
                "peak_memory_bytes": peak, "checkpoint": str(saved) if saved else None,
            }, indent=1))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and train; a setup the flags cannot describe exits with status 2 and says why."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_args(args, int(os.environ.get("WORLD_SIZE", "1")))  # before any process group starts
    except ValueError as error:
        parser.error(str(error))
    try:
        return run(args)
    except UsageError as error:  # found later, e.g. a missing package or a checkpoint of another world size
        parser.error(str(error))
