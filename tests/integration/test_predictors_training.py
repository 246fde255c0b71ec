"""Predictors of the mean old-task gradient through real Trainers: what each one's rule does to
the step, and what it logs. Without a Trainer: ``tests/unit/test_predictors.py``."""

from __future__ import annotations

import pytest
import torch
from helpers import TinyClassifier, loader, make_trainer, task_data
from torch.utils.data import DataLoader

from lightning_metagrad import AnchoredPredictor, MetaGradCallback, MetaNetPredictor


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
