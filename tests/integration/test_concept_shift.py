"""Concept shift through a real Trainer (issue 25): the same standard-normal inputs in every
task, a new random teacher per task. The novelty does not see it (the first layer's gradient
subspace is already full); the direction of the gradient does, alone or in the either
detector ``signal="novelty+direction"``, the default of ``"auto"``. Also: a detected task of one
step is skipped with a warning and never breaks the run."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from helpers import make_trainer
from torch.utils.data import DataLoader

from lightning_metagrad import AutoBoundaries, MetaGradCallback
from lightning_metagrad.benchmark import MLPClassifier
from lightning_metagrad.boundaries.either import EitherDetector

DIM, PER_TASK, TASKS = 24, 200, 3


def concept_stream(seed: int = 0) -> list[dict[str, Any]]:
    """Batches of 64 from ``TASKS`` tasks of ``PER_TASK`` steps: x ~ N(0, I_24), labels
    ``argmax W_t x`` with a new random ``W_t`` per task, no task ids."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(TASKS):
        teacher = torch.randn(10, DIM, generator=gen)
        for _ in range(PER_TASK):
            x = torch.randn(64, DIM, generator=gen)
            batches.append({"x": x, "y": (x @ teacher.T).argmax(1)})
    return batches


def fit(source: AutoBoundaries | str, batches: list[dict[str, Any]]) -> MetaGradCallback:
    torch.manual_seed(0)
    model = MLPClassifier(input_dim=DIM, num_classes=10, hidden_sizes=(128,), lr=0.03)
    cb = MetaGradCallback(task_boundaries=source)
    trainer = make_trainer([cb], max_steps=len(batches))
    trainer.fit(model, DataLoader(batches, batch_size=None))
    return cb


@pytest.mark.slow
def test_direction_finds_every_concept_switch() -> None:
    cb = fit(AutoBoundaries(signal="direction"), concept_stream())
    true = [PER_TASK * t for t in range(1, TASKS)]
    assert len(cb.detected_switches) == len(true), cb.detected_switches
    for found, switch in zip(cb.detected_switches, true):
        assert switch <= found <= switch + 30


def test_auto_finds_a_concept_switch_with_the_novelty_or_the_direction() -> None:
    """``task_boundaries="auto"`` (the either detector, ``signal="novelty+direction"``) on a
    concept switch after 200 steps: the novelty sees nothing, the recent-steps direction
    fires, once."""
    cb = fit("auto", concept_stream()[: PER_TASK + 40])
    assert len(cb.detected_switches) == 1, cb.detected_switches
    assert PER_TASK <= cb.detected_switches[0] <= PER_TASK + 30
    assert cb.task_index == 1
    source = cb.boundaries
    assert isinstance(source, AutoBoundaries) and isinstance(source.detector, EitherDetector)
    assert source.detector.switch_signals == ["direction"]


class ForcedSwitches(AutoBoundaries):
    """Direction detection, plus switches forced at two consecutive steps: the task between
    them has a single step."""

    def __init__(self, at: tuple[int, ...], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.at = at

    def on_gradients(self, names, thetas, targets):  # type: ignore[no-untyped-def]
        detected = super().on_gradients(names, thetas, targets)
        return detected or self.steps in self.at


@pytest.mark.slow
def test_a_detected_task_of_one_step_never_breaks_the_run() -> None:
    """Two switches on consecutive steps: the task between them has one step. It is folded
    in, or skipped with the engine's "too few" warning; either way training goes on and the
    real switch after it is still found."""
    batches = concept_stream()[: PER_TASK + 60]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cb = fit(ForcedSwitches(at=(100, 101), signal="direction"), batches)
    assert cb.detected_switches[:2] in ([99, 100], [100, 101]), cb.detected_switches
    assert len(cb.detected_switches) == 3 and PER_TASK <= cb.detected_switches[2] <= PER_TASK + 30
    assert cb.task_index == 3
    assert not [w for w in caught if "non-finite" in str(w.message)]
