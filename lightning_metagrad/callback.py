"""``MetaGradCallback``: Lightning's hooks wired to the engine.

The method lives in :class:`~lightning_metagrad.engine.MetaGrad` (plain PyTorch). This adapter
maps each hook to one engine call, fills the engine's
:class:`~lightning_metagrad.runtime.Runtime` from the Trainer, refuses set-ups it cannot
support, logs, and glues the engine's state into checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from typing_extensions import override

from lightning_metagrad._checkpoint import migrate_state, refuse_unreadable_state
from lightning_metagrad._lightning import generate_state_key, logs_this_step
from lightning_metagrad._module_utils import (
    batch_loss_of,
    explain_lightning_refusal,
    loss_of,
    refuse_at_fit_start,
    refuse_unsupported,
)
from lightning_metagrad._validation import (
    check_bool,
    check_choice,
)
from lightning_metagrad.boundaries.sources import (
    BoundaryName,
    BoundarySpec,
    NewFitBoundaries,
    TaskBoundarySource,
    build_boundaries,
)
from lightning_metagrad.diagnostics import Diagnostics
from lightning_metagrad.engine import MetaGrad, StepReport
from lightning_metagrad.predictors import (
    PREDICTORS,
    MetaNetPredictor,
    OldGradientPredictor,
    PredictorName,
    build_predictor,
)
from lightning_metagrad.predictors.paper.meta_network import CoordinateMLP
from lightning_metagrad.runtime import Runtime

__all__ = ["PREDICTORS", "BoundaryName", "MetaGradCallback", "PredictorName", "build_predictor"]

_STATE_VERSION = 4


class MetaGradCallback(Callback):
    r"""Continual learning for any ``LightningModule``, in one line.

    During each task a predictor learns the task's gradients (for optimizers other than plain
    SGD, its update vectors) from each optimizer step; from the second task on the step is
    rewritten before the parameters move, so the old tasks are protected; at each task
    boundary the finished task is folded in (eqs. 6-7), so memory is constant in the number
    of tasks. The work is :class:`~lightning_metagrad.engine.MetaGrad`'s; this callback calls
    it from Lightning's hooks.

    Args:
        predictor: ``"subspace"`` (default): per weight matrix, the subspace the old tasks
            used (learnt from the layer's inputs, leaning towards each task's end), projected
            out of later steps
            (:class:`~lightning_metagrad.predictors.subspace.SubspacePredictor`);
            ``"gradient-subspace"``: the same from the gradients alone (the earlier
            default);
            ``"anchored"``: a diagonal Taylor model around each old task's end point with
            eq. 5's sign rule; ``"paper"``: the paper exactly (coordinate-wise meta-networks,
            eq. 5; how it fares is in docs/science.md); ``"replay"``: the real old-task
            gradient from a small episodic memory; ``"relaxed"``: the default's subspace with
            CUBER's relaxation, keeping the old-task part of a step that agrees with the old
            tasks' reference gradient (docs/science.md, section 7); or a configured predictor
            instance.
        combine: for the elementwise predictors, ``"sign"`` (eq. 5) or ``"average"`` (eq. 2
            with predicted old gradients); the subspace predictor always projects.
        target: what the predictor learns and the rule rewrites: ``"gradient"``,
            ``"update"`` (the optimizer's update vector), or ``"auto"``: the gradient for
            plain SGD, else the update.
        task_boundaries: ``"fit"`` (each new ``trainer.fit`` starts a task), ``"batch"`` (a
            change of the task id read from the batch), ``"auto"`` (switches detected from
            the gradients, section 5.1: their novelty against the current task's subspace, or
            a change of the recent steps' mean direction, a concept shift; see
            :class:`~lightning_metagrad.boundaries.auto.AutoBoundaries`), ``"manual"`` (only
            :meth:`start_new_task`), a
            :class:`~lightning_metagrad.boundaries.sources.TaskBoundarySource`, or a list of
            these (a new task starts when any of them says so, e.g. ``["fit", "auto"]``).
        task_id_key: dict-batch key holding the task id, for ``task_boundaries="batch"``.
        task_id_fn: a function ``batch -> task id``, for ``task_boundaries="batch"``.
        diagnostics: warn (once, rank zero) when the prediction carries no information, the
            rule holds back most of each step, or the weights run away; the figures are
            logged either way.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> cb = MetaGradCallback()
        >>> trainer = Trainer(callbacks=[cb], max_steps=1, logger=False)
        >>> cb.task_index
        0
    """

    def __init__(
        self,
        *,
        predictor: PredictorName | OldGradientPredictor = "subspace",
        combine: Literal["sign", "average"] = "sign",
        target: Literal["auto", "gradient", "update"] = "auto",
        task_boundaries: BoundarySpec = "fit",
        task_id_key: str = "task_id",
        task_id_fn: Callable[[Any], Hashable] | None = None,
        diagnostics: bool = True,
    ) -> None:
        super().__init__()
        check_choice("combine", combine, ("sign", "average"))
        check_choice("target", target, ("auto", "gradient", "update"))
        check_bool("diagnostics", diagnostics)
        self.boundaries = self.build_boundaries(task_boundaries, task_id_key, task_id_fn)
        self.engine = MetaGrad(
            build_predictor(predictor),
            combine=combine,
            target=target,
            boundaries=self.boundaries,
            runtime=Runtime(warn=rank_zero_warn),
        )
        self.engine.on_step = self._on_step
        self.predictor = self.engine.predictor
        self.predictor_name = predictor if isinstance(predictor, str) else type(predictor).__name__
        self.combine = combine
        self.target = target
        self.diagnostics = Diagnostics(warn=diagnostics, emit=rank_zero_warn)
        #: Global steps at which automatic detection declared a task switch.
        self.detected_switches: list[int] = []
        # Inside trainer.test/validate/predict: a checkpoint they load must not roll back what
        # the callback learned (only `fit` resumes the continual-learning state).
        self._evaluating = False
        self._trainer: pl.Trainer | None = None
        self._restored_fit_done = False  # the loaded state was saved when its fit had ended
        self._stepped = False
        self._to_log: dict[str, Tensor | float] = {}
        self._skips_reported = 0  # non-finite steps already warned about
        self._warned_optimizer = False

    # ------------------------------------------------------------------ policy (override)

    @staticmethod
    def build_boundaries(
        spec: BoundarySpec,
        task_id_key: str = "task_id",
        task_id_fn: Callable[[Any], Hashable] | None = None,
    ) -> TaskBoundarySource:
        """The boundary source for ``task_boundaries``; override to build your own (the
        default: :func:`~lightning_metagrad.boundaries.sources.build_boundaries`)."""
        return build_boundaries(spec, task_id_key, task_id_fn)

    def warn_about_optimizer(self, optimizer: torch.optim.Optimizer, target: str) -> None:
        """Called at each fit start with the optimizer and what the rule acts on. By
        default: an elementwise predictor (eq. 5 per coordinate) on the update of an
        optimizer with momentum or adaptive steps learns little from task 2 on (measured
        with ``anchored`` and Adam: task accuracy 0.37 against 0.93 without the callback), so
        it warns once; the default predictor projects the update and is not affected."""
        if target != "update" or self.predictor.rule != "elementwise" or self._warned_optimizer:
            return
        self._warned_optimizer = True
        rank_zero_warn(
            f"MetaGrad: predictor {self.predictor_name!r} applies eq. 5 per coordinate to the "
            f"update of {type(optimizer).__name__} (momentum or adaptive steps): from task 2 "
            "on most coordinates of each update are zeroed and new tasks learn little "
            "(measured: task accuracy 0.37 against 0.93 without the callback). Use the "
            "default predictor ('subspace'), or plain SGD with this predictor."
        )

    def on_task_start(self, task_index: int) -> None:
        """Called when a task starts or is returned to (after the previous one was folded
        in). Override to react, e.g. to reset a learning-rate schedule."""

    def on_switch_detected(self, global_step: int) -> None:
        """Called when automatic detection declares a task switch (the new task starts at
        the next batch). Override to react; the steps are in :attr:`detected_switches`."""

    # ------------------------------------------------------------------ public API

    @property
    def state_key(self) -> str:
        return generate_state_key(
            self, predictor=self.predictor_name, combine=self.combine, target=self.target
        )

    @property
    def task_index(self) -> int:
        """The current task (0-based; may return to an earlier one with task ids)."""
        return self.engine.task_index

    @property
    def num_old_tasks(self) -> int:
        """Tasks folded into the predictor (``t`` in eqs. 6-7)."""
        return self.engine.num_old_tasks

    @property
    def meta_network(self) -> CoordinateMLP:
        """With ``predictor="paper"`` only: the current task's meta-network h."""
        return self._meta_predictor().h

    @property
    def predictor_network(self) -> CoordinateMLP | None:
        """With ``predictor="paper"`` only: the distilled g (None before task 2)."""
        return self._meta_predictor().g

    def predict_old_gradient(self, theta: Tensor) -> Tensor:
        """Elementwise predictors: :meth:`MetaGrad.predict_old_gradient
        <lightning_metagrad.engine.MetaGrad.predict_old_gradient>` at a flat ``theta``."""
        return self.engine.predict_old_gradient(theta)

    def start_new_task(self, pl_module: pl.LightningModule | None = None) -> None:
        """End the current task and start the next: fold it in (eq. 7). Call it between
        tasks (e.g. with ``task_boundaries="manual"``); ``pl_module`` is needed only before
        the first ``fit``."""
        if not self.engine.params and pl_module is not None:
            self.engine.bind(pl_module)
        self.engine.start_task()
        self._task_started()

    # ------------------------------------------------------------------ hooks

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # (Lightning skips teardown after an exception: reset here too, not only there.)
        self._evaluating = stage != "fit"
        if stage == "fit":
            refuse_unsupported(
                "MetaGradCallback", trainer, pl_module, edit="rewrites gradients", fsdp2=True
            )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        refuse_at_fit_start("MetaGradCallback", trainer, pl_module)
        callbacks: list[Callback] = trainer.callbacks  # type: ignore[attr-defined]
        others = [c for c in callbacks if isinstance(c, MetaGradCallback) and c is not self]
        if others:
            raise MisconfigurationException(
                f"The Trainer has {len(others) + 1} MetaGradCallbacks; each would rewrite the "
                "other's steps and learn from the rewritten ones. Use one MetaGradCallback (one "
                "predictor and one boundary source, e.g. task_boundaries=['fit', 'auto'])."
            )
        self._trainer = trainer
        self.engine.runtime.batch_loss = batch_loss_of(pl_module)
        self.engine.runtime.mean_over_ranks = (
            (lambda t: trainer.strategy.reduce(t, reduce_op="mean"))
            if trainer.world_size > 1
            else None
        )
        if isinstance(self.boundaries, NewFitBoundaries) and self.boundaries.in_fit:
            if trainer.ckpt_path is None:
                # State taken inside an earlier fit (a ModelCheckpoint file loaded by hand, or
                # a fit that crashed) and this fit does not resume it: that fit is over.
                self.boundaries.on_fit_end()
            elif self._restored_fit_done:
                rank_zero_info(
                    f"MetaGrad: the checkpoint was saved when task {self.task_index}'s fit had "
                    "finished, so this fit starts the next task. To continue that task instead "
                    "(e.g. with a larger max_steps), resume a checkpoint taken during it."
                )
                self.boundaries.on_fit_end()
        self._restored_fit_done = False
        if self.engine.begin_fit(pl_module):
            self._task_started()
        target = self.engine.use_optimizer(trainer.optimizers[0])
        self.warn_about_optimizer(trainer.optimizers[0], target)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._warn_skipped_steps()
        self.engine.end_fit()
        self._release()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            self._evaluating = False

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._evaluating = False
        self._release()
        explain_lightning_refusal("MetaGradCallback", exception)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.engine.observe_batch(batch, batch_idx):
            self._task_started()

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # Once per real optimizer step, after unscaling (AMP) and the whole accumulation
        # window, before clipping: the engine learns from and rewrites the gradient here (in
        # update mode it snapshots, and its optimizer hook finishes the step).
        self._stepped = False
        self.engine.before_optimizer_step()

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self.boundaries.uses_loss:
            loss = loss_of(outputs)
            if loss is not None:
                self.engine.observe_loss(self.engine.runtime.mean(loss.detach().float()))
        if not self._stepped:
            return
        self._stepped = False
        if trainer.global_step % self.diagnostics.check_every == 0:
            self._warn_skipped_steps()
        trainable = [p for p in self.engine.params.values() if p.requires_grad]
        self._to_log.update(self.diagnostics.step(trainable, self.task_index))
        # Like Lightning's LearningRateMonitor: only on steps whose logs are written, each
        # figure's latest value (a `self.log` call costs about a small model's whole step).
        if logs_this_step(trainer):
            self._to_log["metagrad/task"] = float(self.task_index)
            for name, value in self._to_log.items():
                pl_module.log(name, value, on_step=True, on_epoch=False, batch_size=1)
            self._to_log = {}

    # ------------------------------------------------------------------ checkpointing

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "detected_switches": list(self.detected_switches),
            # Saved at the end of its fit (its max_steps / max_epochs reached)?
            "fit_done": bool(self._trainer is not None and self._trainer.fit_loop.done),
            "engine": self.engine.state_dict(),
            "diagnostics": self.diagnostics.state_dict(),
        }

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Lightning gives a callback only the state stored under its own `state_key` and
        # merely warns about the others. Release 0.1.0 keyed its state by other arguments, so
        # without this check `fit(ckpt_path=...)` on a 0.1.0 checkpoint would resume the loops
        # with a blank callback: every learned task silently lost.
        if self._evaluating:  # test/validate/predict read the weights only
            return
        refuse_unreadable_state(checkpoint, self.state_key, _STATE_VERSION)

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._evaluating:
            rank_zero_info(
                "MetaGrad: trainer.test/validate/predict loaded a checkpoint; the callback's "
                "continual-learning state is kept as it is (only `fit` resumes it)."
            )
            return
        state_dict = migrate_state(state_dict, _STATE_VERSION)
        self.detected_switches = [int(s) for s in state_dict["detected_switches"]]
        self._restored_fit_done = bool(state_dict["fit_done"])
        self.engine.load_state_dict(state_dict["engine"])
        self._skips_reported = self.engine.skipped_steps
        self.diagnostics.load_state_dict(state_dict["diagnostics"])

    # ------------------------------------------------------------------ internals

    def _on_step(self, report: StepReport) -> None:
        """The engine's report of each optimizer step: warn, diagnose, log, record switches."""
        self._stepped = True
        if report.finite is False:  # checked on the host: nothing was learned or rewritten
            rank_zero_warn(
                "MetaGrad: non-finite gradient/update at this step; it is passed on unchanged "
                "and its pairs are not used to train the predictor."
            )
            return
        self._to_log.update(report.figures)
        self.diagnostics.observe(report)
        if report.switch_detected:
            step = self._trainer.global_step if self._trainer is not None else 0
            self.detected_switches.append(step)
            self._to_log["metagrad/switch_detected"] = 1.0
            rank_zero_info(
                f"MetaGrad: task switch detected at global step {step}; task "
                f"{self.engine.num_tasks} starts with the next batch."
            )
            self.on_switch_detected(step)

    def _task_started(self) -> None:
        self._to_log.update(self.engine.task_figures)
        self.engine.task_figures = {}
        self.on_task_start(self.task_index)

    def _warn_skipped_steps(self) -> None:
        """Non-finite steps counted on the device (no host sync per step) are reported every
        ``diagnostics.check_every`` steps and at the fit end."""
        skipped = self.engine.skipped_steps
        if skipped > self._skips_reported and self.engine.sync_free:
            rank_zero_warn(
                f"MetaGrad: {skipped - self._skips_reported} step(s) with a non-finite "
                "gradient/update; they reach the optimizer non-finite, as without the callback, "
                "and are not used to train the predictor."
            )
        self._skips_reported = skipped

    def _meta_predictor(self) -> MetaNetPredictor:
        if not isinstance(self.predictor, MetaNetPredictor):
            raise AttributeError(
                f"the {self.predictor_name!r} predictor has no meta-networks; use predictor='paper'"
            )
        return self.predictor

    def _release(self) -> None:
        self._trainer = None
        self.engine.release_optimizer()
