"""Tasks the rank pool runs for the driver tests: the driver's ``main`` on each rank, in the pool's group.

``main`` joins a process group that exists already and leaves it to its owner (``run`` barriers at the
end and does not destroy it), so a run in the pool is the run torchrun makes, less the launch: the same
flags, the same seeded model and data, the same collectives on 2 gloo ranks. What needs the launcher
itself (signals to the launch, torchrun's report of a failed rank, ``--parallel accelerate``, which shuts
the group down) stays under torchrun.
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
