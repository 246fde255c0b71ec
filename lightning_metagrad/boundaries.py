"""Where a new task starts: small pluggable sources of task boundaries.

A source answers two questions the callback asks: "does this ``fit`` start a new task?" and
"does this batch start a new task?". Automatic detection (section 5.1) plugs in the same way.
Plain Python; no Trainer needed.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_metagrad.detection import ChangePointDetector
from lightning_metagrad.meta_network import CoordinateMLP, MetaNetwork


class TaskBoundarySource:
    """Base class: never declares a boundary (tasks then change only by hand).

    Subclass and override :meth:`on_fit_start` / :meth:`on_train_batch` to add a source.

    Example:
        >>> TaskBoundarySource().on_train_batch({"x": 1}, 0)
        False
    """

    name = "manual"

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

    def on_loss(self, loss: Tensor) -> None:
        """Called after each training batch with its detached loss (the mean over ranks under
        DDP), if :attr:`uses_loss`."""

    def on_task_start(self) -> None:
        """Called whenever a new task starts, whatever started it."""

    def returning_to(self) -> int | None:
        """After :meth:`on_train_batch` declared a boundary: the index of the earlier task the
        stream returns to, or None for a task never seen (the default)."""
        return None

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
        if fn is not None and not callable(fn):
            raise ValueError(f"`fn` must be callable, got {type(fn).__name__}")
        if not isinstance(key, str) or not key:
            raise ValueError(f"`key` must be a non-empty string, got {key!r}")
        self.key = key
        self.fn = fn
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
            "current_id": _plain(self.current_id),
            "seen_ids": [_plain(i) for i in self.seen_ids],
        }

    def load_state_dict(self, state: dict) -> None:
        self.current_id = state["current_id"]
        self.seen_ids = list(state["seen_ids"])


def _plain(task_id: Hashable | None) -> Any:
    """A task id as a checkpoint can hold it (weights-only loading)."""
    return task_id if isinstance(task_id, (int, str, float)) or task_id is None else str(task_id)


_AUTO_SIGNALS = ("error", "loss")


class AutoBoundaries(TaskBoundarySource):
    """Task switches detected from a jump in the training loss or in a meta-network's
    reconstruction error (section 5.1).

    A small coordinate-wise meta-network (default 1-32-32-1, the paper's h at a detector's
    size) is trained on the step's ``(theta_j, target_j)`` pairs every ``every`` steps. Its
    MSE on freshly drawn coordinates, *before* the update and in target units fixed at the
    start of each task, is fed to a
    :class:`~lightning_metagrad.detection.ChangePointDetector`: when the task changes, the
    gradients it learned no longer fit and the error jumps and stays up. At a detected switch
    the meta-network is re-initialised for the new task. The first ``settle`` observations
    of the whole run only train the meta-network: from a random initialisation the
    gradients grow and change fast, which is not a task switch.

    ``signal`` chooses the tested signal:

    * ``"loss"`` (default): the mean training loss since the previous observation, with the
      meta-network's error as auxiliary evidence (Stouffer's weighted z, see
      :class:`~lightning_metagrad.detection.ChangePointDetector`);
    * ``"error"``: the meta-network's error alone, the paper's signal exactly.

    Measured on silent Permuted streams (``docs/detection.md``): both find every abrupt switch
    on digits; on Fashion-MNIST, where a θ-only meta-network explains almost nothing of the
    gradient, the error hardly moves at a switch (0 of 12 found) while the loss of a new task
    jumps several-fold (10 of 12 found). A ``detector`` passed in decides itself: its
    ``signal`` and ``weights`` may name ``"error"`` and ``"loss"``.

    Example:
        >>> detector = ChangePointDetector(warmup=5, patience=2)  # the paper's signal
        >>> src = AutoBoundaries(every=1, detector=detector)
        >>> src.on_pairs(torch.linspace(-1, 1, 64), torch.linspace(-1, 1, 64))
        False
    """

    name = "auto"

    def __init__(
        self,
        every: int = 4,
        hidden_sizes: Sequence[int] = (32, 32),
        coords_per_step: int = 1024,
        detector: ChangePointDetector | None = None,
        settle: int = 100,
        seed: int = 0,
        signal: str = "loss",
    ) -> None:
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"`every` must be an int >= 1, got {every!r}")
        if not isinstance(settle, int) or settle < 0:
            raise ValueError(f"`settle` must be an int >= 0, got {settle!r}")
        if signal not in _AUTO_SIGNALS:
            raise ValueError(f"`signal` must be one of {_AUTO_SIGNALS}, got {signal!r}")
        if detector is None:
            weights = {"error": 1.0} if signal == "loss" else None
            detector = ChangePointDetector(signal=signal, weights=weights)
        names = {detector.signal, *detector.weights}
        if not names <= set(_AUTO_SIGNALS):
            raise ValueError(
                f"`detector` may only use the signals {_AUTO_SIGNALS} (as `signal` or in "
                f"`weights`), got {sorted(names)}"
            )
        self.settle = settle
        self.every = every
        self.detector = detector
        # Sum and count of the finite losses since the last observation; tensors, so feeding
        # them never syncs with the device. None: no loss since the last observation.
        self._loss_sum: Tensor | None = None
        self._loss_finite: Tensor | None = None
        gen = torch.Generator().manual_seed(seed)
        self.meta = MetaNetwork(
            CoordinateMLP(hidden_sizes), coords_per_step=coords_per_step, lr=3e-3, generator=gen
        )
        self.steps = 0
        self.switched = False
        self.last_error: float | None = None
        self._needs_reset = True

    @property
    def uses_pairs(self) -> bool:
        return True

    def on_pairs(self, theta: Tensor, target: Tensor) -> bool:
        self.meta.net.to(theta.device)
        if self._needs_reset:
            std = float(theta.float().std())
            self.meta.reset(std if std > 0 else 1.0)
            self._needs_reset = False
        step, self.steps = self.steps, self.steps + 1
        if step % self.every != 0:
            return False
        loss, _ = self.meta.observe(theta, target)
        self.last_error = float(loss)
        if step < self.settle * self.every:
            # From a random initialisation the gradients first grow and change fast; the
            # detector learns its baseline once training has settled.
            return False
        signals = {"error": self.last_error}
        if self.uses_loss:
            mean = self._take_mean_loss()
            if mean is not None:
                signals["loss"] = mean
        if self.detector.signal not in signals:
            return False  # no loss seen since the last observation: nothing to test
        return self.detector.update(**signals)

    @property
    def uses_loss(self) -> bool:
        return self.detector.signal == "loss" or "loss" in self.detector.weights

    def on_loss(self, loss: Tensor) -> None:
        loss = loss.detach().float().reshape(())
        finite = torch.isfinite(loss)  # a non-finite loss is left out by zero weight
        value = torch.where(finite, loss, torch.zeros_like(loss))
        if self._loss_sum is None or self._loss_finite is None:
            self._loss_sum, self._loss_finite = value, finite.float()
        else:
            self._loss_sum, self._loss_finite = self._loss_sum + value, self._loss_finite + finite

    def _take_mean_loss(self) -> float | None:
        if self._loss_sum is None or self._loss_finite is None:
            return None
        total, count = float(self._loss_sum), float(self._loss_finite)
        self._loss_sum = self._loss_finite = None
        return total / count if count > 0 else None

    def on_task_start(self) -> None:
        self.detector.restart()
        self._needs_reset = True
        self._loss_sum = self._loss_finite = None

    def state_dict(self) -> dict:
        return {
            "loss_sum": float(self._loss_sum) if self._loss_sum is not None else None,
            "loss_finite": float(self._loss_finite) if self._loss_finite is not None else None,
            "meta": self.meta.state_dict(),
            "generator": self.meta.generator.get_state(),
            "detector": self.detector.state_dict(),
            "steps": self.steps,
            "needs_reset": self._needs_reset,
        }

    def load_state_dict(self, state: dict) -> None:
        self.meta.load_state_dict(state["meta"])
        self.meta.generator.set_state(state["generator"])
        self.detector.load_state_dict(state["detector"])
        self.steps = int(state["steps"])
        self._needs_reset = bool(state["needs_reset"])
        total, finite = state.get("loss_sum"), state.get("loss_finite")
        if total is None or finite is None:
            self._loss_sum = self._loss_finite = None
        else:
            self._loss_sum, self._loss_finite = torch.tensor(total), torch.tensor(finite)


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
    def uses_loss(self) -> bool:
        return any(s.uses_loss for s in self.sources)

    def on_loss(self, loss: Tensor) -> None:
        for s in self.sources:
            if s.uses_loss:
                s.on_loss(loss)

    def on_task_start(self) -> None:
        for s in self.sources:
            s.on_task_start()

    def state_dict(self) -> dict:
        return {str(i): s.state_dict() for i, s in enumerate(self.sources)}

    def load_state_dict(self, state: dict) -> None:
        for i, s in enumerate(self.sources):
            s.load_state_dict(state[str(i)])
