"""SGP without a Trainer: the importance formula against the official code's ``update_SGP``,
the scaled projection ``G - G M diag(λ) Mᵀ``, its state and arguments. Through real Trainers:
``tests/integration/test_sgp_training.py``."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import lightning_metagrad as lm
from lightning_metagrad.baselines import GPMCallback, SGPCallback
from lightning_metagrad.baselines.gpm import _Protected
from lightning_metagrad.baselines.sgp import scaled_importance, update_importance
from lightning_metagrad.benchmark.methods import make_callbacks, method_parameters
from lightning_metagrad.predictors.basis import grow_basis


def test_importance_is_sgps_eq_2() -> None:
    sigma = torch.tensor([5.0, 2.5, 1.0, 0.05])
    for alpha in (0.0, 3.0, 10.0):
        expected = [(alpha + 1) * s / (alpha * s + 5.0) for s in sigma.tolist()]
        torch.testing.assert_close(scaled_importance(sigma, alpha), torch.tensor(expected))
    lam = scaled_importance(sigma, 10.0)
    assert float(lam[0]) == 1.0 and bool((lam[1:] < 1).all())
    assert bool((lam[:-1] > lam[1:]).all())  # stronger directions matter more
    # A larger α is closer to GPM (every direction 1); α = 0: σ / max σ.
    assert bool((scaled_importance(sigma, 1e6) > 0.99).all())
    torch.testing.assert_close(scaled_importance(sigma, 0.0), sigma / 5.0)
    # Scale-free: only the singular values' ratios count.
    torch.testing.assert_close(scaled_importance(7 * sigma, 10.0), lam)


def _official(
    r: torch.Tensor, old: torch.Tensor | None, previous: torch.Tensor | None, new: int, alpha: float
) -> torch.Tensor:
    """``update_SGP`` of the official repository (main_sgp_cifar100.py), with SVDs of the
    inputs ``R`` (features x n), given how many new directions the basis took."""

    def scaled(x: torch.Tensor) -> torch.Tensor:
        return (alpha + 1) * x / (alpha * x + x.max())

    r = r.double()
    if old is None:
        s = torch.linalg.svdvals(r)
        return scaled(s[:new])
    old = old.double()
    proj = old @ old.T @ r
    uc, sc, _ = torch.linalg.svd(proj, full_matrices=False)
    k = old.shape[1]
    on_old = (((old.T @ uc[:, :k]) ** 2) @ sc[:k] ** 2).sqrt()
    s_hat = torch.linalg.svdvals(r - proj)
    importance = scaled(torch.cat([on_old, s_hat[:new]]))
    importance[:k] = (importance[:k] + previous.double()).clamp(0, 1)
    return importance


def test_importance_updates_match_the_official_code_over_three_tasks() -> None:
    g = torch.Generator().manual_seed(0)
    basis, importance, reference, lowest = None, None, None, []
    for task in range(3):
        mix = torch.randn(9, 9, generator=g) * torch.logspace(0.6, -1, 9)
        r = mix @ torch.randn(9, 40, generator=g)  # features x samples, a few strong directions
        cov = r @ r.T / r.shape[1]
        old = basis
        basis = grow_basis(old, cov, 0.9)
        assert basis is not None
        new = basis.shape[1] - (0 if old is None else old.shape[1])
        importance = update_importance(basis, cov, importance, scale=10.0)
        assert importance is not None and importance.shape == (basis.shape[1],)
        reference = _official(r, old, reference, new, alpha=10.0)
        torch.testing.assert_close(importance.double(), reference, atol=1e-5, rtol=1e-5)
        assert bool(((importance > 0) & (importance <= 1)).all()), task
        lowest.append(float(importance.min()))
    assert lowest[0] < 0.9  # soft, not GPM; old directions add up towards 1 with tasks


def test_a_task_without_input_energy_keeps_the_importances() -> None:
    previous = torch.tensor([1.0, 0.5])
    basis = torch.eye(4)[:, :2]
    assert update_importance(basis, torch.zeros(4, 4), previous, 10.0) is previous
    # Old directions the new task does not use keep their importance (plus nothing).
    cov = torch.diag(torch.tensor([0.0, 0.0, 9.0, 1.0]))
    grown = torch.eye(4)[:, :3]
    torch.testing.assert_close(
        update_importance(grown, cov, previous, 10.0), torch.tensor([1.0, 0.5, 1.0])
    )


def _linear_with_grad(grad: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(grad.shape[1], grad.shape[0], bias=False)
    layer.weight.grad = grad.clone()
    return layer


def test_projection_removes_a_direction_of_importance_one_and_scales_the_others() -> None:
    g = torch.randn(3, 5)
    q, _ = torch.linalg.qr(torch.randn(5, 3))
    m, lam = q[:, :2], torch.tensor([1.0, 0.25])
    layer = _linear_with_grad(g)
    SGPCallback._project(_Protected([("l", layer, m, lam)]))
    out = layer.weight.grad
    assert out is not None
    torch.testing.assert_close(out @ m[:, 0], torch.zeros(3), atol=1e-6, rtol=0)  # removed
    torch.testing.assert_close(out @ m[:, 1], 0.75 * (g @ m[:, 1]))  # scaled by 1 - λ
    outside = torch.eye(5) - m @ m.T
    torch.testing.assert_close(out @ outside, g @ outside)  # the rest untouched
    torch.testing.assert_close(out, g - (g @ m) @ torch.diag(lam) @ m.T)
    # No importance: GPM's hard projection.
    hard = _linear_with_grad(g)
    GPMCallback._project(_Protected([("l", hard, m, None)]))
    torch.testing.assert_close(hard.weight.grad, g - g @ m @ m.T)


def test_tied_layers_merge_their_importances() -> None:
    # Two layers share a weight; one holds e0 (λ 1) and e1 (λ 0.5), the other e1 (λ 0.3).
    first, second = nn.Linear(4, 2, bias=False), nn.Linear(4, 2, bias=False)
    second.weight = first.weight
    eye = torch.eye(4)
    members = [
        ("a", first, eye[:, :2], torch.tensor([1.0, 0.5])),
        ("b", second, eye[:, 1:2], torch.tensor([0.3])),
    ]
    tied = _Protected(members)
    g = torch.randn(2, 4)
    first.weight.grad = g.clone()
    SGPCallback._project(tied)
    out = first.weight.grad
    torch.testing.assert_close(out[:, 0], torch.zeros(2), atol=1e-6, rtol=0)  # λ 1: removed
    torch.testing.assert_close(out[:, 1], 0.2 * g[:, 1])  # λ 0.5 + 0.3
    torch.testing.assert_close(out[:, 2:], g[:, 2:])
    # Clipped at 1: a direction both hold with importance 1 is removed once, not reversed.
    both = _Protected([("a", first, eye[:, :1], torch.ones(1)), ("b", second, eye[:, :1], None)])
    assert both.importance is not None and float(both.importance.max()) == pytest.approx(1.0)


def test_state_dict_is_versioned_and_round_trips() -> None:
    sgp = SGPCallback(threshold=[0.95, 0.99, 0.99], scale=3.0)
    sgp._bases = {"net.0": torch.eye(4)[:, :2]}
    sgp._importance = {"net.0": torch.tensor([1.0, 0.4])}
    sgp.num_tasks = 1
    state = sgp.state_dict()
    assert state["version"] == 1 and set(state) >= {"bases", "importance", "num_tasks"}
    fresh = SGPCallback(threshold=[0.95, 0.99, 0.99], scale=3.0)
    fresh.load_state_dict(state)
    assert fresh.num_tasks == 1
    torch.testing.assert_close(fresh.importances["net.0"], torch.tensor([1.0, 0.4]))
    torch.testing.assert_close(fresh.bases["net.0"], torch.eye(4)[:, :2])
    assert fresh.state_key == sgp.state_key != SGPCallback(scale=3.0).state_key
    bad = dict(state, importance={"net.0": torch.ones(3)})
    with pytest.raises(ValueError, match=r"'net.0' has 2 directions but 3 importances"):
        SGPCallback().load_state_dict(bad)
    with pytest.raises(ValueError, match="version"):
        SGPCallback().load_state_dict(dict(state, version=99))


@pytest.mark.parametrize("scale", [-1.0, float("nan"), float("inf"), "10"])
def test_scale_must_be_a_finite_non_negative_number(scale: object) -> None:
    with pytest.raises(ValueError, match=re.escape("`scale`")):
        SGPCallback(scale=scale)  # type: ignore[arg-type]


def test_one_line_use_and_the_benchmark_name() -> None:
    sgp = lm.SGPCallback()
    assert isinstance(sgp, GPMCallback) and (sgp.threshold, sgp.scale) == (0.97, 10.0)
    (made,) = make_callbacks("sgp", kwargs={"threshold": [0.95, 0.99, 0.99], "scale": 3})
    assert isinstance(made, SGPCallback) and made.scale == 3.0
    assert method_parameters("sgp")[:2] == ["threshold", "scale"]
