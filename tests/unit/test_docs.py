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
    for optional in ("accelerate", "transformers", "lightning", "torchtitan"):
        if f"import {optional}" in source or f"from {optional}" in source or f"integrations.{optional}" in source:
            pytest.importorskip(optional)
    if "integrations.hf_trainer" in source:
        pytest.importorskip("transformers")
    if "integrations.torchtitan" in source:
        pytest.importorskip("torchtitan.models", reason="torchtitan 0.3.0 imports triton with its models")
    exec(compile(source, "<doc example>", "exec"), {"__name__": "__doc_example__"})


LINKED = [*PAGES, ROOT / "CHANGELOG.md", ROOT / "DEVELOPERS.md"]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
OUTSIDE = re.compile(r"DESIGN\.md|STYLE\.md|\.\./shared|(?<![\w/])shared/")


def _anchors(page: pathlib.Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces made dashes."""
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.DOTALL | re.MULTILINE)
    headings = re.findall(r"^#+\s+(.*?)\s*$", text, re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


@pytest.mark.parametrize("page", LINKED, ids=lambda page: str(page.relative_to(ROOT)))
def test_links_stay_inside_the_repository_and_resolve(page: pathlib.Path) -> None:
    """A failure means a page links to a file or heading that does not exist, or to something outside
    the repository that readers of a clone or a wheel do not have."""
    text = page.read_text()
    outside = sorted(set(OUTSIDE.findall(text)))
    assert not outside, f"{page.name} points outside the repository: {outside}"
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):  # http(s), mailto: not checked here
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists() or ROOT not in (resolved, *resolved.parents):
            broken.append(target)
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            broken.append(target)
    assert not broken, f"{page.name} has broken links: {broken}"


def test_no_project_file_points_outside_the_repository() -> None:
    """Code, scripts and configuration name no file that only exists outside the repository (the
    guides it was written from): what a reader needs is in docs/. A failure names the files."""
    this = pathlib.Path(__file__).resolve()
    sources = [p for pattern in ("ckpt_wrapper/**/*.py", "scripts/**/*", "tests/**/*.py", "*.toml", "Makefile", ".ci/*")
               for p in ROOT.glob(pattern) if p.is_file() and p.resolve() != this]
    offending = sorted(str(p.relative_to(ROOT)) for p in sources if OUTSIDE.search(p.read_text(errors="ignore")))
    assert not offending, f"these files point outside the repository: {offending}"
