"""Every Python example in README.md and docs/ runs: examples cannot rot."""

from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


def _examples() -> list:
    found = []
    for page in PAGES:
        for number, match in enumerate(BLOCK.finditer(page.read_text()), 1):
            found.append(pytest.param(match.group(1), id=f"{page.relative_to(ROOT)}#{number}"))
    return found


def test_docs_have_examples() -> None:
    """README and docs carry Python examples; if none are found the extraction below is broken."""
    assert len(_examples()) >= 5


@pytest.mark.parametrize("source", _examples())
def test_doc_example_runs(source: str) -> None:
    """A failure means a documented example no longer works as written."""
    for optional in ("accelerate", "transformers"):
        if f"import {optional}" in source or f"from {optional}" in source or f"integrations.{optional}" in source:
            pytest.importorskip(optional)
    exec(compile(source, "<doc example>", "exec"), {"__name__": "__doc_example__"})
