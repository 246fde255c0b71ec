"""``MetaGradCallback``: the paper's method wired into Lightning's hooks.

The callback only connects hooks to the plain-PyTorch parts:

* a :class:`~lightning_metagrad.predictors.OldGradientPredictor` learns from
  ``(theta_j, target_j)`` pairs during a task, folds it into the running mean of old-task
  gradients at a boundary (eqs. 6-7) and predicts that mean (the paper's meta-networks are
  :class:`~lightning_metagrad.predictors.MetaNetPredictor`);
* :mod:`~lightning_metagrad.combination` rewrites the update (eq. 5, or eq. 2's average);
* :mod:`~lightning_metagrad.boundaries` decides where tasks start;
* :class:`~lightning_metagrad.diagnostics.Diagnostics` watches prediction quality and drift.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from typing_extensions import override

from lightning_metagrad._module_utils import (
    count_optimizers,
    loss_of,
    several_optimizers_message,
)
from lightning_metagrad.boundaries import (
    AutoBoundaries,
    BatchTaskIdBoundaries,
    CombinedBoundaries,
    NewFitBoundaries,
    TaskBoundarySource,
)
from lightning_metagrad.combination import joint_average, sign_agreement
from lightning_metagrad.diagnostics import Diagnostics
from lightning_metagrad.meta_network import CoordinateMLP
from lightning_metagrad.predictors import (
    MetaNetPredictor,
    OldGradientPredictor,
    build_predictor,
)

_COMBINE = ("sign", "average")
_TARGETS = ("auto", "gradient", "update")
_BOUNDARIES = ("fit", "batch", "manual", "auto")
# Coordinates per chunk of the fused eq. 5 pass: small enough that the temporaries stay in
# cache and are not fresh page-faulting allocations of P floats every step.
_CHUNK = 1 << 16


def _flat(tensors: Sequence[Tensor], out: Tensor | None = None) -> Tensor:
    parts = [t.detach().reshape(-1) for t in tensors]
    if out is not None and all(t.dtype == out.dtype for t in parts):
        # Reused buffer: no fresh (page-faulting) allocation of P floats every step.
        return torch.cat(parts, out=out)
    return torch.cat([t.float() for t in parts])


def _write_flat(dest: Sequence[Tensor], flat: Tensor) -> None:
    pieces = flat.split([d.numel() for d in dest])
    torch._foreach_copy_(list(dest), [p.view_as(d) for p, d in zip(pieces, dest)])


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
        predictor: ``"anchored"`` (default) -- a diagonal Taylor model around each old task's
            end point with a trust region
            (:class:`~lightning_metagrad.predictors.AnchoredPredictor`); ``"paper"`` -- the
            paper exactly: coordinate-wise meta-networks h(theta_j), distilled into g
            (:class:`~lightning_metagrad.predictors.MetaNetPredictor`; it diverges on the
            paper's own protocol, see docs/science.md);
            ``"replay"`` -- the real old-task gradient from a small episodic memory of old
            batches (:class:`~lightning_metagrad.predictors.ReplayPredictor`); or a configured
            predictor instance.
        combine: ``"sign"`` (eq. 5) or ``"average"`` (eq. 2 with predicted old gradients).
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
        >>> cb = MetaGradCallback(predictor="anchored")
        >>> trainer = Trainer(callbacks=[cb], max_steps=1, logger=False)
        >>> cb.task_index
        0
    """

    def __init__(
        self,
        *,
        predictor: str | OldGradientPredictor = "anchored",
        combine: Literal["sign", "average"] = "sign",
        target: Literal["auto", "gradient", "update"] = "auto",
        task_boundaries: str | TaskBoundarySource | Sequence[str | TaskBoundarySource] = "fit",
        task_id_key: str = "task_id",
        task_id_fn: Callable[[Any], Hashable] | None = None,
        diagnostics: bool = True,
    ) -> None:
        super().__init__()
        if combine not in _COMBINE:
            raise ValueError(f"`combine` must be one of {_COMBINE}, got {combine!r}")
        if target not in _TARGETS:
            raise ValueError(f"`target` must be one of {_TARGETS}, got {target!r}")
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
        self.predictor = build_predictor(predictor)
        self.predictor_name = predictor if isinstance(predictor, str) else type(predictor).__name__
        self.combine = combine
        self.target = target
        self.diagnostics = Diagnostics(warn=diagnostics)

        # Task bookkeeping (checkpointed).
        self.task_index = 0
        self.detected_switches: list[int] = []  # global steps of automatically detected switches
        self._switch_pending = False
        self._global_step = 0
        self._steps_in_task = 0
        self._skipped_steps = 0

        # Per-fit run-time state (rebuilt in on_fit_start).
        self._params: list[torch.nn.Parameter] = []
        self._resolved_target: str | None = None
        self._hook_handle: Any = None
        self._theta_before: Tensor | None = None
        self._step_params: list[torch.nn.Parameter] = []
        self._stepped = False
        self._to_log: dict[str, Tensor | float] = {}
        self._buffers: list[Tensor | None] = [None, None]  # reused flat theta / gradient

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
            if not isinstance(key, str) or not key:
                raise ValueError(f"`task_id_key` must be a non-empty string, got {key!r}")
            if fn is not None and not callable(fn):
                raise ValueError(
                    f"`task_id_fn` must be a callable `batch -> task id`, got {type(fn).__name__}"
                )
            return BatchTaskIdBoundaries(key=key, fn=fn)
        raise ValueError(
            f"`task_boundaries` must be one of {_BOUNDARIES}, a TaskBoundarySource or a list of "
            f"them, got {spec!r}"
        )

    # ------------------------------------------------------------------ public API

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            predictor=self.predictor_name, combine=self.combine, target=self.target
        )

    @property
    def num_old_tasks(self) -> int:
        """Tasks folded into the running mean of old-task gradients (``t`` in eqs. 6-7)."""
        return self.predictor.num_old_tasks

    @property
    def meta_network(self) -> CoordinateMLP:
        """The current task's meta-network h (paper predictor only)."""
        return self._meta_predictor().h

    @property
    def predictor_network(self) -> CoordinateMLP | None:
        """The distilled predictor g of the mean old-task gradient (paper predictor only)."""
        return self._meta_predictor().g

    def predict_old_gradient(self, theta: Tensor) -> Tensor:
        """The predicted mean old-task gradient at flat ``theta``; zeros before task 2."""
        out = self.predictor.predict(theta)
        return torch.zeros_like(theta, dtype=torch.float32) if out is None else out[0]

    def start_new_task(self, pl_module: pl.LightningModule | None = None) -> None:
        """End the current task and start the next: fold it into the running mean (eq. 7).

        Call it by hand between tasks (e.g. with ``task_boundaries="manual"``); ``pl_module``
        is needed only outside a running ``fit``.
        """
        if not self._params and pl_module is not None:
            self._bind([(n, p) for n, p in pl_module.named_parameters() if p.requires_grad])
        if not self._params:
            raise RuntimeError(
                "start_new_task() needs the model's parameters: call it during fit, or pass "
                "`pl_module=`."
            )
        if self._steps_in_task == 0:
            rank_zero_warn(
                f"MetaGrad: task {self.task_index} ended before any optimizer step; it is not "
                "added to the old-task predictor."
            )
        else:
            theta = _flat(self._params)
            if not bool(torch.isfinite(theta).all()):
                raise RuntimeError(
                    f"MetaGrad: the model's parameters are non-finite at the end of task "
                    f"{self.task_index}; the task cannot be folded into the old-task predictor, "
                    "which was left unchanged. Resume from the last good checkpoint and keep the "
                    "loss finite (lower learning rate, gradient clipping, or skip such steps)."
                )
            self.predictor.end_task(theta)
        self.task_index += 1
        self._steps_in_task = 0
        self.boundaries.on_task_start()
        self.on_task_start(self.task_index)

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
        if stage != "fit":
            return
        if not pl_module.automatic_optimization:
            raise MisconfigurationException(
                "MetaGradCallback rewrites gradients between backward and optimizer.step, which "
                "Lightning's manual optimization does not expose. Use automatic optimization "
                "(remove `self.automatic_optimization = False`)."
            )
        if isinstance(getattr(trainer.strategy, "launcher", None), _MultiProcessingLauncher):
            # Runs in the worker: its state would never reach the caller's callback object.
            raise MisconfigurationException(
                "MetaGradCallback does not support spawned/forked processes (ddp_spawn, "
                "ddp_fork, ddp_notebook): the callback's state stays in the worker processes and "
                "is lost when they exit. Use strategy='ddp', or devices=1."
            )
        strategy = type(trainer.strategy).__name__
        if "FSDP" in strategy or "DeepSpeed" in strategy:
            raise MisconfigurationException(
                f"MetaGradCallback does not support the {strategy} (sharded parameters); use a "
                "single device or strategy='ddp'."
            )
        # Lightning itself rejects several optimizers under automatic optimization, advising
        # manual optimization, which MetaGrad cannot support: say so first.
        num_optimizers = count_optimizers(pl_module)
        if num_optimizers is not None and num_optimizers > 1:
            raise MisconfigurationException(
                several_optimizers_message("MetaGradCallback", num_optimizers)
            )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if len(trainer.optimizers) != 1:
            raise MisconfigurationException(
                several_optimizers_message("MetaGradCallback", len(trainer.optimizers))
            )
        named = [(n, p) for n, p in pl_module.named_parameters() if p.requires_grad]
        if not named:
            raise MisconfigurationException(
                "MetaGradCallback found no trainable parameters (all have requires_grad=False). "
                "Unfreeze the parameters to train, or remove the callback."
            )
        self._bind(named)
        self.predictor.attach(trainer, pl_module)
        optimizer = trainer.optimizers[0]
        self._resolved_target = self._resolve_target(optimizer)
        if self._resolved_target == "update":
            self._hook_handle = optimizer.register_step_post_hook(self._after_optimizer_step)
        if (
            trainer.ckpt_path is None
            and isinstance(self.boundaries, NewFitBoundaries)
            and self.boundaries.in_fit
        ):
            # State taken inside an earlier fit (a ModelCheckpoint file loaded by hand, or a fit
            # that crashed) and this fit does not resume it: that earlier fit is over.
            self.boundaries.on_fit_end()
        if self.boundaries.on_fit_start():
            self.start_new_task()

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.boundaries.on_fit_end()
        self._release()

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._release()

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        switch = self.boundaries.on_train_batch(batch, batch_idx)
        if self._switch_pending:
            self._switch_pending = False
            switch = True
        if switch:
            self.start_new_task()
        self.predictor.observe_batch(batch)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # Fires once per real optimizer step, after unscaling (AMP) and the whole accumulation
        # window, before clipping: the right place to read and rewrite the gradient.
        params = [p for p in self._params if p.grad is not None]
        self._step_params = params
        self._stepped = False
        if not params:
            return
        if self._resolved_target == "update":
            self._theta_before = _flat(params)  # finished in _after_optimizer_step
            return
        theta = _flat(params, out=self._buffer(0, params))
        grads: list[Tensor] = [p.grad for p in params]  # type: ignore[misc]
        grad = _flat(grads, out=self._buffer(1, params))
        finite = self._observe(theta, grad)
        combined = self._combine(theta, grad, inplace=finite)
        if combined is not None:
            _write_flat(grads, combined[0])
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
        self._steps_in_task += 1
        self._global_step = trainer.global_step
        self._to_log.update(self.diagnostics.step(self._params, self.task_index))
        # Like Lightning's LearningRateMonitor: only on steps whose logs are written
        # (`log_every_n_steps`), each figure's latest value; a `self.log` call costs about as
        # much as a small model's whole step.
        if trainer._logger_connector.should_update_logs:
            self._to_log["metagrad/task"] = float(self.task_index)
            for name, value in self._to_log.items():
                pl_module.log(name, value, on_step=True, on_epoch=False, batch_size=1)
            self._to_log = {}

    # ------------------------------------------------------------------ checkpointing

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": 2,
            "task_index": self.task_index,
            "detected_switches": list(self.detected_switches),
            "switch_pending": self._switch_pending,
            "steps_in_task": self._steps_in_task,
            "skipped_steps": self._skipped_steps,
            "predictor": self.predictor.state_dict(),
            "boundaries": self.boundaries.state_dict(),
            "diagnostics": self.diagnostics.state_dict(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.task_index = int(state_dict["task_index"])
        self.detected_switches = [int(s) for s in state_dict["detected_switches"]]
        self._switch_pending = bool(state_dict["switch_pending"])
        self._steps_in_task = int(state_dict["steps_in_task"])
        self._skipped_steps = int(state_dict["skipped_steps"])
        self.predictor.load_state_dict(state_dict["predictor"])
        self.boundaries.load_state_dict(state_dict["boundaries"])
        self.diagnostics.load_state_dict(state_dict["diagnostics"])

    # ------------------------------------------------------------------ internals

    def _meta_predictor(self) -> MetaNetPredictor:
        if not isinstance(self.predictor, MetaNetPredictor):
            raise AttributeError(
                f"the {self.predictor_name!r} predictor has no meta-networks; use predictor='paper'"
            )
        return self.predictor

    def _bind(self, named: list[tuple[str, torch.nn.Parameter]]) -> None:
        self._params = [p for _, p in named]
        self.predictor.bind(
            [n for n, _ in named], [p.numel() for _, p in named], self._params[0].device
        )

    def _resolve_target(self, optimizer: torch.optim.Optimizer) -> str:
        if self.target != "auto":
            return self.target
        plain_sgd = type(optimizer) is torch.optim.SGD and all(
            not group.get("momentum") and not group.get("weight_decay")
            for group in optimizer.param_groups
        )
        return "gradient" if plain_sgd else "update"

    def _buffer(self, slot: int, params: Sequence[Tensor]) -> Tensor:
        """A flat float32 buffer for ``params``, kept between steps (released at fit end)."""
        numel = sum(p.numel() for p in params)
        buf = self._buffers[slot]
        if buf is None or buf.numel() != numel or buf.device != params[0].device:
            buf = torch.empty(numel, dtype=torch.float32, device=params[0].device)
            self._buffers[slot] = buf
        return buf

    def _observe(self, theta: Tensor, target: Tensor) -> bool:
        """Train the predictor on this step's ``(theta_j, target_j)`` pairs (section 2.2).

        Returns whether ``target`` is finite everywhere.
        """
        # One reduction pass instead of an elementwise isfinite + all: a dot product is
        # finite iff every entry is, unless it overflows (then the exact check decides).
        finite = bool(torch.isfinite(torch.dot(target, target))) or bool(
            torch.isfinite(target).all()
        )
        if not finite:
            self._skipped_steps += 1
            rank_zero_warn(
                "MetaGrad: non-finite gradient/update at this step; its pairs are not used to "
                "train the predictor.",
            )
            return False
        logged = self.predictor.observe(theta, target)
        self._to_log.update(logged)
        self.diagnostics.observe_prediction_quality(logged)
        if self.boundaries.on_pairs(theta, target):
            self._switch_pending = True
            self.detected_switches.append(self._global_step)
            self._to_log["metagrad/switch_detected"] = 1.0
            rank_zero_info(
                f"MetaGrad: task switch detected at global step {self._global_step}; "
                f"task {self.task_index + 1} starts with the next batch."
            )
            self.on_switch_detected(self._global_step)
        return True

    def _combine(
        self, theta: Tensor, current: Tensor, inplace: bool = False
    ) -> tuple[Tensor, Tensor | None] | None:
        """The rewritten direction and, for eq. 5, the mask of zeroed coordinates.

        ``inplace``: ``current`` is a finite scratch buffer that eq. 5 may overwrite.
        """
        chunked = type(self.predictor).predict_slice is not OldGradientPredictor.predict_slice
        if inplace and self.combine == "sign" and chunked:
            return self._sign_rule_chunked(theta, current)
        prediction = self.predictor.predict(theta)
        if prediction is None:
            return None
        predicted, trusted = prediction
        if self.combine == "average":
            combined = joint_average(current, predicted, self.num_old_tasks)
            # Guard: a non-finite prediction never reaches the weights.
            return torch.where(torch.isfinite(combined), combined, current), None
        combined, zeroed = sign_agreement(current, predicted)
        if trusted is not None:  # magnitude-aware: keep the gradient where not trusted
            zeroed = zeroed & trusted
            combined = torch.where(zeroed, torch.zeros_like(current), current)
        self._to_log["metagrad/zeroed_fraction"] = zeroed.float().mean()
        return combined, zeroed

    def _sign_rule_chunked(self, theta: Tensor, current: Tensor) -> tuple[Tensor, None] | None:
        """Eq. 5 (magnitude-aware where the predictor says so) in place on the finite buffer
        ``current``, chunk by chunk: one pass over memory, no per-step P-sized temporaries."""
        kept = torch.zeros((), dtype=torch.float64, device=current.device)
        for start in range(0, current.numel(), _CHUNK):
            prediction = self.predictor.predict_slice(theta[start : start + _CHUNK], start)
            if prediction is None:
                return None
            predicted, trusted = prediction
            cur = current[start : start + _CHUNK]
            # 0/1 floats, not booleans: branch-free and several times faster on CPU.
            keep = torch.mul(cur, predicted).gt_(0)  # signs agree (a NaN prediction: 0)
            if trusted is not None:  # magnitude-aware: keep the gradient where not trusted
                keep.sub_(1).mul_(trusted).add_(1)
            cur.mul_(keep)
            kept += keep.sum()
        self._to_log["metagrad/zeroed_fraction"] = 1.0 - kept / max(current.numel(), 1)
        return current, None

    def _after_optimizer_step(self, optimizer: torch.optim.Optimizer, *args: Any) -> None:
        """Update-vector mode: pairs from the update, and the rule applied to the update."""
        if self._theta_before is None:
            return
        theta_before, self._theta_before = self._theta_before, None
        params = self._step_params
        with torch.no_grad():
            theta_after = _flat(params)
            update = theta_before - theta_after  # gradient-like sign: theta' = theta - update
            self._observe(theta_before, update)
            combined = self._combine(theta_before, update)
            if combined is not None:
                new_update, zeroed = combined
                if zeroed is None:
                    _write_flat(params, theta_before - new_update)
                else:  # eq. 5 on the update: a zeroed coordinate keeps its old value exactly
                    _write_flat(params, torch.where(zeroed, theta_before, theta_after))
        self._stepped = True

    def _release(self) -> None:
        if self._hook_handle is not None:
            self._hook_handle.remove()
            self._hook_handle = None
        self._theta_before = None
        self._buffers = [None, None]
