"""The ``ckpt-wrapper`` command.

    ckpt-wrapper demo [--steps N ...]                          # or: python -m ckpt_wrapper demo
    torchrun --nproc_per_node 2 -m ckpt_wrapper demo

Each subcommand is a module with ``add_arguments(parser)``, ``options_from_args(args)`` and
``run(options) -> int``; adding one is one entry in ``_COMMANDS``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from types import ModuleType

from ckpt_wrapper.tools import bench, demo
from ckpt_wrapper.testing import command as parity_command

__all__ = ["build_parser", "main"]

# name -> (module, one-line help). bench and plan join here as they are written.
_COMMANDS: dict[str, tuple[ModuleType, str]] = {
    "demo": (demo, "train a small GPT with checkpointing under FSDP2; check gradients against an unwrapped model"),
    "bench": (bench, "step time against activation memory: no checkpointing, full, selective, offload, plans, PyTorch's tools"),
    "parity": (parity_command, "prove a checkpointed, sharded model trains exactly like a reference (under torchrun)"),
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``ckpt-wrapper``, one subparser per command.

    Example:
        >>> from ckpt_wrapper.tools.cli import build_parser
        >>> build_parser().parse_args(["demo", "--steps", "2"]).steps
        2
    """
    parser = argparse.ArgumentParser(
        prog="ckpt-wrapper", description="Transparent activation checkpointing for PyTorch: tools."
    )
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
    return int(module.run(options))
