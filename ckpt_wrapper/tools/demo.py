"""The demo: train a small GPT with activation checkpointing under FSDP2 and prove nothing changed.

Run it as one process or under torchrun (gloo on CPU, NCCL on GPUs; the backend follows the device):

    python -m ckpt_wrapper demo                                # one process
    torchrun --nproc_per_node 2 -m ckpt_wrapper demo           # two ranks on this machine
    NPROC=2 scripts/launch/run.sh --steps 10                   # the same through the launch script

The proof is the public parity harness, ``ckpt_wrapper.testing.check_parity``: every rank builds the
same seed-initialised ``ckpt_wrapper.testing.models.GPT``, wraps each ``Block`` with
``apply_activation_checkpointing`` and then applies ``fully_shard`` to each block and the root (AC
before sharding, as torchtitan does), and trains on its own slice of a seeded global batch beside an
unwrapped, unsharded copy that sees the whole batch. Every step the harness compares losses, outputs,
the gathered FSDP2 gradients and the parameters after the optimizer step; any difference beyond
tolerance on any rank makes every rank exit with status 1. At the end rank 0 prints how much activation
memory checkpointing saved on an unsharded copy.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import functools
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule

# The public API, imported the way users would.
from ckpt_wrapper import CheckpointWrapper, apply_activation_checkpointing, by_class_name
from ckpt_wrapper.distributed import default_device, init_distributed, shutdown_distributed
from ckpt_wrapper.measure import SavedBytes, held_after_forward
from ckpt_wrapper.table import format_table
from ckpt_wrapper.testing import ParityConfig, ParityReport, check_parity
from ckpt_wrapper.testing.data import counting_batch, lm_loss
from ckpt_wrapper.testing.models import GPT, GPTConfig
from ckpt_wrapper.testing.recipes import ShardRecipe
from ckpt_wrapper.tools import flags
from ckpt_wrapper.tools.benchkit import check_device

__all__ = ["DemoOptions", "add_arguments", "options_from_args", "run", "verdict"]

_MiB = 2**20
# Long enough for a slow first NCCL/gloo rendezvous, short enough that a lost rank does not hang CI.
_PG_TIMEOUT = datetime.timedelta(minutes=5)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DemoOptions:
    """What the demo trains and how strictly it compares."""

    model: GPTConfig = GPTConfig(n_layer=4, d_model=128, n_head=4, seq_len=64, vocab_size=512)
    """The GPT to train (a small one: the demo runs on two CPU processes in seconds)."""
    batch: int = 4
    """Sequences per rank per step; the global batch is ``batch * world size``."""
    steps: int = 5
    """Training steps."""
    lr: float = 0.5
    """SGD learning rate (the parity harness trains with plain SGD: it does not amplify differences)."""
    seed: int = 0
    """Seed for the weights and the synthetic tokens (the same on every rank)."""
    device: str | None = None
    """``"cpu"``, ``"cuda"`` or ``"cuda:N"``; ``None`` picks ``cuda:LOCAL_RANK`` when CUDA exists, else CPU."""
    rtol: float = 1e-5
    """Relative tolerance of the gradient and loss comparison."""
    atol: float = 1e-6
    """Absolute tolerance of the gradient and loss comparison."""

    def __post_init__(self) -> None:
        for name in ("batch", "steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.rtol < 0 or self.atol < 0:
            raise ValueError(
                f"lr must be > 0 and rtol, atol >= 0; got lr={self.lr}, rtol={self.rtol}, atol={self.atol}"
            )
        if self.device is not None:
            check_device(self.device, command="the demo")  # says what is wrong with the device



@dataclasses.dataclass(frozen=True, kw_only=True)
class _World:
    rank: int
    size: int
    device: torch.device
    backend: str
    owns_group: bool


def _init_world(requested_device: str | None) -> _World:
    device = default_device(requested_device)  # DemoOptions has validated the request
    owns_group = init_distributed(device, timeout_s=_PG_TIMEOUT.total_seconds())
    # Report the group's own backend: a group the caller made may not use the one derived here.
    return _World(
        rank=dist.get_rank(), size=dist.get_world_size(), device=device, backend=str(dist.get_backend()),
        owns_group=owns_group,
    )


def _measure_activations(
    reference: nn.Module, tokens: torch.Tensor, targets: torch.Tensor, device: torch.device
) -> tuple[int, int, str]:
    """Bytes held after forward by unsharded copies of ``reference``, without and with checkpointing, and how measured."""
    plain = copy.deepcopy(reference)
    checkpointed = copy.deepcopy(reference)
    apply_activation_checkpointing(checkpointed, check_fn=by_class_name("Block"))
    figures: list[int] = []
    try:
        for model in (plain, checkpointed):
            figures.append(held_after_forward(lambda m=model: m.loss(tokens, targets), device=device))
        how = "torch.cuda.memory_allocated" if device.type == "cuda" else "glibc mallinfo2"
        return figures[0], figures[1], f"held_after_forward ({how})"
    except RuntimeError:  # no mallinfo2 (not glibc): count autograd saves instead
        figures = []
        for model in (plain, checkpointed):
            with SavedBytes(exclude=model.parameters()) as saved:
                model.loss(tokens, targets)
            figures.append(saved.bytes)
        return figures[0], figures[1], "SavedBytes (autograd saves; misses what checkpoint keeps itself)"


def verdict(report: ParityReport, *, parameters: int) -> list[str]:
    """The demo's claim, read off a parity report: do losses and gradients match the unwrapped model?

    Args:
        report: this rank's ``check_parity`` report.
        parameters: how many parameters the model has (the denominator of "k of N parameters").

    Returns:
        The lines rank 0 prints: one verdict for the losses, one for the gradients, one for outputs and
        parameters after each step, each followed by what failed (indented).

    Example:
        >>> from ckpt_wrapper.testing import ParityReport
        >>> from ckpt_wrapper.tools.demo import verdict
        >>> report = ParityReport(recipe="fsdp2", reference="unsharded", tolerances=(1e-5, 1e-6),
        ...                       max_diff={"loss": 0.0, "grad:head.weight": 0.5},
        ...                       failures=["grad:head.weight: max abs diff 0.5 exceeds rtol=1e-05, atol=1e-06"])
        >>> print("\\n".join(verdict(report, parameters=1)))
        losses match the unwrapped model: yes (max abs diff 0.0e+00)
        gradients match the unwrapped model: NO: worst parameter 'head.weight' (max abs diff 5.0e-01; 1 of 1 parameters outside rtol=1e-05, atol=1e-06)
            grad:head.weight: max abs diff 0.5 exceeds rtol=1e-05, atol=1e-06
        outputs and parameters after each step match: yes
    """
    rtol, atol = report.tolerances

    def failed(*prefixes: str) -> list[str]:
        return [f"    {line}" for line in report.failures if line.startswith(prefixes)][:5]

    grads = {key.removeprefix("grad:"): value for key, value in report.max_diff.items() if key.startswith("grad:")}
    loss_failures, grad_failures = failed("loss"), failed("grad")
    lines = [f"losses match the unwrapped model: {'NO' if loss_failures else 'yes'} "
             f"(max abs diff {report.max_diff.get('loss', 0.0):.1e})", *loss_failures]
    if not report.grads_compared:
        lines.append("gradients match the unwrapped model: not gathered for this recipe (parameters compared)")
    elif grad_failures:
        # A missing gradient has no difference recorded: it counts as the worst of all.
        bad = {line.split(":", 2)[1] for line in report.failures if line.startswith("grad:")}
        worst = max(bad, key=lambda name: grads.get(name, float("inf")), default=None)
        detail = "" if worst is None else (
            f": worst parameter {worst!r} (max abs diff {grads.get(worst, float('inf')):.1e}; "
            f"{len(bad)} of {parameters} parameters outside rtol={rtol:g}, atol={atol:g})")
        lines += [f"gradients match the unwrapped model: NO{detail}", *grad_failures]
    else:
        lines.append(f"gradients match the unwrapped model: yes (max abs diff {max(grads.values(), default=0.0):.1e})")
    other_failures = failed("output", "param", "eval_output")
    lines += [f"outputs and parameters after each step match: {'NO' if other_failures else 'yes'}", *other_failures]
    return lines


def run(options: DemoOptions) -> int:
    """Run the demo on this process's rank; return the exit status (0: everything matched, 1: not).

    Initialises (and at the end destroys) a process group unless one exists: env:// under torchrun,
    an in-memory single-rank group otherwise. Output is printed by rank 0 only.

    Args:
        options: the model, training and comparison settings.

    Returns:
        ``0`` when losses, outputs, gradients and parameters matched the unwrapped model at every step
        on every rank and the blocks stayed checkpointed under ``fully_shard``, else ``1`` (on every rank).

    Example:
        >>> import contextlib, io
        >>> from ckpt_wrapper.tools.demo import DemoOptions, run
        >>> from ckpt_wrapper.testing.models import GPTConfig
        >>> model = GPTConfig(n_layer=1, d_model=16, n_head=2, seq_len=8, vocab_size=32)
        >>> options = DemoOptions(model=model, batch=2, steps=1)
        >>> with contextlib.redirect_stdout(io.StringIO()) as out:
        ...     status = run(options)
        >>> status, "gradients match the unwrapped model: yes" in out.getvalue()
        (0, True)
    """
    world = _init_world(options.device)
    try:
        status = _train_and_check(options, world)
    except BaseException:
        # No barrier here: a rank stuck in a collective would never reach it; torchrun stops the rest.
        if world.owns_group:
            dist.destroy_process_group()
        raise
    if world.owns_group:
        shutdown_distributed()  # barrier, destroy, and free the groups before interpreter shutdown
    return status


def _train_and_check(options: DemoOptions, world: _World) -> int:
    log: Callable[[str], None] = (lambda line: print(line, flush=True)) if world.rank == 0 else (lambda line: None)
    config, device = options.model, world.device
    log(
        f"ckpt_wrapper demo: GPT {config.n_layer} layers, width {config.d_model}, {config.n_head} heads, "
        f"sequence {config.seq_len}, vocabulary {config.vocab_size}; batch {options.batch} per rank x "
        f"{world.size} rank(s), {options.steps} steps, {world.backend} on {device}"
    )
    is_block = by_class_name("Block")
    wrapped: list[str] = []
    still_wrapped: list[bool] = []

    def forward(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        if isinstance(model, FSDPModule) and not still_wrapped:  # the checkpointed model, seen once
            still_wrapped.append(all(isinstance(b, CheckpointWrapper) and isinstance(b, FSDPModule) for b in model.layers))
        return model(tokens)

    # Every rank draws the same global batch; the harness gives each rank its own rows of it.
    batch = functools.partial(counting_batch, rows=world.size * options.batch, seq_len=config.seq_len,
                              vocab_size=config.vocab_size, seed=options.seed)
    started = time.perf_counter()
    report = check_parity(
        functools.partial(GPT, config), lambda step: batch(step=step),
        wrap=lambda model: wrapped.extend(apply_activation_checkpointing(model, check_fn=is_block)),
        is_block=is_block, shard=ShardRecipe(kind="fsdp2"), forward_fn=forward, loss_fn=lm_loss,
        config=ParityConfig(steps=options.steps, lr=options.lr, seed=options.seed, rtol=options.rtol, atol=options.atol),
        device=device,
    )
    elapsed = time.perf_counter() - started
    ok = report.ok and all(still_wrapped)
    failed = torch.tensor([0 if ok else 1], device=device)
    dist.all_reduce(failed)  # every rank exits with one verdict, so launchers see one outcome
    log(f"checkpointed {len(wrapped)} blocks ({', '.join(wrapped)}), then fully_shard on each block and the root")
    for step, (ref_loss, loss) in enumerate(report.losses, 1):
        log(f"step {step}/{options.steps}  loss {loss:.4f}  reference {ref_loss:.4f}")
    if world.rank == 0:
        torch.manual_seed(options.seed)
        tokens, targets = counting_batch(step=0, rows=options.batch, seq_len=config.seq_len,
                                         vocab_size=config.vocab_size, seed=options.seed, device=device)
        plain_bytes, ckpt_bytes, how = _measure_activations(GPT(config).to(device), tokens, targets, device)
        rows = [
            ("world size", world.size), ("backend", world.backend), ("device", device),
            ("blocks wrapped", f"{len(wrapped)} of {options.model.n_layer}; still checkpointed under fully_shard: "
                               f"{'yes' if all(still_wrapped) else 'NO'}"),
            ("training and comparing", f"{elapsed:.2f} s for {options.steps} steps of both models"),
            ("activations held, no checkpointing", f"{plain_bytes / _MiB:.2f} MiB"),
            ("activations held, checkpointed", f"{ckpt_bytes / _MiB:.2f} MiB"),
            ("ratio / saving", f"{ckpt_bytes / plain_bytes if plain_bytes else float('nan'):.3f}x / "
                               f"{(plain_bytes - ckpt_bytes) / _MiB:.2f} MiB saved"),
            ("memory measured by", f"{how}, unsharded single-process copy, batch {options.batch}"),
        ]
        log("summary")
        log(format_table(rows, indent="  "))
    for line in verdict(report, parameters=sum(1 for _ in GPT(config).parameters())):
        log(line)
    if not all(still_wrapped):
        log("blocks still checkpointed after fully_shard: NO (fully_shard undid the wrapping)")
    if int(failed) and ok:
        log(f"{int(failed)} other rank(s) reported differences beyond tolerance")
    return 1 if int(failed) else 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the demo's flags to ``parser`` (the ``demo`` subcommand's parser), in place.

    The names are those of every command (``ckpt_wrapper.tools.flags``); the defaults are ``DemoOptions``'.

    Example:
        >>> import argparse
        >>> from ckpt_wrapper.tools.demo import add_arguments, options_from_args
        >>> parser = argparse.ArgumentParser()
        >>> add_arguments(parser)
        >>> options_from_args(parser.parse_args(["--steps", "2"])).steps
        2
    """
    defaults = DemoOptions()
    shape = defaults.model
    flags.add_model_flags(parser, n_layer=shape.n_layer, d_model=shape.d_model, n_head=shape.n_head,
                          seq_len=shape.seq_len, vocab_size=shape.vocab_size)
    flags.add_training_flags(parser, steps=defaults.steps, batch=defaults.batch, lr=defaults.lr, seed=defaults.seed)
    flags.add_tolerance_flags(parser, rtol=defaults.rtol, atol=defaults.atol)
    flags.add_device_flag(parser)


def options_from_args(args: argparse.Namespace) -> DemoOptions:
    """Build ``DemoOptions`` from parsed flags.

    Raises:
        ValueError: if the flags describe no valid run (say, ``--n-head`` not dividing ``--d-model``).
    """
    given = vars(args)
    model = GPTConfig(**{f.name: given[f.name] for f in dataclasses.fields(GPTConfig) if f.name in given})
    fields = {field.name for field in dataclasses.fields(DemoOptions)} - {"model"}
    return DemoOptions(model=model, **{name: value for name, value in given.items() if name in fields})
