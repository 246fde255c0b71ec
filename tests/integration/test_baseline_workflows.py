"""The seven baselines in workflows users really have, each through tiny real Trainers on CPU.

Evaluation of an older checkpoint between tasks, divergence, modules without ``forward()``,
frozen models, a new head per task and parameters without a gradient on some steps. What the
optimizer applied is read from the parameters before and after each step (plain SGD:
``theta' = theta - lr * grad``), the gradient the baseline received from a spy placed before it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import (
    BASELINES,
    LR,
    PENALTY_BASELINES,
    AppliedUpdates,
    GradSpy,
    MultiHead,
    TinyClassifier,
    UnusedBranch,
    assert_same_state,
    loader,
    make_trainer,
)
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_metagrad.baselines import (
    AGEMCallback,
    ERCallback,
    EWCCallback,
    GPMCallback,
    MASCallback,
    OnlineEWCCallback,
    SGPCallback,
    SICallback,
)

QUADRATIC = list(PENALTY_BASELINES)
ALL = list(BASELINES)


def make(cls: type) -> Any:
    """A baseline configured to be fast (few importance batches, a small memory)."""
    if cls in (GPMCallback, SGPCallback):
        return cls(threshold=0.8, samples=32)
    if cls in (AGEMCallback, ERCallback):
        return cls(memory_batches=2)
    if cls is MASCallback:
        return cls(strength=1.0, importance_batches=2)
    if cls is SICallback:
        return cls(strength=1.0)
    return cls(strength=1.0, fisher_batches=2)


def _free_and_edited(spy: AppliedUpdates, free: str, untouched: str | None = None) -> bool:
    """On every step, the parameters named ``free...`` (new since the old tasks) followed plain
    SGD on their received gradient exactly and those named ``untouched...`` had no gradient and
    did not move; whether the baseline changed the others' plain update on some step."""
    edited = False
    for step in spy.steps:
        for name, (before, after, grad) in step.items():
            if untouched is not None and name.startswith(untouched):
                assert grad is None and torch.equal(after, before), name
                continue
            assert grad is not None, name
            plain = before - LR * grad
            if name.startswith(free):
                torch.testing.assert_close(after, plain, rtol=0, atol=1e-6)
            else:
                edited |= float((after - plain).abs().max()) > 1e-6
    return edited


# ---------------------------------------------------------------------------- evaluation


class Evaluated(TinyClassifier):
    """TinyClassifier with test, validation and predict steps."""

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("acc", (self(x).argmax(1) == y).float().mean())

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.test_step(batch, batch_idx)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        return self(batch[0])


@pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")
@pytest.mark.parametrize("cls", ALL)
def test_evaluating_an_older_checkpoint_between_tasks_keeps_the_consolidated_tasks(
    cls: type, tmp_path: Path
) -> None:
    cb, model = make(cls), Evaluated()
    trainer = make_trainer([cb], max_steps=4)
    trainer.fit(model, loader(0))
    task0 = str(tmp_path / "task0.ckpt")
    trainer.save_checkpoint(task0)
    for task in (1, 2):
        make_trainer([cb], max_steps=4).fit(model, loader(task))
    assert cb.num_tasks == 3
    consolidated = cb.state_dict()

    # Each evaluation loads task 0's checkpoint (its weights and its callback state).
    make_trainer([cb]).test(model, loader(0), ckpt_path=task0, verbose=False)
    make_trainer([cb]).validate(model, loader(0), ckpt_path=task0, verbose=False)
    make_trainer([cb]).predict(model, loader(0), ckpt_path=task0)
    assert cb.num_tasks == 3
    assert_same_state(cb.state_dict(), consolidated)

    seen: dict[str, Any] = {}

    class Probe(Callback):
        def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
            seen["state"] = cb.state_dict()

    make_trainer([cb, Probe()], max_steps=4).fit(model, loader(3))
    assert_same_state(seen["state"], consolidated)  # task 4 trains against the three old tasks
    assert cb.num_tasks == 4
    if cls is EWCCallback:
        assert len(cb.terms) == 4
    if cls in (AGEMCallback, ERCallback):
        assert cb.memory.tasks_ended == 4


@pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")
@pytest.mark.parametrize("cls", [EWCCallback, GPMCallback, AGEMCallback])
def test_a_failed_evaluation_does_not_stop_a_later_fit_from_resuming(
    cls: type, tmp_path: Path
) -> None:
    class Broken(Evaluated):
        def test_step(self, batch: Any, batch_idx: int) -> None:
            raise ValueError("broken test_step")

    cb, model = make(cls), Broken()
    trainer = make_trainer([cb], max_steps=8)  # one epoch: the checkpoint resumes cleanly
    trainer.fit(model, loader(0))
    task0 = str(tmp_path / "task0.ckpt")
    trainer.save_checkpoint(task0)
    saved = cb.state_dict()
    make_trainer([cb], max_steps=4).fit(model, loader(1))
    with pytest.raises(ValueError, match="broken test_step"):
        make_trainer([cb]).test(model, loader(0), verbose=False)
    model.train()  # the failed test left it in eval mode
    seen: dict[str, Any] = {}

    class Probe(Callback):
        def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
            seen["state"] = cb.state_dict()

    make_trainer([cb, Probe()], max_steps=12).fit(model, loader(1), ckpt_path=task0)
    assert_same_state(seen["state"], saved)  # `fit` restored task 0's state


# ---------------------------------------------------------------------------- divergence


class NaNAt(TinyClassifier):
    """Its loss is NaN at global step ``nan_at`` (the weights turn NaN with it)."""

    def __init__(self, nan_at: int | None = None) -> None:
        super().__init__(lr=LR)
        self.nan_at = nan_at

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        if self.nan_at is not None and self.trainer.global_step == self.nan_at:
            loss = loss * float("nan")
        return loss


@pytest.mark.parametrize("cls", QUADRATIC)
def test_non_finite_weights_at_a_task_end_are_refused_and_change_nothing(cls: type) -> None:
    cb, model = make(cls), NaNAt()
    make_trainer([cb], max_steps=4).fit(model, loader(0))
    before = {"num_tasks": cb.num_tasks, "terms": cb.state_dict()["terms"]}
    model.nan_at = 1
    # As MetaGradCallback: the task's end warns, the next task's start is refused.
    with pytest.warns(UserWarning, match=r"task 1: .*non-finite.*next `fit` will refuse"):
        make_trainer([cb], max_steps=4).fit(model, loader(1))
    with pytest.raises(RuntimeError, match=r"task 1: .*non-finite.*learning rate"):
        make_trainer([cb], max_steps=4).fit(model, loader(2))
    assert cb.num_tasks == 1
    assert_same_state({"num_tasks": cb.num_tasks, "terms": cb.state_dict()["terms"]}, before)


class NaNWhenEvaluated(TinyClassifier):
    """Finite training, but NaN outputs in eval mode (where the importances are estimated)."""

    def forward(self, x: Tensor) -> Tensor:
        out = super().forward(x)
        return out if self.training else out * float("nan")


@pytest.mark.parametrize("cls", [EWCCallback, OnlineEWCCallback, MASCallback])
def test_a_non_finite_importance_is_refused_and_changes_nothing(cls: type) -> None:
    cb, model = make(cls), NaNWhenEvaluated()
    with pytest.raises(RuntimeError, match=r"importance of parameter .* is not finite"):
        make_trainer([cb], max_steps=3).fit(model, loader(0))
    assert cb.num_tasks == 0 and not cb.terms
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


# ---------------------------------------------------------------------------- MAS outputs


class NoForward(pl.LightningModule):
    """A LightningModule without ``forward()``: its training_step calls ``self.net`` itself."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=LR)


def test_mas_refuses_a_module_without_forward_before_training_and_names_the_fix() -> None:
    counter = GradSpy()
    with pytest.raises(MisconfigurationException, match=r"no `forward\(\)`.*`forward_batch"):
        make_trainer([MASCallback(importance_batches=2), counter], max_steps=20).fit(
            NoForward(), loader(0)
        )
    assert not counter.steps  # refused at fit start, not after the task trained

    class NetMAS(MASCallback):  # the fix the message names
        def forward_batch(self, pl_module: nn.Module, batch: Any) -> Tensor:
            return pl_module.net(batch[0])  # type: ignore[operator]

    mas = NetMAS(importance_batches=2)
    make_trainer([mas], max_steps=4).fit(NoForward(), loader(0))
    assert mas.num_tasks == 1 and float(mas.terms[0][1]["net.0.weight"].sum()) > 0


class ImageDictBatches(TinyClassifier):
    """Dict batches with keys the default ``forward_batch`` does not know."""

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return nn.functional.cross_entropy(self(batch["image"]), batch["label"])


def test_mas_refuses_a_batch_it_cannot_read_on_the_first_step() -> None:
    x, y = next(iter(loader(0, batch_size=128)))
    data = DataLoader([{"image": a, "label": b} for a, b in zip(x, y)], batch_size=16)
    counter = GradSpy()
    with pytest.raises(TypeError, match="override `forward_batch"):
        make_trainer([MASCallback(importance_batches=2), counter], max_steps=20).fit(
            ImageDictBatches(), data
        )
    assert not counter.steps


# ---------------------------------------------------------------------------- frozen models


class InputGradient(TinyClassifier):
    """Its loss has an input-gradient term, so it stays differentiable with every parameter
    frozen: without the refusal a fit runs its steps and changes nothing."""

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        x = x.clone().requires_grad_(True)
        return nn.functional.cross_entropy(self(x), y) + 1e-3 * x.square().mean()


@pytest.mark.parametrize("model_cls", [TinyClassifier, InputGradient])
@pytest.mark.parametrize("cls", ALL)
def test_a_model_without_trainable_parameters_is_refused_with_the_fix(
    cls: type, model_cls: type
) -> None:
    model = model_cls()
    model.requires_grad_(False)
    counter = GradSpy()
    with pytest.raises(MisconfigurationException, match=r"found no trainable parameters.*Unfreeze"):
        make_trainer([make(cls), counter], max_steps=3).fit(model, loader(0))
    assert not counter.steps


class IgnoresItsParameters(TinyClassifier):
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x = batch[0].clone().requires_grad_(True)
        return x.square().mean()  # no parameter in the graph: no parameter gets a gradient


@pytest.mark.parametrize("cls", ALL)
def test_a_fit_in_which_no_parameter_had_a_gradient_says_so(cls: type) -> None:
    cb = make(cls)
    with pytest.warns(UserWarning, match=r"no optimizer step of this `fit` had a gradient"):
        make_trainer([cb], max_steps=3).fit(IgnoresItsParameters(), loader(0))
    assert cb.num_tasks == 0


# ---------------------------------------------------------------------------- model changes


@pytest.mark.parametrize("cls", ALL)
def test_a_new_head_added_between_tasks_follows_the_plain_sgd_update(cls: type) -> None:
    cb, model = make(cls), MultiHead()
    model.add_head()
    make_trainer([cb], max_steps=8).fit(model, loader(0))
    model.add_head()  # heads.1: never seen by task 1
    spy = AppliedUpdates()
    make_trainer([spy, cb], max_steps=6).fit(model, loader(1))
    assert cb.num_tasks == 2 and len(spy.steps) == 6
    edited = _free_and_edited(spy, free="heads.1.", untouched="heads.0.")  # the old head
    assert edited, "the baseline never acted on the body"  # the test would be vacuous


@pytest.mark.parametrize("cls", ALL)
def test_a_parameter_without_a_gradient_on_a_step_is_left_untouched_on_it(cls: type) -> None:
    cb, model = make(cls), UnusedBranch(optimizer="momentum", lr=0.05)
    for task in range(2):
        spy = AppliedUpdates()
        make_trainer([spy, cb], max_steps=6).fit(model, loader(task))
        assert len(spy.steps) == 6
        for i, step in enumerate(spy.steps):
            for name in ("branch.weight", "branch.bias"):
                before, after, grad = step[name]
                assert (grad is None) == (i % 2 == 0)
                if grad is None:  # momentum SGD skips it: neither the step nor the baseline
                    assert torch.equal(before, after)
            assert all(bool(torch.isfinite(a).all()) for _, a, _ in step.values())
    assert cb.num_tasks == 2


@pytest.mark.parametrize("cls", [AGEMCallback, ERCallback])
def test_a_layer_recreated_in_another_shape_is_free_for_the_replay_baselines(cls: type) -> None:
    cb, model = make(cls), TinyClassifier()
    make_trainer([cb], max_steps=8).fit(model, loader(0))
    model.net[2] = nn.Linear(16, 4)  # same names, another shape: the old tasks never trained it
    spy = AppliedUpdates()
    make_trainer([spy, cb], max_steps=6).fit(model, loader(1))
    assert cb.num_tasks == 2 and len(spy.steps) == 6
    edited = _free_and_edited(spy, free="net.2.")
    assert edited or cls is AGEMCallback  # A-GEM edits only conflicting steps


@pytest.mark.parametrize("cls", QUADRATIC)
def test_a_parameter_recreated_in_another_shape_is_refused_by_the_penalties(cls: type) -> None:
    cb, model = make(cls), TinyClassifier()
    make_trainer([cb], max_steps=4).fit(model, loader(0))
    model.net[2] = nn.Linear(16, 4)
    with pytest.raises(MisconfigurationException, match=r"'net.2.weight' has shape \(4, 16\)"):
        make_trainer([cb], max_steps=2).fit(model, loader(1))
    assert cb.num_tasks == 1


# ---------------------------------------------------------------------------- checkpoint layout

LAYOUTS = {
    EWCCallback: {"terms"},
    OnlineEWCCallback: {"terms"},
    MASCallback: {"terms"},
    SICallback: {"terms", "omega", "start"},
    GPMCallback: {"bases"},
    SGPCallback: {"bases", "importance"},
    AGEMCallback: {"memory", "old_shapes", "trained", "num_projections"},
    ERCallback: {"memory", "old_shapes", "trained"},
}


@pytest.mark.parametrize("cls", ALL)
def test_checkpoint_layouts_stay_those_of_version_1(cls: type) -> None:
    cb = make(cls)
    make_trainer([cb], max_steps=4).fit(TinyClassifier(), loader(0))
    state = cb.state_dict()
    assert state["version"] == 1
    assert set(state) == {"version", "num_tasks", "steps_in_task"} | LAYOUTS[cls]
    if "memory" in state:
        memory = state["memory"]
        assert memory["version"] == 1
        keys = {"version", "tasks", "task_ids", "current", "seen", "tasks_ended", "generator"}
        assert set(memory) == keys
    restored = make(cls)
    restored.load_state_dict(state)
    assert_same_state(restored.state_dict(), state)
