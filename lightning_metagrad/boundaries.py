"""Where a new task starts: small pluggable sources of task boundaries.

A source answers two questions the callback asks: "does this ``fit`` start a new task?" and
"does this batch start a new task?". Automatic detection (section 5.1) plugs in the same way.
Plain Python; no Trainer needed.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import torch


class TaskBoundarySource:
    """Base class: never declares a boundary (tasks then change only by hand).

    Subclass and override :meth:`on_fit_start` / :meth:`on_train_batch` to add a source.

    Example:
        >>> TaskBoundarySource().on_train_batch({"x": 1}, 0)
        False
    """

    name = "manual"

    def on_fit_start(self) -> bool:
        """Called at each ``fit`` start (after any checkpoint is restored)."""
        return False

    def on_fit_end(self) -> None:
        """Called at each ``fit`` end."""

    def on_train_batch(self, batch: Any, batch_idx: int) -> bool:
        """Called before each training batch; return True to start a new task before it."""
        return False

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


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
        return {"completed_fits": self.completed_fits, "in_fit": self.in_fit}

    def load_state_dict(self, state: dict) -> None:
        self.completed_fits = int(state["completed_fits"])
        self.in_fit = bool(state["in_fit"])


class BatchTaskIdBoundaries(TaskBoundarySource):
    """A new task starts whenever the task id read from the batch changes.

    The id is read by :meth:`read_task_id`: ``fn(batch)`` when ``fn`` is given, else
    ``batch[key]`` for dict batches (a tensor of per-sample ids uses its most common value).
    Override :meth:`read_task_id` for other layouts.

    Example:
        >>> src = BatchTaskIdBoundaries(key="task_id")
        >>> [src.on_train_batch({"task_id": t}, i) for i, t in enumerate([0, 0, 1, 1, 2])]
        [False, False, True, False, True]
    """

    name = "batch"

    def __init__(self, key: str = "task_id", fn: Callable[[Any], Hashable] | None = None):
        if fn is not None and not callable(fn):
            raise ValueError(f"`fn` must be callable, got {type(fn).__name__}")
        if not isinstance(key, str) or not key:
            raise ValueError(f"`key` must be a non-empty string, got {key!r}")
        self.key = key
        self.fn = fn
        self.current_id: Hashable | None = None

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
            value = int(value.reshape(-1).mode().values) if value.numel() > 1 else int(value)
        return value

    def on_train_batch(self, batch: Any, batch_idx: int) -> bool:
        task_id = self.read_task_id(batch)
        changed = self.current_id is not None and task_id != self.current_id
        self.current_id = task_id
        return changed

    def state_dict(self) -> dict:
        cid = self.current_id
        return {
            "current_id": cid if isinstance(cid, (int, str, float)) or cid is None else str(cid)
        }

    def load_state_dict(self, state: dict) -> None:
        self.current_id = state["current_id"]
