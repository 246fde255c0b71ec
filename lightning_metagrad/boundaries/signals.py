"""The signals task-free detection tests, one object each: what it reads from the training
stream, its value at an observation, and its state. :class:`~lightning_metagrad.boundaries.
auto.AutoBoundaries` builds only the signals its detector names. Plain PyTorch."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from lightning_metagrad._validation import check_bool, check_float
from lightning_metagrad.boundaries.novelty import SubspaceNovelty
from lightning_metagrad.predictors.paper.meta_network import CoordinateMLP, MetaNetwork

#: The least expected squared turn of a normalised direction (a floor against a division by
#: zero when every step points the same way).
_NOISE_FLOOR = 1e-5

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


class _Pooled:
    """A numerator and a denominator summed on the device between observations, so that
    feeding a signal never syncs with the host; read (and reset) once per observation."""

    def __init__(self, keys: tuple[str, str]) -> None:
        self.keys = keys  # their names in the signal's state
        self.num: Tensor | None = None
        self.den: Tensor | None = None

    def add(self, num: Tensor, den: Tensor) -> None:
        if self.num is None or self.den is None:
            self.num, self.den = num, den
        else:
            self.num, self.den = self.num + num, self.den + den

    def take(self) -> tuple[float, float] | None:
        if self.num is None or self.den is None:
            return None
        pooled = float(self.num), float(self.den)
        self.reset()
        return pooled

    def reset(self) -> None:
        self.num = self.den = None

    def state_dict(self) -> dict[str, float | None]:
        num, den = self.keys
        return {
            num: None if self.num is None else float(self.num),
            den: None if self.den is None else float(self.den),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        num, den = (state.get(k) for k in self.keys)
        if num is None or den is None:
            self.reset()
        else:
            self.num, self.den = torch.tensor(num), torch.tensor(den)


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


class InputNoveltySignal(NoveltySignal):
    """The novelty of the layers that read the data alone (their inputs carry no autograd
    history: the first linear or convolution, an embedding, the first trainable layer after
    a frozen backbone; told by :meth:`~lightning_metagrad.boundaries.sources.
    TaskBoundarySource.on_input_layers`). Training does not change what those layers see, so
    their gradients' subspace does not drift as the network leaves its start-up, and the
    reference may lag further behind: ``SubspaceNovelty(lag=3)`` by default. Silent until
    the layers are known.

    Example:
        >>> signal = InputNoveltySignal()
        >>> signal.layers = frozenset({"first.weight"})
        >>> signal.on_gradients(["first.weight", "last.weight"], [torch.ones(4, 3)] * 2)
        >>> signal.novelty.dims()  # only the first layer is tracked
        {'first.weight': 1}
    """

    name = "inputs"
    reads = "gradients"

    def __init__(self, novelty: SubspaceNovelty | None = None, seed: int = 0) -> None:
        super().__init__(novelty if novelty is not None else SubspaceNovelty(lag=3, seed=seed))
        self.layers: frozenset[str] | None = None

    def on_gradients(self, names: Sequence[str], targets: Sequence[Tensor]) -> None:
        if not self.layers:
            return
        keep = [i for i, n in enumerate(names) if n in self.layers]
        if keep:
            self.novelty.observe([names[i] for i in keep], [targets[i] for i in keep])

    def state_dict(self) -> dict[str, Any]:
        layers = None if self.layers is None else sorted(self.layers)
        return {"novelty": self.novelty.state_dict(), "layers": layers}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.novelty.load_state_dict(state["novelty"])
        layers = state.get("layers")
        self.layers = None if layers is None else frozenset(layers)


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
        self._pooled = _Pooled(("sum", "finite"))  # the finite losses and their count

    def on_loss(self, loss: Tensor) -> None:
        loss = loss.detach().float().reshape(())
        finite = torch.isfinite(loss)  # a non-finite loss is left out by zero weight
        self._pooled.add(torch.where(finite, loss, torch.zeros_like(loss)), finite.float())

    def take(self) -> float | None:
        pooled = self._pooled.take()
        if pooled is None:
            return None
        total, count = pooled
        return total / count if count > 0 else None

    def start_task(self) -> None:
        self._pooled.reset()

    def state_dict(self) -> dict[str, Any]:
        return self._pooled.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._pooled.load_state_dict(state)


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

    ``normalise=True`` measures the turn in units of what gradient noise alone would give,
    so that its level within a task does not depend on the gradient's signal-to-noise ratio
    (``1 - cos`` climbs as a task converges and its mean gradient shrinks against the noise;
    ``docs/detection.md``, "Noise-normalised direction"). Per tensor, with ``r`` the probe
    (the recent mean of unit gradients, or the step's unit gradient) and ``m`` the task's
    mean: the squared distance of ``r`` from the half-line along ``m`` (its part across
    ``m``; all of it where ``r`` points against ``m``), over that distance's expected value
    when the steps are unit vectors drawn around one fixed mean,
    ``(S_r + S_m - 2 C) * v``. ``S_r``, ``S_m`` and ``C`` are the sums of the squared and
    the crossed weights the two running means give the steps (exact, tracked as they are
    updated), and ``v`` the task's running mean of ``1 - cos^2`` of each unit gradient with
    ``m`` (the noise across the mean). Within a task it stays near 1 from the first steps to
    convergence; at a new direction it grows with the new mean gradient's size over the noise.
    For small angles it is ``1 - cos`` over its expected value under noise alone.

    Example:
        >>> signal = DirectionSignal()
        >>> for _ in range(20):
        ...     signal.on_gradients(["w"], [torch.ones(4, 3)])
        >>> signal.take() < 1e-6  # the same direction all along
        True
        >>> signal.on_gradients(["w"], [-3 * torch.ones(4, 3)])
        >>> signal.take()  # flipped: 1 - cos = 2, whatever the scale
        2.0

        Normalised, the level within a task is near 1 whatever the noise:

        >>> gen = torch.Generator().manual_seed(0)
        >>> mean = torch.randn(64, generator=gen)
        >>> for noise in (0.5, 4.0):
        ...     signal, values = DirectionSignal(recent=8, normalise=True), []
        ...     for _ in range(300):
        ...         signal.on_gradients(["w"], [mean + noise * torch.randn(64, generator=gen)])
        ...         values.append(signal.take())
        ...     print(round(sorted(values[100:])[100], 1))  # the median over 200 steps
        1.0
        1.0
    """

    name = "direction"
    reads = "gradients"
    #: Version 2 adds the normalised statistic's sums; version 1 (no ``version``) loads.
    _state_version = 2

    def __init__(
        self, halflife: float = 100.0, recent: float | None = None, *, normalise: bool = False
    ) -> None:
        halflife = check_float("halflife", halflife, minimum=0, low_open=True)
        recent = check_float("recent", recent, minimum=0, low_open=True, optional=True)
        self.normalise = check_bool("normalise", normalise)
        self.halflife = float(halflife)
        self.recent = None if recent is None else float(recent)
        self._alpha = 1.0 - 0.5 ** (1.0 / self.halflife)
        self._beta = 1.0 if recent is None else 1.0 - 0.5 ** (1.0 / recent)
        self._means: dict[str, Tensor] = {}
        self._recents: dict[str, Tensor] = {}
        self._counts: dict[str, int] = {}
        # normalise: per tensor, [S_m, S_r, C, v] (see the class docstring), on the device.
        self._noise: dict[str, Tensor] = {}
        # Pooled sum_l |g_l|^2 (1 - cos) and sum_l |g_l|^2.
        self._pooled = _Pooled(("changed", "energy"))

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
                b = torch.where(ok, torch.tensor(self._beta, device=g.device), 0.0 * energy)
                if self.recent is not None:  # the recent steps' mean direction
                    rec = self._recents[name]
                    if rec.device != unit.device:
                        rec = self._recents[name] = rec.to(unit.device)
                    rec.mul_(1.0 - b).add_(b * unit)
                    probe = rec / rec.norm().clamp_min(1e-30)
                count = self._counts[name] + 1
                a = max(1.0 / count, self._alpha)
                a_t = torch.where(ok, torch.tensor(a, device=g.device), torch.zeros_like(energy))
                weight = torch.where(ok & (mean.norm() > 0), energy, torch.zeros_like(energy))
                if self.normalise:
                    value = self._normalised(name, unit, mean, b, a_t, count)
                else:
                    cos = (probe @ mean) / mean.norm().clamp_min(1e-30)
                    value = 1.0 - cos.clamp(-1.0, 1.0)
                changed.append(weight * value)
                energies.append(weight)
                mean.mul_(1.0 - a_t).add_(a_t * unit)
                self._counts[name] = count
            else:  # first step of the task (or a new shape): the mean starts here
                self._means[name] = unit.clone()
                self._recents[name] = unit.clone()
                self._counts[name] = 1
                # Both means are this step alone: S_m = S_r = C = 1; no noise measured yet.
                self._noise[name] = torch.tensor([1.0, 1.0, 1.0, 0.0], device=g.device)
        if energies:
            self._pooled.add(torch.stack(changed).sum(), torch.stack(energies).sum())

    def _normalised(
        self, name: str, unit: Tensor, mean: Tensor, b: Tensor, a: Tensor, count: int
    ) -> Tensor:
        """The step's normalised turn (``normalise=True``), before ``unit`` joins ``mean``;
        the recent mean already holds it. Updates the weight sums and the noise ``v``."""
        stats = self._noise.get(name)
        if stats is None or stats.device != unit.device:  # e.g. a version-1 checkpoint
            if stats is None:
                stats = torch.tensor([1.0, 1.0, 1.0, 0.0])
            stats = self._noise[name] = stats.to(unit.device)
        s_m, s_r, cross, v = stats.unbind()
        m_hat = mean / mean.norm().clamp_min(1e-30)
        if self.recent is not None:
            probe = self._recents[name]
            # The recent mean took this step with weight b (the task's mean has not yet).
            s_r = (1.0 - b) ** 2 * s_r + b**2
            cross = (1.0 - b) * cross
            w_now = b
        else:
            probe, s_r, cross, w_now = unit, torch.ones_like(s_r), torch.zeros_like(cross), b
        # The noise across the mean: the task's running mean of 1 - cos^2 (each step weighs as
        # in the mean; the first measured step alone).
        across = 1.0 - (unit @ m_hat).clamp(-1.0, 1.0) ** 2
        a_v = torch.where(a > 0, torch.clamp(a, min=1.0 / (count - 1)), a)
        v = (1.0 - a_v) * v + a_v * across
        along = probe @ m_hat  # off: the distance from the half-line along the mean, squared
        off = (probe - along.clamp_min(0.0) * m_hat).pow(2).sum()
        expected = ((s_r + s_m - 2.0 * cross).clamp_min(0.0) * v).clamp_min(_NOISE_FLOOR)
        value = off / expected
        # The task's mean takes this step with weight a.
        s_m = (1.0 - a) ** 2 * s_m + a**2
        cross = (1.0 - a) * cross + a * w_now
        self._noise[name] = torch.stack([s_m, s_r, cross, v])
        return value

    def take(self) -> float | None:
        pooled = self._pooled.take()
        if pooled is None:
            return None
        changed, energy = pooled
        return max(changed, 0.0) / energy if energy > 0 else None

    def start_task(self) -> None:
        self._means, self._recents, self._counts, self._noise = {}, {}, {}, {}
        self._pooled.reset()

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": self._state_version,
            "means": {n: m.detach().clone() for n, m in self._means.items()},
            "recents": {n: m.detach().clone() for n, m in self._recents.items()},
            "counts": dict(self._counts),
            "noise": {n: s.detach().clone() for n, s in self._noise.items()},
            **self._pooled.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`. A version-1 state (before ``normalise``) has no weight
        sums: a normalised signal then starts the task's means afresh."""
        version = state.get("version", 1)
        if version not in (1, self._state_version):
            raise ValueError(
                f"DirectionSignal state version {version!r} is not supported "
                f"(this version reads 1 and {self._state_version})"
            )
        self._means = {n: m.detach().clone() for n, m in state.get("means", {}).items()}
        self._recents = {n: m.detach().clone() for n, m in state.get("recents", {}).items()}
        self._counts = {n: int(c) for n, c in state.get("counts", {}).items()}
        self._noise = {n: s.detach().clone() for n, s in state.get("noise", {}).items()}
        if self.normalise and set(self._noise) != set(self._means):
            self._means, self._recents, self._counts, self._noise = {}, {}, {}, {}
        self._pooled.load_state_dict(state)


#: The signals by name.
SIGNALS: dict[str, type[StreamSignal]] = {
    "novelty": NoveltySignal,
    "inputs": InputNoveltySignal,
    "loss": LossSignal,
    "error": ErrorSignal,
    "direction": DirectionSignal,
}
