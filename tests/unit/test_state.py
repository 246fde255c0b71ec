"""Every state object (the callback, the engine, each predictor and boundary source, the
baselines) carries a version that its ``load_state_dict`` checks. Through checkpoints of real
Trainers (``state_dict()`` changes nothing, every field is read, a 0.1.0 checkpoint):
``tests/integration/test_state_training.py``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from helpers import BASELINES, PREDICTORS

from lightning_metagrad import (
    AutoBoundaries,
    BatchTaskIdBoundaries,
    CombinedBoundaries,
    MetaGrad,
    MetaGradCallback,
    NewFitBoundaries,
    SubspacePredictor,
    TaskBoundarySource,
)
from lightning_metagrad.baselines import EpisodicMemory
from lightning_metagrad.boundaries.changepoint import ChangePointDetector
from lightning_metagrad.boundaries.novelty import SubspaceNovelty
from lightning_metagrad.diagnostics import Diagnostics


def _states() -> list[tuple[str, Callable[[], Any]]]:
    def engine() -> MetaGrad:
        return MetaGrad(SubspacePredictor())

    return [
        ("MetaGradCallback", MetaGradCallback),
        ("MetaGrad engine", engine),
        *[(n, f) for n, f in PREDICTORS.items()],
        ("TaskBoundarySource", TaskBoundarySource),
        ("NewFitBoundaries", NewFitBoundaries),
        ("BatchTaskIdBoundaries", BatchTaskIdBoundaries),
        ("AutoBoundaries", AutoBoundaries),
        ("CombinedBoundaries", lambda: CombinedBoundaries([NewFitBoundaries()])),
        ("ChangePointDetector", ChangePointDetector),
        ("SubspaceNovelty", SubspaceNovelty),
        ("Diagnostics", Diagnostics),
        ("EpisodicMemory", lambda: EpisodicMemory(capacity=2)),
        *[(cls.__name__, cls) for cls in BASELINES],
    ]


@pytest.mark.parametrize(("name", "make"), _states(), ids=[n for n, _ in _states()])
def test_every_state_carries_a_version_checked_on_load(name: str, make: Callable) -> None:
    obj = make()
    state = obj.state_dict()
    assert isinstance(state.get("version"), int)
    obj.load_state_dict(state)  # its own version loads
    with pytest.raises(ValueError) as err:
        make().load_state_dict({**state, "version": 99})
    message = str(err.value)
    assert "state version 99 cannot be read" in message
    assert "written by another lightning-metagrad release" in message
    assert "load_state_dict(torch.load(path)['state_dict'])" in message  # what to do
