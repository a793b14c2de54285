"""Logging: one logger per module under ``ckpt_wrapper``, silent until the application asks.

Library code logs through ``get_logger(__name__)`` and never configures handlers: the package logger
``ckpt_wrapper`` carries only a ``NullHandler``, so nothing reaches stderr unless the application
configures logging. In multi-rank runs every rank would repeat each record; ``RankZeroFilter`` on the
application's handler keeps rank 0's, unless a record asks for every rank
(``logger.info(..., extra={"all_ranks": True})``) or ``CKPT_WRAPPER_LOG_ALL_RANKS=1`` is set.

Example:
    >>> import logging
    >>> from ckpt_wrapper.log import RankZeroFilter, get_logger
    >>> get_logger("ckpt_wrapper.offload").name
    'ckpt_wrapper.offload'
    >>> record = logging.LogRecord("ckpt_wrapper", logging.INFO, __file__, 1, "hello", None, None)
    >>> RankZeroFilter(rank=0).filter(record), RankZeroFilter(rank=1).filter(record)
    (True, False)
"""

from __future__ import annotations

import logging
import os
import sys

import torch
import torch.distributed as dist

__all__ = ["ALL_RANKS_ENV", "PACKAGE", "RankZeroFilter", "caller_stacklevel", "current_rank", "get_logger"]

PACKAGE = "ckpt_wrapper"
"""Name of the package logger; every module's logger is a child of it."""

ALL_RANKS_ENV = "CKPT_WRAPPER_LOG_ALL_RANKS"
"""Set to ``1`` (or ``true``, ``yes``) to let ``RankZeroFilter`` pass every rank's records."""

logging.getLogger(PACKAGE).addHandler(logging.NullHandler())


def get_logger(name: str) -> logging.Logger:
    """The logger for module ``name`` (pass ``__name__``), always under the ``ckpt_wrapper`` logger.

    A name outside the package (a script's ``__main__``) is put under it, so one
    ``logging.getLogger("ckpt_wrapper").setLevel(...)`` governs everything ckpt_wrapper logs.

    Example:
        >>> from ckpt_wrapper.log import get_logger
        >>> get_logger("__main__").name
        'ckpt_wrapper.__main__'
    """
    if name != PACKAGE and not name.startswith(PACKAGE + "."):
        name = f"{PACKAGE}.{name}"
    return logging.getLogger(name)


def current_rank() -> int:
    """This process's global rank: from ``torch.distributed`` when a group exists, else ``RANK`` (0 when unset).

    Example:
        >>> from ckpt_wrapper.log import current_rank
        >>> isinstance(current_rank(), int)
        True
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def _env_asks_all_ranks() -> bool:
    return os.environ.get(ALL_RANKS_ENV, "").strip().lower() in ("1", "true", "yes", "on")


class RankZeroFilter(logging.Filter):
    """Passes records on rank 0 only, unless the record or ``CKPT_WRAPPER_LOG_ALL_RANKS`` asks for all ranks.

    Attach it to a handler, not a logger: a logger's filters do not see records its children propagate.
    Every record it passes gets a ``rank`` attribute, so formats may use ``%(rank)s``.

    Args:
        rank: the rank to judge by; default: ``current_rank()`` at each record (a process group made
            after the filter is then seen).
        all_ranks: pass every rank's records (as the environment variable does); default: read
            ``CKPT_WRAPPER_LOG_ALL_RANKS`` at each record.

    Example:
        >>> import logging
        >>> from ckpt_wrapper.log import RankZeroFilter
        >>> record = logging.LogRecord("ckpt_wrapper", logging.INFO, __file__, 1, "from every rank", None, None)
        >>> record.all_ranks = True
        >>> RankZeroFilter(rank=3).filter(record), record.rank
        (True, 3)
    """

    def __init__(self, *, rank: int | None = None, all_ranks: bool | None = None) -> None:
        super().__init__()
        self.rank = rank
        self.all_ranks = all_ranks

    def filter(self, record: logging.LogRecord) -> bool:
        """Whether ``record`` is shown: on rank 0 always, elsewhere only when all ranks were asked for."""
        rank = current_rank() if self.rank is None else self.rank
        record.rank = rank
        if rank == 0 or getattr(record, "all_ranks", False):
            return True
        return self.all_ranks if self.all_ranks is not None else _env_asks_all_ranks()


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_CONSUMER_DIRS = tuple(os.path.join(_PACKAGE_DIR, sub) + os.sep for sub in ("testing", "tools"))
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep


def _internal(filename: str) -> bool:
    """Frames a warning should not be attributed to: ckpt_wrapper's library code and PyTorch's.

    ``ckpt_wrapper.testing`` and ``ckpt_wrapper.tools`` call blocks as user code does (their models,
    the driver), so their frames count as the caller.
    """
    path = os.path.abspath(filename) if not filename.startswith("<") else filename
    if path.startswith(_TORCH_DIR):
        return True
    return path.startswith(_PACKAGE_DIR) and not path.startswith(_CONSUMER_DIRS)


def caller_stacklevel() -> int:
    """The ``stacklevel`` for a ``warnings.warn`` in the caller of this function that names the first frame
    outside ckpt_wrapper and PyTorch (the code that called the block), however many hooks lie between.

    Example:
        >>> from ckpt_wrapper.log import caller_stacklevel
        >>> caller_stacklevel()  # called from outside the package: the caller itself
        1
    """
    frame = sys._getframe(1)  # the function that will call warnings.warn: stacklevel 1
    level = 1
    while frame is not None and _internal(frame.f_code.co_filename):
        frame = frame.f_back
        level += 1
    return level
