"""SGP and GPM's per-layer thresholds through tiny real Trainers on CPU."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from helpers import GradSpy, TinyClassifier, assert_same_params, loader, make_trainer, task_data
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_metagrad.baselines import GPMCallback, SGPCallback

LAYERS = ("net.0", "net.2")  # TinyClassifier: Linear(10, 16) -> ReLU -> Linear(16, 3)


def protected_matrix(step: dict[str, torch.Tensor], layer: str) -> torch.Tensor:
    """``[dW, db]`` of ``layer`` from a GradSpy step."""
    return torch.cat([step[f"{layer}.weight"], step[f"{layer}.bias"][:, None]], 1)


def task_loss(model: nn.Module, task: int) -> float:
    x, y = task_data(task)
    with torch.no_grad():
        return float(nn.functional.cross_entropy(model(x), y))


def test_the_projected_gradients_in_subspace_share_is_one_minus_the_importance() -> None:
    model, sgp = TinyClassifier(), SGPCallback(threshold=0.9, samples=64)
    make_trainer([sgp], max_steps=8).fit(model, loader(0))
    assert set(sgp.bases) == set(LAYERS) and sgp.num_tasks == 1
    bases = {n: b.clone() for n, b in sgp.bases.items()}
    importance = {n: lam.clone() for n, lam in sgp.importances.items()}
    for name, lam in importance.items():
        assert lam.shape == (bases[name].shape[1],)
        assert float(lam.max()) == pytest.approx(1.0) and float(lam.min()) < 0.95  # soft
    before, after = GradSpy(), GradSpy()
    make_trainer([before, sgp, after], max_steps=4).fit(model, loader(1))
    assert len(after.steps) == 4
    for raw, projected in zip(before.steps, after.steps):
        for layer, m in bases.items():
            g, g_raw = protected_matrix(projected, layer), protected_matrix(raw, layer)
            assert float((g_raw @ m).norm()) > 1e-3  # there was something to scale
            # Along each basis direction i, the share 1 - λ_i of the raw gradient is left ...
            torch.testing.assert_close(
                g @ m, (g_raw @ m) * (1 - importance[layer]), atol=1e-6, rtol=1e-4
            )
            # ... and outside the subspace nothing changes.
            outside = torch.eye(m.shape[0]) - m @ m.T
            torch.testing.assert_close(g @ outside, g_raw @ outside, atol=1e-6, rtol=1e-4)
    assert sgp.num_tasks == 2  # the second task's end updated the bases and importances
    for name in LAYERS:
        assert sgp.importances[name].shape == (sgp.bases[name].shape[1],)


def test_sgp_forgets_less_than_nothing_and_learns_more_than_gpm() -> None:
    first = TinyClassifier(lr=0.2)
    make_trainer([], max_steps=40).fit(first, loader(0))
    start = task_loss(first, 0)
    results = {}
    for name, callbacks in {
        "naive": [],
        "gpm": [GPMCallback(threshold=0.97, samples=128)],
        "sgp": [SGPCallback(threshold=0.97, samples=128)],
    }.items():
        model = copy.deepcopy(first)
        for callback in callbacks:  # the first task, as if trained with the callback
            callback.consolidate(make_trainer([], max_steps=1), model, dataloader=loader(0))
        make_trainer(callbacks, max_steps=40).fit(model, loader(1))
        results[name] = (task_loss(model, 0) - start, task_loss(model, 1))
    forgetting = {name: r[0] for name, r in results.items()}
    new_task = {name: r[1] for name, r in results.items()}
    assert forgetting["sgp"] < 0.5 * forgetting["naive"], results
    assert new_task["sgp"] < new_task["gpm"], results  # the soft directions still move


def test_the_state_of_a_task_end_restores_the_same_training() -> None:
    model, sgp = TinyClassifier(), SGPCallback(threshold=0.9, samples=64, scale=3.0)
    make_trainer([sgp], max_steps=6).fit(model, loader(0))
    twin_model, twin = copy.deepcopy(model), SGPCallback(threshold=0.9, samples=64, scale=3.0)
    twin.load_state_dict(copy.deepcopy(sgp.state_dict()))
    make_trainer([sgp], max_steps=5).fit(model, loader(1))
    make_trainer([twin], max_steps=5).fit(twin_model, loader(1))
    assert_same_params(model, twin_model)
    for name in LAYERS:
        torch.testing.assert_close(twin.importances[name], sgp.importances[name])


@pytest.mark.parametrize("cls", [GPMCallback, SGPCallback])
def test_per_layer_thresholds_build_each_layers_basis_with_its_own(cls: type) -> None:
    model = TinyClassifier()
    as_list, as_dict = (
        cls(threshold=[0.5, 0.99], samples=64),
        cls(threshold=dict(zip(LAYERS, [0.5, 0.99])), samples=64),
    )
    for callback in (as_list, as_dict):
        make_trainer([callback], max_steps=3).fit(copy.deepcopy(model), loader(0))
    for name in LAYERS:
        torch.testing.assert_close(as_list.bases[name], as_dict.bases[name])
    low, high = (GPMCallback(threshold=t, samples=64) for t in (0.5, 0.99))
    for callback in (low, high):
        make_trainer([callback], max_steps=3).fit(copy.deepcopy(model), loader(0))
    assert as_list.bases["net.0"].shape == low.bases["net.0"].shape
    assert as_list.bases["net.2"].shape == high.bases["net.2"].shape
    assert as_list.bases["net.0"].shape[1] < high.bases["net.0"].shape[1]


@pytest.mark.parametrize("cls", [GPMCallback, SGPCallback])
def test_a_threshold_list_of_the_wrong_length_stops_the_fit_before_any_step(cls: type) -> None:
    model = TinyClassifier()
    weights = copy.deepcopy(model.state_dict())
    trainer = make_trainer([cls(threshold=[0.95, 0.99, 0.99])], max_steps=2)
    expected = (
        "`threshold` gives 3 values, one per protected layer in model order, but the model has "
        "2 protected layers (trainable Linear/Conv1d/Conv2d with groups=1): ['net.0', 'net.2']"
    )
    with pytest.raises(MisconfigurationException, match=re.escape(expected)):
        trainer.fit(model, loader(0))
    assert trainer.global_step == 0
    for name, value in model.state_dict().items():
        assert torch.equal(value, weights[name]), name


def test_a_full_basis_warning_says_what_sgp_still_moves() -> None:
    with pytest.warns(UserWarning, match="spans all its 11 input features: new tasks move its"):
        make_trainer([SGPCallback(threshold=1.0, samples=64)], max_steps=2).fit(
            TinyClassifier(), loader(0)
        )
