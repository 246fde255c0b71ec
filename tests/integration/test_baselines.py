"""The EWC, online EWC, SI and MAS baselines through tiny real Trainers on CPU."""

from __future__ import annotations

import doctest
import io
import sys
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import (
    PENALTY_BASELINES,
    DictDataset,
    GradSpy,
    ManualModule,
    TinyClassifier,
    assert_same_state,
    loader,
    make_trainer,
)
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import lightning_metagrad.baselines as baselines_pkg
from lightning_metagrad.baselines import (
    EWCCallback,
    MASCallback,
    OnlineEWCCallback,
    SICallback,
)
from lightning_metagrad.baselines import ewc as ewc_mod
from lightning_metagrad.baselines import mas as mas_mod
from lightning_metagrad.baselines import si as si_mod

ALL = list(PENALTY_BASELINES)


def make(cls: type, strength: float = 1.0) -> Any:
    """A baseline with few importance batches (fast)."""
    if cls is MASCallback:
        return cls(strength=strength, importance_batches=2)
    if cls is SICallback:
        return cls(strength=strength)
    return cls(strength=strength, fisher_batches=2)


class Classifier(TinyClassifier):
    """A tiny MLP on 6 inputs with dropout that logs its loss; dict or tuple batches; a loss
    tensor or {"loss": ...}; plain or momentum (0.9) SGD."""

    def __init__(self, dropout: float = 0.0, momentum: bool = False, return_dict: bool = False):
        super().__init__(optimizer="momentum" if momentum else "sgd", lr=0.1)
        self.net = nn.Sequential(nn.Linear(6, 8), nn.Dropout(dropout), nn.ReLU(), nn.Linear(8, 3))
        self.return_dict = return_dict

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        loss = super().training_step(batch, batch_idx)
        self.log("train_loss", loss)
        return {"loss": loss} if self.return_dict else loss


class Regression(pl.LightningModule):
    """``f(x) = W x`` with MSE loss and plain SGD: every importance has a closed form."""

    def __init__(self, lr: float = 0.05, zero_loss: bool = False):
        super().__init__()
        self.layer = nn.Linear(4, 3, bias=False)
        self.lr = lr
        self.zero_loss = zero_loss

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = (batch["x"], batch["y"]) if isinstance(batch, dict) else batch
        if self.zero_loss:  # gradients exist but are zero: .grad holds only the penalty
            return (self.layer.weight * 0.0).sum()
        return (self(x) - y).square().mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def class_loader(task: int, dict_batches: bool = False, shuffle: bool = True) -> DataLoader:
    g = torch.Generator().manual_seed(task)
    x, y = torch.randn(64, 6, generator=g), torch.randint(0, 3, (64,), generator=g)
    ds: Dataset = DictDataset(x, y, task) if dict_batches else TensorDataset(x, y)
    return DataLoader(ds, batch_size=16, shuffle=shuffle)


def regression_data(task: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + task)
    return torch.randn(32, 4, generator=g), torch.randn(32, 3, generator=g)


def regression_loader(task: int, dict_batches: bool = False) -> DataLoader:
    x, y = regression_data(task)
    ds: Dataset = DictDataset(x, y, task) if dict_batches else TensorDataset(x, y)
    return DataLoader(ds, batch_size=8, shuffle=False)


def params_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


# ---------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("dict_batches", [False, True], ids=["tuple", "dict"])
@pytest.mark.parametrize("cls", ALL)
def test_strength_zero_is_bitwise_the_run_without_callback(cls: type, dict_batches: bool) -> None:
    # Dropout, momentum and shuffled loaders: any RNG use, .grad or mode change by the
    # importance estimate would show in the parameters of task 2.
    def run(callbacks: list) -> list[torch.Tensor]:
        pl.seed_everything(0, verbose=False)
        model = Classifier(dropout=0.2, momentum=True, return_dict=dict_batches)
        for task in range(2):
            make_trainer(callbacks, max_steps=6).fit(model, class_loader(task, dict_batches))
        return params_of(model)

    cb = make(cls, strength=0.0)
    with_cb, naive = run([cb]), run([])
    assert cb.num_tasks == 2 and cb.terms
    assert all(torch.equal(a, b) for a, b in zip(with_cb, naive))


@pytest.mark.parametrize("cls", ALL)
def test_penalty_gradient_matches_the_formula(cls: type) -> None:
    g = torch.Generator().manual_seed(0)
    model = Regression(zero_loss=True)
    theta = model.layer.weight.detach().clone()
    anchors = [torch.randn(3, 4, generator=g) for _ in range(2)]
    omegas = [torch.rand(3, 4, generator=g) for _ in range(2)]
    n_terms = 2 if cls is EWCCallback else 1
    cb = make(cls, strength=0.7)
    state = cb.state_dict()
    state["terms"] = [
        {"anchors": {"layer.weight": anchors[i]}, "importances": {"layer.weight": omegas[i]}}
        for i in range(n_terms)
    ]
    state["num_tasks"] = n_terms
    cb.load_state_dict(state)

    expected_penalty_grad = torch.autograd.grad(cb.penalty(model), model.layer.weight)[0]
    spy = GradSpy(only=["layer.weight"])
    make_trainer([cb, spy], max_steps=1).fit(model, regression_loader(0))

    scale = 2 * 0.7 if cls is SICallback else 0.7  # SI: c Σ Ω(θ-θ*)², the others λ/2 Σ ...
    by_hand = sum(scale * omegas[i] * (theta - anchors[i]) for i in range(n_terms))
    torch.testing.assert_close(spy.of("layer.weight")[0], by_hand)
    torch.testing.assert_close(spy.of("layer.weight")[0], expected_penalty_grad)
    torch.testing.assert_close(model.layer.weight.detach(), theta - 0.05 * by_hand)


def _closed_form_importances(theta: torch.Tensor, task: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch-level empirical Fisher and MAS importance over the first 2 batches of 8."""
    x, y = regression_data(task)
    fisher, mas = torch.zeros_like(theta), torch.zeros_like(theta)
    for b in range(2):
        xb, yb = x[8 * b : 8 * b + 8], y[8 * b : 8 * b + 8]
        # d/dW mean((W x - y)²) = 2/(B·3) (W X^T - Y^T) X ; d/dW mean_k ||W x_k||² = 2 W X^T X / B
        fisher += ((2 / (8 * 3)) * (theta @ xb.T - yb.T) @ xb).square() / 2
        mas += (2 * theta @ xb.T @ xb / 8).abs() / 2
    return fisher, mas


@pytest.mark.parametrize("dict_batches", [False, True], ids=["tuple", "dict"])
def test_fisher_and_mas_importances_match_closed_form(dict_batches: bool) -> None:
    model = Regression()
    theta = model.layer.weight.detach().clone()
    trainer = make_trainer([], max_steps=1)
    f0, m0 = _closed_form_importances(theta, 0)
    f1, m1 = _closed_form_importances(theta, 1)
    ewc, online = EWCCallback(fisher_batches=2), OnlineEWCCallback(gamma=0.5, fisher_batches=2)
    mas = MASCallback(importance_batches=2)
    for cb in (ewc, online, mas):  # two tasks ended by hand, parameters unchanged between
        for task in range(2):
            cb.consolidate(trainer, model, dataloader=regression_loader(task, dict_batches))

    assert [imp["layer.weight"].shape for _, imp in ewc.terms] == [(3, 4), (3, 4)]
    torch.testing.assert_close(ewc.terms[0][1]["layer.weight"], f0)  # one term per task
    torch.testing.assert_close(ewc.terms[1][1]["layer.weight"], f1)
    ((anchor, fisher),) = online.terms
    torch.testing.assert_close(fisher["layer.weight"], 0.5 * f0 + f1)  # F <- γF + F_new
    torch.testing.assert_close(mas.terms[0][1]["layer.weight"], m0 + m1)  # Ω summed
    assert torch.equal(anchor["layer.weight"], theta) and ewc.num_tasks == 2


class PathSpy(Callback):
    """Placed before SI: records raw gradients, parameters after each step and ω at the end."""

    def __init__(self, si: SICallback) -> None:
        self.si = si
        self.grads: list[torch.Tensor] = []
        self.thetas: list[torch.Tensor] = []
        self.omega: torch.Tensor | None = None

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.thetas = [pl_module.layer.weight.detach().clone()]

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self.grads.append(pl_module.layer.weight.grad.detach().clone())

    def on_train_batch_end(self, *args: Any) -> None:
        self.thetas.append(args[1].layer.weight.detach().clone())

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.omega = self.si.path_integral["layer.weight"].clone()


def test_si_path_integral_is_nonzero_on_cpu_and_exact() -> None:
    # Regression test for a peer's bug: `p.detach().cpu()` snapshots are live views on CPU,
    # so Δθ and ω were always 0 and SI silently equalled plain training.
    si = SICallback(strength=1.0, damping=0.1)
    spy = PathSpy(si)
    model = Regression(lr=0.05)
    make_trainer([spy, si], max_steps=6).fit(model, regression_loader(0))

    # Plain SGD on task 1 (no penalty yet): Δθ = -lr·g, so ω = Σ_t -g_t·Δθ_t = Σ_t lr·g_t².
    assert spy.omega is not None and spy.omega.abs().sum() > 0
    torch.testing.assert_close(spy.omega, sum(0.05 * g.square() for g in spy.grads))
    steps = [b - a for a, b in zip(spy.thetas, spy.thetas[1:])]
    torch.testing.assert_close(spy.omega, sum(-g * d for g, d in zip(spy.grads, steps)))
    start, end = spy.thetas[0], spy.thetas[-1]
    ((anchors, omega_big),) = si.terms
    torch.testing.assert_close(omega_big["layer.weight"], spy.omega / ((end - start) ** 2 + 0.1))
    assert torch.equal(anchors["layer.weight"], end)

    anchors_seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    class AnchorSpy(Callback):  # during task 2, θ* must stay put while θ moves
        def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
            anchor = si.terms[0][0]["layer.weight"].clone()
            anchors_seen.append((anchor, pl_module.layer.weight.detach().clone()))

    make_trainer([si, AnchorSpy()], max_steps=4).fit(model, regression_loader(1))
    assert all(torch.equal(anchor, end) for anchor, _ in anchors_seen)
    assert not torch.equal(anchors_seen[-1][1], end) and si.num_tasks == 2


# ---------------------------------------------------------------------------- state


@pytest.mark.parametrize("cls", ALL)
def test_state_round_trips_through_a_real_checkpoint(cls: type, tmp_path: Any) -> None:
    cb = make(cls)
    trainer = make_trainer([cb], max_steps=4)
    trainer.fit(Classifier(), class_loader(0))
    path = str(tmp_path / "task1.ckpt")
    trainer.save_checkpoint(path)
    saved = cb.state_dict()
    assert cb.state_key in torch.load(path, weights_only=True)["callbacks"]

    resumed, seen = make(cls), {}

    class Probe(Callback):
        def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
            seen["state"] = resumed.state_dict()

    make_trainer([resumed, Probe()], max_steps=8).fit(Classifier(), class_loader(1), ckpt_path=path)
    assert_same_state(seen["state"], saved)
    assert saved["num_tasks"] == 1 and resumed.num_tasks == 2


def test_si_state_mid_task_survives_weights_only_load() -> None:
    si, states = SICallback(strength=1.0), []

    class Grab(Callback):
        def on_train_batch_end(self, *args: Any) -> None:
            buffer = io.BytesIO()
            torch.save(si.state_dict(), buffer)
            states.append(buffer.getvalue())

    make_trainer([si, Grab()], max_steps=3).fit(Regression(), regression_loader(0))
    state = torch.load(io.BytesIO(states[-1]), weights_only=True)
    restored = SICallback(strength=1.0)
    restored.load_state_dict(state)
    assert restored.path_integral["layer.weight"].abs().sum() > 0
    assert_same_state(restored.state_dict(), state)


# ---------------------------------------------------------------------------- errors


class TwoOptimizers(Classifier):
    def configure_optimizers(self) -> Any:
        return [
            torch.optim.SGD(self.net[0].parameters()),
            torch.optim.SGD(self.net[3].parameters()),
        ]


@pytest.mark.parametrize("cls", ALL)
def test_manual_optimization_raises(cls: type) -> None:
    with pytest.raises(MisconfigurationException, match="manual optimization"):
        make_trainer([make(cls)], max_steps=2).fit(ManualModule(), loader(0))


def test_several_optimizers_raise() -> None:
    # Lightning refuses first (advising manual optimization); the note says what to do.
    with pytest.raises(RuntimeError, match="multiple optimizers") as err:
        make_trainer([EWCCallback()], max_steps=2).fit(TwoOptimizers(), class_loader(0))
    if sys.version_info >= (3, 11):  # exception notes
        notes = "\n".join(getattr(err.value, "__notes__", []))
        assert "EWCCallback supports exactly one optimizer" in notes


def test_mas_forward_batch_unknown_layout_says_to_override() -> None:
    with pytest.raises(TypeError, match="override `forward_batch"):
        MASCallback().forward_batch(nn.Linear(6, 3), torch.ones(2, 6))

    class TensorBatchMAS(MASCallback):
        def forward_batch(self, pl_module: nn.Module, batch: Any) -> torch.Tensor:
            return pl_module(batch)

    mas = TensorBatchMAS(importance_batches=1)
    loader = DataLoader(torch.randn(8, 4), batch_size=4)  # bare tensor batches
    mas.consolidate(make_trainer([], max_steps=1), Regression(), dataloader=loader)
    assert mas.terms[0][1]["layer.weight"].abs().sum() > 0


# ---------------------------------------------------------------------------- behaviour


@pytest.mark.parametrize("cls", ALL)
def test_frozen_parameters_are_skipped(cls: type) -> None:
    model = Classifier()
    model.net[0].requires_grad_(False)
    frozen = model.net[0].weight.detach().clone()
    cb = make(cls, strength=10.0)
    for task in range(2):
        make_trainer([cb], max_steps=3).fit(model, class_loader(task))
    assert model.net[0].weight.grad is None and torch.equal(model.net[0].weight, frozen)
    assert set(cb.terms[-1][1]) == {"net.3.weight", "net.3.bias"}


def test_strength_changes_training_and_a_finished_trainer_adds_no_task() -> None:
    def run(strength: float) -> list[torch.Tensor]:
        pl.seed_everything(0, verbose=False)
        model, cb = Classifier(), EWCCallback(strength=strength, fisher_batches=2)
        for task in range(2):
            make_trainer([cb], max_steps=4).fit(model, class_loader(task))
        trainer = make_trainer([cb], max_steps=4)
        trainer.fit(model, class_loader(2))
        trainer.fit(model, class_loader(2))  # already at max_steps: trains nothing
        assert cb.num_tasks == 3 and len(cb.terms) == 3  # EWC keeps one term per task
        return params_of(model)

    assert not all(torch.equal(a, b) for a, b in zip(run(0.0), run(50.0)))


class SkipsEveryBatch(Classifier):
    def training_step(self, batch: Any, batch_idx: int) -> None:
        return None  # Lightning then makes no optimizer step


@pytest.mark.filterwarnings("ignore:`training_step` returned `None`")
def test_fit_without_optimizer_step_adds_no_task() -> None:
    cb = make(SICallback)
    with pytest.warns(UserWarning, match="no optimizer step"):
        make_trainer([cb], max_steps=2).fit(SkipsEveryBatch(), class_loader(0))
    assert cb.num_tasks == 0 and not cb.terms


def test_too_strong_penalty_for_sgd_warns() -> None:
    model, cb = Classifier(), EWCCallback(strength=1e7, fisher_batches=2)
    make_trainer([cb], max_steps=2).fit(model, class_loader(0))
    with pytest.warns(UserWarning, match="stability limit"):
        make_trainer([cb], max_steps=1).fit(model, class_loader(1))


@pytest.mark.parametrize("module", [baselines_pkg, ewc_mod, si_mod, mas_mod])
def test_docstring_examples_run(module: Any) -> None:
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
