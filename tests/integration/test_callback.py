"""MetaGradCallback through real Trainers: the method end to end, state and errors."""

from __future__ import annotations

import copy
import sys
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import (
    AppliedUpdates,
    ManualModule,
    TinyClassifier,
    loader,
    make_trainer,
    paper_callback_kwargs,
    small_callback_kwargs,
)
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_metagrad import MetaGradCallback
from lightning_metagrad.predictors.rules import sign_agreement


def train_tasks(
    model: pl.LightningModule, callbacks: list, tasks: int, steps: int = 8, **kw: Any
) -> None:
    for task in range(tasks):
        make_trainer(callbacks, max_steps=steps, **kw).fit(model, loader(task))


def test_each_fit_starts_a_new_task() -> None:
    cb = MetaGradCallback(**paper_callback_kwargs())
    model = TinyClassifier()
    for task in range(4):
        make_trainer([cb]).fit(model, loader(task))
        assert cb.task_index == task
        assert cb.num_old_tasks == task  # eqs. 6-7: every finished task folded into g
    assert cb.predictor_network is not None


def test_task_ids_in_batches_start_new_tasks_within_one_fit() -> None:
    cb = MetaGradCallback(task_boundaries="batch", **small_callback_kwargs())
    data = torch.utils.data.ConcatDataset([loader(t, dict_batches=True).dataset for t in range(3)])
    dl = torch.utils.data.DataLoader(data, batch_size=16)
    make_trainer([cb], max_steps=len(dl)).fit(TinyClassifier(), dl)
    assert cb.task_index == 2 and cb.num_old_tasks == 2


def test_manual_boundaries_only_change_tasks_by_hand() -> None:
    cb = MetaGradCallback(task_boundaries="manual", **small_callback_kwargs())
    model = TinyClassifier()
    train_tasks(model, [cb], tasks=2)
    assert cb.task_index == 0
    cb.start_new_task(model)
    assert cb.task_index == 1 and cb.num_old_tasks == 1


def test_rewritten_gradient_is_what_sgd_applied() -> None:
    lr = 0.1
    cb = MetaGradCallback(**paper_callback_kwargs())
    model = TinyClassifier(lr=lr)
    train_tasks(model, [cb], tasks=1)
    spy = AppliedUpdates()
    make_trainer([spy, cb], max_steps=4).fit(model, loader(1))
    zeroed_any = False
    for theta, grad, after in spy.flat():
        predicted = cb.predict_old_gradient(theta)
        expected_grad, zeroed = sign_agreement(grad, predicted)  # eq. 5
        zeroed_any |= bool(zeroed.any())
        # Plain SGD: theta' = theta - lr * (rewritten gradient).
        torch.testing.assert_close(after, theta - lr * expected_grad, rtol=0, atol=1e-6)
    assert zeroed_any


def test_average_mode_applies_eq_2() -> None:
    lr = 0.1
    cb = MetaGradCallback(combine="average", **paper_callback_kwargs())
    model = TinyClassifier(lr=lr)
    train_tasks(model, [cb], tasks=2)  # two old tasks folded into g at the next fit
    spy = AppliedUpdates()
    make_trainer([spy, cb], max_steps=3).fit(model, loader(2))
    theta, grad, after = spy.flat()[0]
    expected = (grad + 2 * cb.predict_old_gradient(theta)) / 3
    torch.testing.assert_close(after, theta - lr * expected, rtol=0, atol=1e-6)


def test_update_vector_mode_with_adam_applies_the_rule_to_the_update() -> None:
    cb = MetaGradCallback(**paper_callback_kwargs())
    model = TinyClassifier(optimizer="adam", lr=1e-2)
    train_tasks(model, [cb], tasks=1)
    spy = AppliedUpdates()
    make_trainer([spy, cb], max_steps=4).fit(model, loader(1))
    assert cb.engine.resolved_target == "update"
    for theta, _, after in spy.flat():
        predicted = cb.predict_old_gradient(theta)
        update = theta - after
        # Eq. 5 on the update vector: every coordinate that moved moved along the prediction;
        # a coordinate whose Adam update disagreed kept its value exactly.
        moved = update != 0
        assert bool((update[moved] * predicted[moved] > 0).all())
        assert 0.0 < float(moved.float().mean()) < 1.0


@pytest.mark.parametrize(
    ("optimizer", "expected"), [("sgd", "gradient"), ("momentum", "update"), ("adam", "update")]
)
def test_target_is_chosen_from_the_optimizer(optimizer: str, expected: str) -> None:
    cb = MetaGradCallback(**small_callback_kwargs())
    make_trainer([cb], max_steps=1).fit(TinyClassifier(optimizer=optimizer), loader(0))
    assert cb.engine.resolved_target == expected


def test_explicit_target_overrides_the_choice() -> None:
    cb = MetaGradCallback(target="gradient", **small_callback_kwargs())
    make_trainer([cb], max_steps=1).fit(TinyClassifier(optimizer="adam"), loader(0))
    assert cb.engine.resolved_target == "gradient"


def test_meta_network_trains_during_the_task_and_logs() -> None:
    cb = MetaGradCallback(**paper_callback_kwargs())
    model = TinyClassifier()
    before = copy.deepcopy(cb.meta_network.state_dict())
    make_trainer([cb]).fit(model, loader(0))
    after = cb.meta_network.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("net"))
    trainer = make_trainer([cb], log_every_n_steps=1)
    trainer.fit(model, loader(1))
    logged = trainer.callback_metrics
    assert {"metagrad/meta_loss", "metagrad/zeroed_fraction", "metagrad/task"} <= set(logged)
    assert float(logged["metagrad/task"]) == 1.0
    assert 0.0 <= float(logged["metagrad/zeroed_fraction"]) <= 1.0


class LogCounter(TinyClassifier):
    """Records the global step of each ``self.log`` call of the callback's figures."""

    def __init__(self) -> None:
        super().__init__()
        self.metagrad_log_steps: list[int] = []

    def log(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        if name == "metagrad/task":
            self.metagrad_log_steps.append(self.trainer.global_step)
        super().log(name, value, *args, **kwargs)


def test_figures_are_logged_only_on_the_trainers_logging_steps() -> None:
    model = LogCounter()
    cb = MetaGradCallback(**small_callback_kwargs())
    make_trainer([cb], max_steps=12, log_every_n_steps=4).fit(model, loader(0))
    assert model.metagrad_log_steps == [4, 8, 12]  # after the 4th, 8th and 12th step


def test_state_dict_round_trip_continues_identically() -> None:
    model = TinyClassifier()
    cb = MetaGradCallback(**paper_callback_kwargs())
    train_tasks(model, [cb], tasks=2)
    clone_model = copy.deepcopy(model)
    clone_cb = MetaGradCallback(**paper_callback_kwargs())
    clone_cb.load_state_dict(copy.deepcopy(cb.state_dict()))
    make_trainer([cb]).fit(model, loader(2))
    make_trainer([clone_cb]).fit(clone_model, loader(2))
    for a, b in zip(model.parameters(), clone_model.parameters()):
        assert torch.equal(a, b)
    assert clone_cb.task_index == cb.task_index == 2
    sa, sb = cb.state_dict()["engine"]["predictor"], clone_cb.state_dict()["engine"]["predictor"]
    assert torch.equal(sa["table"]["values"], sb["table"]["values"])


def test_checkpoint_carries_the_callback_state(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = TinyClassifier()
    cb = MetaGradCallback(**paper_callback_kwargs())
    train_tasks(model, [cb], tasks=2)
    trainer = make_trainer([cb])
    trainer.fit(model, loader(2))
    path = tmp_path / "task3.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)  # what Lightning's resume does
    state = ckpt["callbacks"][cb.state_key]
    fresh = MetaGradCallback(**paper_callback_kwargs())
    fresh.load_state_dict(state)
    assert fresh.task_index == 2 and fresh.num_old_tasks == 2
    fresh.engine.bind(model.named_parameters())  # the plain-PyTorch core, no Trainer
    probe = torch.linspace(-0.5, 0.5, sum(p.numel() for p in model.parameters()))
    torch.testing.assert_close(fresh.predict_old_gradient(probe), cb.predict_old_gradient(probe))


class CrashAtStep(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:  # type: ignore[no-untyped-def]
        if trainer.global_step == self.step:
            raise RuntimeError("simulated crash")


def test_crash_mid_task_resumes_exactly_from_the_last_checkpoint(tmp_path) -> None:  # type: ignore[no-untyped-def]
    def first_task() -> tuple[TinyClassifier, MetaGradCallback]:
        pl.seed_everything(0, verbose=False)
        model, cb = TinyClassifier(), MetaGradCallback(**paper_callback_kwargs())
        make_trainer([cb]).fit(model, loader(0))
        return model, cb

    ref_model, ref_cb = first_task()
    make_trainer([ref_cb], max_steps=8).fit(ref_model, loader(1, n=64))

    model, cb = first_task()
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1)
    trainer = make_trainer([cb, ckpt, CrashAtStep(6)], max_steps=8, enable_checkpointing=True)
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer.fit(model, loader(1, n=64))
    # A new process: fresh model and callback, resumed from the step-4 checkpoint.
    new_model, new_cb = TinyClassifier(), MetaGradCallback(**paper_callback_kwargs())
    make_trainer([new_cb], max_steps=8).fit(
        new_model, loader(1, n=64), ckpt_path=tmp_path / "epoch=0-step=4.ckpt"
    )
    assert new_cb.task_index == ref_cb.task_index == 1  # the resumed fit continued task 2
    assert new_cb.num_old_tasks == ref_cb.num_old_tasks == 1
    for a, b in zip(new_model.parameters(), ref_model.parameters()):
        assert torch.equal(a, b)
    ref_state, state = (
        ref_cb.state_dict()["engine"]["predictor"],
        new_cb.state_dict()["engine"]["predictor"],
    )
    for key, value in ref_state["meta"]["net"].items():
        assert torch.equal(value, state["meta"]["net"][key])
    assert torch.equal(ref_state["generator"], state["generator"])


def test_non_finite_gradients_are_skipped_with_a_warning() -> None:
    class NaNAtStep(TinyClassifier):
        def on_after_backward(self) -> None:
            if self.global_step == 2:
                self.net[0].weight.grad[0, 0] = float("nan")  # type: ignore[index]

        def on_before_optimizer_step(self, optimizer) -> None:  # type: ignore[no-untyped-def]
            # Runs after the callbacks: the user's own guard keeps the weights finite.
            for p in self.parameters():
                torch.nan_to_num_(p.grad, nan=0.0)  # type: ignore[arg-type]

    cb = MetaGradCallback(**paper_callback_kwargs())
    model = NaNAtStep()
    with pytest.warns(UserWarning, match="non-finite"):
        make_trainer([cb], max_steps=4).fit(model, loader(0))
    assert cb.engine.skipped_steps == 1
    for p in cb.meta_network.parameters():
        assert torch.isfinite(p).all()


def test_manual_optimization_is_refused() -> None:
    with pytest.raises(MisconfigurationException, match="automatic optimization"):
        make_trainer([MetaGradCallback()]).fit(ManualModule(), loader(0))


def test_several_optimizers_are_refused() -> None:
    class TwoOpts(TinyClassifier):
        def configure_optimizers(self):  # type: ignore[no-untyped-def]
            return [
                torch.optim.SGD(self.net[0].parameters(), lr=0.1),
                torch.optim.SGD(self.net[2].parameters(), lr=0.1),
            ]

    # Lightning refuses several optimizers first (before any callback hook sees them) and
    # advises manual optimization; the callback adds that this would not help, and the fix.
    with pytest.raises(RuntimeError, match="multiple optimizers") as err:
        make_trainer([MetaGradCallback()]).fit(TwoOpts(), loader(0))
    if sys.version_info >= (3, 11):  # exception notes
        notes = "\n".join(getattr(err.value, "__notes__", []))
        assert "MetaGradCallback supports exactly one optimizer" in notes
        assert "parameter groups" in notes


def test_no_optimizer_is_refused() -> None:
    class NoOptimizer(TinyClassifier):
        def configure_optimizers(self):  # type: ignore[no-untyped-def]
            return []

    with pytest.raises(MisconfigurationException, match="exactly one optimizer, got 0"):
        make_trainer([MetaGradCallback()]).fit(NoOptimizer(), loader(0))


def test_model_without_trainable_parameters_is_refused() -> None:
    model = TinyClassifier()
    model.net[2].weight.requires_grad_(False)
    model.net[2].bias.requires_grad_(False)
    model.net[0].requires_grad_(False)

    class Frozen(TinyClassifier):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return super().training_step(batch, batch_idx).detach().requires_grad_()

    frozen = Frozen()
    frozen.requires_grad_(False)
    with pytest.raises(MisconfigurationException, match="no trainable parameters"):
        make_trainer([MetaGradCallback()]).fit(frozen, loader(0))
