"""Late-task weighting (``SubspacePredictor(late_weight=...)``): the statistic leans towards the
steps at the end of the task, dense or sketched."""

from __future__ import annotations

import pytest
import torch

from lightning_metagrad import GradientSubspacePredictor, Runtime, SubspacePredictor
from lightning_metagrad.predictors import build_predictor


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


def test_the_default_reads_the_layer_inputs_leaning_towards_the_task_end() -> None:
    pred = SubspacePredictor()
    assert (pred.statistic, pred.late_weight) == ("inputs", 0.9)


def test_the_earlier_gradient_default_is_a_named_mode() -> None:
    pred = build_predictor("gradient-subspace")
    assert isinstance(pred, GradientSubspacePredictor)
    assert (pred.statistic, pred.late_weight) == ("gradient", 1.0)
    assert GradientSubspacePredictor(threshold=0.9, late_weight=0.8).late_weight == 0.8


@pytest.mark.parametrize("late_weight", [0.9, 0.5])
def test_forgetting_weighted_steps_leaves_the_moment_of_the_steps_before(
    late_weight: float,
) -> None:
    gen = torch.Generator().manual_seed(0)
    steps = [torch.randn(5, 7, generator=gen) for _ in range(12)]

    def fed(count: int, history: int = 0) -> SubspacePredictor:
        pred = SubspacePredictor(every=1, sample_rows=3, seed=1, late_weight=late_weight)
        w = torch.zeros(5, 7)
        pred.bind({"w": w})
        if history:
            pred.keep_history(history)
        for g in steps[:count]:
            pred.observe(["w"], [w], [g])
        return pred

    late = fed(12, history=6)
    assert late.forget_recent(4)  # a switch detected 4 steps late
    exact = fed(8)
    torch.testing.assert_close(late.state_dict()["cov"]["w"], exact.state_dict()["cov"]["w"])


def test_a_state_learnt_from_another_statistic_warns_on_load_naming_the_setting() -> None:
    old = GradientSubspacePredictor(every=1)
    w = torch.zeros(3, 4)
    old.bind({"w": w})
    old.observe(["w"], [w], [torch.ones(3, 4)])
    old.end_task(["w"], [w])
    warnings: list[str] = []
    new = SubspacePredictor()
    new.runtime = Runtime(warn=warnings.append)
    new.load_state_dict(old.state_dict())
    assert len(warnings) == 1
    assert "statistic='gradient'" in warnings[0] and "late_weight=1.0" in warnings[0]
    again: list[str] = []
    same = GradientSubspacePredictor()
    same.runtime = Runtime(warn=again.append)
    same.load_state_dict(old.state_dict())
    assert again == []
