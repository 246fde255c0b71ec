"""The engine, MetaGrad, in plain training loops (no Trainer): the whole method."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import assert_imports_without_lightning
from torch import nn

from lightning_metagrad import (
    AnchoredPredictor,
    MetaGrad,
    Runtime,
    StepReport,
    SubspacePredictor,
)
from lightning_metagrad.boundaries import BatchTaskIdBoundaries, NewFitBoundaries
from lightning_metagrad.boundaries.sources import TaskBoundarySource


def _data(seed: int, n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    teacher = torch.randn(8, 3, generator=g)
    return x, (x @ teacher).argmax(1)


def _train_task(
    core: MetaGrad, model: nn.Module, opt: torch.optim.Optimizer, seed: int, steps: int = 20
) -> list[StepReport]:
    x, y = _data(seed)
    reports = []
    for i in range(steps):
        batch = slice((i * 16) % 64, (i * 16) % 64 + 16)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
        report = core.before_optimizer_step()
        opt.step()
        reports.append(report if report is not None else core.last_report)
    return reports


def _protected_share(core: MetaGrad, layer: nn.Linear, dw: torch.Tensor, db: torch.Tensor) -> float:
    """The share of a layer's step ``[dW, db]`` inside its protected input subspace."""
    predictor = core.predictor
    assert isinstance(predictor, SubspacePredictor)
    name = next(n for n, p in core.params.items() if p is layer.weight)
    joint = torch.cat([dw, db[:, None]], dim=1)
    inside = joint @ predictor.basis(name)
    return float(inside.pow(2).sum() / joint.pow(2).sum().clamp_min(1e-30))


@pytest.mark.slow  # a fresh interpreter
def test_importing_the_core_does_not_import_lightning() -> None:
    assert_imports_without_lightning(
        "lightning_metagrad.engine",
        "lightning_metagrad.predictors",
        "lightning_metagrad.boundaries",
    )


@pytest.mark.parametrize("optimizer", ["adam", "sgd_momentum"])
def test_the_core_protects_the_update_an_adaptive_optimizer_applies(optimizer: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    if optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    core = MetaGrad(SubspacePredictor(every=1, threshold=0.9))
    core.bind(model)
    assert core.use_optimizer(opt) == "update"
    _train_task(core, model, opt, seed=0)
    core.start_task()
    w, b = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    reports = _train_task(core, model, opt, seed=1)
    dw, db = w - model[0].weight.detach(), b - model[0].bias.detach()
    assert all(r is not None and "0.weight" in r.rewritten for r in reports)
    assert _protected_share(core, model[0], dw, db) < 1e-6


class Recording(TaskBoundarySource):
    """Records what detection is fed each step; never declares a switch."""

    name = "recording"

    def __init__(self) -> None:
        self.fed: list[dict[str, torch.Tensor]] = []

    @property
    def uses_gradients(self) -> bool:
        return True

    def on_gradients(self, names, thetas, targets) -> bool:  # type: ignore[no-untyped-def]
        self.fed.append({n: t.clone() for n, t in zip(names, targets)})
        return False


def test_in_update_mode_detection_reads_the_steps_gradients_not_the_optimizers_update() -> None:
    # Adam's update (per-coordinate scaled, with momentum) is not the task's gradient pattern
    # the signals test; the rule still acts on the update.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    source = Recording()
    core = MetaGrad(SubspacePredictor(every=1), boundaries=source)
    core.bind(model)
    assert core.use_optimizer(opt) == "update"
    x, y = _data(0)
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        grad = model[0].weight.grad.clone()
        before = model[0].weight.detach().clone()
        core.before_optimizer_step()
        opt.step()
        update = before - model[0].weight.detach()
        fed = source.fed[-1]["0.weight"]
        assert torch.equal(fed, grad)
        assert not torch.allclose(fed / fed.norm(), update / update.norm(), atol=1e-2)
    assert len(source.fed) == 3


def test_gradient_mode_rewrites_grad_before_the_optimizer_step() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    core = MetaGrad(SubspacePredictor(every=1))
    core.bind(model)
    assert core.use_optimizer(opt) == "gradient"
    _train_task(core, model, opt, seed=0)
    core.start_task()
    x, y = _data(1)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    report = core.before_optimizer_step()
    assert report is not None and report.learned and report.held_back is not None
    assert _protected_share(core, model[0], model[0].weight.grad, model[0].bias.grad) < 1e-6


def test_a_model_changed_between_fits_is_folded_at_the_binding_it_trained_with() -> None:
    torch.manual_seed(0)
    core = MetaGrad(SubspacePredictor(every=1), boundaries=NewFitBoundaries())
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    core.begin_fit(model)
    core.use_optimizer(opt)
    _train_task(core, model, opt, seed=0)
    core.end_fit()
    # Task 2 grows the head from 3 to 5 classes: the next fit binds another model.
    grown = nn.Sequential(model[0], nn.ReLU(), nn.Linear(16, 5))
    assert core.begin_fit(grown)
    assert core.num_old_tasks == 1
    opt = torch.optim.SGD(grown.parameters(), lr=0.1)
    core.use_optimizer(opt)
    x, _ = _data(1)
    y = torch.randint(0, 5, (64,))
    opt.zero_grad()
    nn.functional.cross_entropy(grown(x), y).backward()
    report = core.before_optimizer_step()  # no shape error
    # The reshaped head is free; the first layer (same shape) is protected.
    assert report is not None and report.rewritten == ["0.weight", "0.bias"]


def test_a_non_finite_step_is_not_learned_from() -> None:
    model = nn.Linear(4, 2)
    core = MetaGrad(AnchoredPredictor())
    core.bind(model)
    core.use_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    model(torch.randn(3, 4)).sum().backward()
    model.weight.grad[0, 0] = float("nan")
    report = core.before_optimizer_step()
    assert report is not None and report.finite is False and not report.learned
    assert core.skipped_steps == 1 and core.steps_in_task == 0


def test_a_task_id_in_the_batch_starts_and_returns_to_tasks() -> None:
    model = nn.Linear(4, 2)
    core = MetaGrad(AnchoredPredictor(), boundaries=BatchTaskIdBoundaries())
    core.bind(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    core.use_optimizer(opt)
    seen = []
    for task_id in ["a", "a", "b", "b", "a"]:
        core.observe_batch({"task_id": task_id})
        opt.zero_grad()
        model(torch.randn(3, 4)).pow(2).sum().backward()
        core.before_optimizer_step()
        opt.step()
        seen.append((core.task_index, core.learning))
    assert seen == [(0, True), (0, True), (1, True), (1, True), (0, False)]
    assert core.num_old_tasks == 2


def test_warnings_go_through_the_runtime() -> None:
    messages: list[str] = []
    model = nn.Linear(4, 2)
    core = MetaGrad(runtime=Runtime(warn=messages.append))
    core.bind(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        core.start_task()  # task 0 had no step
    assert len(messages) == 1 and "before any optimizer step" in messages[0]


def test_state_round_trips_through_a_new_engine() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    core = MetaGrad(SubspacePredictor(every=1))
    core.bind(model)
    core.use_optimizer(opt)
    _train_task(core, model, opt, seed=0)
    core.start_task()
    state = core.state_dict()
    other = MetaGrad(SubspacePredictor(every=1))
    other.load_state_dict(state)
    other.bind(model)
    assert (other.task_index, other.num_old_tasks) == (1, 1)
    assert torch.equal(other.predictor.basis("0.weight"), core.predictor.basis("0.weight"))


def test_bad_arguments_name_the_argument() -> None:
    with pytest.raises(ValueError, match="`predictor`"):
        MetaGrad("nope")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`boundaries`"):
        MetaGrad(boundaries="fit")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`target`"):
        MetaGrad(target="grad")  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="bind"):
        MetaGrad().start_task()


def _fit_task(core: MetaGrad, model: nn.Module, seed: int, steps: int = 20) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    core.begin_fit(model)
    core.use_optimizer(opt)
    _train_task(core, model, opt, seed, steps)
    core.end_fit()


def test_a_layer_inserted_in_front_keeps_the_old_layers_protection_under_its_new_name() -> None:
    torch.manual_seed(0)
    first, head = nn.Linear(8, 16), nn.Linear(16, 3)
    core = MetaGrad(SubspacePredictor(every=1), boundaries=NewFitBoundaries())
    _fit_task(core, nn.Sequential(first, nn.ReLU(), head), seed=0)
    inserted = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), first, nn.ReLU(), head)
    with pytest.warns(UserWarning, match=r"new since the old tasks: \['0.bias', '0.weight'\]"):
        core.begin_fit(inserted)  # folds the task under the old names, then binds
    # The old first layer is now "2.weight" and keeps its (8 + 1)-wide basis; the new
    # layer, "0.weight", is free.
    dims = core.predictor.subspace_dims()
    assert set(dims) == {"2.weight", "4.weight"}
    assert core.predictor.basis("2.weight").shape[0] == 9
    x, y = _data(1)
    nn.functional.cross_entropy(inserted(x), y).backward()
    report = core.step()
    assert report is not None and set(report.rewritten) == {
        "2.weight",
        "2.bias",
        "4.weight",
        "4.bias",
    }


def test_a_layer_pruned_between_tasks_stays_protected_as_weight_orig() -> None:
    from torch.nn.utils import prune

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    core = MetaGrad(SubspacePredictor(every=1), boundaries=NewFitBoundaries())
    _fit_task(core, model, seed=0)
    prune.l1_unstructured(model[0], "weight", amount=0.5)
    core.begin_fit(model)
    x, y = _data(1)
    nn.functional.cross_entropy(model(x), y).backward()
    report = core.step()
    assert report is not None and "0.weight_orig" in report.rewritten
    assert core.predictor.subspace_dims()["0.weight_orig"] > 0


@pytest.mark.parametrize("steps", [[2, 2, 2], [5, 3, 1]])
def test_short_tasks_are_learned_from_and_never_block_the_next(steps: list[int]) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    core = MetaGrad(boundaries=NewFitBoundaries())  # the default: observes every 4th step
    for task, n in enumerate(steps):
        _fit_task(core, model, seed=task, steps=n)
    core.begin_fit(model)
    assert core.num_old_tasks == len(steps)  # each task's first step was observed


def test_parameters_the_old_tasks_trained_that_disappear_are_warned_about() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    core = MetaGrad(SubspacePredictor(every=1), boundaries=NewFitBoundaries())
    _fit_task(core, model, seed=0)
    shorter = nn.Sequential(nn.Linear(8, 3))  # the hidden layer and head are gone
    with pytest.warns(UserWarning, match=r"no longer in the model: \['2.bias', '2.weight'\]"):
        core.begin_fit(shorter)
