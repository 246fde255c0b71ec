"""The paper's predictor: a coordinate-wise meta-network per task, distilled into one g."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from lightning_metagrad._validation import (
    check_choice,
    check_float,
    check_int,
    check_int_sequence,
    check_state_version,
)
from lightning_metagrad.matrices import MatrixGroup
from lightning_metagrad.predictors.base import (
    NothingToFold,
    OldGradientPredictor,
    Prediction,
    _flat,
)
from lightning_metagrad.predictors.paper.distillation import RunningMeanDistiller
from lightning_metagrad.predictors.paper.meta_network import (
    ACTIVATIONS,
    Activation,
    CoordinateMLP,
    MetaNetwork,
)
from lightning_metagrad.predictors.paper.tabulation import TabulatedFunction


class MetaNetPredictor(OldGradientPredictor):
    """The paper's predictor: a coordinate-wise meta-network per task, distilled into one g.

    ``h`` (default 1-256-256-256-1, section 2.2) is trained by Adam on ``coords_per_step``
    random coordinates every ``update_every`` optimizer steps; inputs are divided by the
    parameters' standard deviation at the first step, targets by their RMS at each task's first
    update. At a boundary h is distilled into g (eq. 7) with ``distill_steps`` Adam steps, and
    g is tabulated on ``table_points`` points for O(P) prediction. Coordinate-wise: it flattens
    the tensors only on its update steps, to sample coordinates over the whole model.

    Example:
        >>> pred = MetaNetPredictor(hidden_sizes=(8,), coords_per_step=16, update_every=1)
        >>> theta = torch.randn(100)
        >>> _ = pred.observe(["w"], [theta], [-theta])
        >>> pred.end_task(["w"], [theta])
        >>> pred.predict(["w"], [theta])[0][0].shape
        torch.Size([100])
    """

    def __init__(
        self,
        hidden_sizes: Sequence[int] = (256, 256, 256),
        activation: Activation = "relu",
        coords_per_step: int = 4096,
        lr: float = 1e-3,
        update_every: int = 8,
        distill_steps: int = 200,
        distill_samples: int = 4096,
        table_points: int = 4097,
        seed: int = 0,
    ) -> None:
        # Checked here, under the names the user passed (the parts rename some of them).
        hidden_sizes = check_int_sequence("hidden_sizes", hidden_sizes)
        activation = check_choice("activation", activation, ACTIVATIONS)
        coords_per_step = check_int("coords_per_step", coords_per_step, minimum=1)
        lr = check_float("lr", lr, minimum=0, low_open=True)
        self.update_every = check_int("update_every", update_every, minimum=1)
        distill_steps = check_int("distill_steps", distill_steps, minimum=0)
        distill_samples = check_int("distill_samples", distill_samples, minimum=1)
        self.table_points = check_int("table_points", table_points, minimum=2)
        seed = check_int("seed", seed)
        self.generator = torch.Generator().manual_seed(seed)
        self.meta = MetaNetwork(
            # Placeholder weights from a generator of their own (redrawn from
            # self.generator at the first step): building the predictor draws nothing from
            # torch's global RNG.
            CoordinateMLP(hidden_sizes, activation, generator=torch.Generator().manual_seed(seed)),
            coords_per_step=coords_per_step,
            lr=lr,
            generator=self.generator,
        )
        self.distiller = RunningMeanDistiller(
            steps=distill_steps, num_samples=distill_samples, lr=lr
        )
        self.table: TabulatedFunction | None = None
        self.in_scale: float | None = None
        self.steps_in_task = 0
        self._last_error: Tensor | None = None

    @property
    def num_old_tasks(self) -> int:
        return self.distiller.num_tasks

    @property
    def h(self) -> CoordinateMLP:
        """The current task's meta-network."""
        return self.meta.net

    @property
    def g(self) -> CoordinateMLP | None:
        """The distilled predictor of the mean old-task gradient (None before task 2)."""
        return self.distiller.g

    def bind(
        self,
        params: Mapping[str, Tensor],
        groups: Sequence[MatrixGroup] | None = None,
        modules: Mapping[str, nn.Module] | None = None,
    ) -> None:
        # Coordinate-wise: the layout does not matter, only the device.
        device = next(iter(params.values())).device
        self.meta.net.to(device)
        if self.distiller.g is not None:
            self.distiller.g.to(device)
        if self.table is not None:
            self.table = self.table.to(device)

    def observe(
        self,
        names: Sequence[str],
        thetas: Sequence[Tensor],
        targets: Sequence[Tensor],
        finite: Tensor | None = None,
    ) -> dict[str, Tensor]:
        step = self.steps_in_task
        self.steps_in_task += 1
        if self.in_scale is not None and step % self.update_every != 0:
            return {}
        theta = _flat(thetas)
        if self.in_scale is None:
            # One input scale for every task's network: the parameters' spread at the start.
            std = float(theta.std())
            self.in_scale = std if math.isfinite(std) and std > 0 else 1.0
            self.meta.reset(self.in_scale)
        if step % self.update_every != 0:
            return {}
        index = self.meta.sample_indices(theta.numel(), theta.device)
        # The loss on freshly drawn coordinates, before the update: a held-out error.
        loss, rel_error = self.meta.observe(theta, _flat(targets), index)
        self._last_error = rel_error
        return {"metagrad/meta_loss": loss, "metagrad/meta_rel_error": rel_error}

    def prediction_error(self) -> Tensor | None:
        error, self._last_error = self._last_error, None  # each error is reported once
        return error

    def end_task(self, names: Sequence[str], thetas: Sequence[Tensor]) -> None:
        if self.meta.num_updates == 0 or self.in_scale is None:
            raise NothingToFold("the task ended before its meta-network had any update")
        theta = _flat(thetas)
        self.distiller.add_task(self.meta.net, theta, generator=self.generator)
        g = self.distiller.g
        if g is None:  # pragma: no cover - add_task always sets it
            raise RuntimeError("distillation produced no predictor")
        reach = max(2.0 * float(theta.abs().max()), 8.0 * self.in_scale)
        self.table = TabulatedFunction.from_function(
            g, -reach, reach, num_points=self.table_points, device=theta.device
        )
        self.meta.reset(self.in_scale)
        self.steps_in_task = 0

    def predict(self, names: Sequence[str], thetas: Sequence[Tensor]) -> list[Prediction]:
        table = self.table
        if table is None:
            return [None] * len(thetas)
        return [(table(t.reshape(-1)).view_as(t), None) for t in thetas]

    def state_dict(self) -> dict:
        return {
            "version": self._state_version,
            "meta": self.meta.state_dict(),
            "distiller": self.distiller.state_dict(),
            "table": None if self.table is None else self.table.state_dict(),
            "in_scale": self.in_scale,
            "steps_in_task": self.steps_in_task,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        check_state_version(type(self).__name__, state, self._state_version, unversioned=1)
        self.meta.load_state_dict(state["meta"])
        self.distiller.load_state_dict(state["distiller"], template=self.meta.net)
        table = state["table"]
        self.table = None if table is None else TabulatedFunction.from_state_dict(table)
        self.in_scale = state["in_scale"]
        self.steps_in_task = int(state["steps_in_task"])
        self.generator.set_state(state["generator"])
