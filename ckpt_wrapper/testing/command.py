"""``ckpt-wrapper parity``: prove on your own model that checkpointing changes nothing it learns.

Run it under torchrun; every rank trains the checkpointed, sharded model beside a reference and rank 0
prints the report. The exit status is 1 when any rank saw a difference beyond tolerance.

    torchrun --nproc_per_node 2 -m ckpt_wrapper parity                      # built-in GPT, FSDP2
    torchrun --nproc_per_node 2 -m ckpt_wrapper parity --shard fsdp1 --strategy SHARD_GRAD_OP --order after
    torchrun --nproc_per_node 4 -m ckpt_wrapper parity --model mypkg.models:build --batch mypkg.data:batch \\
        --blocks LlamaDecoderLayer --shard fsdp2 --param-dtype bf16 --reduce-dtype fp32 --reference sharded

``--model`` names a zero-argument callable returning the model; ``--batch`` a callable ``step ->
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
from ckpt_wrapper.distributed import default_device, init_distributed
from ckpt_wrapper.testing.data import random_batch
from ckpt_wrapper.testing.recipes import SHARD_KINDS, ShardRecipe
from ckpt_wrapper.offload import offload_wrapper
from ckpt_wrapper.wrapper import checkpoint_wrapper
from ckpt_wrapper.selection import by_class_name
from ckpt_wrapper.testing.parity import ParityConfig, check_parity

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
    """Add the ``parity`` flags to ``parser``."""
    parser.add_argument("--model", help="module:callable returning the model (default: built-in small GPT)")
    parser.add_argument("--batch", help="module:callable, step -> (inputs, targets) global batch (default: synthetic tokens)")
    parser.add_argument("--blocks", default="Block", help="class name(s) of the blocks to wrap and shard, comma-separated")
    parser.add_argument("--wrap", choices=["checkpoint", "offload"], default="checkpoint", help="wrapper kind")
    parser.add_argument("--shard", choices=SHARD_KINDS, default="fsdp2", help="data parallelism")
    parser.add_argument("--order", choices=["before", "after"], default="before",
                        help="checkpoint blocks before sharding (FSDP(wrap(block))) or after (wrap(FSDP(block)))")
    parser.add_argument("--strategy", default="FULL_SHARD", help="FSDP1 sharding strategy")
    parser.add_argument("--use-orig-params", action="store_true", help="FSDP1 use_orig_params=True")
    parser.add_argument("--fsdp1-cpu-offload", action="store_true", help="FSDP1 CPUOffload(offload_params=True)")
    parser.add_argument("--no-reshard", action="store_true", help="FSDP2 reshard_after_forward=False")
    parser.add_argument("--param-dtype", choices=["bf16", "fp16", "fp32"], help="mixed precision parameter dtype")
    parser.add_argument("--reduce-dtype", choices=["bf16", "fp16", "fp32"], help="mixed precision reduce dtype")
    parser.add_argument("--find-unused", action="store_true", help="DDP find_unused_parameters=True")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps to compare")
    parser.add_argument("--micro-batches", type=int, default=1, help="gradient accumulation micro-batches per step")
    parser.add_argument("--reference", choices=["unsharded", "sharded"], default="unsharded",
                        help="compare with a plain model on the global batch, or the same recipe without checkpointing")
    parser.add_argument("--rtol", type=float, help="relative tolerance (default: 0 vs sharded, 1e-5 vs unsharded)")
    parser.add_argument("--atol", type=float, help="absolute tolerance (default: 0 vs sharded, 1e-6 vs unsharded)")
    parser.add_argument("--device", help="device, e.g. cpu or cuda (default: cuda if available)")


def options_from_args(args: argparse.Namespace) -> ParityOptions:
    """Turn parsed flags into ``ParityOptions``; raises ``ValueError`` on bad combinations."""
    recipe = ShardRecipe(
        kind=args.shard, wrap_order=args.order, sharding_strategy=args.strategy,
        use_orig_params=args.use_orig_params, cpu_offload=args.fsdp1_cpu_offload,
        reshard_after_forward=not args.no_reshard, param_dtype=args.param_dtype,
        reduce_dtype=args.reduce_dtype, find_unused_parameters=args.find_unused,
    )
    config = ParityConfig(steps=args.steps, micro_batches=args.micro_batches, reference=args.reference,
                          rtol=args.rtol, atol=args.atol)
    return ParityOptions(model=args.model, batch=args.batch, blocks=args.blocks, wrap=args.wrap,
                         recipe=recipe, config=config, device=args.device)


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
            dist.barrier()
            dist.destroy_process_group()
