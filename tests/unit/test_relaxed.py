"""``RelaxedSubspacePredictor`` (issue 23, part 3) without a Trainer: an agreeing block's
component is kept (plus the proximal pull), a disagreeing one is removed exactly as the default
removes it, blocks are tested apart, the old columns survive the basis growing, and the state
round-trips. Through a real Trainer: ``tests/integration/test_relaxed_training.py``."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers import same_state
from torch import Tensor

from lightning_metagrad import SubspacePredictor
from lightning_metagrad.predictors import PREDICTORS, build_predictor
from lightning_metagrad.predictors.relaxed import RelaxedSubspacePredictor

ROWS, COLS = 4, 6


def _task(pred: SubspacePredictor, w: Tensor, directions: Tensor, sign: float, seed: int) -> None:
    """One task whose gradients' rows lie along ``directions`` (k x cols), with a positive
    mean (times ``sign``) along them, then its end with the weights at ``w``."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(20):
        coords = sign * (1.0 + 0.3 * torch.randn(ROWS, directions.shape[0], generator=g))
        pred.observe(["w"], [w], [coords @ directions])
    pred.end_task(["w"], [w])


# CUBER's rule alone (whole component, one test per block, nothing guarded outside the basis);
# the tests of the other settings name them.
CUBER = {"keep": "component", "granularity": "block", "outside": "none"}


def _pair(**kwargs: Any) -> tuple[RelaxedSubspacePredictor, SubspacePredictor, Tensor]:
    """A relaxed predictor and the default, each after the same first task along e0, e1."""
    relaxed = RelaxedSubspacePredictor(every=1, sample_rows=None, **{**CUBER, **kwargs})
    default = SubspacePredictor(every=1, sample_rows=None)
    w = torch.zeros(ROWS, COLS)
    for pred in (relaxed, default):
        pred.bind({"w": w})
        _task(pred, w, torch.eye(COLS)[:2], sign=1.0, seed=0)
    return relaxed, default, w


def _rewritten(pred: SubspacePredictor, w: Tensor, grad: Tensor) -> Tensor:
    out = grad.clone()
    pred.rewrite_(["w"], [w], [out])
    return out


def _grad(sign: float) -> Tensor:
    g = torch.Generator().manual_seed(7)
    inside = sign * (1.0 + 0.2 * torch.rand(ROWS, 2, generator=g))  # along e0, e1
    outside = torch.randn(ROWS, COLS - 2, generator=g)
    return torch.cat([inside, outside], 1)


def test_an_agreeing_component_is_kept() -> None:
    relaxed, default, w = _pair(proximal=0.0)
    grad = _grad(+1.0)
    assert torch.allclose(_rewritten(relaxed, w, grad), grad)
    # The default removes it.
    assert _rewritten(default, w, grad)[:, :2].abs().max() < 1e-6


def test_the_proximal_pull_draws_the_weights_back_inside_the_subspace_only() -> None:
    relaxed, _, w = _pair(proximal=2.0)
    moved = w.clone()
    moved[:, 0] += 0.5  # drifted along e0 (in the subspace) ...
    moved[:, 5] += 3.0  # ... and along e5 (outside: free, no pull)
    grad = _grad(+1.0)
    out = _rewritten(relaxed, moved, grad)
    expected = grad.clone()
    expected[:, 0] += 2.0 * 0.5
    assert torch.allclose(out, expected, atol=1e-5)


def test_a_disagreeing_component_is_removed_exactly_as_the_default_removes_it() -> None:
    relaxed, default, w = _pair(proximal=0.0)
    grad = _grad(-1.0)
    out = _rewritten(relaxed, w, grad)
    assert torch.allclose(out, _rewritten(default, w, grad), atol=1e-6)
    assert out[:, :2].abs().max() < 1e-6
    # agree=1 (nothing passes) is the default's projection for any gradient.
    never, default, w = _pair(agree=1.0, proximal=0.0)
    grad = _grad(1.0)
    assert torch.allclose(_rewritten(never, w, grad), _rewritten(default, w, grad), atol=1e-6)
    # ... also per row, where a one-column block's cosine is 1 up to rounding.
    never, default, w = _pair(agree=1.0, proximal=0.0, granularity="row")
    assert torch.allclose(_rewritten(never, w, grad), _rewritten(default, w, grad), atol=1e-6)


def test_reference_mode_keeps_only_the_component_along_the_reference() -> None:
    relaxed, _, w = _pair(proximal=0.0, keep="reference")
    grad = _grad(+1.0)
    out = _rewritten(relaxed, w, grad)
    ref = relaxed._ref["w"]  # rows x 2, the first task's mean in the basis
    m = relaxed.basis("w")
    coords = grad @ m
    along = (coords * ref).sum() / ref.pow(2).sum() * ref
    assert torch.allclose(out @ m, along, atol=1e-5)
    assert torch.allclose(out[:, 2:], grad[:, 2:])  # outside the basis: untouched


def test_blocks_are_tested_apart_and_keep_their_columns_when_the_basis_grows() -> None:
    relaxed = RelaxedSubspacePredictor(every=1, sample_rows=None, proximal=0.0, **CUBER)
    w = torch.zeros(ROWS, COLS)
    relaxed.bind({"w": w})
    eye = torch.eye(COLS)
    _task(relaxed, w, eye[:2], sign=1.0, seed=0)
    first = relaxed.basis("w").clone()
    _task(relaxed, w, eye[2:4], sign=1.0, seed=1)
    m = relaxed.basis("w")
    assert relaxed._edges["w"] == [2, 4]
    assert torch.equal(m[:, :2], first)  # the old block exactly as it was
    assert torch.allclose(m.T @ m, torch.eye(4), atol=1e-5)
    # Agrees with task 1 on its block, disagrees with task 2 on its: only block 1 is kept.
    grad = torch.cat([torch.ones(ROWS, 2), -torch.ones(ROWS, 2), torch.ones(ROWS, 2)], 1)
    out = _rewritten(relaxed, w, grad)
    assert torch.allclose(out @ m[:, :2], grad @ m[:, :2], atol=1e-5)
    assert (out @ m[:, 2:]).abs().max() < 1e-5
    # One test over the whole basis: the disagreement outweighs nothing here (cosine 0).
    layer = RelaxedSubspacePredictor(
        every=1, sample_rows=None, proximal=0.0, keep="component", granularity="layer"
    )
    layer.bind({"w": w})
    _task(layer, w, eye[:2], sign=1.0, seed=0)
    _task(layer, w, eye[2:4], sign=1.0, seed=1)
    assert (_rewritten(layer, w, grad) @ layer.basis("w")).abs().max() < 1e-5


def test_row_tests_keep_each_agreeing_row_apart() -> None:
    relaxed, default, w = _pair(proximal=0.0, granularity="row")
    grad = _grad(+1.0)
    grad[1, :2] *= -1.0  # row 1 now disagrees with the first task; the others agree
    out = _rewritten(relaxed, w, grad)
    projected = _rewritten(default, w, grad)
    assert torch.allclose(out[1], projected[1], atol=1e-6)
    for row in (0, 2, 3):
        assert torch.allclose(out[row], grad[row])


def test_outside_guard_removes_a_disagreeing_component_outside_the_basis_only() -> None:
    relaxed = RelaxedSubspacePredictor(
        every=1, sample_rows=None, proximal=0.0, outside="row", normalize_steps=False
    )
    w = torch.zeros(ROWS, COLS)
    relaxed.bind({"w": w})
    # A task whose steps go along e0, and every other one a little along e5: 1 % of the
    # energy, under the threshold, so e5 stays outside the basis, but in the mean gradient.
    for step in range(40):
        g = torch.zeros(ROWS, COLS)
        g[:, 0 if step % 2 else 5] = 1.0 if step % 2 else 0.1
        relaxed.observe(["w"], [w], [g])
    relaxed.end_task(["w"], [w])
    assert relaxed.subspace_dims() == {"w": 1}
    grad = torch.zeros(ROWS, COLS)
    grad[:, 4] = 1.0  # free: orthogonal to the reference, kept
    grad[:2, 5] = -1.0  # rows 0, 1 disagree outside the basis: their e5 part goes
    grad[2:, 5] = 1.0  # rows 2, 3 agree: kept
    out = _rewritten(relaxed, w, grad)
    expected = grad.clone()
    expected[:2, 5] = 0.0
    assert torch.allclose(out, expected, atol=1e-5)


def test_state_round_trip() -> None:
    relaxed, _, w = _pair(
        proximal=1.0, smoothing=0.5, reference="late", horizon=10, outside="row", keep="reference"
    )
    moved = w + 0.1
    _rewritten(relaxed, moved, _grad(1.0))  # a smoothing average in flight
    relaxed.observe(["w"], [moved], [_grad(1.0)])  # and a task's gradient sum
    state = relaxed.state_dict()
    copy = RelaxedSubspacePredictor(
        every=1, sample_rows=None, proximal=1.0, smoothing=0.5, granularity="block"
    )
    assert copy.outside == "row" and copy.keep == "reference"  # (the defaults)
    copy.bind({"w": w})
    copy.load_state_dict(state)
    assert same_state(copy.state_dict(), state)
    grad = _grad(1.0)
    assert torch.allclose(_rewritten(copy, moved, grad), _rewritten(relaxed, moved, grad))
    with pytest.raises(ValueError, match="RelaxedSubspacePredictor state"):
        copy.load_state_dict(SubspacePredictor().state_dict())


def test_registered_by_name_and_refuses_what_it_does_not_support() -> None:
    assert PREDICTORS["relaxed"] is RelaxedSubspacePredictor
    assert isinstance(build_predictor("relaxed"), RelaxedSubspacePredictor)
    with pytest.raises(ValueError, match="dense"):
        RelaxedSubspacePredictor(sketch=8)
    with pytest.raises(ValueError, match="in_basis"):
        RelaxedSubspacePredictor(in_basis="sign")
    with pytest.raises(ValueError, match="keep"):
        RelaxedSubspacePredictor(keep="all")  # type: ignore[arg-type]
