"""The stream signals of task-free detection (lightning_metagrad/boundaries/signals.py), without
a Trainer: the direction change inside a fixed subspace (issue 25's concept shift)."""

from __future__ import annotations

import statistics

import pytest
import torch

from lightning_metagrad.boundaries import AutoBoundaries
from lightning_metagrad.boundaries.auto import default_detector
from lightning_metagrad.boundaries.signals import SIGNALS, DirectionSignal

ROWS, FAN_IN, RANK = 16, 12, 3


def fixed_subspace() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.linalg.qr(torch.randn(FAN_IN, RANK, generator=gen))[0]


def gradient(mean: torch.Tensor, basis: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A consistent mean gradient plus noise, every row inside the fixed ``basis``."""
    noise = torch.randn(ROWS, RANK, generator=gen) @ basis.T
    return mean + 0.7 * noise


def task_mean(basis: torch.Tensor, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(ROWS, RANK, generator=gen) @ basis.T


def run(signal: DirectionSignal, means: list[torch.Tensor], scales: list[float]) -> list[float]:
    """The signal at each step of consecutive segments (one mean and scale each, 150 steps)."""
    basis, gen = fixed_subspace(), torch.Generator().manual_seed(1)
    values = []
    for mean, scale in zip(means, scales):
        for _ in range(150):
            g = scale * gradient(mean, basis, gen)
            signal.on_gradients(["w", "b"], [g, g.sum(1)])
            value = signal.take()
            if value is not None:
                values.append(value)
    return values


def test_direction_registered_and_built_by_auto() -> None:
    assert SIGNALS["direction"] is DirectionSignal
    src = AutoBoundaries(signal="direction")
    assert isinstance(src.signals["direction"], DirectionSignal)
    assert src.every == 1 and src.uses_gradients and src.uses_loss  # the loss confirms
    assert default_detector("direction").min_relative_jump == 0.5
    both = AutoBoundaries(signal="novelty", evidence={"direction": 1.0})
    assert set(both.signals) == {"novelty", "direction", "loss"}


@pytest.mark.parametrize("recent", [None, 8.0])
def test_direction_fires_on_a_flip_inside_a_fixed_subspace(recent: float | None) -> None:
    """The same subspace throughout (the novelty sees nothing); the mean gradient flips sign,
    then turns to another orientation inside the subspace."""
    basis = fixed_subspace()
    mean = task_mean(basis, 2)
    other = task_mean(basis, 3)
    values = run(DirectionSignal(recent=recent), [mean, -mean, other], [1.0, 1.0, 1.0])
    within = statistics.median(values[50:150])
    flipped = statistics.median(values[155:165])
    assert within < 0.5
    assert flipped > 1.5 and flipped > 3 * within
    assert statistics.median(values[300:310]) > 2 * within  # the new orientation


@pytest.mark.parametrize("recent", [None, 8.0])
def test_direction_quiet_under_a_rescaled_gradient(recent: float | None) -> None:
    """A 10x smaller gradient (a learning-rate drop, a new batch size's mean) keeps its
    direction, so the signal does not move; :class:`AutoBoundaries` declares nothing."""
    basis = fixed_subspace()
    mean = task_mean(basis, 2)
    values = run(DirectionSignal(recent=recent), [mean, mean, mean], [1.0, 0.1, 30.0])
    before = statistics.median(values[50:150])
    for lo in (150, 300):
        assert statistics.median(values[lo : lo + 20]) == pytest.approx(before, rel=0.3)
    src = AutoBoundaries(signal="direction")
    gen = torch.Generator().manual_seed(4)
    fired = []
    for step in range(600):
        scale = 1.0 if step < 300 else 0.1
        g = scale * gradient(mean, basis, gen)
        fired.append(src.on_gradients(["w"], [torch.zeros_like(g)], [g]))
    assert not any(fired)


def test_direction_through_auto_boundaries_finds_the_flip() -> None:
    basis = fixed_subspace()
    mean = task_mean(basis, 2)
    src = AutoBoundaries(signal="direction")
    gen = torch.Generator().manual_seed(5)
    hits = []
    for step in range(400):
        g = gradient(mean if step < 200 else -mean, basis, gen)
        if src.on_gradients(["w"], [torch.zeros_like(g)], [g]):
            hits.append(step)
    assert len(hits) == 1 and 200 <= hits[0] <= 215


def test_direction_start_task_and_state_round_trip() -> None:
    basis = fixed_subspace()
    mean = task_mean(basis, 2)
    signal = DirectionSignal()
    run(signal, [mean], [1.0])
    state = signal.state_dict()
    other = DirectionSignal()
    other.load_state_dict(state)
    g = -gradient(mean, basis, torch.Generator().manual_seed(9))
    signal.on_gradients(["w", "b"], [g, g.sum(1)])
    other.on_gradients(["w", "b"], [g, g.sum(1)])
    assert signal.take() == pytest.approx(other.take())
    signal.start_task()
    signal.on_gradients(["w"], [g])
    assert signal.take() is None  # no mean yet: nothing to compare with


def test_direction_ignores_non_finite_and_zero_gradients() -> None:
    signal = DirectionSignal()
    signal.on_gradients(["w"], [torch.ones(3, 2)])
    signal.on_gradients(["w"], [torch.full((3, 2), float("nan"))])
    signal.on_gradients(["w"], [torch.zeros(3, 2)])
    assert signal.take() is None  # nothing finite and non-zero to measure
    signal.on_gradients(["w"], [torch.ones(3, 2)])
    assert signal.take() == pytest.approx(0.0, abs=1e-6)


def test_auto_boundaries_state_round_trip_with_direction() -> None:
    src = AutoBoundaries(signal="direction", evidence={"loss": 0.5})
    state = src.state_dict()
    assert state["version"] == 2 and set(state["signals"]) == {"direction", "loss"}
    AutoBoundaries(signal="direction", evidence={"loss": 0.5}).load_state_dict(state)
