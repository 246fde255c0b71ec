"""Predictors of the mean old-task gradient, the ``bar-nabla`` of eq. 5.

A predictor is trained on ``(theta_j, target_j)`` pairs of the current task (the gradient, or
the optimizer's update vector), folds the finished task into a running mean at each boundary
(eqs. 6-7), and predicts that mean at the current parameters. Plain PyTorch; the callback only
calls these methods. Two are built in:

* :class:`MetaNetPredictor` -- the paper exactly: a coordinate-wise MLP ``h(theta_j)`` per task
  (section 2.2), distilled online into ``g`` (section 5.2), evaluated through a table.
* :class:`AnchoredPredictor` -- per coordinate, a diagonal Taylor model of each old task's
  gradient around its end point, with a trust region inside which the prediction is not
  trusted; no data stored.
* :class:`ReplayPredictor` -- a small episodic memory of old batches yields the real old-task
  gradient at the current parameters: the upper reference for the rule, and a practical mode
  where keeping a few batches is allowed.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import apply_to_collection
from torch import Tensor

from lightning_metagrad._module_utils import loss_of, quiet_eval
from lightning_metagrad.distillation import RunningMeanDistiller
from lightning_metagrad.meta_network import CoordinateMLP, MetaNetwork
from lightning_metagrad.tabulation import TabulatedFunction


class OldGradientPredictor:
    """Interface of a predictor of the mean old-task gradient (subclass to add one).

    The callback calls :meth:`bind` at each fit start with the trainable parameters' names and
    sizes (the flat layout of ``theta``), :meth:`observe` on every optimizer step of a task,
    :meth:`end_task` at a boundary, and :meth:`predict` from the second task on.

    Example:
        >>> class ZeroPredictor(OldGradientPredictor):
        ...     def observe(self, theta, target):
        ...         return {}
        ...     def end_task(self, theta):
        ...         self._old_tasks += 1
        ...     def predict(self, theta):
        ...         return (torch.zeros_like(theta), None) if self.num_old_tasks else None
        >>> pred = ZeroPredictor()
        >>> pred.predict(torch.ones(2)) is None
        True
        >>> pred.end_task(torch.ones(2))
        >>> pred.predict(torch.ones(2))
        (tensor([0., 0.]), None)
        >>> from lightning_metagrad import MetaGradCallback
        >>> MetaGradCallback(predictor=pred).predictor_name
        'ZeroPredictor'
    """

    _old_tasks = 0

    @property
    def num_old_tasks(self) -> int:
        """Tasks folded into the running mean (``t`` in eqs. 6-7)."""
        return self._old_tasks

    def bind(self, names: Sequence[str], numels: Sequence[int], device: torch.device) -> None:
        """Adopt the flat layout ``theta = cat(p.reshape(-1) for p in params)``."""

    def attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Called at each fit start; predictors that evaluate the model keep it here."""

    def observe_batch(self, batch: Any) -> None:
        """Called with every training batch (on the device); only a memory needs it."""

    def observe(self, theta: Tensor, target: Tensor) -> dict[str, Tensor]:
        """Learn from one step's finite pairs; return diagnostics to log (name -> scalar)."""
        raise NotImplementedError

    def end_task(self, theta: Tensor) -> None:
        """Fold the finished task into the running mean of old-task gradients (eqs. 6-7)."""
        raise NotImplementedError

    def predict(self, theta: Tensor) -> tuple[Tensor, Tensor | None] | None:
        """``(mean old-task gradient, confident mask or None)`` at ``theta``; None before task 2.

        Where the mask is False the rule keeps the current gradient whatever its sign.
        """
        raise NotImplementedError

    def predict_slice(self, theta: Tensor, start: int) -> tuple[Tensor, Tensor | None] | None:
        """:meth:`predict` for the coordinates ``start : start + len(theta)`` only.

        Optional: a predictor whose prediction is coordinate-wise overrides it, and the callback
        then evaluates the rule chunk by chunk (small temporaries, cache-resident passes). The
        mask may be boolean or 0/1 floats of ``theta``'s dtype.
        """
        raise NotImplementedError

    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError


class MetaNetPredictor(OldGradientPredictor):
    """The paper's predictor: a coordinate-wise meta-network per task, distilled into one g.

    ``h`` (default 1-256-256-256-1, section 2.2) is trained by Adam on ``coords_per_step``
    random coordinates every ``update_every`` optimizer steps; inputs are divided by the
    parameters' standard deviation at the first step, targets by their RMS at each task's first
    update. At a boundary h is distilled into g (eq. 7) with ``distill_steps`` Adam steps, and
    g is tabulated on ``table_points`` points for O(P) prediction.

    Example:
        >>> pred = MetaNetPredictor(hidden_sizes=(8,), coords_per_step=16, update_every=1)
        >>> theta = torch.randn(100)
        >>> _ = pred.observe(theta, -theta)
        >>> pred.end_task(theta)
        >>> pred.predict(theta)[0].shape
        torch.Size([100])
    """

    def __init__(
        self,
        hidden_sizes: Sequence[int] = (256, 256, 256),
        activation: str = "relu",
        coords_per_step: int = 4096,
        lr: float = 1e-3,
        update_every: int = 8,
        distill_steps: int = 200,
        distill_samples: int = 4096,
        table_points: int = 4097,
        seed: int = 0,
    ) -> None:
        if not isinstance(update_every, int) or update_every < 1:
            raise ValueError(f"`update_every` must be an int >= 1, got {update_every!r}")
        if not isinstance(table_points, int) or table_points < 2:
            raise ValueError(f"`table_points` must be an int >= 2, got {table_points!r}")
        if not isinstance(seed, int):
            raise ValueError(f"`seed` must be an int, got {seed!r}")
        self.update_every = update_every
        self.table_points = table_points
        self.generator = torch.Generator().manual_seed(seed)
        self.meta = MetaNetwork(
            CoordinateMLP(hidden_sizes, activation),
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
        return self.meta.net

    @property
    def g(self) -> CoordinateMLP | None:
        return self.distiller.g

    def bind(self, names: Sequence[str], numels: Sequence[int], device: torch.device) -> None:
        # Coordinate-wise: the layout does not matter, only the device.
        self.meta.net.to(device)
        if self.distiller.g is not None:
            self.distiller.g.to(device)
        if self.table is not None:
            self.table = self.table.to(device)

    def observe(self, theta: Tensor, target: Tensor) -> dict[str, Tensor]:
        if self.in_scale is None:
            # One input scale for every task's network: the parameters' spread at the start.
            std = float(theta.float().std())
            self.in_scale = std if math.isfinite(std) and std > 0 else 1.0
            self.meta.reset(self.in_scale)
        step = self.steps_in_task
        self.steps_in_task += 1
        if step % self.update_every != 0:
            return {}
        index = self.meta.sample_indices(theta.numel(), theta.device)
        # The loss on freshly drawn coordinates, before the update: a held-out error.
        loss, rel_error = self.meta.observe(theta, target, index)
        return {"metagrad/meta_loss": loss, "metagrad/meta_rel_error": rel_error}

    def end_task(self, theta: Tensor) -> None:
        if self.meta.num_updates == 0:
            raise RuntimeError("the task ended before its meta-network had any update")
        self.distiller.add_task(self.meta.net, theta, generator=self.generator)
        g = self.distiller.g
        assert g is not None and self.in_scale is not None
        reach = max(2.0 * float(theta.abs().max()), 8.0 * self.in_scale)
        self.table = TabulatedFunction.from_function(
            g, -reach, reach, num_points=self.table_points, device=theta.device
        )
        self.meta.reset(self.in_scale)
        self.steps_in_task = 0

    def predict(self, theta: Tensor) -> tuple[Tensor, Tensor | None] | None:
        if self.table is None:
            return None
        return self.table(theta), None

    def predict_slice(self, theta: Tensor, start: int) -> tuple[Tensor, Tensor | None] | None:
        return self.predict(theta)  # coordinate-wise: the position does not matter

    def state_dict(self) -> dict:
        return {
            "meta": self.meta.state_dict(),
            "distiller": self.distiller.state_dict(),
            "table": None if self.table is None else self.table.state_dict(),
            "in_scale": self.in_scale,
            "steps_in_task": self.steps_in_task,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.meta.load_state_dict(state["meta"])
        self.distiller.load_state_dict(state["distiller"], template=self.meta.net)
        table = state["table"]
        self.table = None if table is None else TabulatedFunction.from_state_dict(table)
        self.in_scale = state["in_scale"]
        self.steps_in_task = int(state["steps_in_task"])
        self.generator.set_state(state["generator"])


class AnchoredPredictor(OldGradientPredictor):
    r"""Per-coordinate diagonal Taylor model of the old tasks' gradients, with a trust region.

    During task i the importance ``F_i = mean_s target_j(s)^2`` is accumulated (a running
    squared gradient). Around the task's end point ``theta*_i`` its gradient is modelled as
    ``F_i,j (theta_j - theta*_i,j)``; the mean over old tasks (eq. 6) is linear in theta,
    ``B theta - C`` with ``B = mean_i F_i`` and ``C = mean_i F_i theta*_i``, so the running
    mean is exact and costs two floats per parameter between tasks (in checkpoints), three
    while bound to a model.

    Magnitude-aware rule: the prediction is trusted only outside a trust region, where the
    modelled old-task loss increase ``B (theta - anchor)^2 / 2`` exceeds
    ``radius^2 mean(B) / 2``; inside it the current gradient is kept (eq. 5 would otherwise
    freeze every coordinate at the anchor, where the prediction is 0). Important coordinates
    get a small region, unimportant ones a large one.

    Example:
        >>> pred = AnchoredPredictor(radius=0.01)
        >>> pred.bind(["w"], [3], torch.device("cpu"))
        >>> _ = pred.observe(torch.zeros(3), torch.tensor([1.0, 0.1, 0.0]))
        >>> pred.end_task(torch.zeros(3))
        >>> mean_grad, trusted = pred.predict(torch.tensor([0.5, 0.5, 0.5]))
        >>> mean_grad, trusted
        (tensor([0.5000, 0.0050, 0.0000]), tensor([ True,  True, False]))
    """

    def __init__(self, radius: float = 0.01) -> None:
        if not radius > 0:
            raise ValueError(f"`radius` must be > 0, got {radius!r}")
        self.radius = float(radius)
        self._old_tasks = 0
        self._names: list[str] = []
        self._numels: list[int] = []
        # Per-parameter-name state, so the model may change between tasks.
        self._stored: dict[str, dict[str, Tensor]] = {}
        self._sq_sum: Tensor | None = None  # running sum of target^2 in the current task
        self._count = 0
        self._b: Tensor | None = None
        self._c: Tensor | None = None
        self._b_mean: float | None = None  # cached mean(B), reset whenever B changes

    def bind(self, names: Sequence[str], numels: Sequence[int], device: torch.device) -> None:
        self._unbind()
        self._names, self._numels = list(names), list(numels)
        total = sum(self._numels)

        def gather(key: str) -> Tensor:
            parts = []
            for name, n in zip(self._names, self._numels):
                t = self._stored.get(name, {}).get(key)
                parts.append(
                    t.to(device)
                    if t is not None and t.numel() == n
                    else torch.zeros(n, device=device)
                )
            return torch.cat(parts) if parts else torch.zeros(total, device=device)

        self._sq_sum = gather("sq_sum")
        self._b, self._b_mean = gather("b"), None
        self._c = gather("c")
        self._forget_bound()

    def _forget_bound(self) -> None:
        """Drop the per-name copies of the bound names: the flat buffers hold them now
        (keeping both would cost three more floats per parameter)."""
        for name in self._names:
            self._stored.pop(name, None)

    def _unbind(self) -> None:
        """Write the flat buffers back into the per-name store."""
        if self._b is None or self._c is None or self._sq_sum is None:
            return
        buffers = [("b", self._b), ("c", self._c)]
        if self._count:  # between tasks the squared-gradient sum is all zeros: not stored
            buffers.append(("sq_sum", self._sq_sum))
        for key, flat in buffers:
            for name, piece in zip(self._names, flat.split(self._numels)):
                self._stored.setdefault(name, {})[key] = piece.detach().clone()

    def observe(self, theta: Tensor, target: Tensor) -> dict[str, Tensor]:
        if self._sq_sum is None:
            raise RuntimeError("AnchoredPredictor.observe() before bind()")
        self._sq_sum.addcmul_(target, target)
        self._count += 1
        return {}

    def end_task(self, theta: Tensor) -> None:
        if self._sq_sum is None or self._b is None or self._c is None:
            raise RuntimeError("AnchoredPredictor.end_task() before bind()")
        if self._count == 0:
            raise RuntimeError("the task ended before any step was observed")
        t = float(self._old_tasks)
        importance = self._sq_sum / self._count
        # Eq. 6, exactly: running means of F_i and F_i * theta*_i.
        self._b.mul_(t / (t + 1)).add_(importance, alpha=1 / (t + 1))
        self._b_mean = None
        self._c.mul_(t / (t + 1)).add_(importance * theta, alpha=1 / (t + 1))
        self._sq_sum.zero_()
        self._count = 0
        self._old_tasks += 1

    def predict(self, theta: Tensor) -> tuple[Tensor, Tensor | None] | None:
        out = self.predict_slice(theta, 0)
        return None if out is None or out[1] is None else (out[0], out[1] > 0)

    def predict_slice(self, theta: Tensor, start: int) -> tuple[Tensor, Tensor | None] | None:
        if self.num_old_tasks == 0 or self._b is None or self._c is None:
            return None
        end = start + theta.numel()
        b, c = self._b[start:end], self._c[start:end]
        predicted = torch.mul(b, theta).sub_(c)
        # Outside the trust region: pred^2 / B > radius^2 mean(B)  (no division by B needed).
        if self._b_mean is None:  # B changes only at a boundary: one reduction (sync) per task
            self._b_mean = float(self._b.mean())
        threshold = (self.radius**2) * self._b_mean
        # A 0/1 float mask: float kernels are several times faster than boolean ones on CPU.
        trusted = torch.mul(predicted, predicted).sub_(b, alpha=threshold).gt_(0)
        return predicted, trusted

    def state_dict(self) -> dict:
        self._unbind()
        state = {
            "radius": self.radius,
            "num_old_tasks": self.num_old_tasks,
            "count": self._count,
            "stored": {k: dict(v) for k, v in self._stored.items()},
        }
        if self._b is not None:  # still bound: the copies belong to the returned state only
            self._forget_bound()
        return state

    def load_state_dict(self, state: dict) -> None:
        self._old_tasks = int(state["num_old_tasks"])
        self._count = int(state["count"])
        self._stored = {k: dict(v) for k, v in state["stored"].items()}
        self._b = self._c = self._sq_sum = None
        if self._names:
            device = next(iter(self._stored.values()))["b"].device if self._stored else "cpu"
            self.bind(self._names, self._numels, torch.device(device))


class ReplayPredictor(OldGradientPredictor):
    """The real mean old-task gradient from an episodic memory of old training batches.

    During a task, ``memory_batches`` of its batches are kept by reservoir sampling; at a
    boundary they join the memory, and the total stays at ``memory_batches`` batches shared
    evenly by all old tasks (constant memory). Every ``refresh_every`` steps the gradient of
    the module's own ``training_step`` loss on each old task's batches is computed (eval mode,
    logging silenced, ``.grad`` untouched), averaged over old tasks (eq. 2's mean) and reused
    until the next refresh. Under DDP each rank's estimate is averaged over ranks.

    ``free_below``: a magnitude-aware eq. 5. Coordinates whose old-task gradient is small carry
    no real constraint from the old tasks, so the rule keeps the current gradient there (a "not
    trusted" mask, as the anchored predictor returns): those with
    ``|old_j| <= free_below * mean(|old|)``. Only the few coordinates where the old tasks pull
    hard can then veto the current gradient. On the Fig. 1 protocol (``docs/science.md``) the
    validation split gave a plateau for 2-8 and a fall at 16; the default 4 is its middle.
    ``0`` frees exactly-zero entries only (an input that is 0 in every stored sample, a dead
    ReLU); ``None`` applies eq. 5 literally and blocks ~75 % of the coordinates there, so new
    tasks are learned with a fraction of their gradient.

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
        if not isinstance(memory_batches, int) or memory_batches < 1:
            raise ValueError(f"`memory_batches` must be an int >= 1, got {memory_batches!r}")
        if not isinstance(refresh_every, int) or refresh_every < 1:
            raise ValueError(f"`refresh_every` must be an int >= 1, got {refresh_every!r}")
        if free_below is not None and (
            isinstance(free_below, bool)
            or not isinstance(free_below, (int, float))
            or not 0 <= free_below < float("inf")
        ):
            raise ValueError(
                f"`free_below` must be None or a finite number >= 0, got {free_below!r}"
            )
        self.free_below = None if free_below is None else float(free_below)
        self._trusted: Tensor | None = None
        self.memory_batches = memory_batches
        self.refresh_every = refresh_every
        self._rng = random.Random(seed)
        self.memory: list[list[Any]] = []  # per old task: stored batches
        self.current: list[Any] = []
        self._seen = 0
        self._calls = 0
        self._cached: Tensor | None = None
        self._trainer: pl.Trainer | None = None
        self._module: pl.LightningModule | None = None
        self._params: list[Tensor] = []

    @property
    def num_old_tasks(self) -> int:
        return len(self.memory)

    def attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._trainer, self._module = trainer, pl_module
        self._params = [p for p in pl_module.parameters() if p.requires_grad]
        if self._cached is not None and self._cached.numel() != sum(
            p.numel() for p in self._params
        ):
            self._cached = self._trusted = None  # the trainable parameters changed

    def observe_batch(self, batch: Any) -> None:
        # Reservoir sampling: every batch of the task has the same chance to be kept.
        self._seen += 1
        if len(self.current) < self.memory_batches:
            self.current.append(_detached(batch))
        else:
            slot = self._rng.randrange(self._seen)
            if slot < self.memory_batches:
                self.current[slot] = _detached(batch)

    def observe(self, theta: Tensor, target: Tensor) -> dict[str, Tensor]:
        return {}

    def end_task(self, theta: Tensor) -> None:
        if not self.current:
            raise RuntimeError("the task ended before any batch was stored")
        self.memory.append(self.current)
        share = max(1, self.memory_batches // len(self.memory))
        self.memory = [batches[:share] for batches in self.memory]
        self.current, self._seen, self._cached = [], 0, None

    def predict(self, theta: Tensor) -> tuple[Tensor, Tensor | None] | None:
        if not self.memory:
            return None
        self._refresh(theta.device)
        return self._cached, self._trusted  # type: ignore[return-value]

    def predict_slice(self, theta: Tensor, start: int) -> tuple[Tensor, Tensor | None] | None:
        if not self.memory:
            return None
        if start == 0:  # one call per step: the callback walks the chunks in order
            self._refresh(theta.device)
        end = start + theta.numel()
        trusted = None if self._trusted is None else self._trusted[start:end]
        return self._cached[start:end], trusted  # type: ignore[index]

    def _refresh(self, device: torch.device) -> None:
        """Recompute the old gradient every ``refresh_every`` calls (one call per step)."""
        if self._cached is None or self._calls % self.refresh_every == 0:
            self._cached = self._old_gradient().to(device)
            self._trusted = self._constrained(self._cached)
        elif self._cached.device != device:  # restored from a checkpoint (saved on the CPU)
            self._cached = self._cached.to(device)
            self._trusted = None if self._trusted is None else self._trusted.to(device)
        self._calls += 1

    def _constrained(self, old: Tensor) -> Tensor | None:
        """Where the old tasks constrain the update (the rule's "trusted" mask)."""
        if self.free_below is None:
            return None
        magnitude = old.abs()
        if self.free_below == 0:
            return magnitude > 0
        return magnitude > self.free_below * magnitude.mean()

    def _old_gradient(self) -> Tensor:
        module, trainer = self._module, self._trainer
        if module is None or trainer is None:
            raise RuntimeError("ReplayPredictor.predict() before attach()")
        total = [torch.zeros_like(p, dtype=torch.float32) for p in self._params]
        with quiet_eval(module):
            for batches in self.memory:
                for i, batch in enumerate(batches):
                    loss = loss_of(module.training_step(batch, i))
                    if loss is None:
                        continue
                    grads = torch.autograd.grad(loss, self._params, allow_unused=True)
                    scale = 1.0 / (len(batches) * len(self.memory))
                    for acc, g in zip(total, grads):
                        if g is not None:
                            acc.add_(g.float(), alpha=scale)
        flat = torch.cat([t.reshape(-1) for t in total])
        if trainer.world_size > 1:
            flat = trainer.strategy.reduce(flat, reduce_op="mean")
        return flat

    def state_dict(self) -> dict:
        return {
            "memory": self.memory,
            "current": self.current,
            "seen": self._seen,
            "calls": self._calls,
            "rng": list(self._rng.getstate()[1]),
            # The old gradient in use until the next refresh (so a resumed run rewrites the
            # same gradients as the uninterrupted one, not a fresh one at resumed weights).
            "cached": None if self._cached is None else self._cached.detach().cpu().clone(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.memory = [list(b) for b in state["memory"]]
        self.current = list(state["current"])
        self._seen = int(state["seen"])
        self._calls = int(state["calls"])
        self._rng.setstate((3, tuple(state["rng"]), None))
        self._cached = state.get("cached")
        self._trusted = None if self._cached is None else self._constrained(self._cached)


def _detached(batch: Any) -> Any:
    return apply_to_collection(batch, Tensor, lambda t: t.detach().clone())


PREDICTORS = {"paper": MetaNetPredictor, "anchored": AnchoredPredictor, "replay": ReplayPredictor}


def build_predictor(spec: str | OldGradientPredictor) -> OldGradientPredictor:
    """A predictor from its name (``"paper"``, ``"anchored"``, ``"replay"``) or an instance."""
    if isinstance(spec, OldGradientPredictor):
        return spec
    if spec not in PREDICTORS:
        raise ValueError(
            f"`predictor` must be one of {sorted(PREDICTORS)} or an OldGradientPredictor, "
            f"got {spec!r}"
        )
    return PREDICTORS[spec]()
