"""Every test file sits in a lane: ``tests/unit`` (no Trainer anywhere) or
``tests/integration`` (tiny real Trainers); the slow tests of either carry
``@pytest.mark.slow``. CI runs the lanes one by one (``.ci/run``), so a test file elsewhere
would run only in the README's whole-suite command."""

from __future__ import annotations

import re

from helpers import TESTS

# What runs a Trainer (or a fit through one) in a test file.
TRAINER = re.compile(r"\bmake_trainer\(|\bTrainer\(|\.fit\(|\btrain_then_watch\(|\bLightningCLI\(")


def test_every_test_file_is_in_a_lane() -> None:
    outside = sorted(
        path.relative_to(TESTS).as_posix()
        for path in TESTS.rglob("test_*.py")
        if path.parent.name not in ("unit", "integration") and "data" not in path.parts
    )
    assert not outside, f"move these to tests/unit or tests/integration: {outside}"


def test_the_unit_lane_runs_no_trainer() -> None:
    for path in sorted((TESTS / "unit").glob("test_*.py")):
        found = TRAINER.search(path.read_text())
        assert found is None, f"{path.name} runs a Trainer ({found.group(0)!r}): tests/integration"
