"""The ``ckpt-wrapper`` command.

    ckpt-wrapper demo [--steps N ...]                          # or: python -m ckpt_wrapper demo
    torchrun --nproc_per_node 2 -m ckpt_wrapper demo
    ckpt-wrapper plan --memory-budget 0.5 --out plan.json
    ckpt-wrapper inspect --memory-budget 0.3 --png step.png
    torchrun --nproc_per_node 2 -m ckpt_wrapper parity --plan plan.json
    ckpt-wrapper --version

A usage error is one line on stderr (``ckpt-wrapper COMMAND: error: ...``) and exit status 2.

Each subcommand is a module with ``add_arguments(parser)``, ``options_from_args(args)`` and
``run(options) -> int``; adding one is one entry in ``_COMMANDS``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import NoReturn

import torch

from ckpt_wrapper import __version__
from ckpt_wrapper.testing import command as parity_command
from ckpt_wrapper.tools import bench, demo, inspect_command, plan_command

__all__ = ["OneLineErrorParser", "build_parser", "main", "version_text"]

# name -> (module, one-line help).
_COMMANDS: dict[str, tuple[ModuleType, str]] = {
    "demo": (demo, "train a small GPT with checkpointing under FSDP2; check gradients against an unwrapped model"),
    "bench": (bench, "step time against activation memory: no checkpointing, full, selective, offload, plans, PyTorch's tools"),
    "parity": (parity_command, "prove a checkpointed, sharded model trains exactly like a reference (under torchrun)"),
    "plan": (plan_command, "choose a strategy per block under a memory budget; print the plan, save it as JSON"),
    "inspect": (inspect_command, "what one step saves, recomputes and offloads, before and after a plan; its peak"),
}


class OneLineErrorParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line on stderr, naming ``--help``, and exit status 2.

    Example:
        >>> import contextlib, io
        >>> from ckpt_wrapper.tools.cli import OneLineErrorParser
        >>> parser = OneLineErrorParser(prog="tool")
        >>> _ = parser.add_argument("--steps", type=int, help="steps")
        >>> with contextlib.redirect_stderr(io.StringIO()) as err:
        ...     parser.parse_args(["--steps", "x"])
        Traceback (most recent call last):
        ...
        SystemExit: 2
        >>> err.getvalue()
        "tool: error: argument --steps: invalid int value: 'x' (see tool --help)\\n"
    """

    def error(self, message: str) -> NoReturn:
        """Print ``PROG: error: MESSAGE (see PROG --help)`` on one line and exit with status 2."""
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def version_text() -> str:
    """What ``ckpt-wrapper --version`` prints: this package's version and torch's.

    Example:
        >>> import ckpt_wrapper, torch
        >>> from ckpt_wrapper.tools.cli import version_text
        >>> version_text() == f"ckpt-wrapper {ckpt_wrapper.__version__} (torch {torch.__version__})"
        True
    """
    return f"ckpt-wrapper {__version__} (torch {torch.__version__})"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``ckpt-wrapper``, one subparser per command.

    Example:
        >>> from ckpt_wrapper.tools.cli import build_parser
        >>> build_parser().parse_args(["demo", "--steps", "2"]).steps
        2
    """
    parser = OneLineErrorParser(
        prog="ckpt-wrapper", description="Transparent activation checkpointing for PyTorch: tools."
    )
    parser.add_argument("--version", action="version", version=version_text(),
                        help="print the versions of ckpt_wrapper and torch, and exit")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in _COMMANDS.items():
        sub = commands.add_parser(
            name, help=help_text, description=module.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        module.add_arguments(sub)
        sub.set_defaults(_module=module, _parser=sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the chosen command and return its exit status.

    Args:
        argv: the arguments after the program name.

    Returns:
        The command's exit status (0 on success).

    Example:
        >>> from ckpt_wrapper.tools.cli import main
        >>> main(["demo", "--n-head", "3"])
        Traceback (most recent call last):
        ...
        SystemExit: 2
    """
    args = build_parser().parse_args(argv)
    module: ModuleType = args._module
    try:
        options = module.options_from_args(args)
    except ValueError as error:  # bad flag combinations read as usage errors, not tracebacks
        args._parser.error(str(error))
    status = int(module.run(options))
    sys.stdout.flush()
    return status
