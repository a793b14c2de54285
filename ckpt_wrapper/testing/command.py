"""``ckpt-wrapper parity``: prove on your own model that checkpointing changes nothing it learns.

Run it under torchrun; every rank trains the checkpointed, sharded model beside a reference and rank 0
prints the report, then one summary line that names how many ranks took part. The exit status is 0 when
every rank agreed, 1 when any rank saw a difference beyond tolerance (or fewer ranks than ``--min-ranks``
took part), and 2 for a usage error (one line on stderr).

    torchrun --nproc_per_node 2 -m ckpt_wrapper parity                      # built-in GPT, FSDP2
    torchrun --nproc_per_node 2 -m ckpt_wrapper parity --parallel fsdp1 --sharding-strategy SHARD_GRAD_OP \\
        --ac-order after
    torchrun --nproc_per_node 2 -m ckpt_wrapper parity --model mypkg.models:build_llama \\
        --blocks LlamaDecoderLayer --parallel ddp
    torchrun --nproc_per_node 2 -m ckpt_wrapper parity --plan plan.json --min-ranks 2
    torchrun --nproc_per_node 4 -m ckpt_wrapper parity --model mypkg.models:build --batch-fn mypkg.data:batch \\
        --blocks LlamaDecoderLayer --parallel fsdp2 --param-dtype bf16 --reduce-dtype fp32 --reference sharded

``--model`` names a zero-argument callable returning the model; ``--batch-fn`` a callable ``step ->
(inputs, targets)`` returning the global batch, identical on every rank (split along dimension 0). A model
with ``config.vocab_size`` (a Hugging Face causal LM) needs no ``--batch-fn``: random token ids are drawn
from its vocabulary. Dict inputs are passed as keywords (``model(**inputs)``). Outputs that are not tensors
are understood: a ``ModelOutput`` or dict is compared and trained on by its ``logits`` (or by the model's
own ``loss`` when the inputs carry ``labels``), a tuple by its first element. ``--forward`` and ``--loss``
replace either step. ``--plan`` applies a plan saved by ``ckpt-wrapper plan --out`` instead of ``--ac``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ckpt_wrapper.apply import apply_activation_checkpointing
from ckpt_wrapper.distributed import default_device, init_distributed, shutdown_distributed
from ckpt_wrapper.offload import offload_wrapper
from ckpt_wrapper.planner import Plan
from ckpt_wrapper.selection import by_class_name
from ckpt_wrapper.testing.data import random_batch
from ckpt_wrapper.testing.parity import ParityConfig, ParityReport, check_parity, default_loss
from ckpt_wrapper.testing.recipes import ShardRecipe, clean_name
from ckpt_wrapper.tools import flags
from ckpt_wrapper.wrapper import checkpoint_wrapper

__all__ = [
    "OutputAdapter",
    "ParityOptions",
    "UsageError",
    "add_arguments",
    "builtin_gpt",
    "load_callable",
    "model_batch_fn",
    "options_from_args",
    "output_tensor",
    "plan_wrap",
    "run",
    "summary_line",
]

Batch = tuple[Any, Any]


class UsageError(ValueError):
    """A mistake in what the command was asked to do (a flag, a plan, a callable): exit status 2, one line.

    Example:
        >>> from ckpt_wrapper.testing.command import UsageError
        >>> isinstance(UsageError("--plan p.json: ..."), ValueError)
        True
    """


@dataclasses.dataclass(frozen=True, kw_only=True)
class ParityOptions:
    """Everything ``ckpt-wrapper parity`` needs."""

    model: str | None = None
    """``module:callable`` building the model; None for the built-in GPT."""
    batch: str | None = None
    """``module:callable`` giving ``step -> (inputs, targets)``; None for synthetic tokens (the built-in GPT,
    or a model with ``config.vocab_size``)."""
    forward: str | None = None
    """``module:callable``, ``(model, inputs) -> output``; None: ``model(**inputs)`` for a dict, else ``model(inputs)``."""
    loss: str | None = None
    """``module:callable``, ``(output, targets) -> loss`` on the raw output; None: see ``OutputAdapter``."""
    blocks: str | None = None
    """Class name(s) of the blocks, comma-separated; None: ``Block``, or with ``plan`` the planned blocks' classes."""
    wrap: str = "checkpoint"
    """``checkpoint`` or ``offload`` (ignored with ``plan``)."""
    plan: str | None = None
    """Path of a plan saved by ``Plan.save`` (``ckpt-wrapper plan --out``), applied instead of ``wrap``."""
    min_ranks: int = 1
    """Fail (exit 1) when fewer ranks than this took part."""
    recipe: ShardRecipe = ShardRecipe()
    """How to shard."""
    config: ParityConfig = ParityConfig()
    """Steps and tolerances."""
    device: str | None = None
    """Device override; default CUDA if present, else CPU."""


def load_callable(spec: str, *, flag: str = "--model") -> Callable[..., Any]:
    """The callable a ``module:callable`` text names.

    Args:
        spec: ``package.module:name``.
        flag: the flag it came from, for the error message.

    Raises:
        UsageError: if the text is malformed, cannot be imported, or names something not callable.

    Example:
        >>> from ckpt_wrapper.testing.command import load_callable
        >>> load_callable("math:sqrt")(9.0)
        3.0
        >>> load_callable("math")
        Traceback (most recent call last):
        ...
        ckpt_wrapper.testing.command.UsageError: --model: expected 'module:callable', found 'math'; fix: name the callable after a colon, e.g. mypkg.models:build
    """
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UsageError(f"{flag}: expected 'module:callable', found {spec!r}; fix: name the callable after a colon, "
                         "e.g. mypkg.models:build")
    try:
        target = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as error:
        raise UsageError(f"{flag}: cannot load {spec!r} ({error}); fix: make {module_name} importable "
                         "(PYTHONPATH) and check the name after the colon") from error
    if not callable(target):
        raise UsageError(f"{flag}: expected a callable, found {spec!r} of type {type(target).__name__}")
    return target


def builtin_gpt() -> nn.Module:
    """The built-in small GPT that ``parity`` and ``plan`` use without ``--model`` (blocks: ``Block``).

    Example:
        >>> from ckpt_wrapper.testing.command import builtin_gpt
        >>> model = builtin_gpt()
        >>> len(model.layers), type(model.layers[0]).__name__, model.config.vocab_size
        (4, 'Block', 256)
    """
    from ckpt_wrapper.testing.models import GPT, GPTConfig

    return GPT(GPTConfig(n_layer=4, d_model=64, n_head=4, seq_len=32, vocab_size=256))


def model_batch_fn(model: nn.Module, *, rows: int, flag: str = "--batch-fn",
                   name: str | None = None) -> Callable[[int], Batch]:
    """Synthetic ``step -> (tokens, next tokens)`` for a model that names its vocabulary (``config.vocab_size``).

    The built-in GPT and Hugging Face causal LMs qualify; the sequence length is the model's
    ``config.seq_len`` or ``config.max_position_embeddings``, at most 32. ``name`` (the ``--model`` text)
    and ``flag`` word the error.

    Raises:
        UsageError: if the model has no ``config.vocab_size`` (then it needs a batch function).

    Example:
        >>> from ckpt_wrapper.testing.command import builtin_gpt, model_batch_fn
        >>> tokens, targets = model_batch_fn(builtin_gpt(), rows=2)(0)
        >>> tokens.shape, bool((tokens[:, 1:] == targets[:, :-1]).all())
        (torch.Size([2, 32]), True)
    """
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    if not isinstance(vocab, int):
        raise UsageError(f"--model {name or 'gpt'} (a {type(model).__name__}) needs {flag} too (module:callable, step -> (inputs, "
                         "targets)): expected a model with config.vocab_size to draw tokens for, found none; fix: "
                         f"pass {flag}")
    longest = getattr(config, "seq_len", None) or getattr(config, "max_position_embeddings", None) or 32
    seq_len = min(int(longest), 32)
    return lambda step: random_batch(step=step, rows=rows, seq_len=seq_len, vocab_size=vocab)


def output_tensor(output: Any) -> torch.Tensor:
    """The tensor of a model's output that is compared and trained on: the output itself, the ``logits``
    of a ``ModelOutput``, dict or object, or the first element of a tuple.

    Raises:
        TypeError: for an output none of these describe (pass ``--forward`` returning a tensor).

    Example:
        >>> import torch
        >>> from ckpt_wrapper.testing.command import output_tensor
        >>> logits = torch.zeros(2, 3)
        >>> all(output_tensor(o) is logits for o in (logits, {"logits": logits, "loss": None}, (logits, None)))
        True
    """
    if isinstance(output, torch.Tensor):
        return output
    found = None
    if isinstance(output, Mapping):
        found = output.get("logits")
    elif hasattr(output, "logits"):
        found = output.logits
    elif isinstance(output, (tuple, list)) and output:
        found = output[0]
    if isinstance(found, torch.Tensor):
        return found
    raise TypeError(f"parity: expected the model to return a tensor, a ModelOutput or dict with 'logits', or a tuple "
                    f"whose first element is the logits; found {type(output).__name__}; fix: pass --forward "
                    "module:callable returning the tensor to compare, and --loss if the loss comes from elsewhere")


def _model_loss(output: Any) -> torch.Tensor | None:
    loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    return loss if isinstance(loss, torch.Tensor) else None


class OutputAdapter:
    """``forward_fn`` and ``loss_fn`` for ``check_parity`` that accept any model's output.

    ``forward`` calls the model (or the user's forward) and returns ``output_tensor`` of what came back,
    which the harness compares between the models. ``loss`` then sees that raw output again: the user's
    loss gets it as it was; otherwise the model's own ``loss`` is used when the inputs carried ``labels``
    and the model returned one, else ``default_loss`` (cross-entropy for integer targets) of the tensor.

    Args:
        forward: ``(model, inputs) -> output``; None: ``model(**inputs)`` for a dict, else ``model(inputs)``.
        loss: ``(raw output, targets) -> scalar loss``; None for the default above.

    Example:
        >>> import torch
        >>> from ckpt_wrapper.testing.command import OutputAdapter
        >>> model = lambda tokens: {"logits": torch.zeros(*tokens.shape, 4)}
        >>> adapter = OutputAdapter()
        >>> out = adapter.forward(model, torch.zeros(2, 3, dtype=torch.long))
        >>> out.shape, round(float(adapter.loss(out, torch.zeros(2, 3, dtype=torch.long))), 4)  # log(4)
        (torch.Size([2, 3, 4]), 1.3863)
    """

    def __init__(self, forward: Callable[[Any, Any], Any] | None = None,
                 loss: Callable[[Any, Any], torch.Tensor] | None = None) -> None:
        self._forward, self._loss = forward, loss
        self._last: tuple[torch.Tensor, Any, bool] | None = None

    def forward(self, model: Any, inputs: Any) -> torch.Tensor:
        """Run the model on ``inputs``; return the tensor to compare (remembering the raw output for ``loss``)."""
        if self._forward is not None:
            raw = self._forward(model, inputs)
        elif isinstance(inputs, Mapping):
            raw = model(**inputs)
        else:
            raw = model(inputs)
        tensor = output_tensor(raw)
        self._last = (tensor, raw, isinstance(inputs, Mapping) and inputs.get("labels") is not None)
        return tensor

    def loss(self, output: torch.Tensor, targets: Any) -> torch.Tensor:
        """The loss of the forward that returned ``output``."""
        raw, labelled = output, False
        if self._last is not None and self._last[0] is output:
            _, raw, labelled = self._last
        self._last = None
        if self._loss is not None:
            return self._loss(raw, targets)
        model_loss = _model_loss(raw) if labelled else None
        return model_loss if model_loss is not None else default_loss(output, targets)


def plan_wrap(plan: Plan, model: nn.Module, *, source: str = "the plan") -> list[str]:
    """Apply ``plan`` to ``model``, which may be sharded already (DDP or FSDP1 prefixes in its module names).

    Planned names are matched against the model's module names with wrapper prefixes removed
    (``clean_name``); where several modules share a name (an FSDP1 unit and its block) the innermost is
    wrapped, as ``apply_activation_checkpointing`` with a class selector would.

    Raises:
        UsageError: naming the planned blocks the model lacks and some it has.

    Example:
        >>> from ckpt_wrapper.planner import Plan, PlanEntry
        >>> from ckpt_wrapper.testing.command import builtin_gpt, plan_wrap
        >>> plan = Plan(entries=[PlanEntry("layers.9", "full", 0, 0.0)], budget_bytes=1, unwrapped_bytes=1,
        ...             predicted_bytes=1, step_seconds=0.0, predicted_seconds=0.0, cost_unit="flops")
        >>> plan_wrap(plan, builtin_gpt())
        Traceback (most recent call last):
        ...
        ckpt_wrapper.testing.command.UsageError: the plan names block(s) layers.9, which GPT does not have: expected names of its modules such as layers.0, layers.1, layers.2; fix: plan this model (ckpt-wrapper plan --model ... --out plan.json) and pass that plan
    """
    names: dict[str, str] = {}
    for name, _ in model.named_modules():
        if name:
            names[clean_name(name)] = name  # the last (innermost) module of a clean name wins
    missing = [entry.name for entry in plan.entries if entry.name not in names]
    if missing:
        inner = getattr(model, "module", model)
        known = [n for n in names if n.rsplit(".", 1)[-1].isdigit()] or list(names)
        raise UsageError(f"{source} names block(s) {', '.join(missing[:5])}, which {type(inner).__name__} does not "
                         f"have: expected names of its modules such as {', '.join(known[:3])}; fix: plan this model "
                         "(ckpt-wrapper plan --model ... --out plan.json) and pass that plan")
    renamed = dataclasses.replace(plan, entries=[dataclasses.replace(e, name=names[e.name]) for e in plan.entries])
    return renamed.apply(model)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``parity`` flags to ``parser``, in the vocabulary of ``ckpt_wrapper.tools.flags``.

    Example:
        >>> import argparse
        >>> from ckpt_wrapper.testing.command import add_arguments, options_from_args
        >>> parser = argparse.ArgumentParser()
        >>> add_arguments(parser)
        >>> options = options_from_args(parser.parse_args(["--parallel", "fsdp1", "--ac-order", "after"]))
        >>> options.recipe.describe(), options.wrap
        ('fsdp1 FULL_SHARD use_orig_params=False, checkpoint after sharding', 'checkpoint')
    """
    parser.add_argument("--model", default="gpt",
                        help="gpt (the built-in small GPT) or module:callable returning your model (default: gpt)")
    parser.add_argument("--batch-fn",
                        help="module:callable, step -> (inputs, targets), the global batch; dict inputs are passed "
                             "as keywords (default: random tokens for the built-in GPT or a model with "
                             "config.vocab_size, e.g. a Hugging Face causal LM; other models need it)")
    parser.add_argument("--forward",
                        help="module:callable, (model, inputs) -> output (default: model(**inputs) for a dict, "
                             "else model(inputs)); a ModelOutput, dict or tuple output is compared by its logits")
    parser.add_argument("--loss",
                        help="module:callable, (output, targets) -> scalar loss averaged over the batch, given the "
                             "raw output (default: the model's own .loss when the inputs carry labels, else "
                             "cross-entropy of the logits for integer targets, mean squared error otherwise)")
    flags.add_blocks_flag(parser, default=None, what="Block, or with --plan the classes of the planned blocks")
    parser.add_argument("--ac", choices=["full", "offload"], default="full",
                        help="full: checkpoint_wrapper (recompute); offload: offload_wrapper (default: full)")
    parser.add_argument("--plan", metavar="PLAN.json",
                        help="apply this saved plan (ckpt-wrapper plan --out, Plan.save) instead of --ac")
    parser.add_argument("--min-ranks", type=int, default=1,
                        help="exit 1 when fewer ranks took part, e.g. 2 in CI so that a run without torchrun "
                             "cannot pass (default: 1)")
    flags.add_parallel_flags(parser)
    flags.add_training_flags(parser, steps=3, batch=None, lr=None, seed=None)
    parser.add_argument("--micro-batches", type=int, default=1, help="gradient accumulation micro-batches per step")
    parser.add_argument("--reference", choices=["unsharded", "sharded"], default="unsharded",
                        help="compare with a plain model on the global batch, or the same recipe without checkpointing")
    flags.add_tolerance_flags(parser, rtol=None, atol=None, rtol_text="0 vs sharded, 1e-5 vs unsharded",
                              atol_text="0 vs sharded, 1e-6 vs unsharded")
    flags.add_device_flag(parser)
    # Old spellings: hidden, still accepted (the sharding ones are in add_parallel_flags).
    parser.add_argument("--batch", dest="batch_fn", action=flags.DeprecatedAlias, new="--batch-fn")
    parser.add_argument("--wrap", dest="ac", action=flags.DeprecatedAlias, new="--ac full|offload",
                        choices=["checkpoint", "offload"],
                        convert=lambda value: {"ac": "full" if value == "checkpoint" else value})


def options_from_args(args: argparse.Namespace) -> ParityOptions:
    """Turn parsed flags into ``ParityOptions``.

    Raises:
        ValueError: on a flag combination that cannot work (see ``ckpt_wrapper.tools.flags.recipe_from_args``).
    """
    if args.plan is not None and args.ac != "full":
        raise ValueError(f"--plan applies the plan's strategies, so --ac {args.ac} cannot apply too: expected one of "
                         "them, found both; fix: drop --ac or --plan")
    if args.min_ranks < 1:
        raise ValueError(f"--min-ranks: expected an integer >= 1, found {args.min_ranks}")
    config = ParityConfig(steps=args.steps, micro_batches=args.micro_batches, reference=args.reference,
                          rtol=args.rtol, atol=args.atol)
    return ParityOptions(model=None if args.model == "gpt" else args.model, batch=args.batch_fn,
                         forward=args.forward, loss=args.loss, blocks=args.blocks,
                         wrap="checkpoint" if args.ac == "full" else args.ac, plan=args.plan,
                         min_ranks=args.min_ranks, recipe=flags.recipe_from_args(args), config=config,
                         device=args.device)


def summary_line(report: ParityReport, *, failed_ranks: int, min_ranks: int = 1, torchrun: bool = True) -> str:
    """The last line the command prints: the verdict, and how many ranks it rests on.

    Example:
        >>> from ckpt_wrapper.testing.command import summary_line
        >>> from ckpt_wrapper.testing.parity import ParityReport
        >>> summary_line(ParityReport(recipe="ddp", reference="unsharded", tolerances=(0, 0), world_size=2),
        ...              failed_ranks=0)
        'parity OK on 2 ranks (world size 2): exit status 0'
        >>> print(summary_line(ParityReport(recipe="ddp", reference="unsharded", tolerances=(0, 0)), failed_ranks=0,
        ...                    torchrun=False))
        parity OK on 1 rank only (world size 1): not started by torchrun, so nothing was split or reduced across ranks; run torchrun --nproc_per_node 2 -m ckpt_wrapper parity ... to exercise sharding: exit status 0
    """
    world = report.world_size
    verdict = "OK" if failed_ranks == 0 else f"FAILED on {failed_ranks} of {world} rank(s)"
    if world > 1:
        where = f"on {world} ranks (world size {world})"
    elif torchrun:
        where = "on 1 rank (world size 1, torchrun --nproc_per_node 1): sharding across ranks was not exercised"
    else:
        where = ("on 1 rank only (world size 1): not started by torchrun, so nothing was split or reduced across "
                 "ranks; run torchrun --nproc_per_node 2 -m ckpt_wrapper parity ... to exercise sharding")
    status = 1 if failed_ranks or world < min_ranks else 0
    if world < min_ranks:
        where += f"; expected at least {min_ranks} ranks (--min-ranks {min_ranks}), found {world}"
    return f"parity {verdict} {where}: exit status {status}"


def _setup(options: ParityOptions, device: torch.device) -> dict[str, Any]:
    """The keyword arguments of ``check_parity`` that the options describe (everything is loaded here, so a
    mistake is a ``UsageError`` before any training)."""
    world = dist.get_world_size()
    built: list[nn.Module] = []

    raw_model_fn = builtin_gpt if options.model is None else load_callable(options.model, flag="--model")

    def model_fn() -> nn.Module:
        model = raw_model_fn()
        if not isinstance(model, nn.Module):
            raise UsageError(f"--model {options.model}: expected a callable returning an nn.Module, found "
                             f"{type(model).__name__}")
        built.append(model)
        return model

    if options.batch is not None:
        batch_fn: Callable[[int], Batch] = load_callable(options.batch, flag="--batch-fn")
    else:
        synthesized: list[Callable[[int], Batch]] = []

        def batch_fn(step: int) -> Batch:  # check_parity builds the model before the first batch
            if not synthesized:
                synthesized.append(model_batch_fn(built[0], rows=2 * world, name=options.model))
            return synthesized[0](step)

    adapter = OutputAdapter(forward=options.forward and load_callable(options.forward, flag="--forward"),
                            loss=options.loss and load_callable(options.loss, flag="--loss"))
    if options.plan is not None:
        try:
            plan = Plan.load(options.plan)
        except (OSError, ValueError) as error:
            raise UsageError(f"--plan {options.plan}: expected a plan saved by ckpt-wrapper plan --out (Plan.save), "
                             f"found: {error}") from None
        planned: list[Callable[[nn.Module], bool]] = []

        def wrap(model: nn.Module) -> object:
            return plan_wrap(plan, model, source=f"--plan {options.plan}")

        def plan_blocks(module: nn.Module) -> bool:  # the classes of the planned blocks (a wrapper keeps its class)
            if not planned:
                names = set()
                for entry in plan.entries:
                    try:
                        names.add(type(built[0].get_submodule(entry.name)).__name__)
                    except AttributeError:
                        pass  # plan_wrap names it
                planned.append(by_class_name(",".join(sorted(names))) if names else (lambda m: False))
            return planned[0](module)

        is_block = by_class_name(options.blocks) if options.blocks else plan_blocks
    else:
        selector = by_class_name(options.blocks or "Block")
        wrapper = checkpoint_wrapper
        if options.wrap == "offload":
            wrapper = functools.partial(offload_wrapper, cpu_copy=device.type == "cpu")
        is_block = selector

        def wrap(model: nn.Module) -> object:
            try:
                return apply_activation_checkpointing(model, checkpoint_wrapper_fn=wrapper, check_fn=selector)
            except ValueError as error:  # no block matched, or a block that cannot be wrapped
                raise UsageError(f"--blocks {options.blocks or 'Block'}: {error}") from None

    return dict(model_fn=model_fn, batch_fn=batch_fn, wrap=wrap, is_block=is_block, forward_fn=adapter.forward,
                loss_fn=adapter.loss)


def run(options: ParityOptions) -> int:
    """Run the parity check on this rank; rank 0 prints the report and a summary naming the world size.

    Returns:
        0 when all ranks agree (and at least ``min_ranks`` took part), 1 otherwise, 2 for a usage error
        (a callable that cannot be loaded, a plan that does not fit the model, no batch for the model).
    """
    device = default_device(options.device)
    owns_group = init_distributed(device)
    try:
        try:
            kwargs = _setup(options, device)
            report = check_parity(shard=options.recipe, config=options.config, device=device, **kwargs)
        except UsageError as error:  # every rank raises it alike: the same model, flags and plan
            if dist.get_rank() == 0:
                print(f"ckpt-wrapper parity: error: {error}", file=sys.stderr, flush=True)
            return 2
        failed = torch.tensor([0 if report.ok else 1], device=device)
        dist.all_reduce(failed)
        failed_ranks = int(failed)
        if dist.get_rank() == 0:
            print(report)
            if failed_ranks and report.ok:
                print(f"{failed_ranks} other rank(s) reported differences beyond tolerance")
            print(summary_line(report, failed_ranks=failed_ranks, min_ranks=options.min_ranks,
                               torchrun="RANK" in os.environ), flush=True)
        return 1 if failed_ranks or report.world_size < options.min_ranks else 0
    finally:
        if owns_group:
            shutdown_distributed()  # barrier, destroy, and free the groups before interpreter shutdown
