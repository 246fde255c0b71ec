"""Predictors of the mean old-task gradient and the run-time diagnostics."""

from __future__ import annotations

import pytest
import torch
from conftest import TinyClassifier, loader, make_trainer, task_data
from torch.utils.data import DataLoader

from lightning_metagrad import AnchoredPredictor, MetaGradCallback, MetaNetPredictor
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


def test_anchored_keeps_gradients_inside_the_trust_region_through_a_trainer() -> None:
    lr = 0.1
    cb = MetaGradCallback(predictor=AnchoredPredictor(radius=1e9))  # everything inside
    model = TinyClassifier(lr=lr)
    make_trainer([cb]).fit(model, loader(0))
    reference = TinyClassifier(lr=lr)
    reference.load_state_dict(model.state_dict())
    make_trainer([cb]).fit(model, loader(1))
    make_trainer([]).fit(reference, loader(1))
    assert cb.num_old_tasks == 1
    for a, b in zip(model.parameters(), reference.parameters()):
        assert torch.equal(a, b)  # nothing trusted: plain SGD


def test_anchored_blocks_moves_away_from_an_important_anchor() -> None:
    cb = MetaGradCallback(predictor=AnchoredPredictor(radius=1e-4))
    model = TinyClassifier(lr=0.1)
    make_trainer([cb], max_steps=16).fit(model, loader(0))
    anchor = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
    free = TinyClassifier(lr=0.1)
    free.load_state_dict(model.state_dict())
    trainer = make_trainer([cb], max_steps=16, log_every_n_steps=1)
    trainer.fit(model, loader(1))
    make_trainer([], max_steps=16).fit(free, loader(1))
    moved = torch.cat([p.detach().reshape(-1) for p in model.parameters()]) - anchor
    moved_free = torch.cat([p.detach().reshape(-1) for p in free.parameters()]) - anchor
    assert float(trainer.callback_metrics["metagrad/zeroed_fraction"]) > 0
    assert float(moved.norm()) < 0.9 * float(moved_free.norm())


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


def test_callback_logs_prediction_quality_and_drift() -> None:
    cb = MetaGradCallback(
        predictor=MetaNetPredictor(hidden_sizes=(8,), coords_per_step=64, update_every=1)
    )
    trainer = make_trainer([cb], max_steps=4, log_every_n_steps=1)
    trainer.fit(TinyClassifier(), loader(0))
    logged = trainer.callback_metrics
    assert float(logged["metagrad/meta_rel_error"]) >= 0.0
    assert float(logged["metagrad/param_norm_growth"]) > 0


def test_average_rule_never_lets_a_non_finite_prediction_through() -> None:
    class Exploding(AnchoredPredictor):
        def predict(self, names, thetas):  # type: ignore[no-untyped-def]
            return [(torch.full_like(t, float("inf")), None) for t in thetas]

    lr = 0.1
    cb = MetaGradCallback(predictor=Exploding(), combine="average")
    model = TinyClassifier(lr=lr)
    make_trainer([cb]).fit(model, loader(0))
    make_trainer([cb]).fit(model, loader(1))
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_replay_predicts_the_real_old_task_gradient() -> None:
    from lightning_metagrad import ReplayPredictor

    replay = ReplayPredictor(memory_batches=8, refresh_every=1)
    cb = MetaGradCallback(predictor=replay)
    model = TinyClassifier()
    make_trainer([cb], max_steps=8).fit(model, loader(0))  # 8 batches: all kept
    assert len(replay.current) == 8
    trainer = make_trainer([cb], max_steps=1)
    trainer.fit(model, loader(1))  # the boundary moves them into the memory
    assert replay.num_old_tasks == 1 and len(replay.memory[0]) == 8
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    model.zero_grad()
    losses = [model.training_step(b, i) for i, b in enumerate(loader(0))]
    (sum(losses) / len(losses)).backward()  # type: ignore[union-attr]
    expected = torch.cat([p.grad.reshape(-1) for p in model.parameters()])  # type: ignore[union-attr]
    torch.testing.assert_close(cb.predict_old_gradient(theta), expected, rtol=1e-5, atol=1e-6)


def test_replay_memory_stays_constant_over_tasks() -> None:
    from lightning_metagrad import ReplayPredictor

    replay = ReplayPredictor(memory_batches=6, refresh_every=5)
    cb = MetaGradCallback(predictor=replay)
    model = TinyClassifier()
    for task in range(4):
        make_trainer([cb], max_steps=8).fit(model, loader(task))
    assert replay.num_old_tasks == 3
    assert sum(len(b) for b in replay.memory) <= 6
    restored = ReplayPredictor(memory_batches=6)
    restored.load_state_dict(replay.state_dict())
    assert [len(b) for b in restored.memory] == [len(b) for b in replay.memory]


@pytest.mark.parametrize("free_below", [0.0, None])
def test_replay_leaves_coordinates_without_an_old_gradient_free(free_below: float | None) -> None:
    from torch.utils.data import TensorDataset

    from lightning_metagrad import ReplayPredictor

    x0, y0 = task_data(0)
    x0[:, 0] = 0.0  # input 0 is always 0 in the old task: its first-layer weights get no gradient
    old = DataLoader(TensorDataset(x0, y0), batch_size=16)
    replay = ReplayPredictor(memory_batches=8, refresh_every=1, free_below=free_below)
    cb = MetaGradCallback(predictor=replay)
    model = TinyClassifier()
    make_trainer([cb], max_steps=8).fit(model, old)
    before = model.net[0].weight[:, 0].detach().clone()
    make_trainer([cb], max_steps=1).fit(model, loader(1))  # input 0 is used in the new task
    moved = bool((model.net[0].weight[:, 0] != before).any())
    assert moved is (free_below is not None)  # eq. 5 literally (None) zeroes them: 0 * g <= 0


def test_replay_frees_small_old_gradients_above_zero_when_asked() -> None:
    from lightning_metagrad import ReplayPredictor

    old = {"w": torch.tensor([0.0, 0.1, -0.2, 3.0])}  # mean |old| = 0.825
    zero, one = ReplayPredictor(free_below=0.0), ReplayPredictor(free_below=1.0)
    assert zero._constrained(old)["w"].tolist() == [False, True, True, True]  # type: ignore[index]
    assert one._constrained(old)["w"].tolist() == [False, False, False, True]  # type: ignore[index]
    assert ReplayPredictor(free_below=None)._constrained(old) is None
    assert ReplayPredictor().free_below == 4.0  # the default: the middle of the measured plateau
    with pytest.raises(ValueError, match="free_below"):
        ReplayPredictor(free_below=-1.0)


@pytest.mark.parametrize("name", ["anchored", "replay", "paper"])
def test_per_tensor_rule_equals_the_flat_reference_rule(name: str) -> None:
    from lightning_metagrad import ReplayPredictor
    from lightning_metagrad.predictors.rules import sign_agreement

    predictor = {
        "anchored": AnchoredPredictor(radius=1e-3),
        "replay": ReplayPredictor(refresh_every=1, free_below=1.0),
        "paper": MetaNetPredictor(hidden_sizes=(8,), coords_per_step=64, update_every=1),
    }[name]
    cb = MetaGradCallback(predictor=predictor)
    model = TinyClassifier()
    for task in range(2):
        make_trainer([cb], max_steps=8).fit(model, loader(task))
    names = list(cb.engine.params)
    thetas = [p.detach() for p in cb.engine.params.values()]
    grads = [torch.randn_like(t) for t in thetas]
    flat_grad = torch.cat([g.reshape(-1) for g in grads])
    predictions = cb.predictor.predict(names, thetas)
    predicted = torch.cat([p[0].reshape(-1) for p in predictions if p is not None])
    expected, zeroed = sign_agreement(flat_grad, predicted)
    if predictions[0] is not None and predictions[0][1] is not None:  # magnitude-aware
        trusted = torch.cat([p[1].reshape(-1).bool() for p in predictions if p is not None])
        expected = torch.where(zeroed & trusted, torch.zeros_like(flat_grad), flat_grad)
    cb.engine.rewrite_(names, thetas, grads)
    rewritten = torch.cat([g.reshape(-1) for g in grads])
    torch.testing.assert_close(rewritten, expected)
    assert 0 < int((rewritten == 0).sum()) < rewritten.numel()  # the rule did something


def test_diagnostics_warn_once_when_the_rule_holds_back_most_of_the_update() -> None:
    d = Diagnostics(check_every=1)
    for _ in range(3):
        d.observe_held_back(torch.tensor(0.5))
    assert not d.holding_back
    with pytest.warns(UserWarning, match="holds back [89][0-9] % of the gradient/update"):
        for _ in range(10):
            d.observe_held_back(torch.tensor(0.95))
    assert d.holding_back
