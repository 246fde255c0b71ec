"""Either detector (issue 25), without a Trainer: ``AutoBoundaries(signal="novelty+direction")``
declares a switch when the novelty's detector or the direction's fires. It sees a concept
shift (the mean gradient flips sign inside a fixed subspace: the novelty sees nothing) and an
input shift (a new gradient subspace), each once; its state round-trips."""

from __future__ import annotations

import pytest
import torch

from lightning_metagrad.boundaries import AutoBoundaries, ChangePointDetector, default_detector
from lightning_metagrad.boundaries.either import EitherDetector
from lightning_metagrad.boundaries.signals import DirectionSignal

ROWS, FAN_IN, RANK, STEPS = 16, 12, 3, 200
NAMES = ["l.weight", "l.bias"]
THETAS = [torch.zeros(ROWS, FAN_IN), torch.zeros(ROWS)]


def subspace(seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(FAN_IN, RANK, generator=gen))[0]


def task_mean(basis: torch.Tensor, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(ROWS, RANK, generator=gen) @ basis.T


def feed(
    src: AutoBoundaries, tasks: list[tuple[torch.Tensor, torch.Tensor]], seed: int = 1
) -> list[int]:
    """``STEPS`` steps per ``(basis, mean)`` task: a consistent mean gradient plus noise inside
    the task's subspace, and a little isotropic noise; the steps where a switch was declared."""
    gen = torch.Generator().manual_seed(seed)
    hits = []
    for t, (basis, mean) in enumerate(tasks):
        for i in range(STEPS):
            noise = torch.randn(ROWS, RANK, generator=gen) @ basis.T
            g = mean + 0.7 * noise + 0.02 * torch.randn(ROWS, FAN_IN, generator=gen)
            if src.on_gradients(NAMES, THETAS, [g, g.sum(1)]):
                hits.append(t * STEPS + i)
    return hits


def test_the_combined_signal_builds_both_signals_and_detectors() -> None:
    src = AutoBoundaries(signal="novelty+direction")
    assert isinstance(src.detector, EitherDetector)
    assert src.detector.mains == ["novelty", "direction"]
    assert set(src.signals) == {"novelty", "direction", "loss"}  # the loss confirms
    direction = src.signals["direction"]
    assert isinstance(direction, DirectionSignal) and direction.recent == 8.0
    assert direction.normalise
    assert src.every == 1 and src.settle == 0 and src.uses_gradients
    assert src.uses_loss  # it confirms the switches
    assert src.max_onset_steps == max(d.max_onset for d in src.detector.detectors)
    # The recent direction's stricter shape; evidence goes to the novelty's detector.
    assert src.detector.detectors[1].min_relative_jump == 4.0
    with_loss = AutoBoundaries(signal="novelty+direction", evidence={"loss": 0.5})
    assert with_loss.uses_loss and set(with_loss.signals) == {"novelty", "direction", "loss"}
    # A per-step direction passed in gets the per-step direction's detector.
    raw = AutoBoundaries(signal="novelty+direction", direction=DirectionSignal())
    assert isinstance(raw.detector, EitherDetector)
    assert (
        raw.detector.detectors[1].min_relative_jump
        == default_detector("direction").min_relative_jump
    )
    with pytest.raises(ValueError, match="DirectionSignal"):
        AutoBoundaries(signal="novelty+direction", direction="recent")  # type: ignore[arg-type]


def test_fires_on_a_concept_shift_the_novelty_alone_misses() -> None:
    """The mean gradient flips sign inside one fixed subspace."""
    basis = subspace(0)
    mean = task_mean(basis, 2)
    tasks = [(basis, mean), (basis, -mean)]
    assert feed(AutoBoundaries(signal="novelty"), tasks) == []
    src = AutoBoundaries(signal="novelty+direction")
    hits = feed(src, tasks)
    assert len(hits) == 1 and STEPS <= hits[0] <= STEPS + 30, hits
    assert isinstance(src.detector, EitherDetector)
    assert src.detector.switch_signals == ["direction"]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_fires_once_on_a_new_input_subspace(seed: int) -> None:
    """A new gradient subspace: the novelty fires first; the direction, restarted with it,
    does not declare the same switch again, and the new task's basis, rebuilt from its first
    steps, does not toggle a weak direction into a second switch (it did with the novelty's
    ``energy=0.98``)."""
    old, new = subspace(0), subspace(5)
    src = AutoBoundaries(signal="novelty+direction")
    hits = feed(src, [(old, task_mean(old, 2)), (new, task_mean(new, 3))], seed=seed)
    assert len(hits) == 1 and STEPS <= hits[0] <= STEPS + 15, hits
    assert isinstance(src.detector, EitherDetector)
    assert src.detector.switch_signals == ["novelty"]


def test_state_round_trip_continues_exactly() -> None:
    basis = subspace(0)
    mean = task_mean(basis, 2)
    src = AutoBoundaries(signal="novelty+direction")
    feed(src, [(basis, mean)], seed=1)
    state = src.state_dict()
    assert state["version"] == 2 and set(state["signals"]) == {"novelty", "direction", "loss"}
    assert set(state["detector"]["detectors"]) == {"novelty", "direction"}
    clone = AutoBoundaries(signal="novelty+direction")
    clone.load_state_dict(state)
    assert clone.state_dict()["detector"] == state["detector"]
    after = [(basis, -mean)]
    assert feed(src, after, seed=2) == feed(clone, after, seed=2) != []
    assert src.detector.state_dict() == clone.detector.state_dict()
    with pytest.raises(ValueError, match="detector"):
        AutoBoundaries(signal="novelty").load_state_dict(state)


def test_either_detector_counts_a_switch_both_see_once() -> None:
    def pair() -> EitherDetector:
        a = ChangePointDetector(signal="a", warmup=20, patience=3, cooldown=0)
        b = ChangePointDetector(signal="b", warmup=20, patience=3, cooldown=0, window=15)
        return EitherDetector([a, b])

    det = pair()
    hits = []
    for i in range(300):
        level = 4.0 if i >= 150 else 1.0
        wave = 1 + 0.1 * ((i * 7) % 5)
        if det.update(a=level * wave, b=level * wave):
            hits.append(i)
    assert len(hits) == 1 and det.switch_signals == ["a"] and det.num_switches == 1
    clone = pair()
    clone.load_state_dict(det.state_dict())
    assert clone.state_dict() == det.state_dict()
    assert det.update(b=1.0) is False  # a detector whose main signal is missing waits
    with pytest.raises(ValueError, match="signals"):
        det.update(c=1.0)
    with pytest.raises(ValueError, match="differ"):
        EitherDetector([ChangePointDetector(signal="a"), ChangePointDetector(signal="a")])
    with pytest.raises(ValueError, match="same detectors"):
        EitherDetector([ChangePointDetector(signal="c")]).load_state_dict(det.state_dict())


def test_a_novelty_only_state_loads_into_the_default() -> None:
    """A checkpoint from when ``"auto"`` tested the novelty alone: its detector and signal
    load into the either detector's novelty part, the direction starts afresh, and a new
    gradient subspace is still found once."""
    old, new = subspace(0), subspace(5)
    before = AutoBoundaries(signal="novelty")
    feed(before, [(old, task_mean(old, 2))])
    src = AutoBoundaries()  # the default: novelty+direction
    src.load_state_dict(before.state_dict())
    assert isinstance(src.detector, EitherDetector)
    novelty_detector = src.detector.detectors[0]
    assert novelty_detector.state_dict() == before.detector.state_dict()
    assert src.detector.detectors[1].num_observations == 0
    assert src.detector.num_observations == before.detector.num_observations
    hits = feed(src, [(new, task_mean(new, 3))], seed=2)
    assert len(hits) == 1 and hits[0] <= 15, hits
    with pytest.raises(ValueError, match="none of this one's"):
        AutoBoundaries().load_state_dict(AutoBoundaries(signal="loss").state_dict())
