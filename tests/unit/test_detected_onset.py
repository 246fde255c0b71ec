"""A switch detected some steps late: the new task's first steps are not folded into the old
task's protected subspace.

Without this, the few steps between a switch and its detection (5 with the default novelty
signal, ~36 with the loss) add the new task's strongest gradient directions to the old
task's second moment, and the boundary then protects them: on Permuted digits with tasks of
200 steps that cost 0.11 ACC against given boundaries (docs/detection.md). Through a real
Trainer: ``tests/integration/test_auto_boundaries_training.py``.
"""

from __future__ import annotations

import math

import pytest
import torch

from lightning_metagrad import AutoBoundaries, SubspacePredictor
from lightning_metagrad.boundaries.changepoint import ChangePointDetector


def gradients(seed: int, count: int, rows: int = 12, cols: int = 9, rank: int = 2) -> list:
    gen = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(cols, rank, generator=gen))[0]
    return [torch.randn(rows, rank, generator=gen) @ basis.T for _ in range(count)]


def feed(pred: SubspacePredictor, grads: list) -> None:
    for g in grads:
        pred.observe(["w"], [torch.zeros_like(g)], [g])


def test_forget_recent_takes_back_exactly_the_last_steps() -> None:
    old, new = gradients(0, 20), gradients(1, 5)
    late = SubspacePredictor(every=1, sample_rows=4, seed=3)
    late.bind({"w": torch.zeros(12, 9)})
    late.keep_history(8)
    feed(late, old + new)  # the switch was detected 5 steps late
    assert late.forget_recent(5)
    exact = SubspacePredictor(every=1, sample_rows=4, seed=3)
    exact.bind({"w": torch.zeros(12, 9)})
    feed(exact, old)  # the same row draws for the old task's steps
    torch.testing.assert_close(late.state_dict()["cov"]["w"], exact.state_dict()["cov"]["w"])
    assert late.state_dict()["count"] == exact.state_dict()["count"]


def test_without_history_nothing_is_taken_back() -> None:
    pred = SubspacePredictor(every=1, sample_rows=4)
    pred.bind({"w": torch.zeros(12, 9)})
    feed(pred, gradients(0, 6))
    before = pred.state_dict()["cov"]["w"].clone()
    assert not pred.forget_recent(3)
    torch.testing.assert_close(pred.state_dict()["cov"]["w"], before)


def test_history_is_bounded_and_round_trips() -> None:
    pred = SubspacePredictor(every=2, sample_rows=4)
    pred.bind({"w": torch.zeros(12, 9)})
    pred.keep_history(6)
    feed(pred, gradients(0, 20))
    state = pred.state_dict()
    assert [step for step, _ in state["recent"]] == [14, 16, 18]  # observations of 6 steps
    other = SubspacePredictor(every=2, sample_rows=4)
    other.bind({"w": torch.zeros(12, 9)})
    other.load_state_dict(state)
    assert other.forget_recent(4) and pred.forget_recent(4)
    torch.testing.assert_close(other.state_dict()["cov"]["w"], pred.state_dict()["cov"]["w"])


def test_the_detector_estimates_how_long_ago_an_abrupt_jump_began() -> None:
    det = ChangePointDetector(warmup=20, window=9, patience=5, cooldown=0)
    gen = torch.Generator().manual_seed(0)
    level = [1.0] * 100 + [3.0] * 40
    declared = None
    for i, x in enumerate(level):
        noisy = x * math.exp(0.05 * float(torch.randn((), generator=gen)))
        if det.update(error=noisy):
            declared = i
            break
    assert declared is not None
    delay = declared - 100  # observations from the jump to the declaring one
    assert abs(det.last_onset - delay) <= 2, (det.last_onset, delay)


def test_history_without_sampled_rows_is_refused_with_a_warning() -> None:
    pred = SubspacePredictor(sample_rows=None)
    with pytest.warns(UserWarning, match="sample_rows"):
        pred.keep_history(16)
    feed_rows = gradients(0, 4)
    pred.bind({"w": torch.zeros(12, 9)})
    feed(pred, feed_rows)
    assert not pred.forget_recent(2)  # nothing kept, nothing taken back


def switch_at_100(src: AutoBoundaries, seed: int = 0) -> int:
    """Gradients in one 4-D subspace for 100 steps, then in another: the step declared."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(32, 32, generator=gen))[0]
    for step in range(200):
        sub = basis[:, :4] if step < 100 else basis[:, 4:8]
        g = (sub @ torch.randn(4, 16, generator=gen)).T + 0.05 * torch.randn(16, 32, generator=gen)
        src.on_loss(torch.tensor(1.0 if step < 100 else 3.0))
        if src.on_gradients(["w"], [g], [g]):
            return step
    raise AssertionError("no switch declared")


def test_the_take_back_reaches_five_steps_past_the_estimated_start() -> None:
    # A new task's step left in the old task's statistic blocks the new task (with Adam it
    # wrecked the network); an old task's step taken back costs little (docs/detection.md).
    src = AutoBoundaries()
    declared = switch_at_100(src)
    new_steps = declared - 100 + 1  # the detection's own step included
    assert src.detector.last_onset == new_steps  # the detector's estimate is exact here
    assert src.onset_steps() == new_steps + 5


def test_the_take_back_stays_within_the_steps_kept() -> None:
    src = AutoBoundaries(detector=ChangePointDetector(signal="novelty", warmup=20))
    switch_at_100(src)
    assert src.detector.last_onset + 5 > src.max_onset_steps == 9
    assert src.onset_steps() == src.max_onset_steps
