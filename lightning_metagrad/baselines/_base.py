"""The one task lifecycle of the baselines, and the functions their extra passes share.

:class:`_TaskCallback` is the base of every baseline: the quadratic penalties (EWC, online
EWC, SI, MAS: :class:`~lightning_metagrad.baselines._penalty._QuadraticPenaltyCallback`) and
the gradient editors (GPM, A-GEM, ER). Where tasks end is ``task_boundaries=``, the sources of
``MetaGradCallback`` (:func:`~lightning_metagrad.boundaries.sources.build_boundaries`): by
default each ``trainer.fit`` is one task, ended when the fit ends (``on_train_end``, where
``trainer.train_dataloader`` is still available); with ``"batch"`` a task ends at the batch
whose task id changes, before training on it; with ``"manual"`` only when
:meth:`_TaskCallback.consolidate` is called. Sources that detect switches from the engine's
training signals (``"auto"``) are refused at construction.

NaN/inf weights at a task end are handled as ``MetaGradCallback`` handles them: the task is not
consolidated, a fit that ends such a task warns, and the next task's start (the next ``fit``,
the batch whose task id changes, or ``consolidate`` by hand) raises a RuntimeError naming the
fix; the state is left unchanged.

Every baseline refuses the set-ups it cannot support (``setup`` and ``on_fit_start``: the
refusals of :mod:`lightning_metagrad._module_utils`, shared with ``MetaGradCallback``),
including a model without trainable parameters, and keeps its state when
``trainer.test/validate/predict`` load a checkpoint (only ``fit`` restores it).

Finiteness is checked with :mod:`lightning_metagrad._tensors`, the engine's helpers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.combined_loader import CombinedLoader
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from typing_extensions import override

from lightning_metagrad._lightning import before_batch_transfer, generate_state_key
from lightning_metagrad._module_utils import (
    explain_lightning_refusal,
    refuse_at_fit_start,
    refuse_unsupported,
)
from lightning_metagrad._tensors import batch_size_of, detached_copy, first_non_finite
from lightning_metagrad._validation import check_state_version
from lightning_metagrad.boundaries.sources import (
    BoundarySpec,
    CombinedBoundaries,
    NewFitBoundaries,
    TaskBoundarySource,
    build_boundaries,
)

TensorDict = dict[str, Tensor]
#: The trainable parameters of a task end, by name.
Params = dict[str, torch.nn.Parameter]
#: Where a task end reads the finished task's data (None: ``trainer.train_dataloader``).
TaskData = Iterable[Any] | None


# ---------------------------------------------------------------------------- shared checks


#: The fix named when a task ends with non-finite weights (as ``MetaGrad.end_task`` names it).
DIVERGED_FIX = (
    "Resume from the last good checkpoint (`fit(..., ckpt_path=...)` restores the callback "
    "too) and keep the loss finite (lower learning rate, gradient clipping, or skip such steps)."
)


def non_finite_weights(name: str, pl_module: torch.nn.Module, task: int) -> str | None:
    """The refusal of a task end with NaN/inf weights, in ``MetaGrad.end_task``'s words
    (``task``: the 0-based task index, as ``MetaGradCallback`` counts); None if all are finite."""
    bad = first_non_finite({n: p.detach() for n, p in pl_module.named_parameters()})
    if bad is None:
        return None
    return (
        f"{name}, task {task}: the model's parameters are non-finite at the end of the task "
        f"(first: {bad!r}); it cannot be consolidated, and the callback's state was left "
        f"unchanged. {DIVERGED_FIX}"
    )


def check_finite_weights(name: str, pl_module: torch.nn.Module, task: int) -> None:
    """RuntimeError (:func:`non_finite_weights`) if a parameter has a NaN/inf entry."""
    message = non_finite_weights(name, pl_module, task)
    if message is not None:
        raise RuntimeError(message)


def check_finite_importance(
    name: str, importance: Mapping[str, Tensor], task: int, cause: str
) -> None:
    """RuntimeError naming the first parameter whose new importance has a NaN/inf entry;
    ``cause`` says where such values come from and what to do."""
    bad = first_non_finite(importance)
    if bad is not None:
        raise RuntimeError(
            f"{name}: the importance of parameter {bad!r} is not finite at the end of task "
            f"{task + 1}; the task is not consolidated (its state would hold NaN/inf). {cause}"
        )


# ---------------------------------------------------------------------------- extra passes


class TaskBatches(list):  # type: ignore[type-arg]
    """Training batches of the current task kept by the callback (detached copies): already
    through Lightning's transfer hooks and on the module's device, so
    :func:`training_batches` yields them as they are."""


def extra_pass_context(trainer: pl.Trainer) -> contextlib.AbstractContextManager[Any]:
    """The precision context of the baselines' extra forward/backward passes.

    Under AMP they run in full precision (no loss scaler here to keep fp16 gradients from
    underflowing); other plugins (e.g. ``"16-true"``) keep their context.
    """
    plugin = trainer.precision_plugin
    if isinstance(plugin, MixedPrecision):
        return contextlib.nullcontext()
    return plugin.train_step_context()


def training_batches(
    name: str,
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    dataloader: Iterable[Any] | None,
    purpose: str = "to estimate importances",
) -> Iterator[Any]:
    """Training batches, moved to the module's device with Lightning's transfer hooks (the
    batches of a :class:`TaskBatches` went through them already: yielded as they are)."""
    if isinstance(dataloader, TaskBatches):
        yield from dataloader
        return
    source: Any = dataloader if dataloader is not None else trainer.train_dataloader
    if source is None:
        raise MisconfigurationException(
            f"{name} needs training data {purpose}: call `consolidate` during `fit`, or pass "
            "`dataloader=`."
        )
    if isinstance(source, (Mapping, list, tuple)):  # several train dataloaders
        source = CombinedLoader(source, "max_size_cycle")
    for item in source:
        batch = item[0] if isinstance(source, CombinedLoader) else item
        # The training loop's own steps (loops/training_epoch_loop.py).
        batch = trainer.precision_plugin.convert_input(batch)
        batch = before_batch_transfer(pl_module, batch)
        yield trainer.strategy.batch_to_device(batch, pl_module.device, dataloader_idx=0)


def mean_over_ranks(trainer: pl.Trainer, tensors: Sequence[Tensor]) -> list[Tensor]:
    """Each tensor averaged over the DDP ranks, in one all-reduce (in their promoted dtype)."""
    if not tensors:
        return []
    flat = torch.cat([t.reshape(-1) for t in tensors])
    flat = trainer.strategy.reduce(flat, reduce_op="mean")
    pieces = flat.split([t.numel() for t in tensors])
    return [piece.view_as(t) for piece, t in zip(pieces, tensors)]


# ---------------------------------------------------------------------------- the base class


class _TaskCallback(Callback):
    """The task lifecycle of every baseline.

    ``task_boundaries`` says where a task ends, as for ``MetaGradCallback``
    (:func:`~lightning_metagrad.boundaries.sources.build_boundaries`). With ``"fit"`` (the
    default) each ``trainer.fit`` is one task, ended in ``on_train_end`` by :meth:`consolidate`
    (a fit in which no trainable parameter had a gradient ends none, and says why; a fit whose
    batches carry a changing ``"task_id"`` is warned about). With another source the task ends
    where the source says a new one starts: at the training batch whose task id changes
    (``on_train_batch_start``, before training on it), at a ``fit`` start or end where it
    includes ``"fit"``, or by hand (:meth:`consolidate`). The finished task's data are then the
    first training batches since the previous boundary, kept as detached copies as they come
    (as many as the method reads: ``fisher_batches``, ``importance_batches``, ``samples``
    examples; none for SI, A-GEM and ER), since ``trainer.train_dataloader`` mixes the tasks.
    A return to a task id seen before ends a segment that is consolidated again (unlike
    ``MetaGradCallback``, which does not fold a revisited task in twice).
    Sources that need the engine's training signals (``"auto"``) are refused. The refusals shared
    with ``MetaGradCallback`` run in ``setup`` (``refuse_unsupported``) and ``on_fit_start``
    (``refuse_at_fit_start``). Before every optimizer step (``on_before_optimizer_step``: once
    per real step, after AMP unscaling and the whole accumulation window, before clipping) a
    step on which a trainable parameter has a gradient counts for the task and is handed to
    :meth:`_edit_step`.

    ``trainer.test/validate/predict`` load the callback state of a ``ckpt_path`` as ``fit``
    does; an older checkpoint would roll the consolidated tasks back, so (as for
    :class:`~lightning_metagrad.MetaGradCallback`) only ``fit`` restores the state. ``setup``
    records the stage; ``teardown`` and ``on_exception`` (a failed evaluation calls no
    ``teardown``) clear it.

    Subclasses implement :meth:`_end_task`, :meth:`_config` and :meth:`_edit_step`, may extend
    :meth:`_bind` and :meth:`_release` (the run-time state of a fit), and add their state with
    :meth:`_extra_state` / :meth:`_load_extra_state`.
    """

    #: The layout version :meth:`state_dict` writes (bumped when the layout changes).
    _state_version: ClassVar[int] = 1
    #: What the callback does between backward and ``optimizer.step`` (for the refusal message).
    _edit = "rewrites gradients"
    #: Another way out of the manual-optimization refusal, if any (for the refusal message).
    _alternative = ""
    #: Whether spawned/forked processes (whose state never reaches the caller) are refused.
    _refuse_spawn = True

    def __init__(
        self,
        *,
        task_boundaries: BoundarySpec = "fit",
        task_id_key: str = "task_id",
        task_id_fn: Callable[[Any], Hashable] | None = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        #: Where tasks end (see :func:`~lightning_metagrad.boundaries.sources.build_boundaries`).
        self.boundaries = build_boundaries(task_boundaries, task_id_key, task_id_fn)
        _refuse_detection(name, self.boundaries)
        # The default: each fit is one task, its data `trainer.train_dataloader` (unchanged).
        self._per_fit = isinstance(self.boundaries, NewFitBoundaries)
        self._fit_ends_task = self._per_fit or (
            isinstance(self.boundaries, CombinedBoundaries)
            and any(isinstance(src, NewFitBoundaries) for src in self.boundaries.sources)
        )
        # Other sources: the current task's first batches (its data at the task end).
        self._task_batches = TaskBatches()
        self._task_examples = 0
        # The refusal of a task that ended with NaN/inf weights, raised when the next starts.
        self._diverged: str | None = None
        self._fit_task_id: Any = _UNSET  # "fit": the task id of this fit's first batch
        self._task_id_changed: Tensor | bool = False  # ... and whether it changed since
        self._warned_task_ids = False
        #: Tasks consolidated so far.
        self.num_tasks = 0
        self._steps_in_task = 0
        self._evaluating = False
        self._first_step = 0
        # Per-fit run-time state: the trainable parameters by name, of the module `_owner`.
        self._params: dict[str, Tensor] = {}
        self._owner: pl.LightningModule | None = None

    # ------------------------------------------------------------------ public API

    def consolidate(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        dataloader: Iterable[Any] | None = None,
    ) -> None:
        """End the current task: store what protects it (importances and anchors, subspace
        bases, or the task's batches).

        Called automatically where ``task_boundaries`` ends a task; call it by hand with
        ``task_boundaries="manual"``, or to end a task in the middle of a fit. ``dataloader``
        (for methods that read the finished task's data) defaults to
        ``trainer.train_dataloader`` with ``task_boundaries="fit"``, and to the task's
        training batches kept since the previous boundary with any other source.

        Raises:
            RuntimeError: a weight, or the new task's importance, is NaN/inf (nothing changes).
        """
        check_finite_weights(type(self).__name__, pl_module, self.num_tasks)
        if dataloader is None and not self._per_fit:
            dataloader = self._task_batches
        self._end_task(trainer, pl_module, dataloader)
        self.num_tasks += 1
        self._steps_in_task = 0
        self._owner = None  # rebuilt lazily for the next step
        self._clear_task_data()
        if not self._per_fit:
            self.boundaries.on_task_start()

    # ------------------------------------------------------------------ subclass API

    def _end_task(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, dataloader: TaskData
    ) -> None:
        """Store what protects the finished task (the weights are finite)."""
        raise NotImplementedError

    def _config(self) -> dict[str, Any]:
        """The arguments that tell two configurations apart (for :attr:`state_key`)."""
        raise NotImplementedError

    def _edit_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, names: list[str]
    ) -> None:
        """Edit the gradients of a step; ``names``: the trainable parameters with a gradient."""
        raise NotImplementedError

    def _bind(self, pl_module: pl.LightningModule, check: bool) -> None:
        """Align the run-time state with ``pl_module`` (at the fit start with ``check``, whose
        problems are reported then; lazily without, after a task end or a state load)."""
        self._params = {n: p for n, p in pl_module.named_parameters() if p.requires_grad}
        self._owner = pl_module

    def _release(self) -> None:
        """Drop the references to the module between fits."""
        self._params = {}
        self._owner = None

    def _wants_task_batch(self, batches: int, examples: int) -> bool:
        """Whether the finished task's data still needs a batch, given the ``batches`` (and
        their ``examples``) kept so far (sources other than ``"fit"``); by default none."""
        return False

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    # ------------------------------------------------------------------ hooks

    @property
    @override
    def state_key(self) -> str:
        return generate_state_key(self, **self._config())

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._evaluating = stage != "fit"
        if stage != "fit":
            return
        refuse_unsupported(
            type(self).__name__,
            trainer,
            pl_module,
            edit=self._edit,
            alternative=self._alternative,
            refuse_spawn=self._refuse_spawn,
        )

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._evaluating = False

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        refuse_at_fit_start(type(self).__name__, trainer, pl_module)
        if self._diverged is not None:  # the previous task ended with NaN/inf weights
            raise RuntimeError(self._diverged)
        self._fit_task_id, self._task_id_changed = _UNSET, False
        if not self._per_fit and self.boundaries.on_fit_start() and self._steps_in_task > 0:
            self._task_boundary(trainer, pl_module)
        self._bind(pl_module, check=True)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._per_fit:
            self._watch_task_ids(batch)
            return
        if self.boundaries.on_train_batch(batch, batch_idx):
            self._task_boundary(trainer, pl_module)  # before training on the new task's batch
        if self._wants_task_batch(len(self._task_batches), self._task_examples):
            self._task_batches.append(detached_copy(batch))
            self._task_examples += batch_size_of(batch)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._first_step = trainer.global_step  # after a resumed checkpoint is restored

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self._owner is not pl_module:
            self._bind(pl_module, check=False)
        names = [n for n, p in self._params.items() if p.grad is not None]
        if not names:
            return
        self._steps_in_task += 1
        self._edit_step(trainer, pl_module, names)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._per_fit:
            self._warn_task_ids()

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._per_fit:
            self._warn_task_ids()
        if not self._fit_ends_task:
            return
        if self._steps_in_task > 0:
            refusal = non_finite_weights(type(self).__name__, pl_module, self.num_tasks)
            if refusal is None:
                self.consolidate(trainer, pl_module)
                return
            # As MetaGradCallback: warn now, refuse the next task (the next fit) with the fix.
            self._diverged = refusal
            rank_zero_warn(
                refusal.replace(
                    "it cannot be consolidated, and the callback's state was left unchanged",
                    "it is not consolidated, and the next `fit` will refuse to start",
                )
            )
            return
        if trainer.global_step > self._first_step:
            reason = (
                "no optimizer step of this `fit` had a gradient (`training_step` returned None, "
                "or the loss does not depend on the trainable parameters)"
            )
        else:
            reason = (
                "this `fit` made no optimizer step (use a new Trainer per task; a finished one "
                "trains nothing)"
            )
        rank_zero_warn(f"{type(self).__name__}: {reason}, so no task was consolidated.")

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._per_fit:
            self.boundaries.on_fit_end()
        self._release()

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._evaluating = False
        explain_lightning_refusal(type(self).__name__, exception)
        self._release()

    # ------------------------------------------------------------------ checkpointing

    @override
    def state_dict(self) -> dict[str, Any]:
        state = {
            "version": self._state_version,
            "num_tasks": self.num_tasks,
            "steps_in_task": self._steps_in_task,
            **self._extra_state(),
        }
        if not self._per_fit:  # e.g. the current task id (the default's layout is unchanged)
            state["boundaries"] = self.boundaries.state_dict()
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        name = type(self).__name__
        if self._evaluating:  # test/validate/predict: the state is kept as it is
            rank_zero_info(
                f"{name}: trainer.test/validate/predict loaded a checkpoint; the callback's "
                "continual-learning state is kept as it is (only `fit` restores it)."
            )
            return
        check_state_version(name, state_dict, self._state_version)
        self.num_tasks = int(state_dict["num_tasks"])
        self._steps_in_task = int(state_dict["steps_in_task"])
        self._load_extra_state(state_dict)
        if "boundaries" in state_dict and not self._per_fit:
            self.boundaries.load_state_dict(state_dict["boundaries"])
        # The kept batches refill from the resumed task's batches; a divergence is undone.
        self._clear_task_data()
        self._diverged = None
        self._owner = None  # rebuilt lazily for the next step

    # ------------------------------------------------------------------ task boundaries

    def _task_boundary(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The source says a new task starts: consolidate the finished one (a RuntimeError if
        its weights are NaN/inf, as ``MetaGradCallback`` refuses the next task)."""
        if self._steps_in_task > 0:
            self.consolidate(trainer, pl_module)
            return
        rank_zero_warn(
            f"{type(self).__name__}: task {self.num_tasks} ended before any optimizer step with "
            "a gradient; it is not consolidated."
        )
        self._clear_task_data()
        self.boundaries.on_task_start()

    def _clear_task_data(self) -> None:
        self._task_batches = TaskBatches()
        self._task_examples = 0

    def _watch_task_ids(self, batch: Any) -> None:
        """``"fit"``: note (on the device, no host sync) whether the batches' ``"task_id"``
        changes within the fit, where each task would need its own consolidation."""
        if self._warned_task_ids or not isinstance(batch, Mapping) or "task_id" not in batch:
            return
        value = batch["task_id"]
        if isinstance(value, Tensor):
            ids = value.detach().reshape(-1)
            if ids.numel() == 0:
                return
            if self._fit_task_id is _UNSET:
                self._fit_task_id = ids[:1].clone()
                self._task_id_changed = torch.zeros((), dtype=torch.bool, device=ids.device)
            else:
                self._task_id_changed |= (ids != self._fit_task_id).any()
        elif self._fit_task_id is _UNSET:
            self._fit_task_id = value
        elif value != self._fit_task_id:
            self._task_id_changed = True

    def _warn_task_ids(self) -> None:
        """``"fit"``: warn (once) if the batches' task id changed within this fit (one read)."""
        if self._warned_task_ids or self._fit_task_id is _UNSET or not bool(self._task_id_changed):
            return
        self._warned_task_ids = True
        first = self._fit_task_id
        first = first.item() if isinstance(first, Tensor) else first
        rank_zero_warn(
            f"{type(self).__name__}: the batches' 'task_id' changed within one `fit` (it was "
            f"{first!r} at its start), but with task_boundaries='fit' a task ends only when its "
            "`fit` ends, so the tasks of this fit are not protected from each other. Pass "
            "`task_boundaries='batch'` to consolidate each task when its id changes."
        )


_UNSET: Any = object()


def _refuse_detection(name: str, source: TaskBoundarySource) -> None:
    """ValueError for a source that detects switches from signals only the engine feeds."""
    sources = source.sources if isinstance(source, CombinedBoundaries) else [source]
    for src in sources:
        if src.uses_gradients or src.uses_pairs or src.uses_loss:
            raise ValueError(
                f"{name}: `task_boundaries` includes {type(src).__name__} ({src.name!r}), which "
                "detects task switches from the step gradients, update pairs or losses that "
                "MetaGradCallback's engine feeds it; the baselines do not, so it would never end "
                "a task. Pass `task_boundaries='batch'` with a task id in the batches "
                "(`task_id_key=` / `task_id_fn=`), 'fit' with one `fit` per task, or 'manual' "
                "and call `consolidate(trainer, pl_module)` at each task end; or use "
                "`MetaGradCallback(task_boundaries='auto')`."
            )
