"""Tasks the rank pool runs for the command tests: the driver's or the CLI's ``main`` on each rank.

Both join a process group that exists already and leave it to its owner (they barrier at the end and
destroy only a group they made), so a run in the pool is the run torchrun makes, less the launch: the
same flags, the same seeded model and data, the same collectives on 2 gloo ranks. What needs the launcher
itself (signals to the launch, torchrun's report of a failed rank, ``--parallel accelerate``, which shuts
the group down, the ``python -m`` entry point end to end) stays under torchrun.
"""

from __future__ import annotations

import contextlib
import io


def run_driver(argv: list[str]) -> tuple[int, str, str]:
    """The driver's ``main(argv)`` (scripts/launch/train_driver.py) on this rank: ``(exit status, stdout, stderr)``.

    An exception other than the usage errors ``main`` handles propagates (the pool reports it).
    """
    from ckpt_wrapper.tools.train_driver import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(list(argv))
    return status, out.getvalue(), err.getvalue()


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """``ckpt-wrapper ARGV`` (``ckpt_wrapper.tools.cli.main``) on this rank: ``(exit status, stdout, stderr)``."""
    from ckpt_wrapper.tools.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(list(argv))
    return status, out.getvalue(), err.getvalue()
