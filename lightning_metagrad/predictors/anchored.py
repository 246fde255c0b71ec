"""A diagonal Taylor model of the old tasks' gradients around each task's end point."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from lightning_metagrad._validation import (
    check_float,
    check_state_version,
)
from lightning_metagrad.matrices import MatrixGroup
from lightning_metagrad.predictors.base import (
    NothingToFold,
    OldGradientPredictor,
    Prediction,
    rename_keys,
)

#: Per tensor: ``(mean old-task gradient, trusted mask or None)``, or None (the tensor is free).


class AnchoredPredictor(OldGradientPredictor):
    r"""Per-coordinate diagonal Taylor model of the old tasks' gradients, with a trust region.

    During task i the importance ``F_i = mean_s target_j(s)^2`` is accumulated per tensor (a
    running squared gradient, over the steps the tensor had a gradient). Around the task's end
    point ``theta*_i`` its gradient is modelled as ``F_i,j (theta_j - theta*_i,j)``; the mean
    over old tasks (eq. 6) is linear in theta, ``B theta - C`` with ``B = mean_i F_i`` and
    ``C = mean_i F_i theta*_i``, so the running mean is exact and costs two floats per
    parameter between tasks, three during one.

    Magnitude-aware rule: the prediction is trusted only outside a trust region, where the
    modelled old-task loss increase ``B (theta - anchor)^2 / 2`` exceeds
    ``radius^2 mean(B) / 2``; inside it the current gradient is kept (eq. 5 would otherwise
    freeze every coordinate at the anchor, where the prediction is 0).

    Example:
        >>> pred = AnchoredPredictor(radius=0.01)
        >>> _ = pred.observe(["w"], [torch.zeros(3)], [torch.tensor([1.0, 0.1, 0.0])])
        >>> pred.end_task(["w"], [torch.zeros(3)])
        >>> [(mean_grad, trusted)] = pred.predict(["w"], [torch.tensor([0.5, 0.5, 0.5])])
        >>> mean_grad, trusted
        (tensor([0.5000, 0.0050, 0.0000]), tensor([1., 1., 0.]))
    """

    def __init__(self, radius: float = 0.01) -> None:
        self.radius = check_float("radius", radius, minimum=0, low_open=True)
        self._old_tasks = 0
        # Per parameter name, so the model may change between tasks.
        self._b: dict[str, Tensor] = {}
        self._c: dict[str, Tensor] = {}
        self._sq_sum: dict[str, Tensor] = {}  # running sum of target^2 in the current task
        self._count: dict[str, int] = {}
        self._b_mean: float | None = None  # cached mean(B), reset whenever B changes

    def bind(
        self,
        params: Mapping[str, Tensor],
        groups: Sequence[MatrixGroup] | None = None,
        modules: Mapping[str, nn.Module] | None = None,
    ) -> None:
        for store in (self._b, self._c, self._sq_sum):
            for name, value in list(store.items()):
                p = params.get(name)
                if p is not None and value.shape != p.shape:
                    del store[name]  # the tensor changed shape: a new parameter for old tasks
                elif p is not None:
                    store[name] = value.to(p.device)
        self._b_mean = None

    def observe(
        self,
        names: Sequence[str],
        thetas: Sequence[Tensor],
        targets: Sequence[Tensor],
        finite: Tensor | None = None,
    ) -> dict[str, Tensor]:
        for name, target in zip(names, targets):
            acc = self._sq_sum.get(name)
            if acc is None:
                acc = self._sq_sum[name] = torch.zeros_like(target, dtype=torch.float32)
            acc.addcmul_(target, target)
            self._count[name] = self._count.get(name, 0) + 1
        return {}

    def end_task(self, names: Sequence[str], thetas: Sequence[Tensor]) -> None:
        if not self._count:
            raise NothingToFold("the task ended before any step was observed")
        t = float(self._old_tasks)
        for name, theta in zip(names, thetas):
            b = self._b.get(name)
            if b is None:
                b = self._b[name] = torch.zeros_like(theta, dtype=torch.float32)
                self._c[name] = torch.zeros_like(b)
            count = self._count.get(name, 0)
            # Eq. 6, exactly: running means of F_i and F_i * theta*_i (F_i = 0 where untrained).
            b.mul_(t / (t + 1))
            self._c[name].mul_(t / (t + 1))
            if count:
                importance = self._sq_sum[name] / count
                b.add_(importance, alpha=1 / (t + 1))
                self._c[name].add_(importance * theta, alpha=1 / (t + 1))
        self._sq_sum, self._count = {}, {}
        self._b_mean = None
        self._old_tasks += 1

    def rename(self, renamed: Mapping[str, str]) -> None:
        self._b, self._c = rename_keys(self._b, renamed), rename_keys(self._c, renamed)
        self._sq_sum = rename_keys(self._sq_sum, renamed)
        self._count = rename_keys(self._count, renamed)

    def predict(self, names: Sequence[str], thetas: Sequence[Tensor]) -> list[Prediction]:
        if self._b_mean is None:  # B changes only at a boundary: one reduction (sync) per task
            total = sum(b.numel() for b in self._b.values())
            self._b_mean = float(sum(b.sum() for b in self._b.values())) / max(total, 1)
        threshold = (self.radius**2) * self._b_mean
        out: list[Prediction] = []
        for name, theta in zip(names, thetas):
            b = self._b.get(name)
            if b is None:
                out.append(None)
                continue
            predicted = torch.mul(b, theta).sub_(self._c[name])
            # Outside the trust region: pred^2 / B > radius^2 mean(B) (no division by B).
            # A 0/1 float mask: float kernels are several times faster than boolean ones on CPU.
            trusted = torch.mul(predicted, predicted).sub_(b, alpha=threshold).gt_(0)
            out.append((predicted, trusted.to(predicted.dtype)))
        return out

    def state_dict(self) -> dict:
        return {
            "version": self._state_version,
            "num_old_tasks": self._old_tasks,
            "b": {k: v.detach().clone() for k, v in self._b.items()},
            "c": {k: v.detach().clone() for k, v in self._c.items()},
            "sq_sum": {k: v.detach().clone() for k, v in self._sq_sum.items()},
            "count": dict(self._count),
        }

    def load_state_dict(self, state: dict) -> None:
        check_state_version(type(self).__name__, state, self._state_version, unversioned=1)
        self._old_tasks = int(state["num_old_tasks"])
        self._b = {k: v.clone() for k, v in state["b"].items()}
        self._c = {k: v.clone() for k, v in state["c"].items()}
        self._sq_sum = {k: v.clone() for k, v in state["sq_sum"].items()}
        self._count = {k: int(v) for k, v in state["count"].items()}
        self._b_mean = None
