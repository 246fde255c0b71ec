"""MetaGradCallback in real set-ups (issue 7): one behaviour per test, real Trainers on CPU.

Mixed precision, gradient accumulation, clipping, resume, faults, model changes between tasks,
``torch.compile``, ``LightningCLI`` and refusals. DDP lives in ``tests/integration/test_ddp.py``,
the callback's argument errors in ``tests/unit/test_callback_arguments.py``. The tests about
eq. 5 and the meta-network use the paper's predictor (``paper_callback_kwargs``).

Everything is checked through the public API and observable behaviour, so the tests survive
refactors of the callback's internals:

* the gradient the callback *receives* is recorded by a spy placed before it
  (``callbacks=[spy, cb]``; ``on_before_optimizer_step`` sees unscaled, fully accumulated
  gradients);
* the gradient it *writes* is read back from the applied plain-SGD update
  (``theta' = theta - lr * rewritten``);
* the pairs the predictor learns from are recorded by a :class:`MetaNetPredictor` subclass
  (``OldGradientPredictor.observe`` is the documented predictor interface);
* state is compared through ``MetaGradCallback.state_dict()``, ``meta_network``,
  ``predictor_network`` and ``predict_old_gradient``.

This file is also a script: ``python tests/integration/test_reliability.py killable-run DIR``
(with ``tests/`` on ``PYTHONPATH``) is the training process that
``test_sigkilled_training_resumes_from_its_last_checkpoint`` kills.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import (
    LR,
    AppliedUpdates,
    FlatStep,
    MultiHead,
    TinyClassifier,
    assert_same_params,
    assert_same_state,
    flat,
    loader,
    make_trainer,
    paper_callback_kwargs,
    script_env,
    small_callback_kwargs,
    task_data,
)
from lightning.pytorch.callbacks import BaseFinetuning, Callback, ModelCheckpoint
from lightning.pytorch.plugins import MixedPrecision
from torch import Tensor, nn
from torch.func import functional_call

from lightning_metagrad import (
    AnchoredPredictor,
    MetaGradCallback,
    MetaNetPredictor,
    ReplayPredictor,
    SubspacePredictor,
)
from lightning_metagrad.predictors.rules import sign_agreement

# --------------------------------------------------------------------------- helpers


class RecordingPredictor(MetaNetPredictor):
    """The paper's predictor (tiny, trained every step), recording every target it learns from."""

    def __init__(self) -> None:
        super().__init__(
            hidden_sizes=(16, 16),
            coords_per_step=128,
            update_every=1,
            distill_steps=20,
            distill_samples=256,
        )
        self.targets: list[Tensor] = []

    def observe(
        self, names: list[str], thetas: list[Tensor], targets: list[Tensor]
    ) -> dict[str, Tensor]:
        self.targets.append(flat(targets))
        return super().observe(names, thetas, targets)


PROBE = torch.linspace(-1.0, 1.0, sum(p.numel() for p in TinyClassifier().parameters()))


class MetaNetworkSnapshots(Callback):
    """Place after MetaGrad: the meta-network's weights and the old-gradient prediction at
    ``PROBE``, at the start and after every batch."""

    def __init__(self, cb: MetaGradCallback) -> None:
        self.cb = cb
        self.states: list[dict[str, Tensor]] = []
        self.predictions: list[Tensor] = []

    def _snap(self) -> None:
        self.states.append({k: v.clone() for k, v in self.cb.meta_network.state_dict().items()})
        self.predictions.append(self.cb.predict_old_gradient(PROBE).clone())

    def on_train_start(self, trainer, pl_module) -> None:  # type: ignore[no-untyped-def]
        self._snap()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        self._snap()

    def changed(self) -> list[bool]:
        """Per batch: did the meta-network's weights change during it?"""
        return [
            any(not torch.equal(a[k], b[k]) for k in a)
            for a, b in zip(self.states, self.states[1:])
        ]


def grad_at(model: nn.Module, theta: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """Independent fp32 reference: d cross_entropy(model(x), y) / d theta at flat ``theta``."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    pieces = theta.split([p.numel() for _, p in named])
    leaves = [t.view_as(p).clone().requires_grad_() for t, (_, p) in zip(pieces, named)]
    out = functional_call(model, {n: t for (n, _), t in zip(named, leaves)}, (x,))
    loss = nn.functional.cross_entropy(out.float(), y)
    return flat(list(torch.autograd.grad(loss, leaves)))


def batch_of(task: int, first: int, count: int, batch_size: int = 16) -> tuple[Tensor, Tensor]:
    """Samples of ``count`` consecutive batches of ``loader(task)`` starting at batch ``first``."""
    x, y = task_data(task)
    sl = slice(first * batch_size, (first + count) * batch_size)
    return x[sl], y[sl]


def assert_eq5_applied(cb: MetaGradCallback, step: FlatStep, lr: float = LR) -> None:
    """Plain SGD applied the eq.-5 rewrite of the received gradient."""
    expected, _ = sign_agreement(step.grad, cb.predict_old_gradient(step.theta))
    torch.testing.assert_close(step.after, step.theta - lr * expected, rtol=0, atol=1e-6)


def all_finite(module: nn.Module | None) -> bool:
    assert module is not None
    return all(bool(torch.isfinite(t).all()) for t in module.state_dict().values())


def fp16_scaler_plugin() -> MixedPrecision:
    """The real fp16 + GradScaler path on CPU (``precision="16-mixed"`` becomes bf16 there)."""
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))


@pytest.fixture
def deterministic() -> Any:
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(previous)


# --------------------------------------------------------------------------- mixed precision


def _two_tasks_of_three_steps(**trainer_kwargs: Any) -> None:
    """Two tasks of 3 steps through a spy placed before MetaGrad; then each step's pair is the
    true gradient it received and task 2's steps applied eq. 5 to it."""
    pred = RecordingPredictor()
    cb, model, spy = MetaGradCallback(predictor=pred), TinyClassifier(lr=LR), AppliedUpdates()
    for task in range(2):
        make_trainer([spy, cb], max_steps=3, **trainer_kwargs).fit(model, loader(task))
    steps = spy.flat()
    assert len(pred.targets) == len(steps) == 6
    for i, (step, target) in enumerate(zip(steps, pred.targets)):
        assert torch.equal(target, step.grad)
        # The true gradient: close to an fp32 reference on the same batch (low-precision
        # forward), not a scaled one.
        x, y = batch_of(task=i // 3, first=i % 3, count=1)
        ref = grad_at(model, step.theta, x, y)
        assert 0.9 < float(step.grad.norm() / ref.norm()) < 1.1
    for step in steps[3:]:  # task 2: the rewrite uses that gradient
        assert_eq5_applied(cb, step)


def test_bf16_mixed_meta_network_learns_from_true_gradients() -> None:
    _two_tasks_of_three_steps(precision="bf16-mixed")


def test_fp16_grad_scaler_pairs_and_rewrite_use_unscaled_gradients() -> None:
    plugin = fp16_scaler_plugin()
    _two_tasks_of_three_steps(plugins=[plugin])
    # No step was skipped and the loss scale was large: scaled gradients would be 65536x.
    assert plugin.scaler is not None and plugin.scaler.get_scale() == 65536.0


class InjectInfGrad(Callback):
    """An overflow in the scaled gradient at one step (``on_after_backward`` sees scaled grads)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_after_backward(self, trainer, pl_module) -> None:  # type: ignore[no-untyped-def]
        if trainer.global_step == self.step:
            pl_module.net[0].weight.grad[0, 0] = float("inf")  # type: ignore[index]


def test_fp16_step_skipped_by_the_scaler_records_no_pairs_and_changes_nothing() -> None:
    pred = RecordingPredictor()
    cb, model = MetaGradCallback(predictor=pred), TinyClassifier(lr=LR)
    plugin = fp16_scaler_plugin()
    make_trainer([cb], max_steps=3, plugins=[plugin]).fit(model, loader(0))
    spy, snaps = AppliedUpdates(), MetaNetworkSnapshots(cb)
    pred.targets.clear()
    with pytest.warns(UserWarning):  # the skipped pairs are reported
        make_trainer([InjectInfGrad(step=1), spy, cb, snaps], max_steps=3, plugins=[plugin]).fit(
            model, loader(1)
        )
    assert plugin.scaler is not None and plugin.scaler.get_scale() == 32768.0  # one skip
    assert len(spy.flat()) == 3 and len(pred.targets) == 2  # no pairs from the skipped step
    assert snaps.changed() == [True, False, True]  # meta-network untouched by that step
    skipped = spy.flat()[1]
    assert not bool(torch.isfinite(skipped.grad).all())
    assert torch.equal(skipped.after, skipped.theta)  # the step really was skipped
    assert_eq5_applied(cb, spy.flat()[0])
    assert_eq5_applied(cb, spy.flat()[2])  # and the rule still works after it
    for prediction in snaps.predictions:  # the predictor of old tasks is untouched
        assert torch.equal(prediction, snaps.predictions[0])
    assert all_finite(model) and all_finite(cb.meta_network) and all_finite(cb.predictor_network)


# --------------------------------------------------------------------------- accumulation


def test_accumulation_updates_the_meta_network_once_per_optimizer_step() -> None:
    pred = RecordingPredictor()
    cb, model = MetaGradCallback(predictor=pred), TinyClassifier()
    for task in range(2):
        snaps = MetaNetworkSnapshots(cb)
        make_trainer([cb, snaps], max_steps=2, accumulate_grad_batches=3).fit(model, loader(task))
        # 6 micro-batches, 2 optimizer steps: one meta-network update at each step's last one.
        assert snaps.changed() == [False, False, True, False, False, True]
    assert len(pred.targets) == 4


def test_accumulation_pairs_and_rewrite_use_the_full_accumulated_gradient() -> None:
    k = 3
    pred = RecordingPredictor()
    cb, model, spy = MetaGradCallback(predictor=pred), TinyClassifier(lr=LR), AppliedUpdates()
    for task in range(2):
        make_trainer([spy, cb], max_steps=2, accumulate_grad_batches=k).fit(model, loader(task))
    assert len(spy.flat()) == len(pred.targets) == 4
    for i, (step, target) in enumerate(zip(spy.flat(), pred.targets)):
        # The gradient of the mean loss over all k micro-batches of the step, computed apart.
        x, y = batch_of(task=i // 2, first=k * (i % 2), count=k)
        full = grad_at(model, step.theta, x, y)
        torch.testing.assert_close(step.grad, full, rtol=0, atol=1e-6)
        assert torch.equal(target, step.grad)
    for step in spy.flat()[2:]:
        assert_eq5_applied(cb, step)  # sign_agreement(full accumulated grad, prediction)


# --------------------------------------------------------------------------- clipping


def _task_two_steps(**trainer_kwargs: Any) -> tuple[MetaGradCallback, AppliedUpdates]:
    cb, model, spy = (
        MetaGradCallback(**paper_callback_kwargs()),
        TinyClassifier(lr=LR),
        AppliedUpdates(),
    )
    make_trainer([cb], max_steps=4).fit(model, loader(0))
    make_trainer([spy, cb], max_steps=3, **trainer_kwargs).fit(model, loader(1))
    return cb, spy


def test_value_clipping_applies_to_the_rewritten_gradient() -> None:
    clip = 1e-3
    cb, spy = _task_two_steps(gradient_clip_val=clip, gradient_clip_algorithm="value")
    for step in spy.flat():
        rewritten, _ = sign_agreement(step.grad, cb.predict_old_gradient(step.theta))
        assert bool((rewritten.abs() > clip).any())  # the clip is active
        expected = step.theta - LR * rewritten.clamp(-clip, clip)
        torch.testing.assert_close(step.after, expected, rtol=0, atol=1e-7)


def test_norm_clipping_applies_to_the_rewritten_gradient() -> None:
    clip = 1e-2
    cb, spy = _task_two_steps(gradient_clip_val=clip, gradient_clip_algorithm="norm")
    for step in spy.flat():
        rewritten, zeroed = sign_agreement(step.grad, cb.predict_old_gradient(step.theta))
        assert bool(zeroed.any()) and float(rewritten.norm()) > clip
        expected = step.theta - LR * rewritten * (clip / (float(rewritten.norm()) + 1e-6))
        torch.testing.assert_close(step.after, expected, rtol=0, atol=1e-7)
        # Clipping the raw gradient first would scale by clip/|grad| instead: distinguishable.
        wrong = step.theta - LR * rewritten * (clip / (float(step.grad.norm()) + 1e-6))
        assert not torch.allclose(step.after, wrong, rtol=0, atol=1e-7)


# --------------------------------------------------------------------------- resume


def _seeded_start(
    seed: int = 0, optimizer: str = "sgd", predictor: str = "paper"
) -> tuple[TinyClassifier, Any]:
    pl.seed_everything(seed, verbose=False)
    kwargs = paper_callback_kwargs()
    if predictor == "replay":  # refreshed every 4 steps: the checkpoint at step 3 is mid-cache
        kwargs["predictor"] = ReplayPredictor(memory_batches=4, refresh_every=4, free_below=1.0)
    elif predictor == "anchored":
        kwargs["predictor"] = AnchoredPredictor(radius=1e-3)
    elif predictor == "subspace":  # every=2: the checkpoint at step 3 is between sketch updates
        kwargs["predictor"] = SubspacePredictor(every=2, sample_rows=4)
    return TinyClassifier(optimizer), MetaGradCallback(**kwargs)


def _uninterrupted_two_tasks(
    n2: int = 128, steps2: int = 8, optimizer: str = "sgd", predictor: str = "paper"
) -> tuple[TinyClassifier, Any]:
    model, cb = _seeded_start(optimizer=optimizer, predictor=predictor)
    make_trainer([cb], max_steps=8).fit(model, loader(0))
    make_trainer([cb], max_steps=steps2).fit(model, loader(1, n=n2))
    return model, cb


# Mid-task checkpoints below sit at epoch ends of a 3-batch task-2 loader (n=48, 9 steps): a
# plain DataLoader cannot resume mid-epoch (Lightning warns; the data order then differs from
# the uninterrupted run whatever the callback does).
N2, STEPS2, EVERY = 48, 9, 3


@pytest.mark.parametrize(
    ("optimizer", "predictor"),  # gradient / update-vector target; each predictor
    [
        ("sgd", "paper"),
        ("adam", "paper"),
        ("sgd", "anchored"),
        ("sgd", "replay"),
        ("sgd", "subspace"),
        ("adam", "subspace"),
    ],
)
def test_resume_mid_task_from_checkpoint_matches_uninterrupted_run(
    tmp_path: Path, deterministic: None, optimizer: str, predictor: str
) -> None:
    ref_model, ref_cb = _uninterrupted_two_tasks(N2, STEPS2, optimizer, predictor)

    model, cb = _seeded_start(optimizer=optimizer, predictor=predictor)
    make_trainer([cb], max_steps=8).fit(model, loader(0))
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=EVERY, save_top_k=-1)
    make_trainer([cb, ckpt], max_steps=5, enable_checkpointing=True).fit(model, loader(1, n=N2))
    # "A new process": nothing but the step-3 checkpoint of task 2 carries over.
    new_model, new_cb = _seeded_start(seed=123, optimizer=optimizer, predictor=predictor)
    make_trainer([new_cb], max_steps=STEPS2).fit(
        new_model, loader(1, n=N2), ckpt_path=tmp_path / "epoch=0-step=3.ckpt"
    )
    assert new_cb.task_index == 1 and new_cb.num_old_tasks == 1
    assert_same_params(new_model, ref_model)
    assert_same_state(new_cb.state_dict(), ref_cb.state_dict())


@pytest.mark.parametrize("predictor", ["paper", "subspace"])
def test_resume_between_tasks_from_a_checkpoint_saved_after_fit(
    tmp_path: Path, deterministic: None, predictor: str
) -> None:
    """The documented way: ``trainer.save_checkpoint`` after a task's fit; in the new process
    load the weights and the callback state, then fit the next task on a new Trainer."""
    ref_model, ref_cb = _uninterrupted_two_tasks(predictor=predictor)

    model, cb = _seeded_start(predictor=predictor)
    trainer = make_trainer([cb], max_steps=8)
    trainer.fit(model, loader(0))
    trainer.save_checkpoint(tmp_path / "after-task-1.ckpt")

    new_model, new_cb = _seeded_start(seed=123, predictor=predictor)
    ckpt = torch.load(tmp_path / "after-task-1.ckpt", weights_only=True)
    new_model.load_state_dict(ckpt["state_dict"])
    new_cb.load_state_dict(ckpt["callbacks"][new_cb.state_key])
    make_trainer([new_cb], max_steps=8).fit(new_model, loader(1))
    assert new_cb.task_index == 1 and new_cb.num_old_tasks == 1
    assert_same_params(new_model, ref_model)
    assert_same_state(new_cb.state_dict(), ref_cb.state_dict())


def test_next_task_after_loading_a_modelcheckpoint_file_starts_a_new_task(
    tmp_path: Path, deterministic: None
) -> None:
    ref_model, _ = _uninterrupted_two_tasks()

    model, cb = _seeded_start()
    last = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    make_trainer([cb, last], max_steps=8, enable_checkpointing=True).fit(model, loader(0))

    new_model, new_cb = _seeded_start(seed=123)
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=True)
    new_model.load_state_dict(ckpt["state_dict"])
    new_cb.load_state_dict(ckpt["callbacks"][new_cb.state_key])
    make_trainer([new_cb], max_steps=8).fit(new_model, loader(1))  # no ckpt_path: a new fit
    assert new_cb.task_index == 1 and new_cb.num_old_tasks == 1
    assert_same_params(new_model, ref_model)


# --------------------------------------------------------------------------- faults


class HangAt(Callback):
    """In the killable process: after ``step``, signal the test and wait to be killed."""

    def __init__(self, step: int, marker: Path) -> None:
        self.step, self.marker = step, marker

    def on_train_batch_end(self, trainer, *args) -> None:  # type: ignore[no-untyped-def]
        if trainer.global_step == self.step:
            self.marker.write_text(str(os.getpid()))
            time.sleep(120)  # the test SIGKILLs us long before
            raise SystemExit("not killed")


def _killable_run(out_dir: Path) -> None:
    """Task 1, then task 2 with a checkpoint every 3 steps; hangs after step 5 of task 2."""
    model, cb = _seeded_start()
    make_trainer([cb], max_steps=8).fit(model, loader(0))
    ckpt = ModelCheckpoint(dirpath=out_dir, every_n_train_steps=EVERY, save_last=True)
    hang = HangAt(5, out_dir / "hanging")
    make_trainer([cb, ckpt, hang], max_steps=STEPS2, enable_checkpointing=True).fit(
        model, loader(1, n=N2)
    )


@pytest.mark.slow
def test_sigkilled_training_resumes_from_its_last_checkpoint(tmp_path: Path) -> None:
    marker = tmp_path / "hanging"
    env = script_env(PYTHONWARNINGS="ignore")
    proc = subprocess.Popen(
        [sys.executable, __file__, "killable-run", str(tmp_path)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            if proc.poll() is not None:
                pytest.fail(f"the training process ended early:\n{proc.stderr.read().decode()}")  # type: ignore[union-attr]
            if time.monotonic() > deadline:
                pytest.fail("the training process did not reach step 5 in 120 s")
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()

    last = tmp_path / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 3  # steps 4-5 were lost
    ref_model, ref_cb = _uninterrupted_two_tasks(N2, STEPS2)
    new_model, new_cb = _seeded_start(seed=123)
    make_trainer([new_cb], max_steps=STEPS2).fit(new_model, loader(1, n=N2), ckpt_path=last)
    assert new_cb.task_index == 1 and new_cb.num_old_tasks == 1
    assert_same_params(new_model, ref_model)
    assert_same_state(new_cb.state_dict(), ref_cb.state_dict())


class NaNLossAt(TinyClassifier):
    """Returns a NaN loss at one global step of each fit (``nan_at=None``: never)."""

    def __init__(self, nan_at: int | None = None, guard: bool = False) -> None:
        super().__init__()
        self.nan_at, self.guard = nan_at, guard

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_step == self.nan_at else loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.guard:  # the user's guard; runs after the callbacks' hook
            for p in self.parameters():
                if p.grad is not None:
                    torch.nan_to_num_(p.grad, nan=0.0, posinf=0.0, neginf=0.0)


def test_nan_loss_never_reaches_the_meta_network() -> None:
    cb, model = MetaGradCallback(**paper_callback_kwargs()), NaNLossAt(nan_at=2)
    snaps = MetaNetworkSnapshots(cb)
    with pytest.warns(UserWarning):
        make_trainer([cb, snaps], max_steps=4).fit(model, loader(0))
    # Unguarded, the NaN step ruins the model's weights (as without the callback), so no later
    # step has finite pairs either; the meta-network learnt from the two steps before only.
    assert snaps.changed() == [True, True, False, False]
    assert all_finite(cb.meta_network)


def test_nan_loss_with_a_user_guard_in_a_later_task_keeps_the_predictor_finite() -> None:
    cb, model = MetaGradCallback(**paper_callback_kwargs()), NaNLossAt(guard=True)
    make_trainer([cb], max_steps=4).fit(model, loader(0))
    model.nan_at = 1
    snaps = MetaNetworkSnapshots(cb)
    with pytest.warns(UserWarning):
        make_trainer([cb, snaps], max_steps=4).fit(model, loader(1))
    assert snaps.changed() == [True, False, True, True]
    for prediction in snaps.predictions:
        assert torch.equal(prediction, snaps.predictions[0])
    model.nan_at = None
    make_trainer([cb], max_steps=4).fit(model, loader(2))  # the next boundary folds task 2 fine
    assert cb.num_old_tasks == 2
    assert all_finite(model) and all_finite(cb.meta_network) and all_finite(cb.predictor_network)
    assert bool(torch.isfinite(cb.predict_old_gradient(PROBE)).all())


def test_unguarded_nan_loss_in_a_later_task_does_not_crash_the_callback() -> None:
    cb, model = MetaGradCallback(**paper_callback_kwargs()), NaNLossAt()
    make_trainer([cb], max_steps=4).fit(model, loader(0))
    model.nan_at = 1
    # Like training without the callback: the fit finishes (with NaN weights).
    make_trainer([cb], max_steps=4).fit(model, loader(1))
    assert all_finite(cb.meta_network) and all_finite(cb.predictor_network)


def test_boundary_after_non_finite_weights_is_refused_clearly() -> None:
    cb, model = MetaGradCallback(**small_callback_kwargs()), NaNLossAt(nan_at=2)
    with pytest.warns(UserWarning):
        make_trainer([cb], max_steps=4).fit(model, loader(0))
    with pytest.raises(Exception, match=r"(?i)non-finite"):
        make_trainer([cb], max_steps=4).fit(model, loader(1))
    assert cb.task_index == 0 and cb.num_old_tasks == 0  # nothing half-done


# --------------------------------------------------------------------------- model changes


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_params_frozen_between_tasks_are_never_modified(optimizer: str) -> None:
    cb, model = MetaGradCallback(**paper_callback_kwargs()), TinyClassifier(optimizer, lr=LR)
    make_trainer([cb], max_steps=4).fit(model, loader(0))
    model.net[0].requires_grad_(False)
    frozen = [p.detach().clone() for p in model.net[0].parameters()]
    head = flat(list(model.net[2].parameters()))
    spy = AppliedUpdates()
    make_trainer([spy, cb], max_steps=4).fit(model, loader(1))
    assert cb.task_index == 1
    for p, q in zip(model.net[0].parameters(), frozen):
        assert torch.equal(p, q)
    assert not torch.equal(flat(list(model.net[2].parameters())), head)
    if optimizer == "sgd":
        for step in spy.flat():
            assert_eq5_applied(cb, step)


class FreezeFirstLayer(BaseFinetuning):
    def freeze_before_training(self, pl_module: pl.LightningModule) -> None:
        self.freeze(pl_module.net[0])  # type: ignore[index]

    def finetune_function(self, pl_module: pl.LightningModule, epoch: int, optimizer: Any) -> None:
        pass


def test_base_finetuning_freeze_is_respected() -> None:
    cb, model = MetaGradCallback(**paper_callback_kwargs()), TinyClassifier(lr=LR)
    make_trainer([cb], max_steps=4).fit(model, loader(0))
    frozen = flat(list(model.net[0].parameters()))
    spy = AppliedUpdates()
    make_trainer([FreezeFirstLayer(), spy, cb], max_steps=4).fit(model, loader(1))
    assert torch.equal(flat(list(model.net[0].parameters())), frozen)
    n_head = sum(p.numel() for p in model.net[2].parameters())
    for step in spy.flat():
        assert step.grad.numel() == n_head
        assert_eq5_applied(cb, step)


def assert_free_and_eq5(cb: MetaGradCallback, step: FlatStep, free: slice) -> None:
    """Plain SGD applied the received gradient unchanged on ``free`` coordinates (a parameter
    the old tasks never trained) and, for the paper's predictor, eq. 5 everywhere else."""
    applied = (step.theta - step.after) / LR
    torch.testing.assert_close(applied[free], step.grad[free], rtol=0, atol=1e-5)
    if isinstance(cb.predictor, MetaNetPredictor):  # eq. 5 literally (no trust mask)
        expected, _ = sign_agreement(step.grad, cb.predict_old_gradient(step.theta))
        expected[free] = step.grad[free]
        torch.testing.assert_close(step.after, step.theta - LR * expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("predictor", ["paper", "anchored", "replay"])
def test_params_unfrozen_for_a_later_task_are_free(predictor: str) -> None:
    kwargs = paper_callback_kwargs() if predictor == "paper" else {"predictor": predictor}
    cb, model = MetaGradCallback(**kwargs), TinyClassifier(lr=LR)
    model.net[0].requires_grad_(False)
    make_trainer([cb], max_steps=4).fit(model, loader(0))
    model.net[0].requires_grad_(True)
    spy = AppliedUpdates()
    make_trainer([spy, cb], max_steps=4).fit(model, loader(1))
    n_first = sum(p.numel() for p in model.net[0].parameters())
    zeroed_elsewhere = False
    for step in spy.flat():
        assert step.grad.numel() == sum(p.numel() for p in model.parameters())
        assert_free_and_eq5(cb, step, slice(0, n_first))
        zeroed_elsewhere |= bool((step.after == step.theta)[n_first:].any())
    assert zeroed_elsewhere or predictor == "replay"  # the rule acted on the old parameters


def _a_head_added_for_task_two(
    cb: MetaGradCallback, first_steps: int
) -> tuple[MultiHead, AppliedUpdates]:
    """Task 1 on the body alone, then a new head and 4 steps of task 2 behind a spy."""
    model = MultiHead()
    make_trainer([cb], max_steps=first_steps).fit(model, loader(0))
    model.add_head()
    spy = AppliedUpdates()
    make_trainer([spy, cb], max_steps=4).fit(model, loader(1))
    return model, spy


@pytest.mark.parametrize("predictor", ["paper", "anchored", "replay"])
def test_new_head_added_for_a_later_task_is_free(predictor: str) -> None:
    kwargs = paper_callback_kwargs() if predictor == "paper" else {"predictor": predictor}
    cb = MetaGradCallback(**kwargs)
    model, spy = _a_head_added_for_task_two(cb, first_steps=4)
    n_head = sum(p.numel() for p in model.heads[0].parameters())
    for step in spy.flat():
        # The new head is the last trainable module: its coordinates end the flat vector.
        assert step.grad.numel() == sum(p.numel() for p in model.parameters())
        assert_free_and_eq5(cb, step, slice(-n_head, None))


def test_new_head_is_free_and_the_body_projected_with_the_subspace_default() -> None:
    cb = MetaGradCallback(predictor=SubspacePredictor(every=1))
    model, spy = _a_head_added_for_task_two(cb, first_steps=6)
    n_head = sum(p.numel() for p in model.heads[0].parameters())
    for step in spy.flat():
        applied = (step.theta - step.after) / LR
        torch.testing.assert_close(applied[-n_head:], step.grad[-n_head:], rtol=0, atol=1e-6)
        assert float((applied[:-n_head] - step.grad[:-n_head]).abs().max()) > 1e-4


# --------------------------------------------------------------------------- torch.compile


@pytest.mark.slow
def test_compiled_module_works_with_the_callback() -> None:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    cb, model, spy = (
        MetaGradCallback(**paper_callback_kwargs()),
        TinyClassifier(lr=LR),
        AppliedUpdates(),
    )
    compiled = torch.compile(model)  # default backend: inductor (needs a C compiler)
    make_trainer([cb], max_steps=3).fit(compiled, loader(0))  # type: ignore[arg-type]
    make_trainer([spy, cb], max_steps=3).fit(compiled, loader(1))  # type: ignore[arg-type]
    assert counters["frames"]["ok"] >= 1  # the forward really ran compiled
    assert cb.task_index == 1 and cb.num_old_tasks == 1
    for step in spy.flat():
        assert_eq5_applied(cb, step)
    torch._dynamo.reset()


# --------------------------------------------------------------------------- LightningCLI


class CLIClassifier(TinyClassifier):
    def train_dataloader(self) -> Any:
        return loader(0)


CLI_CONFIG = """
trainer:
  max_steps: 3
  accelerator: cpu
  devices: 1
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: lightning_metagrad.MetaGradCallback
      init_args:
        combine: {combine}
        target: gradient
        task_boundaries: manual
        diagnostics: false
        predictor:
          class_path: lightning_metagrad.MetaNetPredictor
          init_args:
            hidden_sizes: [8, 8]
            coords_per_step: 64
            update_every: 1
model:
  lr: 0.05
"""


def _run_cli(tmp_path: Path, combine: str) -> Any:
    from lightning.pytorch.cli import LightningCLI

    config = tmp_path / "config.yaml"
    config.write_text(CLI_CONFIG.format(combine=combine))
    return LightningCLI(
        CLIClassifier, args=["fit", "--config", str(config)], save_config_callback=None
    )


@pytest.fixture
def clean_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["lightning"])  # LightningCLI also looks at sys.argv


def test_callback_configured_from_yaml_through_lightning_cli(
    tmp_path: Path, clean_argv: None
) -> None:
    cli = _run_cli(tmp_path, combine="average")
    (cb,) = [c for c in cli.trainer.callbacks if isinstance(c, MetaGradCallback)]
    assert cb.combine == "average" and cb.target == "gradient"
    assert isinstance(cb.predictor, MetaNetPredictor) and cb.predictor.update_every == 1
    assert cb.meta_network.hidden_sizes == (8, 8)
    assert cli.trainer.global_step == 3 and cli.model.lr == 0.05
    assert cb.task_index == 0
    cb.start_new_task()  # "manual" boundaries, from the YAML
    assert cb.num_old_tasks == 1


def test_invalid_yaml_value_is_reported_with_the_argument(
    tmp_path: Path, capsys: pytest.CaptureFixture, clean_argv: None
) -> None:
    with pytest.raises(SystemExit):
        _run_cli(tmp_path, combine="max")
    err = capsys.readouterr().err
    assert "combine" in err and "max" in err


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "batches",
    [
        pytest.param(lambda task: loader(task), id="tuple-batch"),
        pytest.param(
            lambda task: torch.utils.data.DataLoader(
                [{"x": x, "y": y, "task": task} for x, y in zip(*task_data(task))],  # type: ignore[arg-type]
                batch_size=16,
            ),
            id="dict-without-the-key",
        ),
    ],
)
def test_batch_boundaries_without_a_task_id_in_the_batch_name_the_fix(batches: Any) -> None:
    cb = MetaGradCallback(task_boundaries="batch", **small_callback_kwargs())
    with pytest.raises(ValueError, match="task_id_key") as err:
        make_trainer([cb], max_steps=2).fit(TinyClassifier(), batches(0))
    assert "task_id_fn" in str(err.value)


@pytest.mark.slow
def test_ddp_spawn_is_refused_or_keeps_the_callback_state() -> None:
    cb, model = MetaGradCallback(**small_callback_kwargs()), TinyClassifier()
    sharing, environ = torch.multiprocessing.get_sharing_strategy(), dict(os.environ)
    torch.multiprocessing.set_sharing_strategy("file_system")  # this sandbox's /dev/shm
    try:
        make_trainer([cb], max_steps=2, strategy="ddp_spawn", devices=1).fit(model, loader(0))
    except Exception as err:  # a refusal must name the fix
        assert "strategy='ddp'" in str(err)
        return
    finally:
        torch.multiprocessing.set_sharing_strategy(sharing)
        os.environ.clear()  # the launcher sets MASTER_PORT in this process
        os.environ.update(environ)
    make_trainer([cb], max_steps=2).fit(model, loader(1))
    assert cb.task_index == 1 and cb.num_old_tasks == 1


# --------------------------------------------------------------------------- script mode

if __name__ == "__main__":
    if sys.argv[1:2] == ["killable-run"]:
        _killable_run(Path(sys.argv[2]))
    else:
        raise SystemExit(f"usage: python {__file__} killable-run DIR")
