"""Automatic task-switch detection through a real Trainer (paper section 5.1).

The detection science, marked ``slow``: one fit over a silent stream of Permuted digits (the
task ids removed, hundreds of steps a task) finds each switch and no within-task event. The
sources without a Trainer: ``tests/unit/test_auto_boundaries.py``.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import EstimateOnly, TinyClassifier, loader, make_trainer
from torch.utils.data import DataLoader

from lightning_metagrad import AutoBoundaries, MetaGradCallback, SubspacePredictor
from lightning_metagrad.benchmark import MLPClassifier
from lightning_metagrad.boundaries.signals import InputNoveltySignal
from lightning_metagrad.data import PermutedStream

STEPS_PER_TASK = 600


def silent_stream(num_tasks: int, seed: int = 0, steps: int = STEPS_PER_TASK) -> list[dict]:
    """Permuted digits, task after task, with the task ids removed: one long stream."""
    stream = PermutedStream(dataset="digits", num_tasks=num_tasks, seed=seed, batch_size=64)
    stream.setup("fit")
    batches: list[dict[str, Any]] = []
    for task in range(num_tasks):
        stream.set_task(task)
        while len(batches) < (task + 1) * steps:
            for batch in stream.train_dataloader():
                batches.append({"x": batch["x"], "y": batch["y"]})
                if len(batches) == (task + 1) * steps:
                    break
    return batches


class ScheduledClassifier(MLPClassifier):
    """A within-task learning-rate schedule: ``"drop"`` divides the learning rate by 10
    half-way, ``"warmup"`` raises it linearly from 0 over the first third."""

    def __init__(self, schedule: str, steps: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.schedule, self.steps = schedule, steps

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        opt = super().configure_optimizers()
        half, third = self.steps // 2, self.steps // 3
        if self.schedule == "drop":
            rule = lambda s: 1.0 if s < half else 0.1  # noqa: E731
        else:
            rule = lambda s: min(1.0, (s + 1) / third)  # noqa: E731
        sched = torch.optim.lr_scheduler.LambdaLR(opt, rule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def mlp(**kwargs: Any) -> MLPClassifier:
    return MLPClassifier(input_dim=64, hidden_sizes=(128, 128), **{"lr": 0.03, **kwargs})


def fit_auto(
    batches: list,
    model: pl.LightningModule,
    signal: str | None = None,
    source: AutoBoundaries | None = None,
) -> MetaGradCallback:
    if source is None:
        source = AutoBoundaries() if signal is None else AutoBoundaries(signal=signal)
    cb = MetaGradCallback(task_boundaries=source)
    make_trainer([cb], max_steps=len(batches)).fit(model, DataLoader(batches, batch_size=None))
    return cb


def assert_found(cb: MetaGradCallback, true: list[int], max_delay: int) -> None:
    assert cb.task_index == len(true) and cb.num_old_tasks == len(true), cb.detected_switches
    delays = [d - t for d, t in zip(cb.detected_switches, true)]
    assert all(0 <= d <= max_delay for d in delays), (cb.detected_switches, true)
    assert cb.state_dict()["detected_switches"] == cb.detected_switches


# ------------------------------------------------------------------ the default: novelty


@pytest.mark.slow  # the detection science: hundreds of steps per run
def test_tasks_of_200_steps_are_each_found() -> None:
    # No settling period and an adaptive warm-up: a task of 200 optimizer steps is tested.
    pl.seed_everything(0, verbose=False)
    cb = fit_auto(silent_stream(4, steps=200), mlp())
    assert_found(cb, [200, 400, 600], max_delay=30)


@pytest.mark.slow
def test_with_adam_tasks_of_200_steps_are_each_found_and_nothing_else() -> None:
    # Adam (update mode): the signals read the step's gradients, not Adam's update, and the
    # loss confirms each switch.
    pl.seed_everything(0, verbose=False)
    cb = fit_auto(silent_stream(4, steps=200), mlp(optimizer="adam", lr=1e-3))
    assert cb.engine.resolved_target == "update"
    assert_found(cb, [200, 400, 600], max_delay=30)


@pytest.mark.slow
def test_with_adam_a_loss_spikes_aftermath_is_not_a_switch() -> None:
    # Two batches of random labels: Adam's momentum carries them on and the weights it moves
    # off raise the novelty and the direction for tens of steps, with the loss still up.
    # Without the quiet after a loss spike (spike=None) this run declares a switch at 420.
    pl.seed_everything(0, verbose=False)
    batches = silent_stream(1, steps=800)
    gen = torch.Generator().manual_seed(0)
    for i in (400, 401):
        batches[i] = {"x": batches[i]["x"], "y": torch.randint(0, 10, (64,), generator=gen)}
    cb = fit_auto(batches, mlp(optimizer="adam", lr=1e-3))
    assert cb.detected_switches == [] and cb.task_index == 0


@pytest.mark.slow
def test_the_first_tasks_start_up_is_not_a_switch() -> None:
    # From a random initialisation the gradients change fast; that is learned, not tested.
    pl.seed_everything(1, verbose=False)
    cb = fit_auto(silent_stream(1, seed=1, steps=400), mlp(lr=0.1))
    assert cb.detected_switches == [] and cb.task_index == 0
    src = cb.boundaries
    assert isinstance(src, AutoBoundaries)
    assert src.detector.num_observations == 399  # every step but the first (no basis yet)
    assert src.detector.num_switches == 0 and src.novelty.dims()


@pytest.mark.slow
@pytest.mark.parametrize("event", ["lr_drop", "warmup", "loss_spike", "batch_size"])
def test_a_within_task_event_is_not_a_switch(event: str) -> None:
    pl.seed_everything(0, verbose=False)
    batches = silent_stream(1, steps=400)
    model = mlp()
    if event == "lr_drop":  # from a high learning rate
        model = ScheduledClassifier(
            "drop", len(batches), input_dim=64, hidden_sizes=(128, 128), lr=0.1
        )
    elif event == "warmup":  # to lr 0.05; a warm-up to 0.07 or more is a known limit (docs)
        model = ScheduledClassifier(
            "warmup", len(batches), input_dim=64, hidden_sizes=(128, 128), lr=0.05
        )
    elif event == "loss_spike":  # two batches of garbage: random labels, inputs 5-fold
        for i in (200, 201):
            batches[i] = {"x": batches[i]["x"] * 5, "y": torch.randint(0, 10, (64,))}
    else:  # from 64 to 16 samples a batch, half-way
        batches = batches[:200] + [{k: v[:16] for k, v in b.items()} for b in batches[200:]]
    cb = fit_auto(batches, model)
    assert cb.detected_switches == [] and cb.task_index == 0


# ------------------------------------------------------------------ the loss and the paper's error


@pytest.mark.slow
@pytest.mark.parametrize(("signal", "seed"), [("error", 0), ("loss", 1)])
def test_one_fit_over_a_silent_stream_finds_its_tasks(signal: str, seed: int) -> None:
    # The paper's error first trains its meta-network for 400 steps (settle=100
    # observations of 4 steps); tasks of 600 steps leave room for that.
    pl.seed_everything(seed, verbose=False)
    cb = fit_auto(silent_stream(2, seed=seed), mlp(), signal)
    assert_found(cb, [STEPS_PER_TASK], max_delay=100)


SIGNALS = pytest.mark.parametrize("signal", ["error", "loss"])


@pytest.mark.slow
@SIGNALS
def test_a_learning_rate_drop_is_not_a_task_switch(signal: str) -> None:
    pl.seed_everything(0, verbose=False)
    batches = silent_stream(1)
    model = ScheduledClassifier("drop", len(batches), input_dim=64, hidden_sizes=(128, 128), lr=0.1)
    cb = fit_auto(batches, model, signal)
    assert cb.detected_switches == [] and cb.task_index == 0


@pytest.mark.slow
@SIGNALS
def test_a_loss_spike_is_not_a_task_switch(signal: str) -> None:
    pl.seed_everything(0, verbose=False)
    batches = silent_stream(1)
    for i in (450, 451):  # two batches of garbage labels: a loss spike within the task
        batches[i] = {"x": batches[i]["x"] * 5, "y": torch.randint(0, 10, (64,))}
    cb = fit_auto(batches, mlp(), signal)
    assert cb.detected_switches == [] and cb.task_index == 0


def test_auto_combines_with_fit_boundaries() -> None:
    cb = MetaGradCallback(predictor="anchored", task_boundaries=["fit", "auto"])
    model = MLPClassifier(input_dim=64, hidden_sizes=(16,), lr=0.03)
    batches = silent_stream(1, steps=50)
    for _ in range(2):
        make_trainer([cb], max_steps=50).fit(model, DataLoader(batches, batch_size=None))
    assert cb.task_index == 1  # the second fit started a task; nothing detected


def test_a_detected_switch_hands_its_onset_to_the_boundary() -> None:
    # Two tasks in one fit, no task ids; the callback keeps history and leaves the new
    # task's steps before the detection out of the old task.
    auto = AutoBoundaries()
    cb = MetaGradCallback(predictor=SubspacePredictor(every=1), task_boundaries=auto)
    batches = [b for task in (0, 1) for b in list(loader(task, batch_size=8, n=128)) * 5]
    make_trainer([cb], max_steps=len(batches)).fit(
        TinyClassifier(), DataLoader(batches, batch_size=None)
    )
    predictor = cb.predictor
    assert isinstance(predictor, SubspacePredictor)
    assert auto.max_onset_steps > 0
    assert predictor.state_dict()["history_steps"] == auto.max_onset_steps + 1
    assert cb.state_dict()["engine"]["switch_onset"] == 0  # nothing pending after the fit


@pytest.mark.slow
def test_a_detected_switch_leaves_the_old_task_where_given_boundaries_leave_it() -> None:
    # The switch is declared 5 steps late (6 new-task steps, the detection's included) and
    # the detector estimates that exactly. Taking back and undoing those steps
    # (AutoBoundaries(undo_late_updates=True), the default) reproduces given boundaries; the
    # default reaches 5 steps further back (a margin against an estimate too short), which
    # leaves the old task no worse off.
    steps = 200
    batches = silent_stream(2, steps=steps)
    stream = PermutedStream(dataset="digits", num_tasks=2, seed=0, batch_size=64)
    stream.setup("fit")

    accuracy = {}
    for run in ("given", "estimate", "default", "kept"):
        pl.seed_everything(0, verbose=False)
        model = mlp()
        if run == "given":
            cb = MetaGradCallback()  # one fit per task
            for task in range(2):
                part = batches[task * steps : (task + 1) * steps]
                make_trainer([cb], max_steps=steps).fit(model, DataLoader(part, batch_size=None))
        else:
            source = {
                "estimate": EstimateOnly(),
                "default": AutoBoundaries(),
                "kept": AutoBoundaries(undo_late_updates=False),
            }[run]
            cb = fit_auto(batches, model, source=source)
            assert cb.detected_switches == [205]
            assert source.detector.last_onset == 6
        accuracy[run] = model.accuracy(stream.task_dataloader(0))
    assert accuracy["estimate"] == pytest.approx(accuracy["given"], abs=0.002)
    assert accuracy["default"] >= accuracy["given"] - 0.005
    assert accuracy["kept"] != pytest.approx(accuracy["given"], abs=0.005)


def test_the_inputs_signal_learns_the_layer_that_reads_the_data_through_a_trainer() -> None:
    # signal="novelty+direction+inputs": the callback binds the LightningModule, whose first
    # training forward shows which layer reads the batch; the sanity check's no-grad
    # validation forward does not count, and the hooks are gone after the first step.
    source = AutoBoundaries(signal="novelty+direction+inputs")
    cb = MetaGradCallback(task_boundaries=source)
    model = TinyClassifier()
    make_trainer([cb], max_steps=6).fit(model, loader(0))
    signal = source.signals["inputs"]
    assert isinstance(signal, InputNoveltySignal)
    assert signal.layers == {"net.0.weight", "net.0.bias"}
    assert set(signal.novelty.dims()) == {"net.0.weight"}
    assert not model.net[0]._forward_pre_hooks
