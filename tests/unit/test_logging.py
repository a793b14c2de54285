"""Library logging: silent by default, one logger tree under ``ckpt_wrapper``, rank 0 only when asked."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
import torch

import ckpt_wrapper
from ckpt_wrapper.log import ALL_RANKS_ENV, PACKAGE, RankZeroFilter, current_rank, get_logger


def _record(**extra: object) -> logging.LogRecord:
    record = logging.LogRecord("ckpt_wrapper.test", logging.INFO, __file__, 1, "message", None, None)
    record.__dict__.update(extra)
    return record


@pytest.fixture
def single_process(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No process group, no all-ranks switch: the rank comes from ``RANK`` alone."""
    if torch.distributed.is_initialized():
        pytest.skip("a process group is open in this process; the rank would come from it")
    monkeypatch.delenv(ALL_RANKS_ENV, raising=False)
    return monkeypatch


def test_filter_passes_rank_0_and_drops_rank_1(single_process: pytest.MonkeyPatch) -> None:
    """A failure means every rank of a multi-rank run repeats each log line (or rank 0 says nothing)."""
    single_process.setenv("RANK", "0")
    assert current_rank() == 0
    assert RankZeroFilter().filter(_record())
    single_process.setenv("RANK", "1")
    assert current_rank() == 1
    assert not RankZeroFilter().filter(_record())
    assert RankZeroFilter(rank=0).filter(_record()) and not RankZeroFilter(rank=1).filter(_record())


def test_record_or_environment_asks_for_all_ranks(single_process: pytest.MonkeyPatch) -> None:
    """A failure means a per-rank message (``extra={"all_ranks": True}``) or the env switch is ignored."""
    single_process.setenv("RANK", "1")
    assert RankZeroFilter().filter(_record(all_ranks=True))
    assert RankZeroFilter(all_ranks=True).filter(_record())
    single_process.setenv(ALL_RANKS_ENV, "1")
    assert RankZeroFilter().filter(_record())
    assert not RankZeroFilter(all_ranks=False).filter(_record())  # the argument wins over the environment


def test_filter_on_a_handler_sees_every_module_logger(single_process: pytest.MonkeyPatch) -> None:
    """Records of module loggers propagate to the package logger's handler and are filtered there.

    A failure means the documented setup (filter on the handler) shows rank 1's lines or hides rank 0's.
    """
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(f"{record.rank}:{record.getMessage()}")  # type: ignore[method-assign]
    handler.addFilter(RankZeroFilter())
    package = logging.getLogger(PACKAGE)
    level = package.level
    package.addHandler(handler)
    package.setLevel(logging.INFO)
    try:
        module_logger = get_logger("ckpt_wrapper.offload_engine")
        single_process.setenv("RANK", "1")
        module_logger.info("dropped")
        module_logger.info("kept on every rank", extra={"all_ranks": True})
        single_process.setenv("RANK", "0")
        module_logger.info("from rank 0")
    finally:
        package.removeHandler(handler)
        package.setLevel(level)
    assert seen == ["1:kept on every rank", "0:from rank 0"]


def test_get_logger_puts_every_name_under_the_package() -> None:
    assert get_logger("ckpt_wrapper.selection") is logging.getLogger("ckpt_wrapper.selection")
    assert get_logger("ckpt_wrapper").name == "ckpt_wrapper"
    assert get_logger("train").name == "ckpt_wrapper.train"


def test_import_adds_only_a_null_handler() -> None:
    """A failure means importing ckpt_wrapper configures logging for the application (a library must not)."""
    handlers = logging.getLogger(PACKAGE).handlers
    assert ckpt_wrapper.log is sys.modules["ckpt_wrapper.log"]
    assert handlers and all(type(h) is logging.NullHandler for h in handlers)


def test_import_prints_nothing_to_stderr() -> None:
    """Even a warning logged by the library stays silent until the application configures logging.

    Without the NullHandler, Python's last-resort handler would print WARNING records to stderr.
    A failure means users see ckpt_wrapper's log lines they never asked for.
    """
    code = (
        "import logging, torch, ckpt_wrapper\n"
        "logging.getLogger('ckpt_wrapper.offload_engine').warning('should not be printed')\n"
        "logging.getLogger('ckpt_wrapper').error('nor this')\n"
        "block = ckpt_wrapper.checkpoint_wrapper(torch.nn.Linear(4, 4))\n"
        "block(torch.randn(2, 4, requires_grad=True)).sum().backward()\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""


def test_offload_at_host_cap_logs_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    """A failure means a capped host pool keeps tensors on the device without saying so in the debug log."""
    block = ckpt_wrapper.offload_wrapper(torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU()),
                                         cpu_copy=True, min_bytes=0, max_host_bytes=0)
    with caplog.at_level(logging.DEBUG, logger="ckpt_wrapper.offload_engine"):
        block(torch.randn(32, 64, requires_grad=True)).sum().backward()
    assert block.offload_engine.stats.kept_host_full > 0
    assert any("host buffer cap" in r.getMessage() for r in caplog.records if r.name == "ckpt_wrapper.offload_engine")
