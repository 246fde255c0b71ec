"""Where a new task starts: small pluggable sources of task boundaries.

A source answers two questions the callback asks: "does this ``fit`` start a new task?" and
"does this batch start a new task?". Automatic detection (section 5.1) plugs in the same way.
Plain Python; no Trainer needed.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from lightning_metagrad._validation import (
    check_callable,
    check_state_version,
    check_str,
)

#: The boundary sources ``task_boundaries=`` builds by name.
BoundaryName = Literal["fit", "batch", "manual", "auto"]
BOUNDARY_NAMES: tuple[str, ...] = ("fit", "batch", "manual", "auto")


class TaskBoundarySource:
    """The protocol of a task-boundary source; on its own it never declares a boundary.

    Subclass and override :meth:`on_fit_start` / :meth:`on_train_batch` (or the step hooks)
    to add a source.

    Example:
        >>> TaskBoundarySource().on_train_batch({"x": 1}, 0)
        False
    """

    name = "manual"
    #: The layout version :meth:`state_dict` writes (bumped when the layout changes).
    _state_version: ClassVar[int] = 1

    @property
    def uses_loss(self) -> bool:
        """Whether :meth:`on_loss` must be fed (the callback then reads each batch's loss)."""
        return False

    def on_fit_start(self) -> bool:
        """Called at each ``fit`` start (after any checkpoint is restored)."""
        return False

    def on_fit_end(self) -> None:
        """Called at each ``fit`` end."""

    def on_train_batch(self, batch: Any, batch_idx: int) -> bool:
        """Called before each training batch; return True to start a new task before it."""
        return False

    @property
    def uses_pairs(self) -> bool:
        """Whether :meth:`on_pairs` must be fed (the callback then flattens each step's pairs)."""
        return False

    def on_pairs(self, theta: Tensor, target: Tensor) -> bool:
        """Called with each optimizer step's finite flat ``(theta, target)`` pairs, if
        :attr:`uses_pairs`; return True to start a new task before the next batch."""
        return False

    @property
    def uses_gradients(self) -> bool:
        """Whether :meth:`on_gradients` must be fed (the callback then copies each step's
        per-tensor gradients before the rule rewrites them)."""
        return False

    def on_gradients(
        self, names: Sequence[str], thetas: Sequence[Tensor], targets: Sequence[Tensor]
    ) -> bool:
        """Called, if :attr:`uses_gradients`, with each optimizer step's finite per-tensor
        targets (gradients or update vectors) by parameter name, before the rule rewrites
        them; return True to start a new task before the next batch."""
        return False

    @property
    def uses_input_layers(self) -> bool:
        """Whether the source wants to know which parameters belong to the layers that read
        the data (:meth:`on_input_layers`)."""
        return False

    def on_input_layers(self, names: Sequence[str]) -> None:
        """Called, if :attr:`uses_input_layers`, before the first optimizer step of each
        binding with the parameters of the layers whose inputs carry no autograd history
        (:class:`~lightning_metagrad.input_layers.InputLayerProbe`)."""

    def on_loss(self, loss: Tensor) -> None:
        """Called after each training batch with its detached loss (the mean over ranks under
        DDP), if :attr:`uses_loss`."""

    def on_task_start(self) -> None:
        """Called whenever a new task starts, whatever started it."""

    def returning_to(self) -> int | None:
        """After :meth:`on_train_batch` declared a boundary: the index of the earlier task the
        stream returns to, or None for a task never seen (the default)."""
        return None

    @property
    def max_onset_steps(self) -> int:
        """How many optimizer steps before a detection a switch may have begun (0: boundaries
        are exact). The predictor keeps that much recent history, so that the steps of the
        new task seen before the detection are not folded into the old one."""
        return 0

    @property
    def undo_late_updates(self) -> bool:
        """Whether, at a detected switch, the updates of the steps between its onset and its
        detection are rewritten once the finished task is folded in (the engine keeps a
        copy of the trainable parameters per step of :attr:`max_onset_steps` for that)."""
        return False

    def onset_steps(self) -> int:
        """After :meth:`on_pairs` or :meth:`on_gradients` declared a switch: how many
        optimizer steps before it the new task is estimated to have begun (0: exactly now)."""
        return 0

    def state_dict(self) -> dict:
        """Plain values only, with a ``"version"``; calling it changes nothing."""
        return {"version": self._state_version}

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict`; ValueError for a version this release cannot read."""
        check_state_version(type(self).__name__, state, self._state_version, unversioned=1)


class ManualBoundaries(TaskBoundarySource):
    """Tasks change only by hand (``MetaGrad.start_task``, ``MetaGradCallback.start_new_task``).

    Example:
        >>> ManualBoundaries().on_fit_start()
        False
    """

    name = "manual"


class NewFitBoundaries(TaskBoundarySource):
    """Each new ``trainer.fit`` with the same callback starts a new task.

    A ``fit`` resumed from a checkpoint taken *during* a task continues that task; one resumed
    from a checkpoint taken after a ``fit`` finished starts the next task.

    Example:
        >>> src = NewFitBoundaries()
        >>> src.on_fit_start(); src.on_fit_end(); src.on_fit_start()
        False
        True
    """

    name = "fit"

    def __init__(self) -> None:
        self.completed_fits = 0
        self.in_fit = False

    def on_fit_start(self) -> bool:
        new_task = self.completed_fits > 0 and not self.in_fit
        self.in_fit = True
        return new_task

    def on_fit_end(self) -> None:
        self.in_fit = False
        self.completed_fits += 1

    def state_dict(self) -> dict:
        return {
            "version": self._state_version,
            "completed_fits": self.completed_fits,
            "in_fit": self.in_fit,
        }

    def load_state_dict(self, state: dict) -> None:
        check_state_version(type(self).__name__, state, self._state_version, unversioned=1)
        self.completed_fits = int(state["completed_fits"])
        self.in_fit = bool(state["in_fit"])


class BatchTaskIdBoundaries(TaskBoundarySource):
    """A task boundary whenever the task id read from the batch changes.

    The id is read by :meth:`read_task_id`: ``fn(batch)`` when ``fn`` is given, else
    ``batch[key]`` for dict batches (a tensor of per-sample ids must hold one id: a batch that
    mixes tasks is refused, since one optimizer step cannot belong to two tasks). Override
    :meth:`read_task_id` for other layouts, e.g. to map a mixed batch to its majority task.

    Ids are remembered: a change to an id seen before returns to that task
    (:meth:`returning_to` gives its index) instead of starting a new one, so two epochs over
    three tasks are three tasks, not six.

    Example:
        >>> src = BatchTaskIdBoundaries(key="task_id")
        >>> [src.on_train_batch({"task_id": t}, i) for i, t in enumerate([0, 0, 1, 1, 2])]
        [False, False, True, False, True]
        >>> src.on_train_batch({"task_id": 0}, 5), src.returning_to()
        (True, 0)
    """

    name = "batch"

    def __init__(self, key: str = "task_id", fn: Callable[[Any], Hashable] | None = None):
        self.fn = check_callable("fn", fn, "a callable `batch -> task id`", optional=True)
        self.key = check_str("key", key)
        self.current_id: Hashable | None = None
        self.seen_ids: list[Hashable] = []  # in order of first appearance: the task indices
        self._returning = False  # the latest batch's id was seen before

    def read_task_id(self, batch: Any) -> Hashable:
        if self.fn is not None:
            value: Any = self.fn(batch)
        elif isinstance(batch, dict) and self.key in batch:
            value = batch[self.key]
        else:
            kind = f"dict with keys {sorted(batch)}" if isinstance(batch, dict) else type(batch)
            raise ValueError(
                f"Cannot read a task id from a batch of type {kind}: task boundaries come from "
                f"batches, so each batch must be a dict with the key {self.key!r}. Pass "
                "`task_id_key=` with the right key, a `task_id_fn=` that reads it, or use "
                "`task_boundaries='fit'`."
            )
        if isinstance(value, torch.Tensor):
            ids = value.reshape(-1).unique()
            if ids.numel() > 1:
                raise ValueError(
                    f"A training batch mixes the task ids {ids.tolist()} (key {self.key!r}): "
                    "with task_boundaries='batch' each batch must come from one task. Batch "
                    "each task separately (e.g. a sampler per task), or pass `task_id_fn=` that "
                    "returns one id for such a batch (e.g. its most common one)."
                )
            value = int(ids)
        return value

    def on_train_batch(self, batch: Any, batch_idx: int) -> bool:
        task_id = self.read_task_id(batch)
        changed = self.current_id is not None and task_id != self.current_id
        self.current_id = task_id
        self._returning = changed and task_id in self.seen_ids
        if task_id not in self.seen_ids:
            self.seen_ids.append(task_id)
        return changed

    def returning_to(self) -> int | None:
        return self.seen_ids.index(self.current_id) if self._returning else None

    def state_dict(self) -> dict:
        return {
            "version": self._state_version,
            "current_id": _plain(self.current_id),
            "seen_ids": [_plain(i) for i in self.seen_ids],
        }

    def load_state_dict(self, state: dict) -> None:
        check_state_version(type(self).__name__, state, self._state_version, unversioned=1)
        self.current_id = state["current_id"]
        self.seen_ids = list(state["seen_ids"])


def _plain(task_id: Hashable | None) -> Any:
    """A task id as a checkpoint can hold it (weights-only loading)."""
    return task_id if isinstance(task_id, (int, str, float)) or task_id is None else str(task_id)


class CombinedBoundaries(TaskBoundarySource):
    """Several sources at once: a new task starts when any of them says so.

    Example:
        >>> src = CombinedBoundaries([NewFitBoundaries(), BatchTaskIdBoundaries()])
        >>> src.on_fit_start(), src.on_train_batch({"task_id": 0}, 0)
        (False, False)
    """

    name = "combined"

    def __init__(self, sources: Sequence[TaskBoundarySource]) -> None:
        if not sources:
            raise ValueError("`sources` must name at least one boundary source")
        self.sources = list(sources)

    def on_fit_start(self) -> bool:
        return any([s.on_fit_start() for s in self.sources])  # every source sees the call

    def on_fit_end(self) -> None:
        for s in self.sources:
            s.on_fit_end()

    def on_train_batch(self, batch: Any, batch_idx: int) -> bool:
        return any([s.on_train_batch(batch, batch_idx) for s in self.sources])

    @property
    def uses_pairs(self) -> bool:
        return any(s.uses_pairs for s in self.sources)

    def on_pairs(self, theta: Tensor, target: Tensor) -> bool:
        return any([s.on_pairs(theta, target) for s in self.sources])

    @property
    def uses_gradients(self) -> bool:
        return any(s.uses_gradients for s in self.sources)

    def on_gradients(
        self, names: Sequence[str], thetas: Sequence[Tensor], targets: Sequence[Tensor]
    ) -> bool:
        return any([s.on_gradients(names, thetas, targets) for s in self.sources])

    def returning_to(self) -> int | None:
        return next((i for s in self.sources if (i := s.returning_to()) is not None), None)

    @property
    def max_onset_steps(self) -> int:
        return max(s.max_onset_steps for s in self.sources)

    def onset_steps(self) -> int:
        return max(s.onset_steps() for s in self.sources)

    @property
    def undo_late_updates(self) -> bool:
        return any(s.undo_late_updates for s in self.sources)

    @property
    def uses_loss(self) -> bool:
        return any(s.uses_loss for s in self.sources)

    @property
    def uses_input_layers(self) -> bool:
        return any(s.uses_input_layers for s in self.sources)

    def on_input_layers(self, names: Sequence[str]) -> None:
        for s in self.sources:
            if s.uses_input_layers:
                s.on_input_layers(names)

    def on_loss(self, loss: Tensor) -> None:
        for s in self.sources:
            if s.uses_loss:
                s.on_loss(loss)

    def on_task_start(self) -> None:
        for s in self.sources:
            s.on_task_start()

    def state_dict(self) -> dict:
        return {
            "version": self._state_version,
            **{str(i): s.state_dict() for i, s in enumerate(self.sources)},
        }

    def load_state_dict(self, state: dict) -> None:
        check_state_version(type(self).__name__, state, self._state_version, unversioned=1)
        for i, s in enumerate(self.sources):
            s.load_state_dict(state[str(i)])


#: What ``task_boundaries=`` accepts: a name, a source, or a list of them.
BoundarySpec = BoundaryName | TaskBoundarySource | Sequence[BoundaryName | TaskBoundarySource]


def build_boundaries(
    spec: BoundarySpec,
    task_id_key: str = "task_id",
    task_id_fn: Callable[[Any], Hashable] | None = None,
) -> TaskBoundarySource:
    """The boundary source for ``task_boundaries=`` (a name, a source, or a list of them: a
    new task starts when any says so), shared by ``MetaGradCallback`` and the baselines.

    Names: ``"fit"`` (:class:`NewFitBoundaries`), ``"batch"`` (:class:`BatchTaskIdBoundaries`
    with ``task_id_key`` / ``task_id_fn``), ``"manual"`` (:class:`ManualBoundaries`) and
    ``"auto"`` (:class:`~lightning_metagrad.boundaries.auto.AutoBoundaries`).

    Example:
        >>> type(build_boundaries("batch", task_id_key="task")).__name__
        'BatchTaskIdBoundaries'
        >>> [type(s).__name__ for s in build_boundaries(["fit", "batch"]).sources]
        ['NewFitBoundaries', 'BatchTaskIdBoundaries']
        >>> build_boundaries("fit", task_id_key="task")
        Traceback (most recent call last):
        ...
        ValueError: `task_id_key` is only used with `task_boundaries='batch'`
    """
    if isinstance(spec, (str, TaskBoundarySource)):
        names: list[Any] = [spec]
    elif isinstance(spec, (list, tuple)):
        names = list(spec)
    else:
        raise ValueError(
            f"`task_boundaries` must be one of {BOUNDARY_NAMES}, a TaskBoundarySource or a "
            f"list of them, got {spec!r}"
        )
    if not names:
        raise ValueError("`task_boundaries` must name at least one source")
    if task_id_fn is not None and "batch" not in names:
        raise ValueError("`task_id_fn` is only used with `task_boundaries='batch'`")
    if task_id_key != "task_id" and "batch" not in names:
        raise ValueError("`task_id_key` is only used with `task_boundaries='batch'`")
    sources = [_boundary_source(n, task_id_key, task_id_fn) for n in names]
    return sources[0] if len(sources) == 1 else CombinedBoundaries(sources)


def _boundary_source(
    spec: Any, key: str, fn: Callable[[Any], Hashable] | None
) -> TaskBoundarySource:
    if isinstance(spec, TaskBoundarySource):
        return spec
    if spec == "fit":
        return NewFitBoundaries()
    if spec == "auto":
        from lightning_metagrad.boundaries.auto import AutoBoundaries  # imports this module

        return AutoBoundaries()
    if spec == "manual":
        return ManualBoundaries()
    if spec == "batch":
        check_str("task_id_key", key)
        check_callable("task_id_fn", fn, "a callable `batch -> task id`", optional=True)
        return BatchTaskIdBoundaries(key=key, fn=fn)
    raise ValueError(
        f"`task_boundaries` must be one of {BOUNDARY_NAMES}, a TaskBoundarySource or a list of "
        f"them, got {spec!r}"
    )
