"""Late-task weighting (``SubspacePredictor(late_weight=...)``): the statistic leans towards the
steps at the end of the task, dense or sketched."""

from __future__ import annotations

import pytest
import torch

from lightning_metagrad import SubspacePredictor


def _two_phase_basis(late_weight: float, sketch: int | None) -> torch.Tensor:
    """A task whose first 10 steps push along input direction 0 and last 10 along 1."""
    pred = SubspacePredictor(
        every=1, threshold=0.9, late_weight=late_weight, sketch=sketch, memory_budget=None
    )
    w = torch.zeros(4, 6)
    pred.bind({"w": w})
    for step in range(20):
        g = torch.zeros(4, 6)
        g[:, 0 if step < 10 else 1] = 1.0
        pred.observe(["w"], [w], [g])
    pred.end_task(["w"], [w])
    return pred.basis("w")


@pytest.mark.parametrize("sketch", [None, 4])
def test_without_weighting_both_phases_are_protected(sketch: int | None) -> None:
    basis = _two_phase_basis(1.0, sketch)
    assert basis.shape[1] == 2


@pytest.mark.parametrize("sketch", [None, 4])
def test_strong_weighting_keeps_the_end_of_the_task(sketch: int | None) -> None:
    basis = _two_phase_basis(0.5, sketch)
    assert basis.shape[1] == 1
    assert basis[1, 0].abs() == pytest.approx(1.0, abs=1e-5)  # input direction 1, the late one


def test_late_weight_is_a_fraction() -> None:
    with pytest.raises(ValueError, match="late_weight"):
        SubspacePredictor(late_weight=0.0)
