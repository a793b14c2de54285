"""``ckpt-wrapper parity``: prove on your own model that checkpointing changes nothing it learns.

Run it under torchrun; every rank trains the checkpointed, sharded model beside a reference and rank 0
prints the report. The exit status is 1 when any rank saw a difference beyond tolerance.

    torchrun --nproc_per_node 2 -m ckpt_wrapper parity                      # built-in GPT, FSDP2
    torchrun --nproc_per_node 2 -m ckpt_wrapper parity --parallel fsdp1 --sharding-strategy SHARD_GRAD_OP \\
        --ac-order after
    torchrun --nproc_per_node 4 -m ckpt_wrapper parity --model mypkg.models:build --batch-fn mypkg.data:batch \\
        --blocks LlamaDecoderLayer --parallel fsdp2 --param-dtype bf16 --reduce-dtype fp32 --reference sharded

``--model`` names a zero-argument callable returning the model; ``--batch-fn`` a callable ``step ->
(inputs, targets)`` returning the global batch, identical on every rank (split along dimension 0).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from ckpt_wrapper.apply import apply_activation_checkpointing
from ckpt_wrapper.distributed import default_device, init_distributed, shutdown_distributed
from ckpt_wrapper.testing.data import random_batch
from ckpt_wrapper.testing.recipes import ShardRecipe
from ckpt_wrapper.offload import offload_wrapper
from ckpt_wrapper.wrapper import checkpoint_wrapper
from ckpt_wrapper.selection import by_class_name
from ckpt_wrapper.testing.parity import ParityConfig, check_parity
from ckpt_wrapper.tools import flags

__all__ = ["ParityOptions", "add_arguments", "options_from_args", "run"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ParityOptions:
    """Everything ``ckpt-wrapper parity`` needs."""

    model: str | None = None
    """``module:callable`` building the model; None for the built-in GPT."""
    batch: str | None = None
    """``module:callable`` giving ``step -> (inputs, targets)``; None for synthetic tokens."""
    blocks: str = "Block"
    """Class name(s) of the blocks, comma-separated."""
    wrap: str = "checkpoint"
    """``checkpoint`` or ``offload``."""
    recipe: ShardRecipe = ShardRecipe()
    """How to shard."""
    config: ParityConfig = ParityConfig()
    """Steps and tolerances."""
    device: str | None = None
    """Device override; default CUDA if present, else CPU."""


def _load(spec: str) -> Callable[..., Any]:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"expected 'module:callable', got {spec!r}")
    try:
        target = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"cannot load {spec!r}: {error}") from error
    if not callable(target):
        raise ValueError(f"{spec!r} is not callable")
    return target


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
                        help="module:callable, step -> (inputs, targets), the global batch; needed with your own "
                             "--model (default: synthetic tokens)")
    flags.add_blocks_flag(parser, default="Block", what="Block")
    parser.add_argument("--ac", choices=["full", "offload"], default="full",
                        help="full: checkpoint_wrapper (recompute); offload: offload_wrapper (default: full)")
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
    if args.model != "gpt" and args.batch_fn is None:
        raise ValueError(f"--model {args.model} needs --batch-fn too (module:callable, step -> (inputs, targets)); "
                         "found none. Only the built-in --model gpt has a batch of its own")
    config = ParityConfig(steps=args.steps, micro_batches=args.micro_batches, reference=args.reference,
                          rtol=args.rtol, atol=args.atol)
    return ParityOptions(model=None if args.model == "gpt" else args.model, batch=args.batch_fn,
                         blocks=args.blocks, wrap="checkpoint" if args.ac == "full" else args.ac,
                         recipe=flags.recipe_from_args(args), config=config, device=args.device)


def run(options: ParityOptions) -> int:
    """Run the parity check on this rank; rank 0 prints the report. Returns 0 when all ranks agree."""
    device = default_device(options.device)
    owns_group = init_distributed(device)
    try:
        selector = by_class_name(options.blocks)
        if options.model is None:
            from ckpt_wrapper.testing.models import GPT, GPTConfig

            gpt = GPTConfig(n_layer=4, d_model=64, n_head=4, seq_len=32, vocab_size=256)
            model_fn: Callable[[], torch.nn.Module] = functools.partial(GPT, gpt)
            batch_fn = options.batch and _load(options.batch)
            rows = 2 * dist.get_world_size()
            batch_fn = batch_fn or (lambda step: random_batch(step=step, rows=rows, seq_len=gpt.seq_len,
                                                              vocab_size=gpt.vocab_size))
        else:
            model_fn = _load(options.model)
            if options.batch is None:
                raise ValueError("--model needs --batch (module:callable, step -> (inputs, targets))")
            batch_fn = _load(options.batch)
        wrapper = checkpoint_wrapper
        if options.wrap == "offload":
            wrapper = functools.partial(offload_wrapper, cpu_copy=device.type == "cpu")
        report = check_parity(
            model_fn, batch_fn,
            wrap=lambda m: apply_activation_checkpointing(m, checkpoint_wrapper_fn=wrapper, check_fn=selector),
            is_block=selector, shard=options.recipe,
                              config=options.config, device=device)
        failed = torch.tensor([0 if report.ok else 1], device=device)
        dist.all_reduce(failed)
        if dist.get_rank() == 0:
            print(report)
            if int(failed) and report.ok:
                print(f"{int(failed)} other rank(s) reported differences beyond tolerance")
        return 1 if int(failed) else 0
    finally:
        if owns_group:
            shutdown_distributed()  # barrier, destroy, and free the groups before interpreter shutdown
