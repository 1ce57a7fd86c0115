"""The guides' code runs: every ```python block of docs/writing-a-*.md, in order, in one
namespace per guide (a block right after ``<!-- not run ... -->`` is skipped: it needs the
real kernel)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[2] / "docs"
BLOCK = re.compile(r"(<!-- not run[^>]*-->\n)?```python\n(.*?)```", re.S)
GUIDES = sorted(DOCS.glob("writing-a-*.md"))


def blocks(guide: Path) -> list[str]:
    return [code for skip, code in BLOCK.findall(guide.read_text()) if not skip]


def test_there_are_guides_with_code() -> None:
    assert {g.name for g in GUIDES} >= {"writing-a-device.md", "writing-a-backend.md"}
    assert all(blocks(g) for g in GUIDES)


@pytest.mark.parametrize("guide", GUIDES, ids=[g.stem for g in GUIDES])
def test_the_guides_code_runs(guide: Path) -> None:
    namespace: dict[str, object] = {"__name__": f"guide_{guide.stem.replace('-', '_')}"}
    for n, code in enumerate(blocks(guide), 1):
        try:
            exec(compile(code, f"{guide.name}, block {n}", "exec"), namespace)
        except Exception as e:
            raise AssertionError(f"{guide.name}, block {n} failed: {type(e).__name__}: {e}") from e
