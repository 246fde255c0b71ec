"""Automatic task-switch detection through a real Trainer (paper section 5.1)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from conftest import make_trainer
from torch.utils.data import DataLoader

from lightning_metagrad import MetaGradCallback
from lightning_metagrad.benchmark import MLPClassifier
from lightning_metagrad.boundaries import AutoBoundaries, CombinedBoundaries, NewFitBoundaries
from lightning_metagrad.data import PermutedStream
from lightning_metagrad.detection import ChangePointDetector

STEPS_PER_TASK = 600


def silent_stream(num_tasks: int, seed: int = 0) -> list[dict[str, Any]]:
    """Permuted digits, task after task, with the task ids removed: one long stream."""
    stream = PermutedStream(dataset="digits", num_tasks=num_tasks, seed=seed, batch_size=64)
    stream.setup("fit")
    batches: list[dict[str, Any]] = []
    for task in range(num_tasks):
        stream.set_task(task)
        while len(batches) < (task + 1) * STEPS_PER_TASK:
            for batch in stream.train_dataloader():
                batches.append({"x": batch["x"], "y": batch["y"]})
                if len(batches) == (task + 1) * STEPS_PER_TASK:
                    break
    return batches


class LRDropClassifier(MLPClassifier):
    """Divides the learning rate by 10 half-way (a within-task event)."""

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        opt = super().configure_optimizers()
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=STEPS_PER_TASK // 2, gamma=0.1)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def fit_auto(batches: list, model: pl.LightningModule, signal: str = "error") -> MetaGradCallback:
    cb = MetaGradCallback(predictor="anchored", task_boundaries=AutoBoundaries(signal=signal))
    make_trainer([cb], max_steps=len(batches)).fit(model, DataLoader(batches, batch_size=None))
    return cb


SIGNALS = pytest.mark.parametrize("signal", ["error", "loss"])


@SIGNALS
def test_one_fit_over_a_silent_five_task_stream_finds_five_tasks(signal: str) -> None:
    pl.seed_everything(0, verbose=False)
    batches = silent_stream(5)
    cb = fit_auto(batches, MLPClassifier(input_dim=64, hidden_sizes=(128, 128), lr=0.03), signal)
    assert cb.task_index + 1 == 5
    assert cb.num_old_tasks == 4
    true = [STEPS_PER_TASK * i for i in range(1, 5)]
    delays = [d - t for d, t in zip(cb.detected_switches, true)]
    assert all(0 <= d <= 100 for d in delays), (cb.detected_switches, true)
    assert cb.state_dict()["detected_switches"] == cb.detected_switches


@SIGNALS
def test_a_learning_rate_drop_is_not_a_task_switch(signal: str) -> None:
    pl.seed_everything(0, verbose=False)
    batches = silent_stream(1)
    cb = fit_auto(batches, LRDropClassifier(input_dim=64, hidden_sizes=(128, 128), lr=0.1), signal)
    assert cb.detected_switches == [] and cb.task_index == 0


@SIGNALS
def test_a_loss_spike_is_not_a_task_switch(signal: str) -> None:
    pl.seed_everything(0, verbose=False)
    batches = silent_stream(1)
    for i in (450, 451):  # two batches of garbage labels: a loss spike within the task
        batches[i] = {"x": batches[i]["x"] * 5, "y": torch.randint(0, 10, (64,))}
    cb = fit_auto(batches, MLPClassifier(input_dim=64, hidden_sizes=(128, 128), lr=0.03), signal)
    assert cb.detected_switches == [] and cb.task_index == 0


def test_auto_combines_with_fit_boundaries() -> None:
    cb = MetaGradCallback(predictor="anchored", task_boundaries=["fit", "auto"])
    model = MLPClassifier(input_dim=64, hidden_sizes=(16,), lr=0.03)
    batches = silent_stream(1)[:50]
    for _ in range(2):
        make_trainer([cb], max_steps=50).fit(model, DataLoader(batches, batch_size=None))
    assert cb.task_index == 1  # the second fit started a task; nothing detected


def test_auto_boundary_state_round_trips() -> None:
    src = AutoBoundaries(every=1, settle=0, signal="error")
    gen = torch.Generator().manual_seed(0)
    for _ in range(30):
        theta = torch.randn(500, generator=gen)
        src.on_pairs(theta, -theta)
    clone = AutoBoundaries(every=1, settle=0, signal="error")
    clone.load_state_dict(src.state_dict())
    theta = torch.randn(500, generator=gen)
    assert src.on_pairs(theta, -theta) == clone.on_pairs(theta, -theta)
    assert src.last_error == pytest.approx(clone.last_error)
    with pytest.raises(ValueError, match="every"):
        AutoBoundaries(every=0)


def test_loss_signal_tests_the_mean_loss_with_the_error_as_evidence() -> None:
    src = AutoBoundaries(signal="loss")
    assert src.uses_loss and src.detector.signal == "loss"
    assert src.detector.weights == {"error": 1.0}
    assert AutoBoundaries().uses_loss  # the default
    assert not AutoBoundaries(signal="error").uses_loss  # the paper's signal needs no loss


def test_loss_signal_ignores_non_finite_losses_and_round_trips() -> None:
    src = AutoBoundaries(every=2, settle=0, signal="loss")
    for value in (1.0, float("nan"), 3.0):
        src.on_loss(torch.tensor(value))
    clone = AutoBoundaries(every=2, settle=0, signal="loss")
    clone.load_state_dict(src.state_dict())
    assert src._take_mean_loss() == clone._take_mean_loss() == pytest.approx(2.0)
    assert src._take_mean_loss() is None  # taken: the next observation waits for new losses


def test_a_detector_on_unknown_signals_is_refused() -> None:
    with pytest.raises(ValueError, match="signal"):
        AutoBoundaries(signal="gradient_norm")
    with pytest.raises(ValueError, match="detector"):
        AutoBoundaries(detector=ChangePointDetector(signal="grad_norm"))


def test_combined_sources_forward_the_loss_to_the_source_that_uses_it() -> None:
    auto = AutoBoundaries(signal="loss")
    src = CombinedBoundaries([NewFitBoundaries(), auto])
    assert src.uses_loss
    src.on_loss(torch.tensor(0.5))
    assert auto._take_mean_loss() == pytest.approx(0.5)


def test_loss_signal_finds_the_switches_of_another_seed() -> None:
    # Through the callback the loss reaches the source after each batch.
    pl.seed_everything(1, verbose=False)
    batches = silent_stream(3, seed=1)
    cb = fit_auto(batches, MLPClassifier(input_dim=64, hidden_sizes=(128, 128), lr=0.03), "loss")
    assert cb.task_index == 2, cb.detected_switches
