"""Predictors of the old tasks' gradients, on the model's named parameter tensors.

A predictor is trained during a task on the gradients (or the optimizer's update vectors) the
callback sees, folds the finished task in at each boundary (eqs. 6-7), and from the second
task on tells the engine (:class:`~lightning_metagrad.engine.MetaGrad`) how to rewrite the
current gradient. Everything works per parameter tensor, by name, so a parameter without a
gradient on a step, or one the old tasks never trained, is simply absent. Plain PyTorch.

Two kinds, declared by :attr:`OldGradientPredictor.rule` (the engine dispatches on it):

* ``"elementwise"``: :meth:`~OldGradientPredictor.predict` returns the predicted mean old-task
  gradient per tensor, and the engine applies eq. 5 (or eq. 2's average) coordinate by
  coordinate. Built in: :class:`MetaNetPredictor` (the paper exactly), :class:`AnchoredPredictor`
  (a diagonal Taylor model with a trust region) and :class:`ReplayPredictor` (the real old-task
  gradient from a small episodic memory).
* ``"projection"``: the predictor rewrites the gradient itself
  (:meth:`~OldGradientPredictor.rewrite_`): :class:`~lightning_metagrad.subspace.SubspacePredictor`,
  the default, removes each weight matrix's component in the old tasks' gradient subspace.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import apply_to_collection
from torch import Tensor

from lightning_metagrad._module_utils import loss_of, quiet_eval
from lightning_metagrad._validation import (
    check_choice,
    check_float,
    check_int,
    check_int_sequence,
    check_state_version,
)
from lightning_metagrad.distillation import RunningMeanDistiller
from lightning_metagrad.meta_network import ACTIVATIONS, Activation, CoordinateMLP, MetaNetwork
from lightning_metagrad.tabulation import TabulatedFunction

#: Per tensor: ``(mean old-task gradient, trusted mask or None)``, or None (the tensor is free).
Prediction = tuple[Tensor, Tensor | None] | None


class OldGradientPredictor:
    """Interface of a predictor of the old tasks' gradients (subclass to add one).

    The engine calls :meth:`bind` with the trainable parameters by name, :meth:`observe` on
    every optimizer step with the tensors that have a gradient, :meth:`end_task` at a boundary,
    and, from the second task on, :meth:`predict` (``rule = "elementwise"``) or
    :meth:`rewrite_` (``rule = "projection"``). ``names``, ``thetas`` and ``targets`` are
    parallel lists; ``targets`` are gradients or update vectors, float32 or lower precision.

    Example:
        >>> class ZeroPredictor(OldGradientPredictor):
        ...     def observe(self, names, thetas, targets):
        ...         return {}
        ...     def end_task(self, names, thetas):
        ...         self._old_tasks += 1
        ...     def predict(self, names, thetas):
        ...         return [(torch.zeros_like(t), None) for t in thetas]
        >>> pred = ZeroPredictor()
        >>> pred.end_task(["w"], [torch.ones(2)])
        >>> pred.predict(["w"], [torch.ones(2)])
        [(tensor([0., 0.]), None)]
        >>> pred.state_dict()
        {'version': 1, 'num_old_tasks': 1}
        >>> from lightning_metagrad import MetaGradCallback
        >>> MetaGradCallback(predictor=pred).predictor_name
        'ZeroPredictor'
    """

    rule: ClassVar[Literal["elementwise", "projection"]] = "elementwise"
    #: Whether :meth:`observe` accepts ``finite=`` (a 0-dim bool device tensor) and leaves a
    #: step out of what it learns where it is False: the engine then checks finiteness
    #: without a host sync per step. Otherwise it only sees finite steps.
    masks_non_finite: ClassVar[bool] = False
    #: The layout version :meth:`state_dict` writes (bumped when the layout changes).
    _state_version: ClassVar[int] = 1
    _old_tasks = 0

    @property
    def num_old_tasks(self) -> int:
        """Tasks folded into the old-task state (``t`` in eqs. 6-7)."""
        return self._old_tasks

    def bind(self, params: Mapping[str, Tensor]) -> None:
        """Adopt the trainable parameters (name -> tensor) at each fit start."""

    def attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Called at each fit start; predictors that evaluate the model keep it here."""

    def learn_from(
        self, target: Literal["gradient", "update"], optimizer: torch.optim.Optimizer | None
    ) -> None:
        """Called at each fit start with what the targets will be: the gradients, or the
        ``optimizer``'s update vectors. A predictor whose statistic depends on it (the
        subspace predictor's step weighting) chooses here; by default nothing changes."""

    def observe_batch(self, batch: Any) -> None:
        """Called with every training batch (on the device); only a memory needs it."""

    def observe(
        self, names: Sequence[str], thetas: Sequence[Tensor], targets: Sequence[Tensor]
    ) -> dict[str, Tensor]:
        """Learn from one step's finite targets; return diagnostics to log (name -> scalar)."""
        raise NotImplementedError

    def end_task(self, names: Sequence[str], thetas: Sequence[Tensor]) -> None:
        """Fold the finished task in (eqs. 6-7); ``thetas`` are its end point."""
        raise NotImplementedError

    def keep_history(self, steps: int) -> None:
        """Keep what each of the last ``steps`` optimizer steps added to the current task, so
        that :meth:`forget_recent` can take it back (task switches detected some steps
        late). The default keeps nothing."""

    def forget_recent(self, steps: int) -> bool:
        """Before :meth:`end_task`: take back what the last ``steps`` steps added to the task
        (they belong to the next one). False if nothing could be taken back (the default)."""
        return False

    def predict(self, names: Sequence[str], thetas: Sequence[Tensor]) -> list[Prediction]:
        """Elementwise rule: per tensor ``(mean old-task gradient, trusted mask or None)``.

        Where the mask is 0 the rule keeps the current gradient whatever its sign; the mask may
        be boolean or 0/1 floats. A None entry leaves that tensor free.
        """
        raise NotImplementedError

    def rewrite_(
        self, names: Sequence[str], thetas: Sequence[Tensor], targets: Sequence[Tensor]
    ) -> dict[str, Tensor]:
        """Projection rule: rewrite ``targets`` in place; return diagnostics to log."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        """Plain values and tensors only (Lightning checkpoints load with ``weights_only``),
        with a ``"version"``; calling it changes nothing. The default holds the old-task
        count, enough for a predictor whose state is that count alone."""
        return {"version": self._state_version, "num_old_tasks": self._old_tasks}

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict`; ValueError for a version this release cannot read."""
        check_state_version(type(self).__name__, state, self._state_version, unversioned=1)
        self._old_tasks = int(state["num_old_tasks"])


def _flat(tensors: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.detach().reshape(-1).float() for t in tensors])


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

    def bind(self, params: Mapping[str, Tensor]) -> None:
        # Coordinate-wise: the layout does not matter, only the device.
        device = next(iter(params.values())).device
        self.meta.net.to(device)
        if self.distiller.g is not None:
            self.distiller.g.to(device)
        if self.table is not None:
            self.table = self.table.to(device)

    def observe(
        self, names: Sequence[str], thetas: Sequence[Tensor], targets: Sequence[Tensor]
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
        return {"metagrad/meta_loss": loss, "metagrad/meta_rel_error": rel_error}

    def end_task(self, names: Sequence[str], thetas: Sequence[Tensor]) -> None:
        if self.meta.num_updates == 0 or self.in_scale is None:
            raise RuntimeError("the task ended before its meta-network had any update")
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

    def bind(self, params: Mapping[str, Tensor]) -> None:
        for store in (self._b, self._c, self._sq_sum):
            for name, value in list(store.items()):
                p = params.get(name)
                if p is not None and value.shape != p.shape:
                    del store[name]  # the tensor changed shape: a new parameter for old tasks
                elif p is not None:
                    store[name] = value.to(p.device)
        self._b_mean = None

    def observe(
        self, names: Sequence[str], thetas: Sequence[Tensor], targets: Sequence[Tensor]
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
            raise RuntimeError("the task ended before any step was observed")
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


class ReplayPredictor(OldGradientPredictor):
    """The real mean old-task gradient from an episodic memory of old training batches.

    During a task, ``memory_batches`` of its batches are kept by reservoir sampling; at a
    boundary they join the memory, and the total stays at ``memory_batches`` batches shared
    evenly by all old tasks (constant memory). Every ``refresh_every`` steps the gradient of
    the module's own ``training_step`` loss on each old task's batches is computed (eval mode,
    logging silenced, ``.grad`` untouched), averaged over old tasks (eq. 2's mean) and reused
    until the next refresh. Under DDP each rank's estimate is averaged over ranks.

    ``free_below``: a magnitude-aware eq. 5. Coordinates whose old-task gradient is small carry
    no real constraint from the old tasks, so the rule keeps the current gradient there: those
    with ``|old_j| <= free_below * mean(|old|)`` (the mean over all parameters). ``0`` frees
    exactly-zero entries only (an input that is 0 in every stored sample, a dead ReLU);
    ``None`` applies eq. 5 literally. The default's choice is in ``docs/science.md``.

    Example:
        >>> ReplayPredictor(memory_batches=8, refresh_every=10).num_old_tasks
        0
    """

    def __init__(
        self,
        memory_batches: int = 8,
        refresh_every: int = 10,
        seed: int = 0,
        free_below: float | None = 4.0,
    ) -> None:
        self.free_below = check_float("free_below", free_below, minimum=0, optional=True)
        self.memory_batches = check_int("memory_batches", memory_batches, minimum=1)
        self.refresh_every = check_int("refresh_every", refresh_every, minimum=1)
        self._generator = torch.Generator().manual_seed(check_int("seed", seed))
        self.memory: list[list[Any]] = []  # per old task: stored batches
        self.current: list[Any] = []
        self._seen = 0
        self._calls = 0
        self._cached: dict[str, Tensor] | None = None  # the old gradient in use, by name
        self._trusted: dict[str, Tensor] | None = None
        self._trainer: pl.Trainer | None = None
        self._module: pl.LightningModule | None = None
        self._params: dict[str, Tensor] = {}

    @property
    def num_old_tasks(self) -> int:
        return len(self.memory)

    def attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._trainer, self._module = trainer, pl_module
        self._params = {n: p for n, p in pl_module.named_parameters() if p.requires_grad}

    def observe_batch(self, batch: Any) -> None:
        # Reservoir sampling: every batch of the task has the same chance to be kept.
        self._seen += 1
        if len(self.current) < self.memory_batches:
            self.current.append(_detached(batch))
        else:
            slot = int(torch.randint(self._seen, (1,), generator=self._generator))
            if slot < self.memory_batches:
                self.current[slot] = _detached(batch)

    def observe(
        self, names: Sequence[str], thetas: Sequence[Tensor], targets: Sequence[Tensor]
    ) -> dict[str, Tensor]:
        return {}

    def end_task(self, names: Sequence[str], thetas: Sequence[Tensor]) -> None:
        if not self.current:
            raise RuntimeError("the task ended before any batch was stored")
        self.memory.append(self.current)
        share = max(1, self.memory_batches // len(self.memory))
        self.memory = [batches[:share] for batches in self.memory]
        self.current, self._seen, self._cached, self._trusted = [], 0, None, None

    def predict(self, names: Sequence[str], thetas: Sequence[Tensor]) -> list[Prediction]:
        if not self.memory:
            return [None] * len(thetas)
        # One call per step: recompute every `refresh_every` calls.
        if self._cached is None or self._calls % self.refresh_every == 0:
            self._cached = self._old_gradient()
            self._trusted = self._constrained(self._cached)
        self._calls += 1
        cached, trusted = self._cached, self._trusted
        out: list[Prediction] = []
        for name, theta in zip(names, thetas):
            old = cached.get(name)
            if old is None or old.shape != theta.shape:
                out.append(None)  # a parameter the memory's loss does not reach: free
                continue
            if old.device != theta.device:  # restored from a checkpoint saved on the CPU
                old = cached[name] = old.to(theta.device)
                if trusted is not None:
                    trusted[name] = trusted[name].to(theta.device)
            out.append((old, None if trusted is None else trusted[name]))
        return out

    def _constrained(self, old: dict[str, Tensor]) -> dict[str, Tensor] | None:
        """Where the old tasks constrain the update (the rule's "trusted" mask), by name."""
        if self.free_below is None:
            return None
        if self.free_below == 0:
            return {n: g.abs() > 0 for n, g in old.items()}
        total = sum(g.numel() for g in old.values())
        mean = sum(g.abs().sum() for g in old.values()) / max(total, 1)
        return {n: g.abs() > self.free_below * mean for n, g in old.items()}

    def _old_gradient(self) -> dict[str, Tensor]:
        module, trainer = self._module, self._trainer
        if module is None or trainer is None:
            raise RuntimeError("ReplayPredictor.predict() before attach()")
        names = list(self._params)
        params = list(self._params.values())
        total = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        reached = [False] * len(params)
        with quiet_eval(module):
            for batches in self.memory:
                for i, batch in enumerate(batches):
                    loss = loss_of(module.training_step(batch, i))
                    if loss is None:
                        continue
                    grads = torch.autograd.grad(loss, params, allow_unused=True)
                    scale = 1.0 / (len(batches) * len(self.memory))
                    for k, (acc, g) in enumerate(zip(total, grads)):
                        if g is not None:
                            acc.add_(g.float(), alpha=scale)
                            reached[k] = True
        if trainer.world_size > 1:
            total = [trainer.strategy.reduce(t, reduce_op="mean") for t in total]
        return {n: t for n, t, r in zip(names, total, reached) if r}

    def state_dict(self) -> dict:
        return {
            "version": self._state_version,
            # Copies of the lists: a later task must not change a state taken now.
            "memory": [list(batches) for batches in self.memory],
            "current": list(self.current),
            "seen": self._seen,
            "calls": self._calls,
            "generator": self._generator.get_state(),
            # The old gradient in use until the next refresh (so a resumed run rewrites the
            # same gradients as the uninterrupted one, not a fresh one at resumed weights).
            "cached": None
            if self._cached is None
            else {n: t.detach().cpu().clone() for n, t in self._cached.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        check_state_version(type(self).__name__, state, self._state_version, unversioned=1)
        self.memory = [list(b) for b in state["memory"]]
        self.current = list(state["current"])
        self._seen = int(state["seen"])
        self._calls = int(state["calls"])
        self._generator.set_state(state["generator"])
        self._cached = None if state["cached"] is None else dict(state["cached"])
        self._trusted = None if self._cached is None else self._constrained(self._cached)


def _detached(batch: Any) -> Any:
    return apply_to_collection(batch, Tensor, lambda t: t.detach().clone())
