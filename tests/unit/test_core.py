"""The plain-PyTorch parts, each against a hand-computed or exactly known case."""

from __future__ import annotations

import pytest
import torch

from lightning_metagrad import BatchTaskIdBoundaries, NewFitBoundaries
from lightning_metagrad.predictors.paper.distillation import RunningMeanDistiller
from lightning_metagrad.predictors.paper.meta_network import CoordinateMLP, MetaNetwork
from lightning_metagrad.predictors.paper.tabulation import TabulatedFunction
from lightning_metagrad.predictors.rules import joint_average, sign_agreement

# ------------------------------------------------------------------ eq. 5 and eq. 2


def test_sign_agreement_keeps_only_agreeing_coordinates() -> None:
    grad = torch.tensor([0.5, -1.0, 2.0, -3.0, 1.0, 0.0])
    pred = torch.tensor([0.1, -0.2, -1.0, 4.0, 0.0, 1.0])
    combined, zeroed = sign_agreement(grad, pred)
    # Eq. 5: delta_j = grad_j if grad_j * pred_j > 0 else 0 (a zero product is dropped too).
    assert combined.tolist() == [0.5, -1.0, 0.0, 0.0, 0.0, 0.0]
    assert zeroed.tolist() == [False, False, True, True, True, True]


def test_sign_agreement_passes_non_finite_entries_through() -> None:
    grad = torch.tensor([float("nan"), float("inf"), 1.0])
    combined, zeroed = sign_agreement(grad, torch.tensor([1.0, -1.0, -1.0]))
    assert torch.isnan(combined[0]) and torch.isinf(combined[1]) and combined[2] == 0
    assert zeroed.tolist() == [False, False, True]


def test_joint_average_is_eq_2_over_all_tasks() -> None:
    # t = 3 old tasks with mean predicted gradient 2, current gradient 6: (6 + 3*2) / 4 = 3.
    out = joint_average(torch.tensor([6.0, -2.0]), torch.tensor([2.0, 2.0]), num_old_tasks=3)
    assert torch.allclose(out, torch.tensor([3.0, 1.0]))
    with pytest.raises(ValueError, match="num_old_tasks"):
        joint_average(torch.zeros(1), torch.zeros(1), num_old_tasks=0)


# ------------------------------------------------------------------ tabulation


def test_tabulated_mlp_error_is_bounded() -> None:
    torch.manual_seed(0)
    h = CoordinateMLP((256, 256, 256))
    h.in_scale.fill_(0.05)
    h.out_scale.fill_(1e-3)
    table = TabulatedFunction.from_function(h, -0.4, 0.4, num_points=4097)
    theta = (torch.rand(100_000) - 0.5) * 0.8
    with torch.no_grad():
        exact = h(theta)
    err = (table(theta) - exact).abs().max()
    # Piecewise-linear MLP: error only in cells containing a kink; bound it relative to the
    # function's range.
    assert err <= 1e-3 * float(exact.abs().max())


def test_tabulation_extrapolates_linearly() -> None:
    table = TabulatedFunction.from_function(lambda x: 2 * x + 1, -1.0, 1.0, num_points=5)
    assert torch.allclose(table(torch.tensor([-3.0, 0.3, 5.0])), torch.tensor([-5.0, 1.6, 11.0]))


def test_tabulation_rejects_bad_range() -> None:
    with pytest.raises(ValueError, match="high"):
        TabulatedFunction(torch.zeros(4), 1.0, 1.0)
    with pytest.raises(ValueError, match="num_points"):
        TabulatedFunction.from_function(torch.sin, 0.0, 1.0, num_points=1)


# ------------------------------------------------------------------ meta-network


def test_meta_network_learns_a_coordinatewise_function() -> None:
    gen = torch.Generator().manual_seed(0)
    meta = MetaNetwork(CoordinateMLP((32, 32)), coords_per_step=512, lr=3e-3, generator=gen)
    theta = torch.randn(5000, generator=gen) * 0.1
    meta.reset(in_scale=float(theta.std()))
    target = -3.0 * theta + 0.5 * theta.pow(2)
    first, _ = meta.observe(theta, target)
    for _ in range(300):
        last, rel_error = meta.observe(theta, target)
    assert float(rel_error) < 0.05
    assert float(last) < 0.05 * float(first)
    held_out = torch.arange(0, 5000, 7)
    assert float(meta.relative_error(theta, target, held_out)) < 0.05


def test_meta_network_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="coords_per_step"):
        MetaNetwork(CoordinateMLP((4,)), coords_per_step=0)
    with pytest.raises(ValueError, match="hidden_sizes"):
        CoordinateMLP(())
    with pytest.raises(ValueError, match="activation"):
        CoordinateMLP((4,), activation="gelu")


# ------------------------------------------------------------------ distillation, eqs. 6-7


def _fitted(fn, seed: int) -> CoordinateMLP:  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(seed)
    meta = MetaNetwork(CoordinateMLP((32, 32)), coords_per_step=1024, lr=3e-3, generator=gen)
    theta = torch.linspace(-1, 1, 4000)
    meta.reset(in_scale=0.5)
    for _ in range(400):
        meta.observe(theta, fn(theta))
    return meta.net


def test_distillation_tracks_the_running_mean_of_tasks() -> None:
    fns = [lambda x: x, lambda x: -0.5 * x + 0.2, lambda x: x.pow(2)]
    hs = [_fitted(f, i) for i, f in enumerate(fns)]
    distiller = RunningMeanDistiller(steps=400, num_samples=1024, lr=3e-3)
    theta = torch.linspace(-1, 1, 4000)
    gen = torch.Generator().manual_seed(0)
    for h in hs:
        distiller.add_task(h, theta, generator=gen)
    assert distiller.num_tasks == 3
    probe = torch.linspace(-0.9, 0.9, 101)
    with torch.no_grad():
        mean_of_hs = sum(h(probe) for h in hs) / 3
        exact_mean = sum(f(probe) for f in fns) / 3
        g = distiller.g(probe)  # type: ignore[misc]
    # g approximates the mean of the h's (what eq. 7 distils) and so the mean of the tasks.
    assert float((g - mean_of_hs).abs().max()) < 0.05
    assert float((g - exact_mean).abs().max()) < 0.08


def test_first_task_initialises_g_to_h1() -> None:
    h1 = CoordinateMLP((8,))
    distiller = RunningMeanDistiller()
    distiller.add_task(h1, torch.randn(100))
    probe = torch.randn(50)
    with torch.no_grad():
        assert torch.equal(distiller.g(probe), h1(probe))  # type: ignore[misc]
    assert not any(p.requires_grad for p in distiller.g.parameters())  # type: ignore[union-attr]


# ------------------------------------------------------------------ boundary sources


def test_new_fit_boundaries_count_fits_and_continue_a_resumed_task() -> None:
    src = NewFitBoundaries()
    assert [src.on_fit_start(), src.on_fit_end(), src.on_fit_start()] == [False, None, True]
    resumed = NewFitBoundaries()
    resumed.load_state_dict(src.state_dict())  # checkpoint taken during the second fit
    assert resumed.on_fit_start() is False


def test_batch_task_id_boundaries_read_tensors_and_functions() -> None:
    src = BatchTaskIdBoundaries()
    ids = [torch.tensor([0, 0]), torch.tensor([0, 0]), torch.tensor([1, 1, 1])]
    assert [src.on_train_batch({"task_id": t}, i) for i, t in enumerate(ids)] == [
        False,
        False,
        True,
    ]
    fn_src = BatchTaskIdBoundaries(fn=lambda b: b[2])
    assert [fn_src.on_train_batch((0, 0, t), 0) for t in "aab"] == [False, False, True]


def test_batch_task_id_boundaries_explain_a_missing_key() -> None:
    with pytest.raises(ValueError, match="task_id_key"):
        BatchTaskIdBoundaries().on_train_batch({"x": 1}, 0)
    with pytest.raises(ValueError, match="task_id_fn"):
        BatchTaskIdBoundaries().on_train_batch((1, 2), 0)
