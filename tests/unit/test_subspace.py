"""The default predictor, ``SubspacePredictor``, without a Trainer: its bases, projection and
state, and the core ``MetaGrad`` with it in a plain PyTorch loop. Through real Trainers:
``tests/integration/test_subspace_training.py``."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers import loader, subspace_bases
from torch import Tensor, nn

from lightning_metagrad import MetaGrad, SubspacePredictor

LR = 0.1


def _orthonormal(m: Tensor) -> bool:
    eye = torch.eye(m.shape[1], dtype=m.dtype)
    return torch.allclose(m.T @ m, eye, atol=1e-5)


def _gradients_in(directions: Tensor, rows: int, steps: int, seed: int) -> list[Tensor]:
    """Gradients (rows x cols) whose rows lie in the span of ``directions`` (k x cols)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, directions.shape[0], generator=g) @ directions for _ in range(steps)]


def test_basis_explains_the_threshold_of_a_tasks_energy_and_no_more_than_needed() -> None:
    pred = SubspacePredictor(threshold=0.9, input_threshold=None, every=1, normalize_steps=False)
    w = torch.zeros(6, 5)
    pred.bind({"w": w})
    # Energy 100 along e0, 10 along e1, 1 along e2: 0.9 of it needs e0 only (100/111).
    scales = torch.tensor([10.0, 10**0.5, 1.0, 0.0, 0.0])
    for target in _gradients_in(torch.diag(scales)[:3], rows=6, steps=200, seed=0):
        pred.observe(["w"], [w], [target])
    pred.end_task(["w"], [w])
    (m,) = subspace_bases(pred).values()
    assert m.shape == (5, 1) and _orthonormal(m)
    assert abs(float(m[0, 0])) == pytest.approx(1.0, abs=0.02)


def test_basis_grows_only_by_the_residual_and_stays_orthonormal_over_tasks() -> None:
    pred = SubspacePredictor(threshold=0.99, input_threshold=None, every=1)
    w = torch.zeros(4, 8)
    pred.bind({"w": w})
    eye = torch.eye(8)
    dims = []
    for task, span in enumerate([eye[:2], eye[1:3], eye[1:3], eye[4:7]]):
        for target in _gradients_in(span, rows=4, steps=50, seed=task):
            pred.observe(["w"], [w], [target])
        pred.end_task(["w"], [w])
        dims.append(pred.subspace_dims()["w"])
        assert _orthonormal(subspace_bases(pred)["w"])
    # e0,e1 -> +e2 (e1 known) -> nothing new (the same span again) -> +e4..e6.
    assert dims == [2, 3, 3, 6]
    # 6 of 8 directions: the 2-column complement is what is stored.
    assert pred.state_floats() == 8 * 2
    assert pred.num_old_tasks == 4


def test_a_basis_past_half_the_fan_in_is_stored_as_its_complement_with_the_same_rule() -> None:
    pred = SubspacePredictor(threshold=0.999, input_threshold=None, every=1)
    w, b = torch.zeros(5, 7), torch.zeros(5)
    names = ["l.weight", "l.bias"]
    pred.bind(dict(zip(names, (w, b))))
    g = torch.Generator().manual_seed(0)
    span = torch.eye(8)[:6]  # 6 of the 8 columns of [W, b]
    for target in _gradients_in(span, rows=5, steps=40, seed=1):
        pred.observe(names, [w, b], [target[:, :7].clone(), target[:, 7].clone()])
    pred.end_task(names, [w, b])
    assert pred.subspace_dims() == {"l.weight": 6} and pred.state_floats() == 8 * 2
    m = pred.basis("l.weight")
    gw, gb = torch.randn(5, 7, generator=g), torch.randn(5, generator=g)
    full = torch.cat([gw, gb[:, None]], 1)
    expected = full - full @ m @ m.T
    logged = pred.rewrite_(names, [w, b], [gw, gb])
    torch.testing.assert_close(torch.cat([gw, gb[:, None]], 1), expected, atol=1e-5, rtol=0)
    removed = float((full @ m).pow(2).sum() / full.pow(2).sum())
    assert float(logged) == pytest.approx(removed, abs=1e-5)


def test_projection_removes_the_component_in_the_protected_subspace_only() -> None:
    pred = SubspacePredictor(threshold=0.999, input_threshold=None, every=1)
    w, b = torch.zeros(3, 4), torch.zeros(3)
    pred.bind({"layer.weight": w, "layer.bias": b})
    g = torch.Generator().manual_seed(0)
    for _ in range(20):  # gradients only along input 0 and the bias column
        gw = torch.zeros(3, 4)
        gw[:, 0] = torch.randn(3, generator=g)
        pred.observe(["layer.weight", "layer.bias"], [w, b], [gw, torch.randn(3, generator=g)])
    pred.end_task(["layer.weight", "layer.bias"], [w, b])
    assert pred.subspace_dims() == {"layer.weight": 2}  # [dW, db] is 3 x (4 + 1)
    gw, gb = torch.ones(3, 4), torch.ones(3)
    logged = pred.rewrite_(["layer.weight", "layer.bias"], [w, b], [gw, gb])
    torch.testing.assert_close(gw[:, 1:], torch.ones(3, 3))  # outside the subspace: untouched
    torch.testing.assert_close(gw[:, 0], torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(gb, torch.zeros(3), atol=1e-5, rtol=0)
    assert float(logged) == pytest.approx(6 / 15, abs=1e-4)


def test_sign_in_basis_keeps_components_that_also_help_the_old_task() -> None:
    pred = SubspacePredictor(threshold=0.99, input_threshold=None, every=1, in_basis="sign")
    end = torch.zeros(1, 2)
    pred.bind({"w": end})
    for _ in range(10):  # task 1: gradients along input 0 only, ending at W* = 0
        pred.observe(["w"], [end], [torch.tensor([[1.0, 0.0]])])
    pred.end_task(["w"], [end])
    assert pred.subspace_dims() == {"w": 1}
    # At W = [0.5, 0]: the old task's modelled gradient along e0 is positive (pull back to 0).
    theta = torch.tensor([[0.5, 0.0]])
    agree, disagree = torch.tensor([[2.0, 1.0]]), torch.tensor([[-2.0, 1.0]])
    pred.rewrite_(["w"], [theta], [agree])
    pred.rewrite_(["w"], [theta], [disagree])
    assert agree.tolist() == [[2.0, 1.0]]  # the step -g moves back towards W*: kept
    assert disagree.tolist() == [[0.0, 1.0]]  # it would move away: removed, as "project" does
    restored = SubspacePredictor(in_basis="sign")  # (sign mode always stores the basis)
    restored.load_state_dict(pred.state_dict())
    assert torch.equal(restored.state_dict()["taylor_k"]["w"], pred.state_dict()["taylor_k"]["w"])


def test_each_step_enters_the_second_moment_with_unit_energy() -> None:
    # Task 1: 10 large early steps along e0, then 30 small late ones along e1.
    steps = [torch.tensor([[100.0, 0.0, 0.0]])] * 10 + [torch.tensor([[0.0, 1.0, 0.0]])] * 30
    dims = {}
    for normalize in (True, False):
        pred = SubspacePredictor(threshold=0.9, every=1, normalize_steps=normalize, late_weight=1.0)
        w = torch.zeros(1, 3)
        pred.bind({"w": w})
        for target in steps:
            pred.observe(["w"], [w], [target.clone()])
        pred.end_task(["w"], [w])
        dims[normalize] = pred.basis("w").abs().round().T.tolist()
    # Unit energy per step: 10 of 40 along e0, 30 along e1, so 0.9 needs both. Raw energy:
    # e0 holds 100,000 of 100,030 and the late direction is left free.
    assert dims[True] in (
        [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]],
        [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]],
    )
    assert dims[False] == [[1.0, 0.0, 0.0]]


def test_the_sign_modes_taylor_model_keeps_the_gradients_real_scale() -> None:
    models = []
    for normalize in (True, False):
        pred = SubspacePredictor(every=1, in_basis="sign", normalize_steps=normalize)
        w = torch.zeros(2, 3)
        pred.bind({"w": w})
        for target in _gradients_in(torch.eye(3)[:2] * 3.0, rows=2, steps=20, seed=0):
            pred.observe(["w"], [w], [target])
        pred.end_task(["w"], [w])
        models.append(pred.state_dict()["taylor_k"]["w"])
    # Unit-energy steps change the basis statistic, not the modelled old-task gradient's scale
    # (equal here: every step of this task has the same distribution of energies).
    torch.testing.assert_close(models[0].abs().sum(), models[1].abs().sum(), rtol=0.25, atol=0)


def test_sampled_rows_estimate_the_same_subspace() -> None:
    eye = torch.eye(16)
    exact = SubspacePredictor(threshold=0.95, input_threshold=None, every=1)
    sampled = SubspacePredictor(threshold=0.95, input_threshold=None, every=1, sample_rows=4)
    w = torch.zeros(32, 16)
    for pred in (exact, sampled):
        pred.bind({"w": w})
        for target in _gradients_in(eye[:3] * torch.tensor([[3.0], [2.0], [1.0]]), 32, 100, 0):
            pred.observe(["w"], [w], [target])
        pred.end_task(["w"], [w])
    a, b = subspace_bases(exact)["w"], subspace_bases(sampled)["w"]
    torch.testing.assert_close(a @ a.T, b @ b.T, atol=1e-3, rtol=0)


def test_layers_near_full_rank_are_warned_about_once() -> None:
    pred = SubspacePredictor(threshold=0.999, input_threshold=None, every=1)
    w = torch.zeros(8, 3)
    pred.bind({"w": w})
    g = torch.Generator().manual_seed(0)
    with pytest.warns(UserWarning, match=r"'w'.*3 of its 3 input directions"):
        for _ in range(10):
            pred.observe(["w"], [w], [torch.randn(8, 3, generator=g)])
        pred.end_task(["w"], [w])


def test_layer_thresholds_override_the_default_per_weight() -> None:
    pred = SubspacePredictor(threshold=0.99, input_threshold=0.5, layer_thresholds={"b": 0.7})
    pred.bind({"a": torch.zeros(2, 2), "b": torch.zeros(2, 2), "c": torch.zeros(2, 2)})
    assert [pred.threshold_of(n) for n in "abc"] == [0.5, 0.7, 0.99]


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"threshold": 1.5}, "threshold"),
        ({"threshold": "0.9"}, "threshold"),
        ({"input_threshold": 0.0}, "input_threshold"),
        ({"every": 0}, "every"),
        ({"sample_rows": 0}, "sample_rows"),
        ({"layer_thresholds": {"w": 2.0}}, "layer_thresholds"),
        ({"layer_thresholds": [0.9]}, "layer_thresholds"),
        ({"seed": 1.5}, "seed"),
        ({"in_basis": "average"}, "in_basis"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=f"`{name}"):
        SubspacePredictor(**kwargs)


def _first_task_loss_increase(core: MetaGrad | None) -> float:
    """Train task 0 then task 1 in a plain PyTorch loop (with ``core`` or without); return how
    much task 0's loss rose during task 1."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3))
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    if core is not None:
        core.bind(model.named_parameters())
    x0, y0 = next(iter(loader(0, batch_size=128)))
    losses = []
    for task in range(2):
        for x, y in loader(task):
            for _ in range(3):
                opt.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                if core is not None:
                    core.step()  # between backward() and step(): rewrites .grad
                opt.step()
        if core is not None:
            assert core.end_task()
        losses.append(float(nn.functional.cross_entropy(model(x0), y0)))
    return losses[1] - losses[0]


def test_the_core_works_in_a_plain_pytorch_loop_and_protects_the_first_task() -> None:
    core = MetaGrad(SubspacePredictor(every=1))
    protected = _first_task_loss_increase(core)
    assert core.num_old_tasks == 2
    assert protected < 0.5 * _first_task_loss_increase(None)


def test_a_version_1_state_without_step_energies_still_loads() -> None:
    pred = SubspacePredictor(every=1)
    w = torch.zeros(3, 4)
    pred.bind({"w": w})
    pred.observe(["w"], [w], [torch.ones(3, 4)])
    old = {k: v for k, v in pred.state_dict().items() if k != "energy"}
    old["version"] = 1  # written before normalize_steps
    restored = SubspacePredictor(every=1)
    restored.load_state_dict(old)
    assert torch.equal(restored.state_dict()["cov"]["w"], pred.state_dict()["cov"]["w"])
    assert restored.state_dict()["version"] == SubspacePredictor._state_version
    assert restored.state_dict()["energy"] == {}
