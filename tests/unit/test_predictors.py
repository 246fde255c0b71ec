"""Predictors of the mean old-task gradient without a Trainer (the anchored predictor's
running mean and trust region, the replay predictor's free coordinates) and the run-time
diagnostics. Through real Trainers: ``tests/integration/test_predictors_training.py``."""

from __future__ import annotations

import pytest
import torch

from lightning_metagrad import AnchoredPredictor, ReplayPredictor
from lightning_metagrad.diagnostics import Diagnostics


def _observe(pred: AnchoredPredictor, theta: list[float], target: list[float]) -> None:
    pred.observe(["w"], [torch.tensor(theta)], [torch.tensor(target)])


def _predict(pred: AnchoredPredictor, theta: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    [prediction] = pred.predict(["w"], [torch.tensor(theta)])
    assert prediction is not None and prediction[1] is not None
    return prediction[0], prediction[1].bool()


def test_anchored_running_mean_is_exact_eq_6() -> None:
    pred = AnchoredPredictor(radius=1e-6)
    # Task 1: importance F1 = mean(target^2) = [4, 1], end point theta*_1 = [1, 0].
    for target in ([2.0, 1.0], [-2.0, -1.0]):
        _observe(pred, [0.0, 0.0], target)
    pred.end_task(["w"], [torch.tensor([1.0, 0.0])])
    # Task 2: F2 = [0, 9], theta*_2 = [0, 2].
    _observe(pred, [0.0, 0.0], [0.0, 3.0])
    pred.end_task(["w"], [torch.tensor([0.0, 2.0])])
    mean, trusted = _predict(pred, [3.0, 5.0])
    # Mean of F_i (theta - theta*_i): [(4*2 + 0)/2, (1*5 + 9*3)/2]
    assert torch.allclose(mean, torch.tensor([4.0, 16.0]))
    assert bool(trusted.all())
    assert pred.num_old_tasks == 2


def test_anchored_trust_region_scales_with_importance() -> None:
    pred = AnchoredPredictor(radius=0.1)
    _observe(pred, [0.0, 0.0], [10.0, 0.1])  # F = [100, 0.01], mean 50.005
    pred.end_task(["w"], [torch.zeros(2)])
    # Radius_j = 0.1 * sqrt(mean F / F_j): ~0.0707 for the important, ~7.07 for the other.
    assert _predict(pred, [0.08, 0.08])[1].tolist() == [True, False]
    assert _predict(pred, [0.06, 8.0])[1].tolist() == [False, True]


def test_anchored_state_follows_parameters_by_name() -> None:
    pred = AnchoredPredictor(radius=1e-6)
    pred.observe(["a", "b"], [torch.zeros(1)] * 2, [torch.tensor([1.0]), torch.tensor([2.0])])
    pred.end_task(["a", "b"], [torch.zeros(1)] * 2)
    # Next task: "a" frozen (absent), a new head "c" before "b": no prediction for "c".
    out = pred.predict(["c", "b"], [torch.ones(1), torch.ones(1)])
    assert out[0] is None and out[1] is not None and out[1][0].tolist() == [4.0]  # F=4 * (1-0)
    restored = AnchoredPredictor(radius=1e-6)
    restored.load_state_dict(pred.state_dict())
    [prediction] = restored.predict(["a"], [torch.tensor([2.0])])
    assert prediction is not None and prediction[0].tolist() == [2.0]


def test_anchored_state_dict_does_not_change_the_predictor() -> None:
    pred = AnchoredPredictor(radius=1e-3)
    _observe(pred, [0.0, 0.0], [1.0, 2.0])
    before = pred.state_dict()
    again = pred.state_dict()
    assert before.keys() == again.keys() and before["count"] == again["count"] == {"w": 1}
    assert torch.equal(before["sq_sum"]["w"], again["sq_sum"]["w"])


@pytest.mark.parametrize("radius", ["0.1", float("inf"), 0.0, -1.0, float("nan"), True])
def test_anchored_radius_must_be_a_finite_positive_number(radius: object) -> None:
    with pytest.raises(ValueError, match="`radius`"):
        AnchoredPredictor(radius=radius)  # type: ignore[arg-type]


def test_diagnostics_warn_once_when_the_prediction_is_uninformative() -> None:
    d = Diagnostics(warmup=5)
    with pytest.warns(UserWarning, match="no information"):
        for _ in range(10):
            d.observe_prediction_error(torch.tensor(1.0))
    assert d.uninformative


def test_diagnostics_stay_quiet_for_an_informative_prediction() -> None:
    d = Diagnostics(warmup=5)
    for _ in range(20):
        d.observe_prediction_error(torch.tensor(0.3))
    assert not d.uninformative


def test_diagnostics_warn_when_the_weights_run_away_once_the_rule_acts() -> None:
    d = Diagnostics(check_every=1)
    w = torch.ones(10)
    d.step([w * 0.1], 0)
    d.step([w], 0)  # 10x in the first task: plain training's own growth, no warning
    assert not d.runaway
    d.step([w], 1)  # the first step with an old task: growth is measured from here
    d.step([w * 2], 1)
    assert not d.runaway
    with pytest.warns(UserWarning, match="running away"):
        figures = d.step([w * 5], 1)
    assert d.runaway and float(figures["metagrad/param_norm_growth"]) == pytest.approx(5.0)


def test_replay_frees_small_old_gradients_above_zero_when_asked() -> None:
    old = {"w": torch.tensor([0.0, 0.1, -0.2, 3.0])}  # mean |old| = 0.825
    zero, one = ReplayPredictor(free_below=0.0), ReplayPredictor(free_below=1.0)
    assert zero._constrained(old)["w"].tolist() == [False, True, True, True]  # type: ignore[index]
    assert one._constrained(old)["w"].tolist() == [False, False, False, True]  # type: ignore[index]
    assert ReplayPredictor(free_below=None)._constrained(old) is None
    assert ReplayPredictor().free_below == 4.0  # the default: the middle of the measured plateau
    with pytest.raises(ValueError, match="free_below"):
        ReplayPredictor(free_below=-1.0)


def test_diagnostics_warn_once_when_the_rule_holds_back_most_of_the_update() -> None:
    d = Diagnostics(check_every=1)
    for _ in range(3):
        d.observe_held_back(torch.tensor(0.5))
    assert not d.holding_back
    with pytest.warns(UserWarning, match="holds back [89][0-9] % of the gradient/update"):
        for _ in range(10):
            d.observe_held_back(torch.tensor(0.95))
    assert d.holding_back
