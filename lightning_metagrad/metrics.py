"""Continual-learning metrics: the accuracy matrix and the scores computed from it.

``R[i][j]`` is the test accuracy on task ``j`` after training on tasks ``0..i``
(Lopez-Paz & Ranzato, 2017). From a full ``T x T`` matrix:

* :func:`average_accuracy`: ``ACC = mean_j R[T-1][j]``;
* :func:`backward_transfer`: ``BWT = mean_{j<T-1} (R[T-1][j] - R[j][j])``;
* :func:`forward_transfer`: ``FWT = mean_{j>=1} (R[j-1][j] - b[j])`` with ``b`` the accuracies
  of the randomly initialised model;
* :func:`average_forgetting`: ``F = mean_{j<T-1} (max_{l<T-1} R[l][j] - R[T-1][j])``
  (Chaudhry et al., 2018);
* :func:`collapsed_in_task`: the first task after which training collapsed to chance.

The functions take a tensor, a NumPy array or nested lists; the scores are Python floats, and
NaN entries they read propagate to the result. The benchmark runner fills ``R`` with
:class:`AccuracyMatrix` and its curves with :class:`TaskAccuracyCurve`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric


class AccuracyMatrix(Metric):
    """Accumulates the accuracy matrix ``R`` (``T x T``) of a continual-learning run.

    Call :meth:`update` with the predictions on task ``eval_task`` made after training up to
    task ``trained_upto``; :meth:`compute` returns ``R`` with NaN where nothing was evaluated,
    in the metric's dtype (the default dtype; ``set_dtype(torch.float64)`` for exact ratios).
    The states are fixed-shape count matrices summed across processes (like
    ``MulticlassConfusionMatrix``), so it works under DDP.

    Example:
        >>> metric = AccuracyMatrix(num_tasks=2)
        >>> metric.update(torch.tensor([0, 1, 1, 0]), torch.tensor([0, 1, 0, 0]), 0, 0)
        >>> logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])  # argmax: [0, 1]
        >>> metric.update(logits, torch.tensor([0, 0]), trained_upto=1, eval_task=0)
        >>> metric.compute()
        tensor([[0.7500,    nan],
                [0.5000,    nan]])
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    correct: Tensor
    total: Tensor

    def __init__(self, num_tasks: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
            raise ValueError(f"`num_tasks` must be an integer >= 1, got {num_tasks!r}")
        self.num_tasks = num_tasks
        shape = (num_tasks, num_tasks)
        self.add_state("correct", torch.zeros(shape, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros(shape, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor, trained_upto: int, eval_task: int) -> None:
        """Count correct predictions on ``eval_task`` after training through ``trained_upto``.

        ``preds`` are class indices shaped like ``target`` or scores (logits / probabilities)
        with the classes on dim 1, i.e. ``[N, C]`` for targets ``[N]``.
        """
        i = self._check_task("trained_upto", trained_upto)
        j = self._check_task("eval_task", eval_task)
        if target.is_floating_point() or target.is_complex():
            raise ValueError(f"`target` must hold integer class labels, got {target.dtype}")
        if preds.ndim == target.ndim + 1:
            if preds.shape[:1] + preds.shape[2:] != target.shape:
                raise ValueError(
                    f"scores `preds` {tuple(preds.shape)} must be `target` {tuple(target.shape)} "
                    "with a class dimension at dim 1"
                )
            labels = preds.argmax(dim=1)
        elif preds.shape == target.shape:
            if preds.is_floating_point() or preds.is_complex():
                raise ValueError(
                    "`preds` shaped like `target` must be integer class indices; pass scores "
                    "with a class dimension at dim 1 instead"
                )
            labels = preds
        else:
            raise ValueError(
                f"`preds` {tuple(preds.shape)} must be class indices shaped like `target` "
                f"{tuple(target.shape)} or scores with a class dimension at dim 1"
            )
        self.correct[i, j] += (labels == target).sum()
        self.total[i, j] += target.numel()

    def compute(self) -> Tensor:
        """``R`` as a float ``T x T`` tensor: ``R[i][j]`` = accuracy on task j after task i."""
        acc = self.correct.double() / self.total.double()  # 0/0 -> NaN: not evaluated
        return acc.to(self.dtype)

    def _check_task(self, name: str, task: Any) -> int:
        if isinstance(task, Tensor) and task.numel() == 1 and not task.is_floating_point():
            task = int(task.item())
        if isinstance(task, bool) or not isinstance(task, int):
            raise ValueError(f"`{name}` must be an integer task index, got {task!r}")
        if not 0 <= task < self.num_tasks:
            raise ValueError(f"`{name}` must be in [0, {self.num_tasks}), got {task}")
        return task


def _as_matrix(R: Any, min_tasks: int = 1, name: str = "R") -> Tensor:
    try:
        m = torch.as_tensor(R, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"`{name}` must be a square T x T matrix of accuracies: {err}") from err
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"`{name}` must be a square T x T matrix, got shape {tuple(m.shape)}")
    if m.shape[0] < min_tasks:
        raise ValueError(f"`{name}` must cover at least {min_tasks} tasks, got {m.shape[0]}")
    return m


def _mean(values: Tensor) -> float:
    # Left-to-right float64 sum, as the tables in docs/ were computed: their third decimals
    # (ties such as 0.7855) come out the same.
    return sum(values.tolist()) / values.numel()


def average_accuracy(R: Any) -> float:
    """ACC: mean accuracy over all tasks after training the last one (mean of the last row).

    Example:
        >>> average_accuracy([[0.9, 0.1], [0.7, 0.8]])
        0.75
    """
    m = _as_matrix(R)
    return _mean(m[-1])


def backward_transfer(R: Any) -> float:
    """BWT (Lopez-Paz & Ranzato, 2017): ``mean_{j<T-1} R[T-1][j] - R[j][j]``; < 0 is forgetting.

    Example:
        >>> round(backward_transfer([[0.9, 0.1], [0.7, 0.8]]), 6)
        -0.2
    """
    m = _as_matrix(R, min_tasks=2)
    T = m.shape[0]
    return _mean(m[T - 1, : T - 1] - m.diagonal()[: T - 1])


def forward_transfer(R: Any, b: Any) -> float:
    """FWT (Lopez-Paz & Ranzato, 2017): ``mean_{j>=1} R[j-1][j] - b[j]``.

    ``b[j]`` is the accuracy on task ``j`` of the model at random initialisation.

    Example:
        >>> round(forward_transfer([[0.9, 0.3], [0.7, 0.8]], [0.1, 0.1]), 6)
        0.2
    """
    m = _as_matrix(R, min_tasks=2)
    try:
        base = torch.as_tensor(b, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"`b` must be a vector of T accuracies: {err}") from err
    T = m.shape[0]
    if base.shape != (T,):
        raise ValueError(f"`b` must be a vector of {T} accuracies, got shape {tuple(base.shape)}")
    return _mean(m.diagonal(offset=1) - base[1:])


def average_forgetting(R: Any) -> float:
    """Average forgetting (Chaudhry et al., 2018): ``mean_{j<T-1} max_{l<T-1} R[l][j] - R[T-1][j]``.

    Example:
        >>> round(average_forgetting([[0.9, 0.1], [0.7, 0.8]]), 6)
        0.2
    """
    m = _as_matrix(R, min_tasks=2)
    T = m.shape[0]
    best = m[: T - 1, : T - 1].max(dim=0).values
    return _mean(best - m[T - 1, : T - 1])


# An accuracy at most CHANCE_MARGIN / num_classes counts as chance in collapsed_in_task.
CHANCE_MARGIN = 1.5


def collapsed_in_task(R: Any, num_classes: int) -> int | None:
    """The first task ``i`` after which training had collapsed to chance, or None.

    Collapsed: an earlier task was learned (``R[l][l]`` above chance for some ``l < i``), yet
    the task just trained scores at chance, ``R[i][i] <= 1.5 / num_classes`` (e.g. a penalty
    whose curvature passed SGD's stability limit, or weights gone non-finite, which predict
    one class). The benchmark's "collapsed" seeds are those where this is not None.

    Example:
        >>> collapsed_in_task([[0.9, 0.1, 0.1], [0.8, 0.7, 0.1], [0.1, 0.1, 0.1]], 10)
        2
        >>> collapsed_in_task([[0.9, 0.1], [0.5, 0.8]], num_classes=10) is None
        True
    """
    m = _as_matrix(R)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"`num_classes` must be an integer >= 2, got {num_classes!r}")
    chance = CHANCE_MARGIN / num_classes
    diagonal = m.diagonal().tolist()
    for task, accuracy in enumerate(diagonal):
        if accuracy <= chance and any(a > chance for a in diagonal[:task]):
            return task
    return None


class TaskAccuracyCurve:
    """Records ``(iteration, task, accuracy)`` rows: per-task test accuracy during training.

    The data of accuracy-vs-iteration curves (one line per task, as in the paper's Fig. 1).

    Example:
        >>> curve = TaskAccuracyCurve()
        >>> curve.record(0, task=0, accuracy=0.1)
        >>> curve.record_all(100, [0.9, 0.2])
        >>> curve.as_dict()
        {'iteration': [0, 100, 100], 'task': [0, 0, 1], 'accuracy': [0.1, 0.9, 0.2]}
        >>> curve.series(0)
        ([0, 100], [0.1, 0.9])
    """

    def __init__(self) -> None:
        self._rows: list[tuple[int, int, float]] = []

    def record(self, iteration: int, task: int, accuracy: float) -> None:
        """Add one measurement of ``task``'s accuracy at training ``iteration``."""
        for name, value in (("iteration", iteration), ("task", task)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"`{name}` must be an integer >= 0, got {value!r}")
        self._rows.append((iteration, task, float(accuracy)))

    def record_all(self, iteration: int, accuracies: Sequence[float]) -> None:
        """Add the accuracies of tasks ``0..len(accuracies)-1`` at ``iteration``."""
        for task, accuracy in enumerate(accuracies):
            self.record(iteration, task, accuracy)

    @property
    def rows(self) -> list[dict[str, Any]]:
        """The rows as dicts ``{"iteration", "task", "accuracy"}``, in recording order."""
        return [{"iteration": i, "task": t, "accuracy": a} for i, t, a in self._rows]

    @property
    def tasks(self) -> list[int]:
        """The tasks with at least one row, sorted."""
        return sorted({t for _, t, _ in self._rows})

    def series(self, task: int) -> tuple[list[int], list[float]]:
        """``(iterations, accuracies)`` of one task, in recording order (ready to plot)."""
        points = [(i, a) for i, t, a in self._rows if t == task]
        return [i for i, _ in points], [a for _, a in points]

    def as_dict(self) -> dict[str, list[Any]]:
        """Columns ``{"iteration": [...], "task": [...], "accuracy": [...]}`` (JSON-ready)."""
        return {
            "iteration": [i for i, _, _ in self._rows],
            "task": [t for _, t, _ in self._rows],
            "accuracy": [a for _, _, a in self._rows],
        }

    def __len__(self) -> int:
        return len(self._rows)
