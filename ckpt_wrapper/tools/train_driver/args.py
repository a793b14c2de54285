"""The driver's command line: the shared vocabulary (``ckpt_wrapper.tools.flags``) plus its own flags.

Example:
    >>> from ckpt_wrapper.tools.train_driver.args import build_parser, check_args
    >>> args = build_parser().parse_args(["--parallel", "fsdp1", "--ac-order", "after", "--every", "2"])
    >>> check_args(args, world=2)
    >>> args.parallel, args.ac, args.every
    ('fsdp1', 'full', 2)
"""

from __future__ import annotations

import argparse
import difflib
import os
import pathlib
from typing import NoReturn

from ckpt_wrapper.budget import parse_budget
from ckpt_wrapper.testing.recipes import SHARD_KINDS
from ckpt_wrapper.tools import flags

__all__ = ["AC_MODES", "PARALLEL", "Parser", "UsageError", "build_parser", "check_args", "check_data"]

AC_MODES = ("none", "full", "selective", "offload", "full+offload", "plan")
"""The ``--ac`` choices."""
PARALLEL = (*SHARD_KINDS, "accelerate")
"""The ``--parallel`` choices: a ``ShardRecipe`` kind, or whatever ``accelerate launch`` configured."""


class UsageError(ValueError):
    """The flags describe a run that cannot work (or a feature this version lacks)."""


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` for every rank of a launch: help on rank 0 only, errors raised as ``UsageError``.

    ``main`` prints the error once, on rank 0, as one line (a mistyped flag gets the closest spelling,
    not the whole usage text), and exits with status 2 before any process group starts.
    """

    def error(self, message: str) -> NoReturn:
        if message.startswith("unrecognized arguments: "):
            known = [o for action in self._actions for o in action.option_strings]
            hints = []
            for word in message.removeprefix("unrecognized arguments: ").split():
                close = difflib.get_close_matches(word.split("=", 1)[0], known, n=1) if word.startswith("-") else []
                if close:
                    hints.append(f"{word}: did you mean {close[0]}?")
            message += (" (" + "; ".join(hints) + ")") if hints else ""
        raise UsageError(f"{message} (see --help)")

    def _print_message(self, message: str, file=None) -> None:  # noqa: ANN001 (argparse's signature)
        if os.environ.get("RANK", "0") == "0":
            super()._print_message(message, file)


def build_parser() -> argparse.ArgumentParser:
    """The command line of the training driver.

    Returns:
        The parser; its description is the package docstring.
    """
    from ckpt_wrapper.tools import train_driver

    p = Parser(prog="train_driver.py", description=train_driver.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("gpt", "llama"), default="gpt",
                   help="gpt: ckpt_wrapper.testing.models.GPT; llama: HF LlamaForCausalLM built from a config "
                        "(needs transformers; nothing is downloaded) (default: gpt)")
    flags.add_model_flags(p, n_layer=4, d_model=128, n_head=4, seq_len=64, vocab_size=512)
    p.add_argument("--dropout", type=float, default=0.0,
                   help="dropout probability (attention dropout for llama) (default: 0.0)")
    p.add_argument("--data", type=pathlib.Path, default=None,
                   help="a local text file, read as bytes (one token per byte; --vocab-size >= 256); "
                        "default: synthetic counting sequences")
    flags.add_training_flags(p, steps=20, batch=4, lr=3e-3, seed=0)
    flags.add_device_flag(p)
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each block in place (after checkpointing, before sharding)")
    p.add_argument("--compile-backend", default="inductor", help="backend for --compile (default: inductor)")
    flags.add_parallel_flags(p, kinds=PARALLEL)
    ac = p.add_argument_group("activation checkpointing")
    ac.add_argument("--ac", choices=AC_MODES, default="full",
                    help="none; full (checkpoint_wrapper); selective (op-level, --selective-preset); offload "
                         "(offload_wrapper); full+offload (checkpoint, block inputs to host); plan (per-block "
                         "choice within --memory-budget) (default: full)")
    flags.add_blocks_flag(p, default=None, what="Block for gpt, LlamaDecoderLayer for llama")
    ac.add_argument("--every", type=int, default=1,
                    help="wrap every N-th block only (default: 1, all); --every 2 wraps blocks 0, 2, ...")
    ac.add_argument("--selective-preset", default="matmuls",
                    help="preset of --ac selective (ckpt_wrapper.selective.PRESETS) (default: matmuls)")
    ac.add_argument("--memory-budget", type=flags.budget_arg, default=parse_budget(0.5),
                    help="--ac plan: activation memory budget: a fraction of the unwrapped model's in (0, 1] "
                         "('0.5', '50%%') or bytes ('6GiB', '800MB', '123456') (default: 0.5)")
    ac.add_argument("--offload-cpu-copy", action="store_true",
                    help="offload modes on CPU: copy into separate host buffers anyway (frees nothing; "
                         "exercises the offload path without a GPU)")
    ck = p.add_argument_group("checkpoints and output")
    ck.add_argument("--checkpoint-dir", type=pathlib.Path, default=None,
                    help="save DCP checkpoints here and resume from the latest one found (default: none)")
    ck.add_argument("--save-every", type=int, default=0,
                    help="also save every N steps (default: 0, only at the end or at --stop-after)")
    ck.add_argument("--stop-after", type=int, default=None,
                    help="stop after this step, saving a checkpoint (as if interrupted); resume with the same "
                         "command without it")
    ck.add_argument("--keep-last", type=int, default=3,
                    help="keep the newest K steps in --checkpoint-dir; older ones are deleted after each successful "
                         "save (default: 3; 0 keeps all)")
    ck.add_argument("--no-resume", action="store_true",
                    help="start from step 1 even if --checkpoint-dir holds steps (of this run or another); they "
                         "are deleted at this run's first save")
    ck.add_argument("--progress", choices=("auto", "bar", "lines", "off"), default="auto",
                    help="rank 0's display: bar (tqdm if installed, else one updating line), lines (one line "
                         "per --log-every steps), auto (bar on a terminal, else lines) (default: auto)")
    ck.add_argument("--log-every", type=int, default=1, help="steps between progress lines (default: 1)")
    ck.add_argument("--metrics-out", type=pathlib.Path, default=None,
                    help="rank 0 writes losses and the summary to this JSON file")
    return p


def check_args(args: argparse.Namespace, world: int) -> None:
    """Reject flag combinations that cannot work, saying what was expected, what was found and what to do.

    Raises:
        ValueError: naming the flags to change.
    """
    for name in ("steps", "batch", "every", "log_every", "n_layer", "seq_len"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, found {getattr(args, name)}")
    if args.keep_last < 0:
        raise ValueError(f"--keep-last must be >= 0 (0 keeps every step), found {args.keep_last}")
    if args.stop_after is not None and not 1 <= args.stop_after <= args.steps:
        raise ValueError(f"--stop-after must be within 1..--steps ({args.steps}), found {args.stop_after}")
    if args.stop_after is not None and args.checkpoint_dir is None:
        raise ValueError("--stop-after saves a checkpoint to resume from: pass --checkpoint-dir too")
    if args.data is not None and args.vocab_size < 256:
        raise ValueError(f"--data reads bytes (256 token values): --vocab-size must be >= 256, found {args.vocab_size}")
    if args.parallel == "none" and world > 1:
        raise ValueError(f"--parallel none trains one unsynchronised copy per rank; run one process, not {world}")
    if args.parallel != "accelerate":
        flags.recipe_from_args(args)  # the sharding flags' own checks
    if args.reduce_dtype is not None and args.parallel not in ("fsdp1", "fsdp2"):
        raise ValueError(f"--reduce-dtype is FSDP's gradient-reduction dtype; found --parallel {args.parallel}: "
                         "drop --reduce-dtype, or use fsdp1 or fsdp2")
    if args.ac_order == "after" and (args.ac in ("plan",) or args.compile or args.parallel == "fsdp2"):
        raise ValueError("--ac-order after works with --parallel fsdp1, ddp or none, without --compile or --ac plan "
                         "(fully_shard and compile want checkpointing applied first)")
    if args.parallel == "accelerate" and args.ac in ("selective", "plan"):
        raise ValueError(f"--ac {args.ac} is not wired to --parallel accelerate; use fsdp2, fsdp1, ddp or none")
    if args.parallel != "accelerate" and os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        raise ValueError("launched by `accelerate launch` with an FSDP config: pass --parallel accelerate")


def check_data(args: argparse.Namespace) -> None:
    """Refuse a ``--data`` file that is missing or too short, before any process group starts.

    Raises:
        ValueError: naming the file.
    """
    if args.data is None:
        return
    if not args.data.is_file():
        what = "is a folder" if args.data.is_dir() else "does not exist"
        raise ValueError(f"--data {args.data} {what}: pass a text file")
    size = args.data.stat().st_size
    if size <= args.seq_len + 1:
        raise ValueError(f"--data {args.data} holds {size} bytes; expected more than --seq-len + 1 "
                         f"({args.seq_len + 1}): use a longer file or a smaller --seq-len")
