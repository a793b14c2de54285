"""The driver's run: set up (checkpoint, compile, shard), train, save, summarise.

Example:
    >>> from ckpt_wrapper.tools.train_driver.loop import main
    >>> main(["--parallel", "fsdp2", "--sharding-strategy", "HYBRID_SHARD"])  # one line on stderr
    2
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import pathlib
import signal
import sys
import threading
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
from ckpt_wrapper.tools.train_driver.args import UsageError, build_parser, check_args, check_data
from ckpt_wrapper.tools.train_driver.checkpoints import Checkpoints, check_folder, run_identity
from ckpt_wrapper.tools.train_driver.modes import (
    Batches, block_names, build_model, compile_blocks, learning_rate, make_checkpointing, model_logits, wrapper_for,
)
from ckpt_wrapper.tools.train_driver.progress import MiB, Progress, activation_bytes, peak_memory, size_text, summary_text

__all__ = ["Setup", "main", "preflight", "run", "setup"]


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


class _Stop:
    """Set by SIGINT / SIGTERM: the loop finishes its step, every rank agrees, saves and leaves."""

    CODES = {signal.SIGINT: 1, signal.SIGTERM: 2}

    def __init__(self) -> None:
        self.signum: int | None = None

    def handle(self, signum: int, frame: Any) -> None:  # noqa: ARG002 (signal's signature)
        if self.signum != signal.SIGTERM:  # SIGTERM (preemption) wins over SIGINT
            self.signum = signum

    def agreed(self, world: int, value: float) -> int | None:
        """The signal every rank stops for, from the all-reduced sum of ``encode()``: None to go on."""
        if value <= 0:
            return None
        return int(signal.SIGTERM) if value > world + 0.5 else int(signal.SIGINT)

    def encode(self, world: int) -> float:
        """0 (no signal), 1 (SIGINT) or world + 1 (SIGTERM): their sum over ranks says which was seen."""
        return {None: 0.0, signal.SIGINT: 1.0, signal.SIGTERM: float(world + 1)}[self.signum]


_STOP = _Stop()


@contextlib.contextmanager
def _stop_on_signals() -> Any:
    """While inside, SIGINT and SIGTERM set ``_STOP`` instead of raising (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _STOP.signum = None
    previous = {sig: signal.signal(sig, _STOP.handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stop_requested(world: int, device: torch.device) -> int | None:
    value = _reduce(torch.tensor([_STOP.encode(world)], device=device), dist.ReduceOp.SUM)
    return _STOP.agreed(world, value.item())


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
        checkpoints = (Checkpoints(args.checkpoint_dir, rank, world, run_identity(args, world))
                       if args.checkpoint_dir else None)
        first, resumed_from, latest = 1, None, None
        if checkpoints is not None:
            checkpoints.clean_partial()
            if not args.no_resume:
                latest = _resume(checkpoints, model, optimizer, device, log)
            elif checkpoints.steps():
                log(f"--no-resume: {args.checkpoint_dir} holds {len(checkpoints.steps())} earlier step(s); "
                    "they are deleted at this run's first save")
        if latest is not None:
            first, resumed_from = latest[2], latest[0]
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
    activation: int | None = None
    stopped = _stop_requested(world, device)  # a signal during set-up: nothing new to save
    model.train()
    for step in range(first, last + 1):
        if stopped:
            break
        started = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args)
        tokens, targets = (t[rows].to(device) for t in batches(step))

        def forward() -> torch.Tensor:
            with autocast:
                return lm_loss(model_logits(model, tokens, args.model), targets)

        if activation is None and not args.compile:  # the first step measures what forward keeps for backward
            loss, activation = activation_bytes(forward, model)
        else:
            loss = forward()
        if ready.accelerator is not None:
            ready.accelerator.backward(loss)
        else:
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        # One collective per step: the loss (gloo has no AVG: a sum) and whether any rank was signalled.
        packed = torch.stack([loss.detach().float(), torch.tensor(_STOP.encode(world), device=loss.device)])
        packed = _reduce(packed, dist.ReduceOp.SUM)
        losses[step] = (packed[0] / world).item()  # .item() waits for the step: the timing below is honest on GPUs
        stopped = _STOP.agreed(world, packed[1].item())
        times.append(time.perf_counter() - started)
        progress.update(step, losses[step], tokens_per_step / times[-1], _memory_text(device, activation))
        if checkpoints is not None and (step == last or stopped or (args.save_every and step % args.save_every == 0)):
            # --no-resume: the earlier steps go at this run's first save, so no two runs ever share the folder
            saved = checkpoints.save(step, model, optimizer, device, args.keep_last,
                                     discard_others=args.no_resume and saved is None)
    progress.close()

    peak = peak_memory(device)
    peak = None if peak is None else int(_reduce(torch.tensor([peak], dtype=torch.float64, device=device),
                                                 dist.ReduceOp.MAX).item())
    if activation is not None:
        activation = int(_reduce(torch.tensor([activation], dtype=torch.float64, device=device),
                                 dist.ReduceOp.MAX).item())
    done = max(losses) if losses else first - 1
    metrics = {
        "losses": {str(step): value for step, value in losses.items()}, "first_step": first,
        "last_step": done, "resumed_from": resumed_from, "wrapped": ready.wrapped, "world_size": world,
        "parallel": ready.described, "activation_memory_bytes": activation, "peak_memory_bytes": peak,
        "checkpoint": str(saved) if saved else None, "stopped_by": signal.Signals(stopped).name if stopped else None,
    }
    if stopped:
        name = signal.Signals(stopped).name
        where = (f"saved {saved}; run the same command to resume at step {done + 1}" if saved
                 else "nothing saved (no step finished)" if checkpoints is not None
                 else "nothing saved (no --checkpoint-dir)")
        log(f"stopped by {name} after step {done}: {where}")
        if rank == 0 and args.metrics_out is not None:
            args.metrics_out.write_text(json.dumps(metrics, indent=1))
        return 128 + stopped

    later = sorted(times[1:] or times)
    median = later[len(later) // 2] if later else float("nan")
    precision = _precision(args, ready, autocasts)
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
        ("activation memory (max over ranks)",
         f"{size_text(activation)} kept by forward for backward (first step; ckpt_wrapper.measure)"
         if activation is not None else "not measured" + (" (--compile)" if args.compile else "")),
    ]
    if peak is not None:
        summary.append(("peak memory (max over ranks)", f"{peak / MiB:,.1f} MiB allocated (CUDA)"))
    summary.append(("checkpoint", str(saved) if saved else "-"))
    if rank == 0:
        print(summary_text(summary), flush=True)
        if args.metrics_out is not None:
            metrics["tokens_per_s"] = tokens_per_step / median if losses else None
            metrics["mixed_precision"] = precision
            args.metrics_out.write_text(json.dumps(metrics, indent=1))
    return 0


def _resume(checkpoints: Checkpoints, model: nn.Module, optimizer: Any, device: torch.device,
            log: Callable[[str], None]) -> tuple[int, pathlib.Path, int] | None:
    """Load the newest good step, skipping damaged ones with one warning line each: ``(step, path, next step)``.

    Raises:
        ValueError: the folder holds steps but none can be loaded.
    """
    steps = checkpoints.steps()
    for step, path in reversed(steps):
        problem = checkpoints.problem(path)
        if problem is None:
            try:
                return step, path, checkpoints.load(path, model, optimizer, device)
            except Exception as error:  # raised on every rank alike (DCP gathers failures)
                problem = f"{path} cannot be loaded ({type(error).__name__}: {str(error).splitlines()[0][:300]})"
        log(f"warning: skipping checkpoint step {step}: {problem}")
    if steps:
        raise ValueError(f"--checkpoint-dir {checkpoints.root}: none of its {len(steps)} step(s) can be loaded "
                         "(see the warnings above): pass --no-resume to start over, or another --checkpoint-dir")
    return None


def _memory_text(device: torch.device, activation: int | None) -> str:
    if device.type == "cuda":
        return f"peak {torch.cuda.max_memory_allocated(device) / MiB:,.0f} MiB"
    return f"activations {size_text(activation)}" if activation is not None else ""


def _precision(args: argparse.Namespace, ready: Setup, autocasts: bool) -> str:
    """The mixed precision in effect: accelerate's own setting under ``--parallel accelerate``."""
    if ready.accelerator is not None:
        mixed = str(getattr(ready.accelerator, "mixed_precision", "no"))
        return "no (accelerate)" if mixed == "no" else f"{mixed} (accelerate)"
    if args.param_dtype is None:
        return "no"
    return f"{args.param_dtype} autocast" if autocasts else f"{args.param_dtype} (reduce {args.reduce_dtype or 'same'})"


def preflight(args: argparse.Namespace, world: int, rank: int) -> None:
    """Every check that needs no process group: flags, ``--data``, the checkpoint folder and its run.

    Raises:
        UsageError: saying what to change.
    """
    try:
        check_args(args, world)
        check_data(args)
        if args.checkpoint_dir is not None:
            check_folder(args.checkpoint_dir, rank)
            if not args.no_resume:
                Checkpoints(args.checkpoint_dir, rank, world, run_identity(args, world)).refuse_foreign()
    except ValueError as error:
        raise UsageError(str(error)) from None


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and train; return the exit status.

    A setup the flags cannot describe prints one line on rank 0 and returns 2 (before any process group
    starts where it can be seen before); SIGINT / SIGTERM stop after the current step, save, and return
    130 / 143.
    """
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    parser = build_parser()
    with _stop_on_signals():
        try:
            args = parser.parse_args(argv)
            preflight(args, world, rank)
            return run(args)
        except UsageError as error:  # found later too: a missing package, say
            if rank == 0:
                print(f"{parser.prog}: error: {error}", file=sys.stderr, flush=True)
            status = 2
    if rank != 0 and "TORCHELASTIC_RUN_ID" in os.environ and threading.current_thread() is threading.main_thread():
        # torchrun stops every rank once one exits with an error: the others wait here (a signal ends the
        # wait at once, quietly) so that rank 0's line is printed before torchrun ends the launch.
        def leave(signum: int, frame: Any) -> None:  # noqa: ARG001 (signal's signature)
            raise SystemExit(status)

        previous = {sig: signal.signal(sig, leave) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            time.sleep(_QUIET_RANK_WAIT_S)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    return status


_QUIET_RANK_WAIT_S = 10.0
