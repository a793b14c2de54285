"""One memory-budget grammar in Python and on the command line."""

from __future__ import annotations

import argparse

import pytest

import ckpt_wrapper
from ckpt_wrapper.budget import Budget, parse_budget
from ckpt_wrapper.planner import PlanOptions
from ckpt_wrapper.tools.flags import budget_arg


@pytest.mark.parametrize(
    "value, expected",
    [
        (0.5, Budget(fraction=0.5)),
        (1.0, Budget(fraction=1.0)),
        ("0.35", Budget(fraction=0.35)),
        ("35%", Budget(fraction=0.35)),
        (6 * 2**30, Budget(nbytes=6 * 2**30)),
        ("6GiB", Budget(nbytes=6 * 2**30)),
        ("6 gib", Budget(nbytes=6 * 2**30)),
        ("800MB", Budget(nbytes=800 * 10**6)),
        ("1.5KiB", Budget(nbytes=1536)),
        ("123456", Budget(nbytes=123456)),
    ],
)
def test_accepted_forms(value: object, expected: Budget) -> None:
    """Fractions as floats, texts or percentages; bytes as ints, digits or texts with a unit."""
    assert parse_budget(value) == expected
    assert PlanOptions(memory_budget=value).memory_budget == expected


@pytest.mark.parametrize("value", [1.5, 1, 0, -0.1, 0.0, float("nan"), float("inf"), True, None, "lots", "150%",
                                   "-3GiB", "0", "", [0.5]])
def test_everything_else_is_a_value_error_that_says_what_is_accepted(value: object) -> None:
    """Caught on the main of 2026-12-01: ``memory_budget=1.5`` became a one-byte budget (whose error then
    said to raise the budget), and ``1`` meant 100% while the docs said one byte."""
    with pytest.raises(ValueError, match=r"fraction|bytes|one byte"):
        parse_budget(value)
    with pytest.raises(ValueError):
        ckpt_wrapper.plan(None, None, memory_budget=value)  # refused before the model is touched


def test_the_command_line_uses_the_same_grammar() -> None:
    """The training driver's ``--memory-budget`` parses with the same rules and errors."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--memory-budget", type=budget_arg)
    assert parser.parse_args(["--memory-budget", "6GiB"]).memory_budget == Budget(nbytes=6 * 2**30)
    with pytest.raises(SystemExit):
        parser.parse_args(["--memory-budget", "1.5"])


def test_resolve_gives_bytes() -> None:
    assert parse_budget(0.25).resolve(1000) == 250
    assert parse_budget("2KiB").resolve(10**9) == 2048
