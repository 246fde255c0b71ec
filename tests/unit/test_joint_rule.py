"""The joint rule of the either detector (issue 25, blurry switches), without a Trainer: two
signals that each rise part of the way to their own detector's threshold, together with a
rising training loss, are one switch; the same rise with a falling loss (learning) is held back
until the loss rises; one signal alone half-way is nothing."""

from __future__ import annotations

import math

import pytest

from lightning_metagrad.boundaries import AutoBoundaries, ChangePointDetector, default_detector
from lightning_metagrad.boundaries.either import EitherDetector
from lightning_metagrad.boundaries.joint import JointRule

STEPS, RISE = 400, 150


def detector(signal: str) -> ChangePointDetector:
    # Alone, each needs its signal to double.
    return ChangePointDetector(
        signal=signal, warmup=30, window=9, patience=5, min_relative_jump=1.0, cooldown=0
    )


def either(joint: JointRule | None = None) -> EitherDetector:
    return EitherDetector([detector("a"), detector("b")], joint=joint)


def stream(
    a: float = 1.5,
    b: float = 1.5,
    loss: list[tuple[int, float]] | None = None,
    spike: int | None = None,
):
    """``STEPS`` observations: ``a`` and ``b`` rise ``a``- and ``b``-fold at ``RISE``; the loss
    is multiplied by each ``(step, factor)`` from that step on (default: 1.3-fold at RISE),
    and 50-fold at ``spike`` and the step after only (two batches of garbage)."""
    loss = [(RISE, 1.3)] if loss is None else loss
    for i in range(STEPS):
        wave = 1 + 0.05 * math.sin(1.7 * i)
        up = i >= RISE
        level = math.prod(f for s, f in loss if i >= s)
        level *= 50 if spike is not None and spike <= i <= spike + 1 else 1
        yield {"a": wave * (a if up else 1), "b": (2 - wave) * (b if up else 1), "loss": level}


def switches(det: EitherDetector, **kwargs) -> list[int]:
    known = set(det.signals)  # without the joint rule nothing reads the loss
    return [
        i
        for i, obs in enumerate(stream(**kwargs))
        if det.update(**{k: v for k, v in obs.items() if k in known})
    ]


def test_signals_rising_together_with_the_loss_are_one_joint_switch() -> None:
    det = either(JointRule())
    hits = switches(det)
    assert len(hits) == 1 and RISE < hits[0] <= RISE + 20, hits
    assert det.switch_signals == ["joint"]
    assert 8 <= det.last_onset <= 30  # the run plus half the confirmation's window


def test_without_the_joint_rule_neither_detector_fires() -> None:
    assert switches(either()) == []


def test_one_signal_half_way_is_not_a_switch() -> None:
    assert switches(either(JointRule()), b=1.0) == []


def test_a_joint_rise_while_the_loss_falls_is_held_back() -> None:
    assert switches(either(JointRule()), loss=[(RISE, 0.8)]) == []


def test_a_held_back_joint_switch_is_declared_once_the_loss_rises() -> None:
    det = either(JointRule())
    hits = switches(det, loss=[(RISE - 40, 0.8), (RISE + 10, 1.6)])
    assert len(hits) == 1 and RISE + 15 < hits[0] <= RISE + 30, hits  # 1.3-fold at RISE: 161


def test_a_joint_rise_in_the_aftermath_of_a_loss_spike_is_not_a_switch() -> None:
    # Two batches of garbage just before the signals rise: a transient perturbation (with
    # Adam its momentum raises the loss and both signals for a while), not a blend.
    assert switches(either(JointRule()), spike=RISE - 3) == []
    unmuted = either(JointRule(spike=None))
    assert len(switches(unmuted, spike=RISE - 3)) == 1 and unmuted.switch_signals == ["joint"]


def test_a_sustained_loss_jump_does_not_mute_the_joint_rule() -> None:
    # A new task's loss jumps and stays: not a spike.
    hits = switches(either(JointRule()), loss=[(RISE, 50.0)])
    assert len(hits) == 1 and RISE < hits[0] <= RISE + 20, hits


def test_a_loss_never_fed_does_not_hold_a_joint_switch_back() -> None:
    det = either(JointRule())
    hits = [i for i, obs in enumerate(stream()) if det.update(a=obs["a"], b=obs["b"])]
    assert len(hits) == 1 and det.switch_signals == ["joint"]


def test_the_joint_rule_declares_the_loss_as_a_signal() -> None:
    assert either(JointRule()).signals == ["a", "b", "loss"]
    assert either(JointRule(confirm={}, spike=None)).signals == ["a", "b"]
    assert either(JointRule()).max_onset == 30


def test_state_round_trip_continues_exactly() -> None:
    obs = list(stream())
    a, b = either(JointRule()), either(JointRule())
    first = [i for i in range(RISE + 5) if a.update(**obs[i])]
    b.load_state_dict(a.state_dict())
    rest_a = [i for i in range(RISE + 5, STEPS) if a.update(**obs[i])]
    rest_b = [i for i in range(RISE + 5, STEPS) if b.update(**obs[i])]
    assert first == [] and rest_a == rest_b and len(rest_a) == 1
    assert b.state_dict() == a.state_dict()


def test_a_state_from_before_the_joint_rule_loads() -> None:
    old = either()
    _ = switches(old)
    state = old.state_dict()
    assert "joint" not in state
    det = either(JointRule())
    det.load_state_dict(state)
    assert det.num_observations == STEPS and det.state_dict()["joint"]["run"] == 0


def test_the_default_either_detector_has_the_joint_rule_confirmed_by_the_loss() -> None:
    det = default_detector("novelty+direction")
    assert isinstance(det, EitherDetector) and isinstance(det.joint, JointRule)
    assert det.joint.confirm == {"loss": 1.1} and det.joint.need == 1.0
    assert AutoBoundaries().detector.joint is not None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"need": 0}, "need"),
        ({"patience": 0}, "patience"),
        ({"threshold": -1}, "threshold"),
        ({"window": 0}, "window"),
        ({"confirm": {"loss": 0}}, "confirm"),
        ({"confirm": ["loss"]}, "confirm"),
        ({"max_onset": 0}, "max_onset"),
        ({"spike": 1.0}, "spike"),
        ({"confirm": {}}, "`confirm` is empty"),
        ({"each_threshold": -1}, "each_threshold"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        JointRule(**kwargs)


def test_joint_must_be_a_joint_rule() -> None:
    with pytest.raises(ValueError, match="`joint` must be a JointRule"):
        EitherDetector([detector("a"), detector("b")], joint={"need": 1.0})  # type: ignore[arg-type]
