"""The one memory-budget grammar, the same in Python, the training driver and ``ckpt-wrapper bench``.

A budget is either a fraction of the unwrapped model's activation memory, a float in (0, 1]
(``0.5``, or the text ``"0.5"`` or ``"50%"``), or a number of bytes, an int (``6 * 2**30``) or a text
with a unit (``"6GiB"``, ``"800MB"``, ``"123456"``). Anything else is a ``ValueError`` that says what
was expected. ``1`` alone is refused: it reads as "all of it" but would mean one byte.

Example:
    >>> from ckpt_wrapper.budget import parse_budget
    >>> parse_budget(0.5), parse_budget("50%"), parse_budget("6GiB")
    (Budget(fraction=0.5, nbytes=None), Budget(fraction=0.5, nbytes=None), Budget(fraction=None, nbytes=6442450944))
    >>> parse_budget("1.5")
    Traceback (most recent call last):
    ...
    ValueError: memory budget='1.5': a fraction must be in (0, 1]; for bytes pass an int or a text with a unit such as '6GiB'
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re

__all__ = ["Budget", "parse_budget"]

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_WITH_UNIT = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)\s*", re.IGNORECASE)
_HELP = "pass a fraction in (0, 1] such as 0.5 or '50%', or bytes as an int or a text such as '6GiB'"


@dataclasses.dataclass(frozen=True)
class Budget:
    """A parsed memory budget: exactly one of ``fraction`` and ``nbytes`` is set."""

    fraction: float | None = None
    """Share of the unwrapped model's activation memory, in (0, 1]."""
    nbytes: int | None = None
    """Bytes."""

    def resolve(self, unwrapped_bytes: int) -> int:
        """The budget in bytes, given the unwrapped model's activation bytes."""
        if self.fraction is not None:
            return int(self.fraction * unwrapped_bytes)
        return int(self.nbytes)  # type: ignore[arg-type]

    def __str__(self) -> str:
        return f"{self.fraction:g}" if self.fraction is not None else f"{self.nbytes} bytes"


def _fraction(value: float, shown: str) -> Budget:
    if not math.isfinite(value) or not 0 < value <= 1:
        raise ValueError(f"{shown}: a fraction must be in (0, 1]; for bytes pass an int or a text "
                         "with a unit such as '6GiB'")
    return Budget(fraction=float(value))


def _bytes(value: int, shown: str) -> Budget:
    if value < 1:
        raise ValueError(f"{shown}: bytes must be at least 1; {_HELP}")
    if value == 1:
        raise ValueError(f"{shown} is one byte, which no step fits; for all of the activation "
                         "memory pass 1.0, for bytes a text such as '1GiB'")
    return Budget(nbytes=int(value))


def parse_budget(value: object, *, name: str = "memory budget") -> Budget:
    """Read a memory budget written in any of the accepted forms (see the module docstring).

    Args:
        value: a float fraction, an int of bytes, a ``Budget``, or a text of either.
        name: how errors name the value (``memory_budget``, ``--memory-budget``).

    Returns:
        The ``Budget``.

    Raises:
        ValueError: for anything else, saying what is accepted.
    """
    if isinstance(value, Budget):
        return value
    shown = f"{name}={value!r}"
    if isinstance(value, bool) or value is None:
        raise ValueError(f"{shown}: {_HELP}")
    if isinstance(value, numbers.Integral):
        return _bytes(int(value), shown)
    if isinstance(value, numbers.Real):
        return _fraction(float(value), shown)
    if not isinstance(value, str):
        raise ValueError(f"{shown} ({type(value).__name__}): {_HELP}")
    text = value.strip()
    if text.endswith("%"):
        try:
            return _fraction(float(text[:-1]) / 100, shown)
        except ValueError as error:
            if "fraction must" in str(error):
                raise
            raise ValueError(f"{shown}: {_HELP}") from None
    match = _WITH_UNIT.fullmatch(text)
    if match:
        number, unit = match.groups()
        return _bytes(int(float(number) * _UNITS[unit.lower()]), shown)
    if re.fullmatch(r"\d+", text):
        return _bytes(int(text), shown)
    try:
        return _fraction(float(text), shown)
    except ValueError as error:
        if "fraction must" in str(error):
            raise
        raise ValueError(f"{shown}: {_HELP}") from None
