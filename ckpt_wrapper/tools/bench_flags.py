"""The command-line flags the benchmarks share: ``ckpt-wrapper bench`` and ``scripts/bench/*.py``.

Example:
    >>> import argparse
    >>> from ckpt_wrapper.tools import bench_flags
    >>> parser = argparse.ArgumentParser()
    >>> bench_flags.add_run_arguments(parser, rounds=20, warmup=3)
    >>> bench_flags.add_model_arguments(parser)
    >>> args = parser.parse_args(["--preset", "small", "--n-layer", "2"])
    >>> args.preset, args.n_layer, args.rounds, args.device
    ('small', 2, 20, None)
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from ckpt_wrapper.distributed import DTYPES
from ckpt_wrapper.tools.benchkit import MALLOC_ENV, PRESETS

__all__ = [
    "add_model_arguments", "add_reexec_argument", "add_run_arguments", "check_run_arguments", "comma_separated",
    "script_parser",
]


def comma_separated(kind: Callable[[str], Any]) -> Callable[[str], tuple[Any, ...]]:
    """An argparse ``type``: ``"1,2"`` -> ``(1, 2)`` with ``kind`` applied to each part; ``""`` -> ``()``.

    Example:
        >>> from ckpt_wrapper.tools.bench_flags import comma_separated
        >>> comma_separated(float)("0.5, 0.25")
        (0.5, 0.25)
    """

    def parse(text: str) -> tuple[Any, ...]:
        try:
            return tuple(kind(part) for part in text.split(",") if part.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated {kind.__name__} values, got {text!r}") from None

    return parse


def script_parser(description: str, *, rounds: int = 20, warmup: int = 3) -> argparse.ArgumentParser:
    """A benchmark script's parser with the shared flags: run, model (with ``--preset``) and ``--no-reexec``.

    Example:
        >>> from ckpt_wrapper.tools.bench_flags import script_parser
        >>> script_parser("demo").parse_args(["--rounds", "2", "--no-reexec"]).rounds
        2
    """
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_run_arguments(parser, rounds=rounds, warmup=warmup)
    add_model_arguments(parser)
    add_reexec_argument(parser)
    return parser


def add_run_arguments(parser: argparse.ArgumentParser, *, rounds: int, warmup: int, steps: bool = True) -> None:
    """Flags every benchmark takes: device, dtype, rounds, warm-up, threads (and ``--steps`` per round)."""
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default, or 'auto': cuda when available, else cpu)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="parameter and activation dtype (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--rounds", type=int, default=rounds,
                        help="timed rounds, each running every configuration once (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=warmup, help="untimed rounds before them (default: %(default)s)")
    if steps:
        parser.add_argument("--steps", type=int, default=1, help="steps per configuration per round, timed together")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: 2 on CPU, unchanged on CUDA)")


def add_model_arguments(parser: argparse.ArgumentParser, *, preset: bool = True) -> None:
    """Flags that choose the model: ``--preset`` (with ``preset``), ``--reference``, overrides, batch, seed."""
    if preset:
        parser.add_argument("--preset", choices=list(PRESETS), default=None,
                            help="model shape: 'small' (8 blocks, width 256, 4 heads, sequence 128, vocabulary 2000), "
                                 "'cpu-reference' (models.CPU_REFERENCE), 'gpu-reference' (models.GPU_REFERENCE); "
                                 "default small on CPU, gpu-reference on CUDA")
    parser.add_argument("--reference", action="store_true",
                        help="the device's reference workload: models.CPU_REFERENCE on CPU, models.GPU_REFERENCE on "
                             "CUDA (the default there), instead of the small GPT (8 blocks, width 256, 4 heads, "
                             "sequence 128, vocabulary 2000)")
    for name, help_text in (("n_layer", "blocks"), ("d_model", "hidden width"), ("n_head", "attention heads"),
                            ("seq_len", "sequence length"), ("vocab_size", "vocabulary size")):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=None,
                            help=f"override the workload's {help_text}")
    parser.add_argument("--batch", type=int, default=4, help="sequences per step (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights and tokens (default: %(default)s)")


def add_reexec_argument(parser: argparse.ArgumentParser) -> None:
    """``--no-reexec``: keep the current environment on CPU."""
    parser.add_argument("--no-reexec", action="store_true",
                        help="on CPU, do not re-execute with " + " ".join(f"{k}={v}" for k, v in MALLOC_ENV.items())
                             + " when they are missing (the result records whether they were set)")


def check_run_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``parser.error`` for out-of-range values of the shared flags (it exits with status 2)."""
    for flag in ("rounds", "steps", "batch"):
        if getattr(args, flag, 1) < 1:
            parser.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.reference and getattr(args, "preset", None) is not None:
        parser.error("pass either --reference or --preset, not both")
