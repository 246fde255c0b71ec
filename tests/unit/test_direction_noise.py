"""The noise-normalised direction (issue 25, ``DirectionSignal(normalise=True)``), without a
Trainer: its level within a task does not depend on the gradient's signal-to-noise ratio, and
a new direction moves it far above that level."""

from __future__ import annotations

import statistics

import pytest
import torch

from lightning_metagrad.boundaries import AutoBoundaries
from lightning_metagrad.boundaries.signals import DirectionSignal


def unit(dim: int, seed: int) -> torch.Tensor:
    v = torch.randn(dim, generator=torch.Generator().manual_seed(seed))
    return v / v.norm()


def levels(
    signal: DirectionSignal, means: list[torch.Tensor], noise: list[float], steps: int = 300
) -> list[float]:
    """Feed ``steps`` noisy gradients around each mean in turn; the value at every step."""
    gen = torch.Generator().manual_seed(1)
    out: list[float] = []
    for mean, scale in zip(means, noise):
        for _ in range(steps):
            g = mean + scale * torch.randn(mean.shape, generator=gen) / mean.numel() ** 0.5
            signal.on_gradients(["w"], [g])
            value = signal.take()
            out.append(float("nan") if value is None else value)
    return out


def median(values: list[float]) -> float:
    return statistics.median(values)


@pytest.mark.parametrize("recent", [8.0, None])
def test_level_within_a_task_does_not_depend_on_the_noise(recent: float | None) -> None:
    mean = unit(256, 0)
    for noise in (0.3, 1.0, 3.0, 30.0):
        values = levels(DirectionSignal(recent=recent, normalise=True), [mean], [noise])
        assert 0.7 < median(values[100:]) < 1.4, noise


def test_raw_level_does_depend_on_the_noise() -> None:
    """What the normalisation removes: 1 - cos of the recent mean climbs with the noise."""
    mean = unit(256, 0)
    quiet = levels(DirectionSignal(recent=8), [mean], [0.3])
    noisy = levels(DirectionSignal(recent=8), [mean], [3.0])
    assert median(noisy[100:]) > 20 * median(quiet[100:])


def test_new_direction_after_a_converged_task_jumps_far() -> None:
    """A noisy (converged) task, then a coherent new one at right angles: the normalised
    value jumps more than 5-fold over its level, the raw one less than 5-fold."""
    old, new = unit(256, 0), unit(256, 1)
    normed = levels(DirectionSignal(recent=8, normalise=True), [old, new], [4.0, 0.5], 200)
    raw = levels(DirectionSignal(recent=8), [old, new], [4.0, 0.5], 200)
    assert median(normed[200:230]) > 5 * median(normed[100:200])
    assert median(raw[200:230]) < 5 * median(raw[100:200])


def test_reversed_direction_counts_in_full() -> None:
    """Against the mean, the whole recent mean counts (not only its part across the mean)."""
    mean = unit(64, 0)
    values = levels(DirectionSignal(recent=8, normalise=True), [mean, -mean], [0.5, 0.5], 100)
    assert median(values[110:130]) > 20 * median(values[50:100])


def test_scale_free() -> None:
    mean = unit(64, 0)
    a = levels(DirectionSignal(recent=8, normalise=True), [mean], [1.0], 50)
    signal = DirectionSignal(recent=8, normalise=True)
    gen = torch.Generator().manual_seed(1)
    b = []
    for step in range(50):
        g = mean + torch.randn(64, generator=gen) / 8.0
        signal.on_gradients(["w"], [g * (0.01 if step % 2 else 100.0)])
        b.append(signal.take())
    assert b[0] is None and a[1:] == pytest.approx(b[1:], rel=1e-4)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"normalise": 1}, "normalise"),
        ({"normalise": "yes"}, "normalise"),
        ({"halflife": 0}, "halflife"),
        ({"halflife": True}, "halflife"),
        ({"recent": -1.0}, "recent"),
    ],
)
def test_arguments_are_checked(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DirectionSignal(**kwargs)


def test_state_round_trip_keeps_the_noise_sums() -> None:
    mean = unit(64, 0)
    signal = DirectionSignal(recent=8, normalise=True)
    levels(signal, [mean], [1.0], 40)
    state = signal.state_dict()
    assert state["version"] == 2 and set(state["noise"]) == {"w"}
    other = DirectionSignal(recent=8, normalise=True)
    other.load_state_dict(state)
    g = mean + 0.1 * unit(64, 5)
    signal.on_gradients(["w"], [g])
    other.on_gradients(["w"], [g])
    assert signal.take() == pytest.approx(other.take())


def test_version_1_state_restarts_a_normalised_signal() -> None:
    """A checkpoint from before ``normalise`` has no weight sums: the normalised signal starts
    the task afresh (nothing to compare with at its next step); the raw one continues."""
    mean = unit(64, 0)
    raw = DirectionSignal(recent=8)
    levels(raw, [mean], [1.0], 40)
    old = {k: v for k, v in raw.state_dict().items() if k not in ("version", "noise")}
    normed = DirectionSignal(recent=8, normalise=True)
    normed.load_state_dict(old)
    normed.on_gradients(["w"], [mean])
    assert normed.take() is None
    again = DirectionSignal(recent=8)
    again.load_state_dict(old)
    again.on_gradients(["w"], [mean])
    assert again.take() is not None


def test_unknown_state_version_is_refused() -> None:
    with pytest.raises(ValueError, match="version"):
        DirectionSignal().load_state_dict({"version": 99})


def test_auto_boundaries_takes_a_normalised_direction() -> None:
    src = AutoBoundaries(
        signal="novelty+direction", direction=DirectionSignal(recent=8, normalise=True)
    )
    direction = src.signals["direction"]
    assert isinstance(direction, DirectionSignal) and direction.normalise
    assert src.detector.detectors[1].min_relative_jump == 4.0  # the recent direction's shape
