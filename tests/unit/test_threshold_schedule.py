"""A threshold schedule for long streams (``SubspacePredictor(threshold_step=...)``)."""

from __future__ import annotations

import pytest
import torch

from lightning_metagrad import SubspacePredictor


def _folded(pred: SubspacePredictor, tasks: int) -> SubspacePredictor:
    w = torch.zeros(4, 6)
    pred.bind({"w": w})
    gen = torch.Generator().manual_seed(0)
    for _ in range(tasks):
        pred.observe(["w"], [w], [torch.randn(4, 6, generator=gen)])
        pred.end_task(["w"], [w])
    return pred


def test_each_folded_task_moves_the_threshold_by_the_step() -> None:
    pred = SubspacePredictor(every=1, threshold=0.9, threshold_step=-0.1)
    assert pred.threshold_of("w") == pytest.approx(0.9)
    _folded(pred, 3)
    assert pred.threshold_of("w") == pytest.approx(0.6)


def test_the_schedule_applies_to_per_layer_thresholds_and_stays_a_fraction() -> None:
    pred = SubspacePredictor(
        every=1, threshold=0.97, layer_thresholds={"w": 0.99}, threshold_step=0.003
    )
    _folded(pred, 5)
    assert pred.threshold_of("w") == 1.0  # 0.99 + 0.015, kept within (0, 1]
    assert pred.threshold_of("other") == pytest.approx(0.985)


def test_a_lower_threshold_late_in_the_stream_protects_fewer_directions() -> None:
    flat = _folded(SubspacePredictor(every=1, threshold=0.99), 4)
    falling = _folded(SubspacePredictor(every=1, threshold=0.99, threshold_step=-0.3), 4)
    assert falling.subspace_dims()["w"] < flat.subspace_dims()["w"]


def test_the_step_is_validated() -> None:
    with pytest.raises(ValueError, match="threshold_step"):
        SubspacePredictor(threshold_step=2.0)
