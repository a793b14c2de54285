"""The demo: train a small GPT with activation checkpointing under FSDP2 and prove nothing changed.

Run it as one process or under torchrun (gloo on CPU, NCCL on GPUs; the backend follows the device):

    python -m ckpt_wrapper demo                                # one process
    torchrun --nproc_per_node 2 -m ckpt_wrapper demo           # two ranks on this machine
    NPROC=2 scripts/launch/run.sh --steps 10                   # the same through the launch script

Every rank builds the same seed-initialised ``ckpt_wrapper.testing.models.GPT``, wraps each ``Block`` with
``apply_activation_checkpointing`` and then applies ``fully_shard`` to each block and the root (AC
before sharding, as torchtitan does). Each rank trains on its own slice of a seeded global batch.
Rank 0 also trains an unwrapped, unsharded copy on the whole global batch and, every step, compares
the losses and the gathered FSDP2 gradients with it; any mismatch makes every rank exit with status 1.
At the end rank 0 prints how much activation memory checkpointing saved on an unsharded copy.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import time
from collections.abc import Callable, Mapping

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

# The public API, imported the way users would.
from ckpt_wrapper import CheckpointWrapper, apply_activation_checkpointing, by_class_name
from ckpt_wrapper.distributed import default_device, init_distributed
from ckpt_wrapper.measure import SavedBytes, held_after_forward
from ckpt_wrapper.testing.models import GPT, GPTConfig
from ckpt_wrapper.tools import flags

__all__ = ["DemoOptions", "GradientReport", "add_arguments", "compare_gradients", "options_from_args", "run"]

_MiB = 2**20
# Long enough for a slow first NCCL/gloo rendezvous, short enough that a lost rank does not hang CI.
_PG_TIMEOUT = datetime.timedelta(minutes=5)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DemoOptions:
    """What the demo trains and how strictly it compares."""

    n_layer: int = 4
    """Transformer blocks in the model."""
    d_model: int = 128
    """Hidden width."""
    n_head: int = 4
    """Attention heads; must divide ``d_model``."""
    seq_len: int = 64
    """Tokens per sequence."""
    vocab_size: int = 512
    """Vocabulary size."""
    batch: int = 4
    """Sequences per rank per step; the global batch is ``batch * world size``."""
    steps: int = 5
    """Training steps."""
    lr: float = 3e-3
    """AdamW learning rate."""
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
        self.model_config()  # GPTConfig checks the shape and says what is wrong
        if self.device is not None:
            try:
                device = torch.device(self.device)
            except RuntimeError as error:
                raise ValueError(
                    f"device {self.device!r} is not a device ({error}); use cpu, cuda or cuda:N"
                ) from None
            if device.type not in ("cpu", "cuda"):
                raise ValueError(f"device {self.device!r}: the demo runs on cpu or cuda")
            if device.type == "cuda" and not torch.cuda.is_available():
                raise ValueError(f"device {self.device!r} asks for CUDA but none is available; use cpu")

    def model_config(self) -> GPTConfig:
        """The ``GPTConfig`` these options describe."""
        return GPTConfig(
            n_layer=self.n_layer, d_model=self.d_model, n_head=self.n_head,
            seq_len=self.seq_len, vocab_size=self.vocab_size,
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class GradientReport:
    """The outcome of ``compare_gradients``."""

    matched: bool
    """Whether every expected gradient is present and within tolerance."""
    max_abs_diff: float
    """Largest absolute difference over all parameters (``inf`` if a gradient is missing)."""
    worst: str | None
    """The parameter furthest outside tolerance (or, when all match, the one with the largest difference)."""
    worst_abs_diff: float
    """Largest absolute difference within ``worst``."""
    mismatched: tuple[str, ...]
    """Every parameter that failed, in the order given."""
    detail: str
    """``torch.testing.assert_close``'s explanation for ``worst`` when it failed, else ``""``."""


def compare_gradients(
    actual: Mapping[str, torch.Tensor | None],
    expected: Mapping[str, torch.Tensor | None],
    *,
    rtol: float,
    atol: float,
) -> GradientReport:
    """Compare gradients by parameter name with ``torch.testing.assert_close`` and find the worst one.

    Each parameter passes or fails by ``assert_close``. Among those that fail, the worst is the one
    whose difference most exceeds ``atol + rtol * |expected|`` (ties: the larger absolute difference);
    a missing gradient, an unexpected one or a shape mismatch is worst of all.

    Args:
        actual: gradients under test (full tensors, not shards), keyed by parameter name.
        expected: the reference gradients, keyed the same way.
        rtol: relative tolerance.
        atol: absolute tolerance.

    Returns:
        A ``GradientReport``.

    Example:
        >>> import torch
        >>> from ckpt_wrapper.tools.demo import compare_gradients
        >>> ref = {"a": torch.ones(3), "b": torch.zeros(2)}
        >>> got = {"a": torch.ones(3), "b": torch.tensor([0.0, 0.5])}
        >>> report = compare_gradients(got, ref, rtol=1e-5, atol=1e-6)
        >>> report.matched, report.worst, report.worst_abs_diff
        (False, 'b', 0.5)
    """
    inf = float("inf")
    names = list(expected) + [name for name in actual if name not in expected]
    max_abs = 0.0
    worst: tuple[tuple[bool, float, float], str, float, str] | None = None  # (rank key, name, abs diff, detail)
    mismatched: list[str] = []
    for name in names:
        got, want = actual.get(name), expected.get(name)
        if got is None or want is None or got.shape != want.shape:
            abs_diff, excess = inf, inf
            message = f"gradient of {name!r}: got {_describe(got)}, expected {_describe(want)}"
        else:
            # float64 so the ranking itself adds no rounding to differences near float32's epsilon.
            got64, want64 = got.detach().double(), want.detach().double()
            diff = torch.nan_to_num((got64 - want64).abs(), nan=inf)
            # Elements that agree exactly score 0 even at zero tolerance (0 / 0 would be nan).
            excess_map = torch.where(diff == 0, 0.0, diff / (atol + rtol * want64.abs()))
            abs_diff = float(diff.max()) if diff.numel() else 0.0
            excess = float(excess_map.max()) if diff.numel() else 0.0
            try:
                torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")
                message = ""
            except AssertionError as error:
                message = str(error)
        if message:
            mismatched.append(name)
        max_abs = max(max_abs, abs_diff)
        # A failing parameter always outranks a passing one, whatever their ratios say.
        key = (bool(message), excess, abs_diff)
        if worst is None or key > worst[0]:
            worst = (key, name, abs_diff, message)
    return GradientReport(
        matched=not mismatched,
        max_abs_diff=max_abs,
        worst=worst[1] if worst else None,
        worst_abs_diff=worst[2] if worst else 0.0,
        mismatched=tuple(mismatched),
        detail=worst[3] if worst else "",
    )


def _describe(tensor: torch.Tensor | None) -> str:
    return "no gradient" if tensor is None else f"shape {tuple(tensor.shape)}"


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


def _synthetic_batch(
    generator: torch.Generator, rows: int, config: GPTConfig, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Counting sequences (random start and stride, modulo the vocabulary) and their next tokens.

    Learnable, unlike uniform noise, so the loss visibly falls within a few steps.
    """
    start = torch.randint(0, config.vocab_size, (rows, 1), generator=generator)
    stride = torch.randint(1, 9, (rows, 1), generator=generator)
    sequences = ((start + stride * torch.arange(config.seq_len + 1)) % config.vocab_size).to(device)
    return sequences[:, :-1], sequences[:, 1:]


def _full_gradients(model: nn.Module) -> dict[str, torch.Tensor | None]:
    # full_tensor() is a collective: every rank must call it, in the same (named_parameters) order.
    grads: dict[str, torch.Tensor | None] = {}
    for name, param in model.named_parameters():
        grad = param.grad
        grads[name] = grad.full_tensor() if isinstance(grad, DTensor) else grad
    return grads


def _measure_activations(
    reference: nn.Module, tokens: torch.Tensor, targets: torch.Tensor, device: torch.device
) -> tuple[int, int, str]:
    """Bytes held after forward by an unsharded copy, without and with checkpointing, and the measure used."""
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


def run(options: DemoOptions) -> int:
    """Run the demo on this process's rank; return the exit status (0: gradients matched, 1: not).

    Initialises (and at the end destroys) a process group unless one exists: env:// under torchrun,
    an in-memory single-rank group otherwise. Output is printed by rank 0 only.

    Args:
        options: the model, training and comparison settings.

    Returns:
        ``0`` when losses and gradients matched the unwrapped model at every step, else ``1`` (on
        every rank).

    Example:
        >>> import contextlib, io
        >>> from ckpt_wrapper.tools.demo import DemoOptions, run
        >>> options = DemoOptions(n_layer=1, d_model=16, n_head=2, seq_len=8, vocab_size=32, batch=2, steps=1)
        >>> with contextlib.redirect_stdout(io.StringIO()) as out:
        ...     status = run(options)
        >>> status, "gradients match the unwrapped model: yes" in out.getvalue()
        (0, True)
    """
    world = _init_world(options.device)
    try:
        status = _train_and_compare(options, world)
    except BaseException:
        # No barrier here: a rank stuck in a collective would never reach it; torchrun stops the rest.
        if world.owns_group:
            dist.destroy_process_group()
        raise
    if world.owns_group:
        dist.barrier()
        dist.destroy_process_group()
    return status


def _train_and_compare(options: DemoOptions, world: _World) -> int:
    log: Callable[[str], None] = (lambda line: print(line, flush=True)) if world.rank == 0 else (lambda line: None)
    config, device = options.model_config(), world.device
    torch.manual_seed(options.seed)
    # Built on CPU, then moved: the weights are identical on every rank and every device type.
    model = GPT(config).to(device)
    reference = copy.deepcopy(model) if world.rank == 0 else None

    wrapped = apply_activation_checkpointing(model, check_fn=by_class_name("Block"))
    mesh = init_device_mesh(device.type, (world.size,))
    for block in model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    still_wrapped = all(isinstance(b, CheckpointWrapper) and isinstance(b, FSDPModule) for b in model.layers)

    optimizer = torch.optim.AdamW(model.parameters(), lr=options.lr)
    ref_optimizer = torch.optim.AdamW(reference.parameters(), lr=options.lr) if reference is not None else None
    data = torch.Generator().manual_seed(options.seed + 1)
    rows = slice(world.rank * options.batch, (world.rank + 1) * options.batch)

    log(
        f"ckpt_wrapper demo: GPT {config.n_layer} layers, width {config.d_model}, {config.n_head} heads, "
        f"sequence {config.seq_len}, vocabulary {config.vocab_size}; batch {options.batch} per rank x "
        f"{world.size} rank(s), {options.steps} steps, {world.backend} on {device}"
    )
    log(f"checkpointed {len(wrapped)} blocks ({', '.join(wrapped)}), then fully_shard on each block and the root")

    reported: tuple[int, GradientReport] | None = None  # the first failing step, else the largest diff
    loss_failure, max_grad_diff, max_loss_diff, step_times = "", 0.0, 0.0, []
    for step in range(1, options.steps + 1):
        # Every rank draws the same global batch and trains on its own rows of it.
        tokens, targets = _synthetic_batch(data, world.size * options.batch, config, device)

        started = time.perf_counter()
        loss = model.loss(tokens[rows], targets[rows])
        loss.backward()
        _synchronize(device)
        step_times.append(time.perf_counter() - started)
        # FSDP2 averages gradients over ranks, so with equal slices they are the gradients of the mean
        # loss over the global batch: exactly what the reference computes below.
        global_loss = loss.detach().clone()
        dist.all_reduce(global_loss)  # SUM: gloo has no AVG
        global_loss /= world.size
        grads = _full_gradients(model)

        line = f"step {step}/{options.steps}  loss {global_loss.item():.4f}"
        if reference is not None and ref_optimizer is not None:
            ref_loss = reference.loss(tokens, targets)
            ref_loss.backward()
            expected = {name: p.grad for name, p in reference.named_parameters()}
            report = compare_gradients(grads, expected, rtol=options.rtol, atol=options.atol)
            max_grad_diff = max(max_grad_diff, report.max_abs_diff)
            if reported is None or (
                reported[1].matched and (not report.matched or report.max_abs_diff > reported[1].max_abs_diff)
            ):
                reported = (step, report)
            loss_diff = abs(global_loss.item() - ref_loss.item())
            max_loss_diff = max(max_loss_diff, loss_diff)
            try:
                torch.testing.assert_close(global_loss, ref_loss.detach(), rtol=options.rtol, atol=options.atol)
            except AssertionError as error:
                loss_failure = loss_failure or f"step {step}: {error}"
            line += f"  reference {ref_loss.item():.4f}  max |grad diff| {report.max_abs_diff:.1e}"
            ref_optimizer.step()
            ref_optimizer.zero_grad(set_to_none=True)
        started = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _synchronize(device)
        step_times[-1] += time.perf_counter() - started
        log(f"{line}  ({step_times[-1]:.2f} s)")

    status = 0
    if reference is not None and reported is not None:
        measured = tokens[: options.batch], targets[: options.batch]
        plain_bytes, ckpt_bytes, how = _measure_activations(reference, *measured, device)
        _print_summary(log, options, world, wrapped, still_wrapped, step_times, plain_bytes, ckpt_bytes, how)
        step, report = reported
        verdict_word = "NO" if loss_failure else "yes"
        log(f"losses match the unwrapped model: {verdict_word} (max abs diff {max_loss_diff:.1e})")
        if loss_failure:
            log(_indent(loss_failure))
        if report.matched:
            log(f"gradients match the unwrapped model: yes (max abs diff {max_grad_diff:.1e})")
        else:
            log(
                f"gradients match the unwrapped model: NO, from step {step}: worst parameter {report.worst!r} "
                f"(max abs diff {report.worst_abs_diff:.1e}; {len(report.mismatched)} of {len(grads)} "
                f"parameters outside rtol={options.rtol}, atol={options.atol})"
            )
            log(_indent(report.detail))
        if not still_wrapped:
            log("blocks still checkpointed after fully_shard: NO (fully_shard undid the wrapping)")
        status = 0 if report.matched and not loss_failure and still_wrapped else 1
    # Rank 0 alone knows the verdict; every rank exits with it so launchers see one outcome.
    verdict = torch.tensor([status], device=device)
    dist.broadcast(verdict, src=0)
    return int(verdict.item())


def _synchronize(device: torch.device) -> None:
    # CUDA work is asynchronous: without this, the clock would measure only the launches.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _indent(text: str) -> str:
    return "\n".join(f"    {line}" if line else line for line in text.splitlines())


def _print_summary(
    log: Callable[[str], None], options: DemoOptions, world: _World, wrapped: list[str], still_wrapped: bool,
    step_times: list[float], plain_bytes: int, ckpt_bytes: int, how: str,
) -> None:
    later = sorted(step_times[1:] or step_times)  # the first step pays for warm-up
    rows = [
        ("world size", str(world.size)),
        ("backend", world.backend),
        ("device", str(world.device)),
        ("blocks wrapped", f"{len(wrapped)} of {options.n_layer}; still checkpointed under fully_shard: "
                           f"{'yes' if still_wrapped else 'NO'}"),
        ("step time (median after the first)", f"{later[len(later) // 2]:.3f} s"),
        ("activations held, no checkpointing", f"{plain_bytes / _MiB:.2f} MiB"),
        ("activations held, checkpointed", f"{ckpt_bytes / _MiB:.2f} MiB"),
        ("ratio / saving", f"{ckpt_bytes / plain_bytes if plain_bytes else float('nan'):.3f}x / "
                           f"{(plain_bytes - ckpt_bytes) / _MiB:.2f} MiB saved"),
        ("memory measured by", f"{how}, unsharded single-process copy, batch {options.batch}"),
    ]
    width = max(len(name) for name, _ in rows)
    log("summary")
    for name, value in rows:
        log(f"  {name:<{width}}  {value}")


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
    flags.add_model_flags(parser, n_layer=defaults.n_layer, d_model=defaults.d_model, n_head=defaults.n_head,
                          seq_len=defaults.seq_len, vocab_size=defaults.vocab_size)
    flags.add_training_flags(parser, steps=defaults.steps, batch=defaults.batch, lr=defaults.lr, seed=defaults.seed)
    flags.add_tolerance_flags(parser, rtol=defaults.rtol, atol=defaults.atol)
    flags.add_device_flag(parser)


def options_from_args(args: argparse.Namespace) -> DemoOptions:
    """Build ``DemoOptions`` from parsed flags.

    Raises:
        ValueError: if the flags describe no valid run (say, ``--n-head`` not dividing ``--d-model``).
    """
    fields = {field.name for field in dataclasses.fields(DemoOptions)}
    return DemoOptions(**{name: value for name, value in vars(args).items() if name in fields})
