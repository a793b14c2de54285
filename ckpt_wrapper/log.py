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

import torch.distributed as dist

__all__ = ["ALL_RANKS_ENV", "PACKAGE", "RankZeroFilter", "current_rank", "get_logger"]

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
