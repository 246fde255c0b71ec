"""``MetaGradCallback``: the method wired into Lightning's hooks.

The callback is a thin adapter: it reads the task boundaries, hands each optimizer step's
gradients (or update vectors) to the plain-PyTorch core
:class:`~lightning_metagrad.engine.MetaGrad`, refuses set-ups it cannot support, and logs.

* a predictor (:mod:`~lightning_metagrad.subspace`, :mod:`~lightning_metagrad.predictors`)
  learns each task's gradients and folds it in at a boundary (eqs. 6-7);
* the engine rewrites ``.grad`` before ``optimizer.step()`` (eq. 5, in the learned subspace by
  default);
* :mod:`~lightning_metagrad.boundaries` decides where tasks start;
* :class:`~lightning_metagrad.diagnostics.Diagnostics` watches prediction quality and drift.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_metagrad._lightning import generate_state_key, logs_this_step
from lightning_metagrad._module_utils import (
    explain_lightning_refusal,
    loss_of,
    refuse_at_fit_start,
    refuse_unsupported,
)
from lightning_metagrad._validation import (
    check_bool,
    check_callable,
    check_choice,
    check_state_version,
    check_str,
)
from lightning_metagrad.boundaries import (
    AutoBoundaries,
    BatchTaskIdBoundaries,
    CombinedBoundaries,
    NewFitBoundaries,
    TaskBoundarySource,
)
from lightning_metagrad.diagnostics import Diagnostics
from lightning_metagrad.engine import MetaGrad
from lightning_metagrad.meta_network import CoordinateMLP
from lightning_metagrad.predictors import (
    AnchoredPredictor,
    MetaNetPredictor,
    OldGradientPredictor,
    ReplayPredictor,
)
from lightning_metagrad.subspace import SubspacePredictor

_COMBINE = ("sign", "average")
_TARGETS = ("auto", "gradient", "update")
_BOUNDARIES = ("fit", "batch", "manual", "auto")
_STATE_VERSION = 3
#: The state version release 0.1.0 wrote (a paper-only callback without predictors).
_V010_STATE_VERSION = 1
PREDICTORS: dict[str, type[OldGradientPredictor]] = {
    "subspace": SubspacePredictor,
    "paper": MetaNetPredictor,
    "anchored": AnchoredPredictor,
    "replay": ReplayPredictor,
}
#: The predictors ``MetaGradCallback(predictor=...)`` builds by name.
PredictorName = Literal["subspace", "paper", "anchored", "replay"]
#: The boundary sources ``MetaGradCallback(task_boundaries=...)`` builds by name.
BoundaryName = Literal["fit", "batch", "manual", "auto"]
_RESUME_HINT = (
    "Start a new run (a new task stream) instead of resuming it: load its model weights only "
    "(`model.load_state_dict(torch.load(path)['state_dict'])`), or use the release that "
    "wrote it."
)


def build_predictor(spec: PredictorName | OldGradientPredictor) -> OldGradientPredictor:
    """A predictor from its name (``"subspace"``, ``"paper"``, ``"anchored"``, ``"replay"``)
    or an instance.

    Example:
        >>> type(build_predictor("subspace")).__name__
        'SubspacePredictor'
    """
    if isinstance(spec, OldGradientPredictor):
        return spec
    if spec not in PREDICTORS:
        raise ValueError(
            f"`predictor` must be one of {sorted(PREDICTORS)} or an OldGradientPredictor, "
            f"got {spec!r}"
        )
    return PREDICTORS[spec]()


def _flat(tensors: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.detach().reshape(-1).float() for t in tensors])


class MetaGradCallback(Callback):
    r"""Continual learning for any ``LightningModule`` with predicted old-task gradients.

    During each task a predictor learns the task's gradient (or, for optimizers other than
    plain SGD, its update vector) from per-coordinate pairs. From the second task on, the
    predicted mean old-task gradient :math:`\bar\nabla` is combined with the current gradient
    by the sign-agreement rule (eq. 5) and written into ``.grad`` before ``optimizer.step()``,
    so clipping and the optimizer see the rewritten gradient. At each task boundary the
    finished task is folded into the running mean (eqs. 6-7); memory is constant in the
    number of tasks.

    Args:
        predictor: ``"subspace"`` (default) -- per weight matrix, the old tasks' gradient
            subspace, learned from the gradients and projected out of later ones
            (:class:`~lightning_metagrad.subspace.SubspacePredictor`); ``"anchored"`` -- a
            diagonal Taylor model around each old task's end point with a trust region
            (:class:`~lightning_metagrad.predictors.AnchoredPredictor`); ``"paper"`` -- the
            paper exactly: coordinate-wise meta-networks h(theta_j), distilled into g
            (:class:`~lightning_metagrad.predictors.MetaNetPredictor`; how it fares on the
            paper's own protocol is in docs/science.md);
            ``"replay"`` -- the real old-task gradient from a small episodic memory of old
            batches (:class:`~lightning_metagrad.predictors.ReplayPredictor`); or a configured
            predictor instance.
        combine: for the elementwise predictors, ``"sign"`` (eq. 5) or ``"average"`` (eq. 2
            with predicted old gradients); the subspace predictor always projects.
        target: what the predictor learns: ``"gradient"`` (plain SGD), ``"update"`` (the
            optimizer's update vector; the rule then applies to that update), or ``"auto"``:
            gradient for ``torch.optim.SGD`` without momentum and weight decay, else update.
        task_boundaries: ``"fit"`` (each new ``trainer.fit`` starts a task), ``"batch"`` (a
            change of the task id read from the batch), ``"auto"`` (switches detected from a
            jump in the training loss, with a meta-network's reconstruction error as evidence,
            section 5.1; ``AutoBoundaries(signal="error")`` uses the paper's signal alone),
            ``"manual"`` (only :meth:`start_new_task`), a
            :class:`~lightning_metagrad.boundaries.TaskBoundarySource`, or a list of these
            (a new task starts when any of them says so, e.g. ``["fit", "auto"]``).
        task_id_key: dict-batch key holding the task id, for ``task_boundaries="batch"``.
        task_id_fn: a function ``batch -> task id``, for ``task_boundaries="batch"``.
        diagnostics: warn (once, rank zero) when the prediction carries no information or
            the weights run away; the figures are logged either way.

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
        task_boundaries: BoundaryName
        | TaskBoundarySource
        | Sequence[BoundaryName | TaskBoundarySource] = "fit",
        task_id_key: str = "task_id",
        task_id_fn: Callable[[Any], Hashable] | None = None,
        diagnostics: bool = True,
    ) -> None:
        super().__init__()
        check_choice("combine", combine, _COMBINE)
        check_choice("target", target, _TARGETS)
        check_bool("diagnostics", diagnostics)
        if isinstance(task_boundaries, (str, TaskBoundarySource)):
            names: list[Any] = [task_boundaries]
        elif isinstance(task_boundaries, (list, tuple)):
            names = list(task_boundaries)
        else:
            raise ValueError(
                f"`task_boundaries` must be one of {_BOUNDARIES}, a TaskBoundarySource or a list "
                f"of them, got {task_boundaries!r}"
            )
        if not names:
            raise ValueError("`task_boundaries` must name at least one source")
        sources = [self._boundary_source(n, task_id_key, task_id_fn) for n in names]
        self.boundaries = sources[0] if len(sources) == 1 else CombinedBoundaries(sources)
        if task_id_fn is not None and "batch" not in names:
            raise ValueError("`task_id_fn` is only used with `task_boundaries='batch'`")
        if task_id_key != "task_id" and "batch" not in names:
            raise ValueError("`task_id_key` is only used with `task_boundaries='batch'`")
        self.predictor = build_predictor(predictor)
        self.engine = MetaGrad(self.predictor, combine=combine)
        self.predictor_name = predictor if isinstance(predictor, str) else type(predictor).__name__
        self.combine = combine
        self.target = target
        self.diagnostics = Diagnostics(warn=diagnostics)

        # Task bookkeeping (checkpointed).
        self.task_index = 0
        self._tasks_started = 1  # distinct tasks so far (task_index may return to an old one)
        self.detected_switches: list[int] = []  # global steps of automatically detected switches
        self._switch_pending = False
        self._switch_onset = 0  # steps before the pending detection its task began
        self._global_step = 0
        # Inside trainer.test/validate/predict: a checkpoint they load must not roll back what
        # the callback learned (only `fit` resumes the continual-learning state).
        self._evaluating = False
        self._trainer: pl.Trainer | None = None
        self._restored_fit_done = False  # the loaded state was saved when its fit had ended

        # Per-fit run-time state (rebuilt in on_fit_start).
        self._resolved_target: str | None = None
        self._hook_handle: Any = None
        self._before: list[Tensor] | None = None  # update mode: parameters before the step
        self._step_names: list[str] = []
        self._stepped = False
        self._to_log: dict[str, Tensor | float] = {}
        self._skips_reported = 0  # non-finite steps already warned about

    @staticmethod
    def _boundary_source(
        spec: str | TaskBoundarySource, key: str, fn: Callable[[Any], Hashable] | None
    ) -> TaskBoundarySource:
        if isinstance(spec, TaskBoundarySource):
            return spec
        if spec == "fit":
            return NewFitBoundaries()
        if spec == "auto":
            return AutoBoundaries()
        if spec == "manual":
            return TaskBoundarySource()
        if spec == "batch":
            check_str("task_id_key", key)
            check_callable("task_id_fn", fn, "a callable `batch -> task id`", optional=True)
            return BatchTaskIdBoundaries(key=key, fn=fn)
        raise ValueError(
            f"`task_boundaries` must be one of {_BOUNDARIES}, a TaskBoundarySource or a list of "
            f"them, got {spec!r}"
        )

    # ------------------------------------------------------------------ public API

    @property
    def state_key(self) -> str:
        return generate_state_key(
            self, predictor=self.predictor_name, combine=self.combine, target=self.target
        )

    @property
    def num_old_tasks(self) -> int:
        """Tasks folded into the running mean of old-task gradients (``t`` in eqs. 6-7)."""
        return self.predictor.num_old_tasks

    @property
    def meta_network(self) -> CoordinateMLP:
        """The current task's meta-network h: with ``predictor="paper"`` only (a shortcut for
        ``callback.predictor.h``); AttributeError with any other predictor. Every predictor's
        own state is on :attr:`predictor`."""
        return self._meta_predictor().h

    @property
    def predictor_network(self) -> CoordinateMLP | None:
        """The distilled predictor g of the mean old-task gradient (None before task 2): with
        ``predictor="paper"`` only (``callback.predictor.g``); AttributeError otherwise."""
        return self._meta_predictor().g

    def predict_old_gradient(self, theta: Tensor) -> Tensor:
        """Elementwise predictors: the predicted mean old-task gradient at a flat ``theta``
        laid out like the trainable parameters (``cat(p.reshape(-1))`` over those with
        ``requires_grad``); 0 where a parameter is free, or before task 2."""
        if self.predictor.rule != "elementwise":
            raise TypeError(
                f"the {self.predictor_name!r} predictor rewrites by projection and predicts no "
                "old-task gradient; use an elementwise predictor ('anchored', 'paper', 'replay')"
            )
        params = {n: p for n, p in self.engine.params.items() if p.requires_grad}
        if not params:
            raise RuntimeError("predict_old_gradient() needs the model: call it after a fit")
        sizes = [p.numel() for p in params.values()]
        thetas = [t.view_as(p) for t, p in zip(theta.split(sizes), params.values())]
        out = torch.zeros_like(theta, dtype=torch.float32)
        if self.num_old_tasks == 0:
            return out
        predictions = self.predictor.predict(list(params), thetas)
        for piece, prediction in zip(out.split(sizes), predictions):
            if prediction is not None:
                piece.copy_(prediction[0].reshape(-1))
        return out

    def start_new_task(self, pl_module: pl.LightningModule | None = None) -> None:
        """End the current task and start the next: fold it into the predictor (eq. 7).

        Call it by hand between tasks (e.g. with ``task_boundaries="manual"``); ``pl_module``
        is needed only outside a running ``fit``.
        """
        if not self.engine.params and pl_module is not None:
            self._bind(pl_module)
        if not self.engine.params:
            raise RuntimeError(
                "start_new_task() needs the model's parameters: call it during fit, or pass "
                "`pl_module=`."
            )
        self._start_new_task()

    def _start_new_task(self, forget_steps: int = 0) -> None:
        """:meth:`start_new_task`; a switch detected late leaves out its last steps."""
        self._end_task(forget_steps)
        self.task_index = self._tasks_started
        self._tasks_started += 1
        self.engine.learning = True
        self.boundaries.on_task_start()
        self.on_task_start(self.task_index)

    def _end_task(self, forget_steps: int = 0) -> None:
        """Fold the current task in, unless it is a revisited one (folded in already)."""
        if not self.engine.learning:
            return
        try:
            folded = self.engine.end_task(forget_steps)
        except RuntimeError as err:
            raise RuntimeError(f"MetaGrad, task {self.task_index}: {err}") from None
        if not folded:
            rank_zero_warn(
                f"MetaGrad: task {self.task_index} ended before any optimizer step; it is not "
                "added to the old-task predictor."
            )
        else:
            self._to_log.update(
                {f"metagrad/subspace_dim/{n}": float(k) for n, k in self._subspace_dims().items()}
            )

    def _return_to_task(self, index: int) -> None:
        """The stream returns to task ``index`` (``task_boundaries="batch"``, a known id): the
        task that ends is folded in if new; the revisited one trains with the rule acting
        (it protects every folded task, this one included) and is not folded in again."""
        self._end_task()
        self.task_index = index
        self.engine.learning = False
        self.boundaries.on_task_start()
        self.on_task_start(index)

    def on_task_start(self, task_index: int) -> None:
        """Called when a new task starts (after the previous one was folded in). Override to
        react, e.g. to reset a learning-rate schedule."""

    def on_switch_detected(self, global_step: int) -> None:
        """Called when automatic detection declares a task switch (before the new task
        starts, at the next batch). Override to react; the steps are in
        :attr:`detected_switches`."""

    # ------------------------------------------------------------------ hooks

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # (Lightning skips teardown after an exception: reset here too, not only there.)
        self._evaluating = stage != "fit"
        if stage != "fit":
            return
        refuse_unsupported("MetaGradCallback", trainer, pl_module, edit="rewrites gradients")

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        refuse_at_fit_start("MetaGradCallback", trainer, pl_module)
        self._bind(pl_module)
        self.predictor.attach(trainer, pl_module)
        # Detection must know at once whether a step was finite (a host sync); without it the
        # engine checks on the device where the predictor allows.
        self.engine.sync_free = not (self.boundaries.uses_pairs or self.boundaries.uses_gradients)
        # A detected switch is declared some steps after it began: keep that much history.
        onset = self.boundaries.max_onset_steps
        self.predictor.keep_history(onset + 1 if onset else 0)
        optimizer = trainer.optimizers[0]
        target = self._resolved_target = self._resolve_target(optimizer)
        self.predictor.learn_from(target, optimizer)
        if self._resolved_target == "update":
            self._hook_handle = optimizer.register_step_post_hook(self._after_optimizer_step)
        self._trainer = trainer
        if isinstance(self.boundaries, NewFitBoundaries) and self.boundaries.in_fit:
            if trainer.ckpt_path is None:
                # State taken inside an earlier fit (a ModelCheckpoint file loaded by hand, or
                # a fit that crashed) and this fit does not resume it: that fit is over.
                self.boundaries.on_fit_end()
            elif self._restored_fit_done:
                # `fit(next task, ckpt_path=last.ckpt)` of a finished task: the usual way to
                # "continue on the next task". The checkpointed fit was over; this is a new one.
                rank_zero_info(
                    f"MetaGrad: the checkpoint was saved when task {self.task_index}'s fit had "
                    "finished, so this fit starts the next task. To continue that task instead "
                    "(e.g. with a larger max_steps), resume a checkpoint taken during it."
                )
                self.boundaries.on_fit_end()
        self._restored_fit_done = False
        if self.boundaries.on_fit_start():
            self.start_new_task()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            self._evaluating = False

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._warn_skipped_steps()
        self.boundaries.on_fit_end()
        self._release()

    def _warn_skipped_steps(self) -> None:
        """Without a host sync per step the engine counts non-finite steps on the device;
        they are reported here, every ``diagnostics.check_every`` steps and at the fit end."""
        if not self.engine.sync_free:
            return
        skipped = self.engine.skipped_steps
        if skipped > self._skips_reported:
            rank_zero_warn(
                f"MetaGrad: {skipped - self._skips_reported} step(s) with a non-finite "
                "gradient/update; they reach the optimizer non-finite, as without the callback, "
                "and are not used to train the predictor."
            )
        self._skips_reported = skipped

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
        switch = self.boundaries.on_train_batch(batch, batch_idx)
        onset = 0
        if self._switch_pending:
            self._switch_pending = False
            switch = True
            onset, self._switch_onset = self._switch_onset, 0
        if switch:
            revisited = self.boundaries.returning_to()
            if revisited is None:
                self._start_new_task(forget_steps=onset)
            else:
                self._return_to_task(revisited)
        if self.engine.learning:  # a revisited task's batches are not stored again
            self.predictor.observe_batch(batch)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # Fires once per real optimizer step, after unscaling (AMP) and the whole accumulation
        # window, before clipping: the right place to read and rewrite the gradient.
        params = self.engine.params
        names = [n for n, p in params.items() if p.requires_grad and p.grad is not None]
        self._step_names = names
        self._stepped = False
        if not names:
            return
        thetas = [params[n].detach() for n in names]
        if self._resolved_target == "update":
            self._before = [t.clone() for t in thetas]  # finished in _after_optimizer_step
            return
        grads: list[Tensor] = [params[n].grad for n in names]  # type: ignore[misc]
        self._step(names, thetas, grads)
        self._stepped = True

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
                loss = loss.detach().float()
                if trainer.world_size > 1:  # every rank must take the same decision
                    loss = trainer.strategy.reduce(loss, reduce_op="mean")
                self.boundaries.on_loss(loss)
        if not self._stepped:
            return
        self._stepped = False
        self._global_step = trainer.global_step
        if self._global_step % self.diagnostics.check_every == 0:
            self._warn_skipped_steps()
        self._to_log.update(
            self.diagnostics.step(
                [p for p in self.engine.params.values() if p.requires_grad], self.task_index
            )
        )
        # Like Lightning's LearningRateMonitor: only on steps whose logs are written
        # (`log_every_n_steps`), each figure's latest value; a `self.log` call costs about as
        # much as a small model's whole step.
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
            "task_index": self.task_index,
            "tasks_started": self._tasks_started,
            "detected_switches": list(self.detected_switches),
            "switch_pending": self._switch_pending,
            "switch_onset": self._switch_onset,
            # Saved at the end of its fit (its max_steps / max_epochs reached)?
            "fit_done": bool(self._trainer is not None and self._trainer.fit_loop.done),
            "engine": self.engine.state_dict(),
            "boundaries": self.boundaries.state_dict(),
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
        states = checkpoint.get("callbacks") or {}
        if self.state_key in states:
            return  # load_state_dict checks its version
        for key, state in states.items():
            if not str(key).startswith("MetaGradCallback") or not isinstance(state, dict):
                continue
            version = state.get("version")
            if version == _V010_STATE_VERSION:
                raise ValueError(
                    "The checkpoint holds MetaGradCallback state written by lightning-metagrad "
                    f"0.1.0 (state version {version}, key {key!r}), which this release cannot "
                    "resume: 0.1.0 had only the paper's meta-network predictor, in a layout "
                    "today's predictors do not read. " + _RESUME_HINT
                )
            if version != _STATE_VERSION:
                check_state_version("MetaGradCallback", state, _STATE_VERSION, _RESUME_HINT)

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._evaluating:
            rank_zero_info(
                "MetaGrad: trainer.test/validate/predict loaded a checkpoint; the callback's "
                "continual-learning state is kept as it is (only `fit` resumes it)."
            )
            return
        check_state_version("MetaGradCallback", state_dict, _STATE_VERSION, _RESUME_HINT)
        self.task_index = int(state_dict["task_index"])
        self._tasks_started = int(state_dict["tasks_started"])
        self.detected_switches = [int(s) for s in state_dict["detected_switches"]]
        self._switch_pending = bool(state_dict["switch_pending"])
        self._switch_onset = int(state_dict["switch_onset"])
        self._restored_fit_done = bool(state_dict["fit_done"])
        self.engine.load_state_dict(state_dict["engine"])
        self._skips_reported = self.engine.skipped_steps
        self.boundaries.load_state_dict(state_dict["boundaries"])
        self.diagnostics.load_state_dict(state_dict["diagnostics"])

    # ------------------------------------------------------------------ internals

    def _meta_predictor(self) -> MetaNetPredictor:
        if not isinstance(self.predictor, MetaNetPredictor):
            raise AttributeError(
                f"the {self.predictor_name!r} predictor has no meta-networks; use predictor='paper'"
            )
        return self.predictor

    def _subspace_dims(self) -> dict[str, int]:
        if isinstance(self.predictor, SubspacePredictor):
            return self.predictor.subspace_dims()
        return {}

    def _bind(self, pl_module: torch.nn.Module) -> None:
        self.engine.bind(pl_module.named_parameters())

    def _resolve_target(self, optimizer: torch.optim.Optimizer) -> Literal["gradient", "update"]:
        if self.target == "gradient" or self.target == "update":
            return self.target
        plain_sgd = type(optimizer) is torch.optim.SGD and all(
            not group.get("momentum") and not group.get("weight_decay")
            for group in optimizer.param_groups
        )
        return "gradient" if plain_sgd else "update"

    def _step(
        self, names: Sequence[str], thetas: Sequence[Tensor], targets: Sequence[Tensor]
    ) -> bool:
        """One step through the engine, plus detection; returns whether it was finite."""
        pairs = (_flat(thetas), _flat(targets)) if self.boundaries.uses_pairs else None
        raw = [t.detach().clone() for t in targets] if self.boundaries.uses_gradients else None
        logged = self.engine.step_(names, thetas, targets)
        if "finite" in logged:
            rank_zero_warn(
                "MetaGrad: non-finite gradient/update at this step; it is passed on unchanged "
                "and its pairs are not used to train the predictor.",
            )
            return False
        self._to_log.update(logged)
        self.diagnostics.observe_prediction_quality(logged)
        self.diagnostics.observe_rule(logged)
        switch = pairs is not None and self.boundaries.on_pairs(*pairs)
        if raw is not None:  # the step's own gradients, before the rule rewrote them
            switch = self.boundaries.on_gradients(names, thetas, raw) or switch
        if switch:
            self._switch_pending = True
            self._switch_onset = self.boundaries.onset_steps()
            self.detected_switches.append(self._global_step)
            self._to_log["metagrad/switch_detected"] = 1.0
            rank_zero_info(
                f"MetaGrad: task switch detected at global step {self._global_step}; "
                f"task {self.task_index + 1} starts with the next batch."
            )
            self.on_switch_detected(self._global_step)
        return True

    def _after_optimizer_step(self, optimizer: torch.optim.Optimizer, *args: Any) -> None:
        """Update-vector mode: learn from the update, and apply the rule to the update."""
        if self._before is None:
            return
        before, self._before = self._before, None
        names = self._step_names
        params = [self.engine.params[n] for n in names]
        with torch.no_grad():
            after = [p.detach() for p in params]
            update = torch._foreach_sub(before, after)  # gradient-like: theta' = theta - update
            finite = self._step(names, before, update)
            rewritten = self.engine.protected(names, update) if finite else []
            if rewritten:
                # A zeroed coordinate of the update keeps its old value exactly (before - 0).
                torch._foreach_copy_(
                    [after[i] for i in rewritten],
                    torch._foreach_sub(
                        [before[i] for i in rewritten], [update[i] for i in rewritten]
                    ),
                )
        self._stepped = True

    def _release(self) -> None:
        self._trainer = None
        if self._hook_handle is not None:
            self._hook_handle.remove()
            self._hook_handle = None
        self._before = None
