"""The one plain-text table formatter: summaries, plan tables and reports all print through it.

Example:
    >>> from ckpt_wrapper.table import format_table
    >>> print(format_table([["layers.0", "full", 1.5]], headers=["block", "strategy", "MiB"]))
    block     strategy  MiB
    layers.0  full      1.5
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["format_table"]


def format_table(
    rows: Sequence[Sequence[Any]], *, headers: Sequence[str] | None = None, align: str | None = None, indent: str = ""
) -> str:
    """Format ``rows`` as left-aligned (or per-column ``align``: ``"l"``/``"r"``) space-separated columns.

    Args:
        rows: the cells, one sequence per row; each cell is shown with ``str``.
        headers: an optional first row.
        align: one character per column, ``l`` or ``r``; default all left.
        indent: put before every line.

    Returns:
        The table, lines joined by newlines, without trailing spaces.

    Raises:
        ValueError: if ``align`` has a character other than ``l``/``r``, or rows differ in length.
    """
    table = [list(map(str, headers))] if headers is not None else []
    table += [[str(cell) for cell in row] for row in rows]
    if not table:
        return ""
    width = len(table[0])
    if any(len(row) != width for row in table):
        raise ValueError(f"every row needs {width} cells; got rows of lengths {sorted({len(r) for r in table})}")
    align = align or "l" * width
    if len(align) != width or set(align) - {"l", "r"}:
        raise ValueError(f"align needs one of 'l'/'r' per column ({width}), got {align!r}")
    widths = [max(len(row[i]) for row in table) for i in range(width)]
    lines = []
    for row in table:
        cells = [cell.rjust(w) if a == "r" else cell.ljust(w) for cell, w, a in zip(row, widths, align)]
        lines.append((indent + "  ".join(cells)).rstrip())
    return "\n".join(lines)
