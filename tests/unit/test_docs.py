"""The documentation cites files and tests that exist."""

from __future__ import annotations

import re

import pytest
from helpers import ROOT

PAGES = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]
# Repository paths the pages cite, in links or code spans: experiments/overhead.py,
# ../tests/test_callback.py, experiments/results/main-job.json, ...
CITED = re.compile(
    r"(?:\.\./)?\b((?:experiments|tests|lightning_metagrad|examples|docs)/[\w./-]*\w\.(?:py|json|md|sh|txt|yaml|png))"
    r"(?:::(\w+))?"
)


def _citations() -> list[tuple[str, str, str]]:
    found = []
    for page in PAGES:
        for match in CITED.finditer(page.read_text()):
            found.append((page.name, match.group(1), match.group(2) or ""))
    return found


def test_the_pages_cite_something() -> None:
    assert len(_citations()) > 50


@pytest.mark.parametrize(("page", "path", "test"), sorted(set(_citations())), ids=lambda v: str(v))
def test_every_cited_file_and_test_exists(page: str, path: str, test: str) -> None:
    target = ROOT / path
    if "runs/" in path:  # outputs of the documented commands (git-ignored), not sources
        return
    assert target.exists(), f"{page} cites {path}, which does not exist"
    if test:
        source = target.read_text()
        assert re.search(rf"^(?:async )?def {test}\b", source, re.M), (
            f"{page} cites {path}::{test}, which is not a test in that file"
        )
