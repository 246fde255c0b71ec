"""Automatic task boundaries without a Trainer: the defaults, the signals a source needs, state
round trips and refusals. Through real Trainers and the detection science on silent streams:
``tests/integration/test_auto_boundaries_training.py``."""

from __future__ import annotations

import pytest
import torch

from lightning_metagrad import MetaGradCallback
from lightning_metagrad.boundaries import AutoBoundaries, CombinedBoundaries, NewFitBoundaries
from lightning_metagrad.boundaries.changepoint import ChangePointDetector
from lightning_metagrad.boundaries.either import EitherDetector
from lightning_metagrad.boundaries.signals import DirectionSignal


def test_auto_defaults_to_the_novelty_or_the_direction() -> None:
    src = MetaGradCallback(task_boundaries="auto").boundaries
    assert isinstance(src, AutoBoundaries) and isinstance(src.detector, EitherDetector)
    assert src.detector.mains == ["novelty", "direction"]  # either fires (issue 25)
    direction = src.signals["direction"]
    assert isinstance(direction, DirectionSignal) and direction.recent == 8.0
    assert direction.normalise  # in units of its noise-only value (issue 25)
    assert src.uses_gradients and not src.uses_pairs
    assert src.uses_loss and "loss" in src.signals  # it confirms the switches
    assert src.every == 1 and src.settle == 0


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
    assert src.every == 4 and src.settle == 0  # the loss: the mean of 4 steps an observation
    assert AutoBoundaries().uses_loss  # the default's switches are confirmed by the loss
    assert not AutoBoundaries(signal="error").uses_loss  # the paper's signal needs no loss
    assert AutoBoundaries(signal="error").settle == 100  # its meta-network learns first


def test_loss_signal_ignores_non_finite_losses_and_round_trips() -> None:
    src = AutoBoundaries(every=2, settle=0, signal="loss")
    for value in (1.0, float("nan"), 3.0):
        src.on_loss(torch.tensor(value))
    clone = AutoBoundaries(every=2, settle=0, signal="loss")
    clone.load_state_dict(src.state_dict())
    loss, cloned = src.signals["loss"], clone.signals["loss"]
    assert loss.take() == cloned.take() == pytest.approx(2.0)
    assert loss.take() is None  # taken: the next observation waits for new losses


def test_a_detector_on_unknown_signals_is_refused() -> None:
    with pytest.raises(ValueError, match="signal"):
        AutoBoundaries(signal="gradient_norm")
    with pytest.raises(ValueError, match="detector"):
        AutoBoundaries(detector=ChangePointDetector(signal="grad_norm"))
    with pytest.raises(ValueError, match="detector"):
        AutoBoundaries(detector=ChangePointDetector(signal="novelty", weights={"norm": 1.0}))


def test_combined_sources_forward_the_loss_to_the_source_that_uses_it() -> None:
    auto = AutoBoundaries(signal="loss")
    src = CombinedBoundaries([NewFitBoundaries(), auto])
    assert src.uses_loss
    src.on_loss(torch.tensor(0.5))
    assert auto.signals["loss"].take() == pytest.approx(0.5)


def test_novelty_combines_with_the_loss_as_evidence_and_round_trips() -> None:
    src = AutoBoundaries(signal="novelty", evidence={"loss": 0.5})
    assert src.uses_gradients and src.uses_loss and not src.uses_pairs
    assert src.detector.signal == "novelty" and src.detector.weights == {"loss": 0.5}
    gen = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(12, 3, generator=gen))[0]
    names, thetas = ["l.weight", "l.bias"], [torch.zeros(8, 12), torch.zeros(8)]
    for _ in range(40):
        src.on_loss(torch.rand((), generator=gen))
        grads = [torch.randn(8, 3, generator=gen) @ basis.T, torch.zeros(8)]
        src.on_gradients(names, thetas, grads)
    assert src.detector.num_observations > 0 and src.novelty.dims()["l.weight"] <= 4
    clone = AutoBoundaries(signal="novelty", evidence={"loss": 0.5})
    clone.load_state_dict(src.state_dict())
    grads = [torch.randn(8, 12, generator=gen), torch.zeros(8)]
    src.on_loss(torch.tensor(0.7))
    clone.on_loss(torch.tensor(0.7))
    assert src.on_gradients(names, thetas, grads) == clone.on_gradients(names, thetas, grads)
    assert src.detector.state_dict() == clone.detector.state_dict()
    with pytest.raises(ValueError, match="evidence"):
        AutoBoundaries(evidence={"loss": 1.0}, detector=ChangePointDetector(signal="novelty"))


def test_only_the_signals_the_detector_names_are_built_and_checkpointed() -> None:
    # No meta-network for the default.
    assert set(AutoBoundaries().signals) == {"novelty", "direction", "loss"}
    assert set(AutoBoundaries(signal="novelty").signals) == {"novelty", "loss"}  # confirms
    assert set(AutoBoundaries(signal="loss").signals) == {"loss", "error"}
    assert set(AutoBoundaries(signal="novelty", evidence={"loss": 1.0}).signals) == {
        "novelty",
        "loss",
    }
    assert set(AutoBoundaries().state_dict()["signals"]) == {"novelty", "direction", "loss"}


def test_a_version_1_state_with_every_signal_flat_still_loads() -> None:
    src = AutoBoundaries(every=1, settle=0, signal="error")
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        theta = torch.randn(50, generator=gen)
        src.on_pairs(theta, -theta)
    new = src.state_dict()
    error = new["signals"]["error"]
    old = {
        "version": 1,
        "loss_sum": None,
        "loss_finite": None,
        "meta": error["meta"],
        "generator": error["generator"],
        "detector": new["detector"],
        "steps": new["steps"],
        "needs_reset": error["needs_reset"],
        "novelty": AutoBoundaries().signals["novelty"].state_dict(),
        "last_error": error["last_error"],
    }
    clone = AutoBoundaries(every=1, settle=0, signal="error")
    clone.load_state_dict(old)
    assert clone.steps == src.steps and clone.last_error == src.last_error
