"""The whole method in plain PyTorch: :class:`MetaGrad`, usable in any training loop.

:class:`MetaGrad` is to :class:`~lightning_metagrad.callback.MetaGradCallback` what
``torch_ema``'s ``ExponentialMovingAverage`` is to an EMA callback. Data flows one way:

* :meth:`MetaGrad.bind` adopts the model's parameters by name, folding a finished task in
  first at the binding it was trained with;
* :meth:`MetaGrad.use_optimizer` decides what the predictor learns from (the gradient, or for
  optimizers other than plain SGD the update vector) and, in update mode, hooks the
  optimizer's step;
* per batch, :meth:`MetaGrad.observe_batch` and :meth:`MetaGrad.observe_loss` feed the task
  boundary source (a switch starts the next task here);
* per optimizer step, :meth:`MetaGrad.before_optimizer_step` (between ``backward()`` and
  ``optimizer.step()``) lets the predictor learn from the step and, from the second task on,
  rewrites the gradient in place (eq. 5 in the learned subspace by default); in update mode it
  snapshots the parameters, and the optimizer's step post-hook learns from and rewrites the
  update the optimizer applied. Each returns a :class:`StepReport`;
* :meth:`MetaGrad.start_task`, :meth:`MetaGrad.return_to_task` and :meth:`MetaGrad.end_task`
  are the task lifecycle: a finished task is folded in (eqs. 6-7), so memory is constant in
  the number of tasks.

Importing this module does not import Lightning.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_metagrad._tensors import all_finite, finite_flag
from lightning_metagrad._validation import check_choice, check_state_version
from lightning_metagrad.boundaries.sources import TaskBoundarySource
from lightning_metagrad.input_layers import InputLayerProbe
from lightning_metagrad.matrices import MatrixGroup, matrix_groups
from lightning_metagrad.predictors import PredictorName, build_predictor
from lightning_metagrad.predictors.base import NothingToFold, OldGradientPredictor, rename_keys
from lightning_metagrad.predictors.rules import joint_average_, sign_agreement_
from lightning_metagrad.runtime import Runtime
from lightning_metagrad.sharding import Shards, local, shards_of

_STATE_VERSION = 2
#: Above this, the copies kept to undo a detected switch's late updates are warned about.
_HISTORY_WARN_BYTES = 2**30
Target = Literal["gradient", "update"]
_TARGETS = ("auto", "gradient", "update")


@dataclass
class StepReport:
    """What one optimizer step did.

    Attributes:
        names: the bound parameters that took part (trainable, with a gradient).
        finite: whether the step's targets were finite: a bool, or a 0-dim bool device tensor
            when the engine checked without a host sync.
        learned: the predictor learned from the step (False on a task folded in already).
        rewritten: names of the tensors the rule rewrote (those the old tasks trained).
        held_back: the share of the step the rule removed (eq. 5's zeroed coordinates, or the
            energy a projection removed), a 0-dim tensor; None where the rule did not act.
        prediction_error: the predictor's held-out relative error, where it measures one.
        switch_detected: the boundary source detected a task switch at this step; the next
            task starts with the next batch (or the next step).
        figures: everything to log, by name.
    """

    names: list[str] = field(default_factory=list)
    finite: bool | Tensor = True
    learned: bool = False
    rewritten: list[str] = field(default_factory=list)
    held_back: Tensor | None = None
    prediction_error: Tensor | None = None
    switch_detected: bool = False
    figures: dict[str, Tensor] = field(default_factory=dict)


@torch.no_grad()
def _write_rewritten(
    names: Sequence[str],
    params: Sequence[Tensor],
    before: Sequence[Tensor],
    delta: Sequence[Tensor],
    rewritten: Sequence[str],
) -> None:
    """Set the ``rewritten`` parameters to ``before - delta`` (their rewritten step), in place.
    A zeroed coordinate of ``delta`` keeps its value from ``before`` exactly."""
    if not rewritten:
        return
    index = [names.index(n) for n in rewritten]
    torch._foreach_copy_(
        [params[i] for i in index],
        torch._foreach_sub([before[i] for i in index], [delta[i] for i in index]),
    )


class MetaGrad:
    """Continual learning in any training loop: bind, step, task boundaries, state.

    Args:
        predictor: ``"subspace"`` (default), ``"anchored"``, ``"paper"``, ``"replay"`` or an
            :class:`~lightning_metagrad.predictors.base.OldGradientPredictor`.
        combine: for elementwise predictors, ``"sign"`` (eq. 5) or ``"average"`` (eq. 2);
            projection predictors rewrite by their own rule.
        target: what the predictor learns and the rule rewrites: ``"gradient"``,
            ``"update"`` (the optimizer's update vector), or ``"auto"``: the gradient for plain
            ``torch.optim.SGD`` (no momentum, no weight decay), else the update, so that
            the step the optimizer applies is protected. Decided in :meth:`use_optimizer`.
        boundaries: where tasks start besides :meth:`start_task` (a
            :class:`~lightning_metagrad.boundaries.sources.TaskBoundarySource`; None: only by
            hand).
        runtime: the loop's services (warnings, a loss on a stored batch for replay, a mean
            over processes); see :class:`~lightning_metagrad.runtime.Runtime`.

    Example (a plain loop with Adam: the update the optimizer applies is protected):
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = torch.optim.Adam(model.parameters(), lr=0.01)
        >>> core = MetaGrad()
        >>> core.bind(model)
        >>> core.use_optimizer(opt)
        'update'
        >>> for task in range(2):
        ...     if task:
        ...         _ = core.start_task()
        ...     for _ in range(4):
        ...         opt.zero_grad()
        ...         model(torch.randn(8, 4)).pow(2).mean().backward()
        ...         _ = core.before_optimizer_step()
        ...         opt.step()  # the engine's hook learns from and rewrites the update
        >>> core.task_index, core.num_old_tasks
        (1, 1)
    """

    def __init__(
        self,
        predictor: PredictorName | OldGradientPredictor = "subspace",
        *,
        combine: Literal["sign", "average"] = "sign",
        target: Literal["auto", "gradient", "update"] = "auto",
        boundaries: TaskBoundarySource | None = None,
        runtime: Runtime | None = None,
    ) -> None:
        self.predictor = build_predictor(predictor)
        self.combine = check_choice("combine", combine, ("sign", "average"))
        self.target = check_choice("target", target, _TARGETS)
        if boundaries is not None and not isinstance(boundaries, TaskBoundarySource):
            raise ValueError(
                "`boundaries` must be a TaskBoundarySource or None, got "
                f"{type(boundaries).__name__}"
            )
        self.boundaries = boundaries if boundaries is not None else TaskBoundarySource()
        if runtime is not None and not isinstance(runtime, Runtime):
            raise ValueError(f"`runtime` must be a Runtime, got {type(runtime).__name__}")
        self.runtime = runtime if runtime is not None else Runtime()
        self.predictor.connect(self.runtime)
        self.params: dict[str, Tensor] = {}
        self.groups: list[MatrixGroup] = []  # the weight matrices, by owner module
        self.shards = Shards()  # the parameters' row shards over processes (FSDP2), if any
        # Task bookkeeping (in the state).
        self.task_index = 0
        self.num_tasks = 1  # distinct tasks so far (task_index may return to an old one)
        self.steps_in_task = 0
        self.learning = True  # False on a task folded in already (a revisited task id)
        self._skipped: int | Tensor = 0  # non-finite steps: an int, or a device tensor
        self._old_shapes: dict[str, tuple[int, ...]] = {}  # what the old tasks trained
        self._trained: set[str] = set()  # had a target in the current task
        self._switch_pending = False
        self._switch_onset = 0  # steps before the detection the new task began
        # The trainable parameters before each of the last steps a detected switch may have
        # begun at (run-time only; see _undo_late_updates).
        self._history: deque[dict[str, Tensor]] | None = None
        # Finds the layers that read the data for a source that asks (until the first step).
        self._probe: InputLayerProbe | None = None
        # Per optimizer (run-time only).
        self.resolved_target: Target = "gradient"
        self._hook: Any = None
        self._before: list[Tensor] | None = None  # update mode: parameters before the step
        # Update mode with detection: the step's gradients, which the signals read (not the
        # optimizer's update: Adam's per-coordinate scaling and momentum are not the task's).
        self._step_grads: list[Tensor] | None = None
        self._step_names: list[str] = []
        self._sync_free = True
        self.last_report: StepReport | None = None
        #: The predictor's figures after the latest task was folded in.
        self.task_figures: dict[str, float] = {}
        #: Called with each :class:`StepReport` of a step (after the rule acted); the
        #: callback logs and diagnoses through it.
        self.on_step: Callable[[StepReport], None] | None = None

    # ------------------------------------------------------------------ properties

    @property
    def num_old_tasks(self) -> int:
        """Tasks folded into the predictor (``t`` in eqs. 6-7)."""
        return self.predictor.num_old_tasks

    @property
    def skipped_steps(self) -> int:
        """Steps with a non-finite target, not learned from (a host sync on the device)."""
        return int(self._skipped)

    @property
    def sync_free(self) -> bool:
        """Whether steps are checked for finiteness on the device, without a host sync (the
        predictor masks non-finite steps and no detection needs to know at once)."""
        return self._sync_free

    @sync_free.setter
    def sync_free(self, value: bool) -> None:
        # False forces a host check of every step (a test of the host-checked path).
        self._sync_free = bool(value) and self.predictor.masks_non_finite

    @property
    def switch_pending(self) -> bool:
        """A detected switch whose new task starts with the next batch or step."""
        return self._switch_pending

    # ------------------------------------------------------------------ binding

    def bind(self, model: nn.Module | Iterable[tuple[str, Tensor]]) -> None:
        """Adopt the model's parameters by name (an ``nn.Module``, or ``named_parameters()``;
        the module lets weight matrices be grouped by the module that owns them, see
        :mod:`~lightning_metagrad.matrices`).

        Frozen ones are bound too (a layer frozen for one task keeps what the old tasks
        learned about it); only parameters that require a gradient and have one take part in
        a step. A parameter the old tasks trained in another shape, or never trained, is
        free. A parameter bound before under another name (a layer inserted in front of it,
        pruning's ``weight`` -> ``weight_orig``) keeps its protection under the new name;
        names the old tasks trained that are gone, or new ones, are warned about.
        """
        params: dict[str, Tensor]
        if isinstance(model, nn.Module):
            params, modules = dict(model.named_parameters()), dict(model.named_modules())
            _refuse_sparse_gradients(modules)
        else:
            params, modules = dict(model), None
        if not any(p.requires_grad for p in params.values()):
            raise ValueError(
                "no trainable parameters to bind (all have requires_grad=False): unfreeze "
                "the parameters to train"
            )
        renamed = self._renamed(params)
        if renamed:
            self._old_shapes = rename_keys(self._old_shapes, renamed)
            self._trained = set(rename_keys(dict.fromkeys(self._trained), renamed))
            self.predictor.rename(renamed)
        if self.predictor.needs_batch_loss and self.runtime.batch_loss is None:
            raise ValueError(
                f"{type(self.predictor).__name__} replays stored batches: it needs their loss. "
                "Pass `MetaGrad(..., runtime=Runtime(batch_loss=fn))` (fn(batch) -> the loss "
                "tensor) and call `core.observe_batch(batch)` with every training batch, or "
                "use MetaGradCallback, which does both."
            )
        shards = self._check_shards(params)
        self._warn_changed_names(params)
        self._warn_fresh_model(params)
        self.params = params
        self.shards = shards
        self.groups = matrix_groups(params, modules)
        self.predictor.shards = shards
        # The predictor sees each process's rows (the groups keep the global shapes).
        local_params = {n: local(p) for n, p in params.items()}
        self.predictor.bind(local_params, groups=self.groups, modules=modules)
        self._decide_sync()
        self._probe_input_layers(model if isinstance(model, nn.Module) else None)

    def _probe_input_layers(self, model: nn.Module | None) -> None:
        if self._probe is not None:
            self._probe.remove()
            self._probe = None
        if not self.boundaries.uses_input_layers:
            return
        if model is None:
            self.runtime.warn(
                "MetaGrad: the boundary source tests the layers that read the data, which "
                "only a model bound as an nn.Module shows; bind the module (core.bind(model)) "
                "rather than its named parameters, or that signal stays silent."
            )
            return
        self._probe = InputLayerProbe(model, self.params)

    def _check_shards(self, params: dict[str, Tensor]) -> Shards:
        """The parameters' row shards (FSDP2), refusing what cannot run on them."""
        shards = shards_of(params)
        if not shards.active:
            return shards
        why = self.predictor.sharding_unsupported()
        if why is not None:
            raise ValueError(
                f"{type(self.predictor).__name__} cannot learn from parameters sharded over "
                f"processes (FSDP2): {why}. Use the default SubspacePredictor(), or train "
                "without sharding (a single device or strategy='ddp')."
            )
        if self.boundaries.uses_gradients or self.boundaries.uses_pairs:
            raise ValueError(
                "task-switch detection from gradients (task_boundaries='auto') reads whole "
                "gradients, which sharded parameters (FSDP2) split over processes. Give the "
                "boundaries instead: a new fit per task ('fit'), a task id in the batch "
                "('batch'), or start_task() by hand ('manual')."
            )
        return shards

    def _require_binding(self, call: str) -> None:
        if not self.params:
            raise RuntimeError(
                f"MetaGrad.{call} needs the model's parameters: call `bind(model)` first"
            )

    def _renamed(self, params: dict[str, Tensor]) -> dict[str, str]:
        """Old name -> new name of the parameters bound before under another name: the same
        tensor object (a layer inserted in front, pruning's ``weight_orig``), or, for names
        the old tasks trained, the same name inside a wrapper (``torch.compile``'s
        ``_orig_mod.``, DDP's ``module.``), e.g. after loading a state."""
        old = {id(p): n for n, p in self.params.items()}
        renamed = {old[id(p)]: n for n, p in params.items() if id(p) in old and old[id(p)] != n}
        known = {_unwrapped(n): n for n in self._old_shapes if n not in params}
        for n in params:
            was = known.get(_unwrapped(n))
            if was is not None and was != n and was not in renamed and n not in self._old_shapes:
                renamed[was] = n
        return renamed

    def _warn_fresh_model(self, params: dict[str, Tensor]) -> None:
        """A model bound for a later task that is not the one the earlier task trained: none
        of its parameters is the same object, and none holds the values that task ended
        with (a freshly built model with the same callback)."""
        if not self.params or (not self._old_shapes and self.steps_in_task == 0):
            return
        bound = {id(q) for q in self.params.values()}
        if any(id(p) in bound for p in params.values()):
            return
        pairs = [
            (local(p.detach()), local(self.params[n].detach()))
            for n, p in params.items()
            if n in self.params and self.params[n].shape == p.shape
        ]
        # Stops at the first tensor that still holds the previous task's values.
        if pairs and not any(torch.equal(p, q.to(p.device)) for p, q in pairs):
            self.runtime.warn(
                "MetaGrad: the model bound now holds none of the weights the previous task "
                f"ended with (task {self.task_index}): a freshly built model? It is trained "
                "as the next task of the same stream, protecting the old tasks. To start a "
                "new stream, use a new MetaGradCallback (or MetaGrad); to continue, load the "
                "previous weights into it first."
            )

    def _warn_changed_names(self, params: dict[str, Tensor]) -> None:
        if not self._old_shapes:
            return
        gone = sorted(set(self._old_shapes) - set(params))
        new = sorted(n for n, p in params.items() if p.requires_grad and n not in self._old_shapes)
        if gone:
            self.runtime.warn(
                f"MetaGrad: parameters the old tasks trained are no longer in the model: {gone}; "
                "their protection is dropped. If a layer was replaced or renamed, keep its name "
                "(or its parameter object) between tasks to keep it protected."
            )
        reshaped = sorted(
            n for n, p in params.items() if n in self._old_shapes and self._old_shapes[n] != p.shape
        )
        if reshaped:
            self.runtime.warn(
                f"MetaGrad: parameters changed shape since the old tasks trained them: "
                f"{reshaped}; they are free (the old tasks' knowledge of them does not apply)."
            )
        if new and self.num_old_tasks:
            self.runtime.warn(
                f"MetaGrad: parameters new since the old tasks: {new}; the old tasks never "
                "trained them, so they are free."
            )

    def begin_fit(self, model: nn.Module | Iterable[tuple[str, Tensor]]) -> bool:
        """A new training run (a Lightning ``fit``) starts on ``model``: ask the boundary
        source whether it starts a new task; if so, fold the finished task in at the binding
        it was trained with, then bind ``model`` and start the task. Returns whether a new
        task started."""
        new_task = self.boundaries.on_fit_start()
        if new_task and self.params:
            self._end_task()  # at the old binding: names and shapes the task trained
        self.bind(model)
        if new_task:
            if not self.params_folded:
                self._end_task()  # resumed without a binding: the model is the task's end
            self._begin_task()
        return new_task

    def end_fit(self) -> None:
        """The training run ends (tasks may go on in the next one)."""
        self.boundaries.on_fit_end()

    # ------------------------------------------------------------------ optimizer

    def use_optimizer(self, optimizer: torch.optim.Optimizer) -> Target:
        """Decide what the predictor learns from (``target``), tell the predictor, and in
        update mode register a step post-hook on ``optimizer`` that learns from and rewrites
        the update it applied (a step the grad scaler skips applies none, and is not seen).
        Returns ``"gradient"`` or ``"update"``."""
        self.release_optimizer()
        if self.target == "auto":
            plain_sgd = type(optimizer) is torch.optim.SGD and all(
                not g.get("momentum") and not g.get("weight_decay") for g in optimizer.param_groups
            )
            self.resolved_target = "gradient" if plain_sgd else "update"
        else:
            self.resolved_target = self.target  # type: ignore[assignment]
        self.predictor.learn_from(self.resolved_target, optimizer)
        if self.resolved_target == "update":
            self._hook = optimizer.register_step_post_hook(self._after_step_hook)
        return self.resolved_target

    def release_optimizer(self) -> None:
        """Remove the optimizer hook (update mode) and any pending snapshot."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._before = None
        self._step_grads = None

    # ------------------------------------------------------------------ per batch

    def observe_batch(self, batch: Any, batch_idx: int = 0) -> bool:
        """Before a training batch: feed the boundary source, start the next task (or return
        to an earlier one) where it says so, and hand the batch to the predictor (a memory
        keeps some). Returns whether the task changed."""
        switch = self.boundaries.on_train_batch(batch, batch_idx)
        changed = self._apply_switch(switch)
        if self.learning:  # a revisited task's batches are not stored again
            self.predictor.observe_batch(batch)
        return changed

    def observe_loss(self, loss: Tensor) -> None:
        """After a training batch, its detached loss (the mean over processes), for
        boundary sources that read it (:attr:`TaskBoundarySource.uses_loss`)."""
        if self.boundaries.uses_loss:
            self.boundaries.on_loss(loss)

    # ------------------------------------------------------------------ per optimizer step

    def before_optimizer_step(self) -> StepReport | None:
        """Between ``backward()`` (after unscaling and the whole accumulation window) and
        ``optimizer.step()``. Gradient mode: learn from the bound parameters' ``.grad`` and
        rewrite it in place; returns the report. Update mode: snapshot the parameters (the
        optimizer's step post-hook finishes the step); returns None."""
        return self._begin_step(update=self.resolved_target == "update")

    def step(self) -> StepReport | None:
        """:meth:`before_optimizer_step` in gradient mode (whatever ``target`` says): learn
        from and rewrite the bound parameters' ``.grad``."""
        return self._begin_step(update=False)

    def _begin_step(self, update: bool) -> StepReport | None:
        self._require_binding("before_optimizer_step()")
        self._apply_switch(False)
        if self._probe is not None and (found := self._probe.names()) is not None:
            self.boundaries.on_input_layers(found)  # the step's forward has shown them
            self._probe.remove()
            self._probe = None
        snapshot: dict[str, Tensor] | None = None
        if self._history is not None:
            snapshot = {
                n: local(p.detach()).clone() for n, p in self.params.items() if p.requires_grad
            }
            self._history.append(snapshot)
        names = [n for n, p in self.params.items() if p.requires_grad and p.grad is not None]
        self._step_names = names
        self._before = None
        self._step_grads = None
        if not names:
            return None
        thetas = [local(self.params[n].detach()) for n in names]
        if update:  # the history's copy serves (both are only read), else one of its own
            self._before = [snapshot[n] for n in names] if snapshot else [t.clone() for t in thetas]
            if self.boundaries.uses_gradients or self.boundaries.uses_pairs:
                now = [self.params[n].grad for n in names]
                self._step_grads = [local(g).detach().clone() for g in now]  # type: ignore[arg-type]
            return None
        grads = [local(self.params[n].grad) for n in names]  # type: ignore[arg-type]
        return self._step(names, thetas, grads)

    def after_optimizer_step(self) -> StepReport | None:
        """Update mode, after ``optimizer.step()``: learn from the update it applied and
        rewrite that update in place in the parameters. Called by the hook
        :meth:`use_optimizer` registers; call it by hand only without that hook."""
        if self._before is None:
            return None
        before, self._before = self._before, None
        names = self._step_names
        with torch.no_grad():
            after = [local(self.params[n].detach()) for n in names]
            update = torch._foreach_sub(before, after)  # gradient-like: theta' = theta - update
            grads, self._step_grads = self._step_grads, None
            report = self._step(names, before, update, detect_on=grads)
            _write_rewritten(names, after, before, update, report.rewritten)
        return report

    def _after_step_hook(self, optimizer: torch.optim.Optimizer, *args: Any) -> None:
        self.after_optimizer_step()

    @torch.no_grad()
    def _step(
        self,
        names: Sequence[str],
        thetas: Sequence[Tensor],
        targets: Sequence[Tensor],
        detect_on: list[Tensor] | None = None,
    ) -> StepReport:
        """Observe one step's ``(theta, target)`` pairs, feed detection (``detect_on``: the
        step's gradients in update mode; else the targets before the rule), rewrite
        ``targets``.

        A non-finite step is not learned from. Checked on the host (one sync), it is not
        rewritten either: a NaN reaches the optimizer or grad scaler as it is. Checked on the
        device (the predictor masks non-finite steps and no detection needs to know at
        once), the predictor leaves it out of what it learns and the rule still runs.
        """
        report = StepReport(names=list(names))
        if self._sync_free:
            finite: Tensor | None = self.shards.all_true(finite_flag(targets))  # type: ignore[assignment]
            self._skipped = (~finite).to(torch.int64) + self._skipped  # type: ignore[operator]
            report.finite = finite  # type: ignore[assignment]
        else:
            finite = None
            if not self.shards.all_true(all_finite(targets)):
                self._skipped = int(self._skipped) + 1
                report.finite = False
                self._report(report)
                return report
        raw = detect_on
        if raw is None and (self.boundaries.uses_gradients or self.boundaries.uses_pairs):
            raw = [t.detach().clone() for t in targets]  # before the rule rewrites them
        if self.learning:
            if finite is None:
                figures = self.predictor.observe(names, thetas, targets)
            else:  # only predictors that declare masks_non_finite are checked on the device
                figures = self.predictor.observe(names, thetas, targets, finite=finite)
            report.figures.update(figures)
            report.prediction_error = self.predictor.prediction_error()
            report.learned = True
            self.steps_in_task += 1
            self._trained.update(names)
        self.rewrite_(names, thetas, targets, report)
        if raw is not None:
            report.switch_detected = self._detect(names, thetas, raw)
        self._report(report)
        return report

    def _report(self, report: StepReport) -> None:
        self.last_report = report
        if self.on_step is not None:
            self.on_step(report)

    def _detect(self, names: Sequence[str], thetas: Sequence[Tensor], raw: list[Tensor]) -> bool:
        switch = False
        if self.boundaries.uses_pairs:
            flat_theta = torch.cat([t.reshape(-1).float() for t in thetas])
            switch = self.boundaries.on_pairs(
                flat_theta, torch.cat([t.reshape(-1).float() for t in raw])
            )
        if self.boundaries.uses_gradients:
            switch = self.boundaries.on_gradients(names, thetas, raw) or switch
        if switch:
            self._switch_pending = True
            self._switch_onset = self.boundaries.onset_steps()
        return switch

    @torch.no_grad()
    def rewrite_(
        self,
        names: Sequence[str],
        thetas: Sequence[Tensor],
        targets: Sequence[Tensor],
        report: StepReport | None = None,
    ) -> StepReport:
        """Apply the rule (from task 2 on) to ``targets`` in place, on the tensors the old
        tasks trained in this shape; the rest is free. Returns (or fills) the report."""
        report = report if report is not None else StepReport(names=list(names))
        chosen = self.protected(names, targets)
        if not chosen:
            return report
        names = [names[i] for i in chosen]
        thetas = [thetas[i] for i in chosen]
        targets = [targets[i] for i in chosen]
        report.rewritten = list(names)
        if self.predictor.rule == "projection":
            held = self.predictor.rewrite_(names, thetas, targets)
            if held is not None:
                report.held_back = held
                report.figures["metagrad/removed_energy"] = held
            return report
        predictions = self.predictor.predict(names, thetas)
        pairs = [(t, p) for t, p in zip(targets, predictions) if p is not None]
        if not pairs:
            report.rewritten = []
            return report
        currents, given = [t for t, _ in pairs], [p for _, p in pairs]
        if self.combine == "average":
            joint_average_(currents, given, self.predictor.num_old_tasks)
            return report
        kept, total = sign_agreement_(currents, given)
        held = 1.0 - kept / max(total, 1)
        report.held_back = held
        report.figures["metagrad/zeroed_fraction"] = held
        return report

    def predict_old_gradient(self, theta: Tensor) -> Tensor:
        """Elementwise predictors: the predicted mean old-task gradient at a flat ``theta``
        laid out like the trainable parameters (``cat(p.reshape(-1))`` over those with
        ``requires_grad``); 0 where a parameter is free, or before task 2."""
        if self.predictor.rule != "elementwise":
            raise TypeError(
                f"the {type(self.predictor).__name__} rewrites by projection and predicts no "
                "old-task gradient; use an elementwise predictor ('anchored', 'paper', 'replay')"
            )
        self._require_binding("predict_old_gradient()")
        params = {n: p for n, p in self.params.items() if p.requires_grad}
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

    def protected(self, names: Sequence[str], tensors: Sequence[Tensor]) -> list[int]:
        """Indices of the tensors the rule may rewrite: those the old tasks trained, in the
        shape they trained. The rest (a new head, a layer unfrozen later) is free."""
        if self.predictor.num_old_tasks == 0:
            return []
        # Global shapes: a sharded parameter's local rows are not the shape it trained in.
        return [
            i
            for i, n in enumerate(names)
            if self._old_shapes.get(n) == tuple(self._shape_of(n, tensors[i]))
        ]

    def _shape_of(self, name: str, tensor: Tensor) -> tuple[int, ...]:
        bound = self.params.get(name)
        return tuple(bound.shape if bound is not None else tensor.shape)

    # ------------------------------------------------------------------ task lifecycle

    def start_task(self, forget_steps: int = 0) -> int:
        """End the current task (fold it in, eqs. 6-7) and start the next; returns its index.

        ``forget_steps``: the last steps belonged to the new task already (a switch detected
        that many steps late); what they taught the predictor is taken back first.
        """
        self._require_binding("start_task()")
        self._end_task(forget_steps)
        self._begin_task()
        return self.task_index

    def return_to_task(self, index: int) -> None:
        """Go back to an earlier task (a task id seen before): the current task is folded
        in; the earlier one, folded in already, is trained without being learned again."""
        if not 0 <= index < self.num_tasks:
            raise ValueError(f"`index` must name a task seen so far (0..{self.num_tasks - 1})")
        self._end_task()
        self.task_index = index
        self.learning = False
        self.boundaries.on_task_start()
        if self._history is not None:
            self._history.clear()

    def end_task(self, forget_steps: int = 0) -> bool:
        """Fold the current task in now (without starting another); False if it had no step
        to learn from (nothing changes then). Raises if the parameters are non-finite: such
        a task is never folded in."""
        self._require_binding("end_task()")
        if not self.learning or self.steps_in_task == 0:
            return False
        names = [n for n in self.params if n in self._trained]
        thetas = [local(self.params[n].detach()) for n in names]
        if not self.shards.all_true(all_finite(thetas)):
            raise RuntimeError(
                f"MetaGrad, task {self.task_index}: the model's parameters are non-finite at "
                "the end of the task; it cannot be folded into the old-task predictor, which "
                "was left unchanged. Resume from the last good checkpoint and keep the loss "
                "finite (lower learning rate, gradient clipping, or skip such steps)."
            )
        if forget_steps > 0:
            self.predictor.forget_recent(forget_steps)
        try:
            self.predictor.end_task(names, thetas)
        except NothingToFold as err:  # a short task: skipped, and the run goes on
            self.runtime.warn(
                f"MetaGrad: task {self.task_index} is not added to the old-task predictor "
                f"({err}); its {self.steps_in_task} step(s) were too few. Train it longer, or "
                "give the predictor more observations (e.g. SubspacePredictor(every=1))."
            )
            self.steps_in_task, self._trained = 0, set()
            return False
        for n in names:
            self._old_shapes[n] = tuple(self.params[n].shape)
        self.steps_in_task = 0
        self._trained = set()
        return True

    @property
    def params_folded(self) -> bool:
        """Whether the current task has nothing left to fold in."""
        return not self.learning or self.steps_in_task == 0

    def _end_task(self, forget_steps: int = 0) -> None:
        if not self.learning:
            return
        if self.steps_in_task == 0:
            self.runtime.warn(
                f"MetaGrad: task {self.task_index} ended before any optimizer step; it is "
                "not added to the old-task predictor."
            )
            return
        if self.end_task(forget_steps):
            self.task_figures = self.predictor.task_figures()

    def _begin_task(self) -> None:
        self.task_index = self.num_tasks
        self.num_tasks += 1
        self.learning = True
        self.boundaries.on_task_start()
        if self._history is not None:  # a later detection reaches back to here at most
            self._history.clear()

    def _apply_switch(self, switch: bool) -> bool:
        onset = 0
        if self._switch_pending:
            self._switch_pending = False
            switch = True
            onset, self._switch_onset = self._switch_onset, 0
        if not switch:
            return False
        revisited = self.boundaries.returning_to()
        at_onset = self._parameters_at_onset(onset)  # before any task change clears them
        if revisited is None:
            self.start_task(forget_steps=onset)
        else:
            self.return_to_task(revisited)
        if at_onset:
            self._undo_late_updates(at_onset)
        return True

    def _parameters_at_onset(self, steps: int) -> dict[str, Tensor]:
        """The trainable parameters before the first of the last ``steps`` steps (as far
        back as the history goes); empty without history or a late detection."""
        if self._history is None or steps <= 0 or not self._history:
            return {}
        return self._history[-min(steps, len(self._history))]

    @torch.no_grad()
    def _undo_late_updates(self, before: dict[str, Tensor]) -> None:
        """A switch detected late: the new task's updates since ``before`` (the parameters
        at its estimated onset) changed the weights while the finished task was not yet
        protected. Now that it is folded in, their sum is rewritten by the rule as one step
        would have been (projected out of the old tasks' subspaces by default), so the old
        tasks keep the weights they had at the switch. The optimizer's state (e.g. momentum)
        is left as it is."""
        names = [n for n in before if n in self.params]
        now = [local(self.params[n].detach()) for n in names]
        thetas = [before[n] for n in names]
        delta = torch._foreach_sub(thetas, now)  # gradient-like: now = before - delta
        report = self.rewrite_(names, thetas, delta)
        _write_rewritten(names, now, thetas, delta, report.rewritten)

    def _decide_sync(self) -> None:
        # Detection must know at once whether a step was finite (a host sync); otherwise the
        # engine checks on the device where the predictor masks non-finite steps.
        needs = self.boundaries.uses_pairs or self.boundaries.uses_gradients
        self._sync_free = self.predictor.masks_non_finite and not needs
        # A detected switch is declared some steps after it began: keep that much history.
        onset = self.boundaries.max_onset_steps
        self.predictor.keep_history(onset + 1 if onset else 0)
        undo = onset and self.boundaries.undo_late_updates
        self._history = deque(maxlen=onset) if undo else None
        if undo:
            self._warn_history_memory(onset)

    def _warn_history_memory(self, copies: int) -> None:
        trainable = [local(p) for p in self.params.values() if p.requires_grad]
        size = copies * sum(p.numel() * p.element_size() for p in trainable)
        if size > _HISTORY_WARN_BYTES:
            self.runtime.warn(
                f"MetaGrad: undoing a detected switch's late updates keeps {copies} copies of "
                f"the trainable parameters ({size / 2**30:.1f} GiB on their device). Pass "
                "AutoBoundaries(undo_late_updates=False) to save that memory; the updates "
                "between a switch and its detection then stay in the old tasks' weights."
            )

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Plain values and tensors; does not change the object."""
        return {
            "version": _STATE_VERSION,
            "task_index": self.task_index,
            "num_tasks": self.num_tasks,
            "steps_in_task": self.steps_in_task,
            "skipped_steps": self.skipped_steps,  # a host sync, at checkpoints only
            "learning": self.learning,
            "old_shapes": {n: list(s) for n, s in self._old_shapes.items()},
            "trained": sorted(self._trained),
            "switch_pending": self._switch_pending,
            "switch_onset": self._switch_onset,
            "predictor": self.predictor.state_dict(),
            "boundaries": self.boundaries.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state_version("MetaGrad engine", state, _STATE_VERSION)
        self.task_index = int(state["task_index"])
        self.num_tasks = int(state["num_tasks"])
        self.steps_in_task = int(state["steps_in_task"])
        self._skipped = int(state["skipped_steps"])
        self.learning = bool(state["learning"])
        self._old_shapes = {n: tuple(int(x) for x in s) for n, s in state["old_shapes"].items()}
        self._trained = set(state["trained"])
        self._switch_pending = bool(state["switch_pending"])
        self._switch_onset = int(state["switch_onset"])
        self.predictor.load_state_dict(state["predictor"])
        self.boundaries.load_state_dict(state["boundaries"])


#: Leading name segments that wrappers add around a model (``torch.compile``, DDP, Fabric).
_WRAPPERS = ("_orig_mod", "module", "_forward_module", "_checkpoint_wrapped_module")


def _unwrapped(name: str) -> str:
    """A parameter name without the leading segments wrappers add
    (``_orig_mod.net.0.weight`` -> ``net.0.weight``)."""
    parts = name.split(".")
    while len(parts) > 1 and parts[0] in _WRAPPERS:
        parts = parts[1:]
    return ".".join(parts)


def _refuse_sparse_gradients(modules: dict[str, nn.Module]) -> None:
    """Sparse gradients (``nn.Embedding(sparse=True)``) cannot be read or rewritten in place."""
    for name, module in modules.items():
        sparse = isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and module.sparse
        if sparse and module.weight.requires_grad:
            raise ValueError(
                f"the {type(module).__name__} {name!r} has sparse=True: its gradients are "
                "sparse tensors, which MetaGrad cannot learn from or rewrite. Build it with "
                "sparse=False (the default); the default predictor projects the dense "
                "gradient of the rows a batch uses."
            )
