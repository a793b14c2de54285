"""The one flag vocabulary of the commands: train (example and driver), demo and parity.

Each concept has one spelling, defined here once and added to a parser by a small function:

=====================  ==============================================================
concept                flag
=====================  ==============================================================
data parallelism       ``--parallel {none,ddp,fsdp1,fsdp2[,accelerate]}``
checkpoint vs shard    ``--ac-order {before,after}``
FSDP sharding          ``--sharding-strategy`` (FSDP2: FULL_SHARD or SHARD_GRAD_OP)
FSDP1 details          ``--use-orig-params``, ``--fsdp1-cpu-offload``
DDP detail             ``--find-unused``
mixed precision        ``--param-dtype``, ``--reduce-dtype`` (fp32, bf16, fp16)
model shape            ``--n-layer``, ``--d-model``, ``--n-head``, ``--seq-len``, ``--vocab-size``
training               ``--steps``, ``--batch`` (sequences per rank), ``--lr``, ``--seed``
where                  ``--device``
which blocks           ``--blocks`` (class names, comma-separated)
tolerances             ``--rtol``, ``--atol``
=====================  ==============================================================

Old spellings (``--shard``, ``--order``, ``--strategy``, ``--no-reshard``, ``--parallel fsdp``,
``--mixed-precision``) still parse, hidden from ``--help``, and print a one-line deprecation note.

Example:
    >>> import argparse
    >>> from ckpt_wrapper.tools.flags import add_parallel_flags, recipe_from_args
    >>> parser = argparse.ArgumentParser()
    >>> add_parallel_flags(parser)
    >>> args = parser.parse_args(["--parallel", "fsdp1", "--sharding-strategy", "SHARD_GRAD_OP"])
    >>> recipe_from_args(args).describe()
    'fsdp1 SHARD_GRAD_OP use_orig_params=False, checkpoint before sharding'
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from ckpt_wrapper.budget import Budget, parse_budget
from ckpt_wrapper.distributed import DTYPES
from ckpt_wrapper.testing.recipes import SHARD_KINDS, ShardRecipe

__all__ = [
    "DeprecatedAlias",
    "FSDP1_STRATEGIES",
    "FSDP2_STRATEGIES",
    "add_blocks_flag",
    "add_device_flag",
    "add_model_flags",
    "add_parallel_flags",
    "add_tolerance_flags",
    "add_training_flags",
    "recipe_from_args",
]

FSDP1_STRATEGIES = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD", "_HYBRID_SHARD_ZERO2")
"""Every ``--sharding-strategy`` FSDP1 takes."""
FSDP2_STRATEGIES = ("FULL_SHARD", "SHARD_GRAD_OP")
"""What ``--sharding-strategy`` means for FSDP2: ``reshard_after_forward`` True or False."""


def _note(text: str) -> None:
    # One line per run, not one per rank.
    if os.environ.get("RANK", "0") == "0":
        print(f"note: {text}", file=sys.stderr, flush=True)


class DeprecatedAlias(argparse.Action):
    """An old spelling of a flag, hidden from ``--help``: a one-line note names the new flag, then it stores
    what the new one would (``convert(values)`` gives ``{dest: value}`` where that differs from ``values``).

    Example:
        >>> import argparse, contextlib, io
        >>> from ckpt_wrapper.tools.flags import DeprecatedAlias
        >>> parser = argparse.ArgumentParser()
        >>> _ = parser.add_argument("--steps", type=int, help="steps")
        >>> _ = parser.add_argument("--iters", dest="steps", type=int, action=DeprecatedAlias, new="--steps")
        >>> with contextlib.redirect_stderr(io.StringIO()) as err:
        ...     parser.parse_args(["--iters", "3"]).steps
        3
        >>> err.getvalue()
        'note: --iters is deprecated and will be removed; use --steps\\n'
    """

    def __init__(self, option_strings: Sequence[str], dest: str, *, new: str,
                 convert: Callable[[Any], dict[str, Any]] | None = None, **kwargs: Any) -> None:
        self.new, self.convert = new, convert
        super().__init__(option_strings, dest, help=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        _note(f"{option_string} is deprecated and will be removed; use {self.new}")
        for dest, value in (self.convert(values) if self.convert else {self.dest: values}).items():
            setattr(namespace, dest, value)


def _parallel_kind(value: str) -> str:
    if value == "fsdp":
        _note("--parallel fsdp is deprecated and will be removed; use --parallel fsdp1")
        return "fsdp1"
    return value


def add_parallel_flags(parser: argparse.ArgumentParser, *, kinds: Sequence[str] = SHARD_KINDS,
                       default: str = "fsdp2") -> None:
    """Add ``--parallel`` and the sharding, ordering and mixed-precision flags (read by ``recipe_from_args``).

    Args:
        parser: the parser to add to, in place.
        kinds: the ``--parallel`` choices this command supports (``SHARD_KINDS``, plus ``accelerate``
            for the training driver).
        default: the default ``--parallel``.
    """
    group = parser.add_argument_group("parallelism")
    group.add_argument("--parallel", type=_parallel_kind, choices=tuple(kinds), default=default,
                       help="none (one process), ddp, fsdp1 (FullyShardedDataParallel), fsdp2 (fully_shard)"
                            + (", accelerate (what `accelerate launch --config_file ...` configured)"
                               if "accelerate" in kinds else "") + f" (default: {default})")
    group.add_argument("--ac-order", choices=("before", "after"), default="before",
                       help="checkpoint blocks before sharding (FSDP(wrap(block))) or after (wrap(FSDP(block)), "
                            "what accelerate does) (default: before)")
    group.add_argument("--sharding-strategy", choices=FSDP1_STRATEGIES, default="FULL_SHARD",
                       help="FSDP1 sharding strategy; for fsdp2 FULL_SHARD reshards after forward and "
                            "SHARD_GRAD_OP keeps parameters gathered (reshard_after_forward=False) "
                            "(default: FULL_SHARD)")
    group.add_argument("--use-orig-params", action="store_true", help="FSDP1 use_orig_params=True")
    group.add_argument("--fsdp1-cpu-offload", action="store_true",
                       help="FSDP1 CPUOffload(offload_params=True): parameters in host memory")
    group.add_argument("--find-unused", action="store_true", help="DDP find_unused_parameters=True")
    dtypes = tuple(DTYPES)
    group.add_argument("--param-dtype", choices=dtypes, default=None,
                       help="mixed precision compute dtype: FSDP's param_dtype, autocast under ddp and none, "
                            "accelerate's mixed_precision (default: none, full precision)")
    group.add_argument("--reduce-dtype", choices=dtypes, default=None,
                       help="FSDP gradient-reduction dtype (default: the parameters' dtype)")
    # Old spellings: hidden, still accepted.
    group.add_argument("--shard", dest="parallel", action=DeprecatedAlias, new="--parallel",
                       type=_parallel_kind, choices=tuple(kinds))
    group.add_argument("--order", dest="ac_order", action=DeprecatedAlias, new="--ac-order",
                       choices=("before", "after"))
    group.add_argument("--strategy", dest="sharding_strategy", action=DeprecatedAlias,
                       new="--sharding-strategy", choices=FSDP1_STRATEGIES)
    group.add_argument("--no-reshard", dest="sharding_strategy", action=DeprecatedAlias, nargs=0,
                       new="--sharding-strategy SHARD_GRAD_OP",
                       convert=lambda _: {"sharding_strategy": "SHARD_GRAD_OP"})
    group.add_argument("--mixed-precision", dest="param_dtype", action=DeprecatedAlias, choices=("no", "bf16"),
                       new="--param-dtype bf16 --reduce-dtype fp32 (or neither, for no)",
                       convert=lambda value: {"param_dtype": None, "reduce_dtype": None} if value == "no"
                       else {"param_dtype": "bf16", "reduce_dtype": "fp32"})


def recipe_from_args(args: argparse.Namespace) -> ShardRecipe:
    """The ``ShardRecipe`` the flags of ``add_parallel_flags`` describe.

    Raises:
        ValueError: for ``--parallel accelerate`` (accelerate's config shards, not a recipe) or an FSDP1-only
            strategy with fsdp2.
    """
    kind, strategy = args.parallel, args.sharding_strategy
    if kind not in SHARD_KINDS:
        raise ValueError(f"--parallel {kind} has no ShardRecipe: expected one of {', '.join(SHARD_KINDS)}")
    if kind == "fsdp2" and strategy not in FSDP2_STRATEGIES:
        raise ValueError(f"--parallel fsdp2 takes --sharding-strategy {' or '.join(FSDP2_STRATEGIES)}, found "
                         f"{strategy}, an FSDP1 strategy: use --parallel fsdp1 for it")
    return ShardRecipe(
        kind=kind, wrap_order=args.ac_order, sharding_strategy=strategy, use_orig_params=args.use_orig_params,
        cpu_offload=args.fsdp1_cpu_offload, reshard_after_forward=strategy != "SHARD_GRAD_OP",
        param_dtype=args.param_dtype, reduce_dtype=args.reduce_dtype, find_unused_parameters=args.find_unused,
    )


def add_model_flags(parser: argparse.ArgumentParser, *, n_layer: int, d_model: int, n_head: int, seq_len: int,
                    vocab_size: int) -> None:
    """Add the model-shape flags ``--n-layer --d-model --n-head --seq-len --vocab-size`` with these defaults."""
    group = parser.add_argument_group("model")
    group.add_argument("--n-layer", type=int, default=n_layer, help=f"transformer blocks (default: {n_layer})")
    group.add_argument("--d-model", type=int, default=d_model, help=f"hidden width (default: {d_model})")
    group.add_argument("--n-head", type=int, default=n_head,
                       help=f"attention heads, dividing --d-model (default: {n_head})")
    group.add_argument("--seq-len", type=int, default=seq_len, help=f"tokens per sequence (default: {seq_len})")
    group.add_argument("--vocab-size", type=int, default=vocab_size, help=f"vocabulary size (default: {vocab_size})")


def add_training_flags(parser: argparse.ArgumentParser, *, steps: int, batch: int | None, lr: float | None,
                       seed: int | None = 0) -> None:
    """Add ``--steps``, and ``--batch``, ``--lr``, ``--seed`` unless their default is None (not a flag here)."""
    group = parser.add_argument_group("training")
    group.add_argument("--steps", type=int, default=steps, help=f"optimizer steps (default: {steps})")
    if batch is not None:
        group.add_argument("--batch", type=int, default=batch,
                           help=f"sequences per rank per step; the global batch is batch x world size "
                                f"(default: {batch})")
    if lr is not None:
        group.add_argument("--lr", type=float, default=lr, help=f"AdamW learning rate (default: {lr})")
    if seed is not None:
        group.add_argument("--seed", type=int, default=seed,
                           help=f"seed of the weights and the data, the same on every rank (default: {seed})")


def budget_arg(text: str) -> Budget:
    """argparse ``type=`` for a memory budget, in ``ckpt_wrapper.budget``'s grammar."""
    try:
        return parse_budget(text, name="--memory-budget")
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_device_flag(parser: argparse.ArgumentParser) -> None:
    """Add ``--device`` (default None: ``cuda:LOCAL_RANK`` where CUDA exists, else the CPU)."""
    parser.add_argument("--device", default=None,
                        help="cpu, cuda or cuda:N (default: cuda:LOCAL_RANK when CUDA is available, else cpu); "
                             "the distributed backend follows the device")


def add_blocks_flag(parser: argparse.ArgumentParser, *, default: str | None, what: str) -> None:
    """Add ``--blocks``: the class names of the blocks to checkpoint (and shard), comma-separated."""
    parser.add_argument("--blocks", default=default,
                        help=f"class name(s) of the blocks to checkpoint and shard, comma-separated "
                             f"(default: {default or what})")


def add_tolerance_flags(parser: argparse.ArgumentParser, *, rtol: float | None, atol: float | None,
                        rtol_text: str | None = None, atol_text: str | None = None) -> None:
    """Add ``--rtol`` and ``--atol``, the tolerances of a comparison with a reference (``*_text``: the
    default as ``--help`` should word it, where the default is None)."""
    parser.add_argument("--rtol", type=float, default=rtol,
                        help=f"relative tolerance of losses and gradients (default: {rtol_text or rtol})")
    parser.add_argument("--atol", type=float, default=atol,
                        help=f"absolute tolerance of losses and gradients (default: {atol_text or atol})")
