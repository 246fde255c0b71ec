"""The signals task-free detection tests, one object each: what it reads from the training
stream, its value at an observation, and its state. :class:`~lightning_metagrad.boundaries.
auto.AutoBoundaries` builds only the signals its detector names. Plain PyTorch."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from lightning_metagrad.boundaries.novelty import SubspaceNovelty
from lightning_metagrad.predictors.paper.meta_network import CoordinateMLP, MetaNetwork

#: What a signal reads: each step's gradients by name, each step's flat (theta, target)
#: pairs, or each batch's loss.
Reads = Literal["gradients", "pairs", "loss"]


class StreamSignal:
    """A positive signal of the training stream, read at each detector observation."""

    name: ClassVar[str]
    reads: ClassVar[Reads]

    def on_gradients(self, names: Sequence[str], targets: Sequence[Tensor]) -> None:
        """Each optimizer step's finite targets by name (``reads == "gradients"``)."""

    def on_pairs(self, theta: Tensor, target: Tensor, observing: bool) -> None:
        """Each optimizer step's flat pairs (``reads == "pairs"``); ``observing``: the step
        is an observation."""

    def on_loss(self, loss: Tensor) -> None:
        """Each batch's detached loss (``reads == "loss"``)."""

    def take(self) -> float | None:
        """The value at an observation (None: nothing to report); pooled values reset."""
        raise NotImplementedError

    def start_task(self) -> None:
        """A new task starts: statistics of the old one are dropped."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`."""


class NoveltySignal(StreamSignal):
    """The share of each step's gradient energy outside the current task's gradient subspace
    (:class:`~lightning_metagrad.boundaries.novelty.SubspaceNovelty`), pooled over the steps
    between observations. Scale free: learning-rate changes, warm-ups and batch sizes leave
    it alone.

    Example:
        >>> signal = NoveltySignal()
        >>> signal.on_gradients(["w"], [torch.ones(4, 3)])
        >>> signal.take() is None  # no basis yet: nothing to compare with
        True
    """

    name = "novelty"
    reads = "gradients"

    def __init__(self, novelty: SubspaceNovelty | None = None, seed: int = 0) -> None:
        self.novelty = novelty if novelty is not None else SubspaceNovelty(seed=seed)

    def on_gradients(self, names: Sequence[str], targets: Sequence[Tensor]) -> None:
        self.novelty.observe(names, targets)  # every step; pooled per observation

    def take(self) -> float | None:
        return self.novelty.pooled()

    def start_task(self) -> None:
        self.novelty.start_task()

    def state_dict(self) -> dict[str, Any]:
        return self.novelty.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.novelty.load_state_dict(state)


class LossSignal(StreamSignal):
    """The mean finite training loss since the previous observation (tensors until read, so
    feeding it never syncs with the device).

    Example:
        >>> signal = LossSignal()
        >>> signal.on_loss(torch.tensor(1.0)); signal.on_loss(torch.tensor(3.0))
        >>> signal.take(), signal.take()
        (2.0, None)
    """

    name = "loss"
    reads = "loss"

    def __init__(self) -> None:
        self._sum: Tensor | None = None
        self._finite: Tensor | None = None

    def on_loss(self, loss: Tensor) -> None:
        loss = loss.detach().float().reshape(())
        finite = torch.isfinite(loss)  # a non-finite loss is left out by zero weight
        value = torch.where(finite, loss, torch.zeros_like(loss))
        if self._sum is None or self._finite is None:
            self._sum, self._finite = value, finite.float()
        else:
            self._sum, self._finite = self._sum + value, self._finite + finite

    def take(self) -> float | None:
        if self._sum is None or self._finite is None:
            return None
        total, count = float(self._sum), float(self._finite)
        self._sum = self._finite = None
        return total / count if count > 0 else None

    def start_task(self) -> None:
        self._sum = self._finite = None

    def state_dict(self) -> dict[str, Any]:
        return {
            "sum": None if self._sum is None else float(self._sum),
            "finite": None if self._finite is None else float(self._finite),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        total, finite = state.get("sum"), state.get("finite")
        if total is None or finite is None:
            self._sum = self._finite = None
        else:
            self._sum, self._finite = torch.tensor(total), torch.tensor(finite)


class ErrorSignal(StreamSignal):
    """The paper's signal: a small coordinate-wise meta-network (default 1-32-32-1, the
    paper's h at a detector's size) trained on each observed step's ``(theta_j, target_j)``
    pairs; its relative error on freshly drawn coordinates, before the update, in target
    units fixed at the start of each task.

    Example:
        >>> signal = ErrorSignal(hidden_sizes=(4,), coords_per_step=16)
        >>> signal.on_pairs(torch.randn(50), torch.randn(50), observing=True)
        >>> signal.take() > 0
        True
    """

    name = "error"
    reads = "pairs"

    def __init__(
        self, hidden_sizes: Sequence[int] = (32, 32), coords_per_step: int = 1024, seed: int = 0
    ) -> None:
        generator = torch.Generator().manual_seed(seed)
        # Placeholder weights from a generator of their own (redrawn from `generator` at the
        # first observation): building the signal draws nothing from torch's global RNG.
        net = CoordinateMLP(hidden_sizes, generator=torch.Generator().manual_seed(seed))
        self.meta = MetaNetwork(net, coords_per_step=coords_per_step, lr=3e-3, generator=generator)
        self.last_error: float | None = None
        self._needs_reset = True

    def on_pairs(self, theta: Tensor, target: Tensor, observing: bool) -> None:
        self.meta.net.to(theta.device)
        if self._needs_reset:
            std = float(theta.float().std())
            self.meta.reset(std if std > 0 else 1.0)
            self._needs_reset = False
        if observing:
            loss, _ = self.meta.observe(theta, target)
            self.last_error = float(loss)

    def take(self) -> float | None:
        return self.last_error

    def start_task(self) -> None:
        self._needs_reset = True

    def state_dict(self) -> dict[str, Any]:
        return {
            "meta": self.meta.state_dict(),
            "generator": self.meta.generator.get_state(),
            "needs_reset": self._needs_reset,
            "last_error": self.last_error,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.meta.load_state_dict(state["meta"])
        self.meta.generator.set_state(state["generator"])
        self._needs_reset = bool(state["needs_reset"])
        self.last_error = state.get("last_error")


class DirectionSignal(StreamSignal):
    """A change of the gradient's **direction**: per gradient tensor, one minus the cosine of
    the step's gradient with the current task's running mean gradient direction (the mean of
    the task's unit-norm gradients, exponentially forgotten with a half-life of ``halflife``
    steps), energy-weighted over the tensors and pooled over the steps between observations:
    ``sum_l |g_l|^2 (1 - cos(g_l, m_l)) / sum_l |g_l|^2``, in [0, 2].

    It sees what the novelty cannot: a concept shift (the same inputs, new labels or a new
    teacher) on a small-input layer whose gradient subspace is already nearly full turns the
    gradient *inside* the subspace, often against the old task's mean. Scale free: a
    rescaled gradient (a learning-rate change, a warm-up, another batch size's mean) keeps
    its cosine. Each step is measured before it is added to the mean; :meth:`start_task`
    forgets the mean.

    ``recent`` (a half-life in steps; None: each step alone) measures the mean direction of
    the recent steps instead of each step's: within a task it then stays near 0 whatever the
    gradient noise, so a new batch size moves it less than a new mapping does
    (``docs/detection.md``, "Concept shift").

    Example:
        >>> signal = DirectionSignal()
        >>> for _ in range(20):
        ...     signal.on_gradients(["w"], [torch.ones(4, 3)])
        >>> signal.take() < 1e-6  # the same direction all along
        True
        >>> signal.on_gradients(["w"], [-3 * torch.ones(4, 3)])
        >>> signal.take()  # flipped: 1 - cos = 2, whatever the scale
        2.0
    """

    name = "direction"
    reads = "gradients"

    def __init__(self, halflife: float = 100.0, recent: float | None = None) -> None:
        if not halflife > 0:
            raise ValueError(f"`halflife` must be > 0, got {halflife!r}")
        if recent is not None and not recent > 0:
            raise ValueError(f"`recent` must be > 0 or None, got {recent!r}")
        self.halflife = float(halflife)
        self.recent = None if recent is None else float(recent)
        self._alpha = 1.0 - 0.5 ** (1.0 / self.halflife)
        self._beta = 1.0 if recent is None else 1.0 - 0.5 ** (1.0 / recent)
        self._means: dict[str, Tensor] = {}
        self._recents: dict[str, Tensor] = {}
        self._counts: dict[str, int] = {}
        self._changed: Tensor | None = None  # pooled sum_l |g_l|^2 (1 - cos)
        self._energy: Tensor | None = None  # pooled sum_l |g_l|^2

    @torch.no_grad()
    def on_gradients(self, names: Sequence[str], targets: Sequence[Tensor]) -> None:
        changed: list[Tensor] = []
        energies: list[Tensor] = []
        for name, target in zip(names, targets):
            g = target.detach().reshape(-1).float()
            energy = g.pow(2).sum()
            norm = energy.sqrt()
            ok = torch.isfinite(energy) & (norm > 0)  # a non-finite step is left out
            unit = torch.where(ok, g / norm.clamp_min(1e-30), torch.zeros_like(g))
            mean = self._means.get(name)
            if mean is not None and mean.shape == unit.shape:
                if mean.device != unit.device:  # e.g. restored from a checkpoint on the CPU
                    mean = self._means[name] = mean.to(unit.device)
                probe = unit
                if self.recent is not None:  # the recent steps' mean direction
                    rec = self._recents[name]
                    if rec.device != unit.device:
                        rec = self._recents[name] = rec.to(unit.device)
                    b = torch.where(ok, torch.tensor(self._beta, device=g.device), 0.0 * energy)
                    rec.mul_(1.0 - b).add_(b * unit)
                    probe = rec / rec.norm().clamp_min(1e-30)
                cos = (probe @ mean) / mean.norm().clamp_min(1e-30)
                weight = torch.where(ok & (mean.norm() > 0), energy, torch.zeros_like(energy))
                changed.append(weight * (1.0 - cos.clamp(-1.0, 1.0)))
                energies.append(weight)
                count = self._counts[name] + 1
                a = max(1.0 / count, self._alpha)
                a_t = torch.where(ok, torch.tensor(a, device=g.device), torch.zeros_like(energy))
                mean.mul_(1.0 - a_t).add_(a_t * unit)
                self._counts[name] = count
            else:  # first step of the task (or a new shape): the mean starts here
                self._means[name] = unit.clone()
                self._recents[name] = unit.clone()
                self._counts[name] = 1
        if energies:
            c, e = torch.stack(changed).sum(), torch.stack(energies).sum()
            if self._changed is None or self._energy is None:
                self._changed, self._energy = c, e
            else:
                self._changed, self._energy = self._changed + c, self._energy + e

    def take(self) -> float | None:
        if self._changed is None or self._energy is None:
            return None
        changed, energy = float(self._changed), float(self._energy)
        self._changed = self._energy = None
        return max(changed, 0.0) / energy if energy > 0 else None

    def start_task(self) -> None:
        self._means, self._recents, self._counts = {}, {}, {}
        self._changed = self._energy = None

    def state_dict(self) -> dict[str, Any]:
        return {
            "means": {n: m.detach().clone() for n, m in self._means.items()},
            "recents": {n: m.detach().clone() for n, m in self._recents.items()},
            "counts": dict(self._counts),
            "changed": None if self._changed is None else float(self._changed),
            "energy": None if self._energy is None else float(self._energy),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._means = {n: m.detach().clone() for n, m in state.get("means", {}).items()}
        self._recents = {n: m.detach().clone() for n, m in state.get("recents", {}).items()}
        self._counts = {n: int(c) for n, c in state.get("counts", {}).items()}
        changed, energy = state.get("changed"), state.get("energy")
        if changed is None or energy is None:
            self._changed = self._energy = None
        else:
            self._changed, self._energy = torch.tensor(changed), torch.tensor(energy)


#: The signals by name.
SIGNALS: dict[str, type[StreamSignal]] = {
    "novelty": NoveltySignal,
    "loss": LossSignal,
    "error": ErrorSignal,
    "direction": DirectionSignal,
}
