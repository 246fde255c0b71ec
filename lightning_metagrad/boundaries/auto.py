"""Task switches detected from the training stream (section 5.1): :class:`AutoBoundaries`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from torch import Tensor

from lightning_metagrad._tensors import batch_size_of
from lightning_metagrad._validation import (
    check_bool,
    check_choice,
    check_int,
    check_int_sequence,
    check_state_version,
)
from lightning_metagrad.boundaries.changepoint import ChangePointDetector
from lightning_metagrad.boundaries.either import EitherDetector
from lightning_metagrad.boundaries.joint import JointRule
from lightning_metagrad.boundaries.novelty import SubspaceNovelty
from lightning_metagrad.boundaries.signals import (
    SIGNALS,
    DirectionSignal,
    ErrorSignal,
    InputNoveltySignal,
    NoveltySignal,
    StreamSignal,
)
from lightning_metagrad.boundaries.sources import TaskBoundarySource

#: The main signals :class:`AutoBoundaries` can test; ``"novelty+direction"``: either the
#: novelty's detector or the (recent-steps) direction's fires.
Signal = Literal[
    "novelty", "inputs", "loss", "error", "direction", "novelty+direction",
    "novelty+direction+inputs",
]  # fmt: skip
_AUTO_SIGNALS: tuple[Signal, ...] = (
    "novelty", "inputs", "loss", "error", "direction", "novelty+direction",
    "novelty+direction+inputs",
)  # fmt: skip
#: The signals a detector may name (the single ones).
_SINGLE: tuple[str, ...] = ("novelty", "inputs", "loss", "error", "direction")
#: Combined signals: a switch when any of these signals' detectors fires.
_EITHER: dict[str, tuple[str, ...]] = {
    "novelty+direction": ("novelty", "direction"),
    "novelty+direction+inputs": ("novelty", "direction", "inputs"),
}
#: The half-life, in steps, of the recent mean direction the combined signal tests
#: (``DirectionSignal(recent=8, normalise=True)``; the per-step direction fires on a
#: batch-size change, the raw one rises as a task converges: docs/detection.md).
_RECENT = 8.0
#: Main signals read every step from the gradients (observed every step, pooled).
_PER_STEP: tuple[str, ...] = ("novelty", "inputs", "direction")
#: The auxiliary evidence (detector weights) each main signal gets by default.
_DEFAULT_EVIDENCE: dict[str, dict[str, float]] = {
    "novelty": {},
    "inputs": {},
    "loss": {"error": 1.0},
    "error": {},
    "direction": {},
}
_DEFAULT_SIGNAL: Signal = "novelty+direction"
#: How far back (observations) the per-step detectors may place a switch's start from their
#: signal's trace (``ChangePointDetector(trace_onset=...)``): concept switches are declared
#: up to ~30 steps late (docs/detection.md, "Where a switch began").
_TRACE_ONSET = 30
#: The per-step detectors' switches must not come with a falling training loss (by more than
#: 10 %): learning itself turns the gradient, a switch does not make the loss fall
#: (``ChangePointDetector(confirm=...)``; docs/detection.md, "Confirmed by the loss").
_CONFIRM = {"loss": 0.9}
#: A switch of the joint rule (the detectors' signals rising together, each below its own
#: threshold: a blend of two tasks) needs the training loss to rise by 10 %: learning leaving
#: its start-up raises the signals together too, but makes the loss fall (docs/detection.md,
#: "The joint rule").
_JOINT_CONFIRM = {"loss": 1.1}
#: The aftermath of a transient loss spike (a value 5 times the loss before, back at the next
#: step) is not a switch for 2 x max_onset (60) observations: with Adam a 2-batch spike of
#: garbage raises the loss and the gradients' signals for tens of steps
#: (``ChangePointDetector(spike=...)``, ``JointRule(spike=...)``).
_SPIKE = 5.0
#: Observations added to the detector's estimate of where a switch began (capped at its
#: max_onset) when the steps since are taken back and undone: a new task's step left in the
#: old task's statistic, which weighs its latest steps most (``late_weight`` 0.9), blocks the
#: new task and, with Adam, wrecked the network (Rotated 500 steps: ACC 0.47 against 0.72 with
#: given boundaries, a switch declared 17 steps late and estimated at 15), while an old
#: task's step taken back costs little (docs/detection.md, "Where the take-back begins").
_ONSET_MARGIN = 5
#: Batches in a row of one new size after which the training batch size counts as changed
#: (:meth:`AutoBoundaries.on_batch_size_change`): an epoch's smaller last batch is not a
#: change, and the detectors, which need 8 exceedances of a 15-observation median, have not
#: fired on the new size yet.
_SIZE_HOLDS = 4


Detector = ChangePointDetector | EitherDetector


def default_detector(
    signal: str = _DEFAULT_SIGNAL,
    evidence: Mapping[str, float] | None = None,
    *,
    recent: float | None = None,
) -> Detector:
    """The :class:`~lightning_metagrad.boundaries.changepoint.ChangePointDetector` an
    :class:`AutoBoundaries` builds for a main ``signal``: an adaptive warm-up (20
    observations after the start and after each switch, extended while the signal still
    moves, up to 100) and no cooldown. The novelty, observed every step and noisier, is
    tested on a window of 15 and must double (``min_relative_jump=1``) for 8 observations in a
    row against a baseline with a half-life of 100 observations, or grow 4-fold
    (``fast_jump=3``) for 4; the loss and the meta-network's error, observed every 4 steps,
    must grow 1.5-fold for 5 observations against one with a half-life of 200.

    The direction (in [0, 2]) must grow 1.5-fold for 8 observations, or 2-fold for 4. With
    ``recent`` (the :class:`~lightning_metagrad.boundaries.signals.DirectionSignal`'s
    ``recent``: the recent steps' mean direction, near 0.05-0.15 within a task) it must grow
    5-fold for 8, or 8-fold for 4. ``"novelty+direction"`` gives an
    :class:`~lightning_metagrad.boundaries.either.EitherDetector` of the novelty's detector
    (with ``evidence``) and the direction's (``recent``, default 8), which restart together.
    The novelty's, the inputs' and the direction's detectors read a switch's start from their
    signal's trace too (``trace_onset=30``), need the training loss to confirm it
    (``confirm={"loss": 0.9}``) and sit out a loss spike's aftermath (``spike=5``). The either
    detector also has a :class:`~lightning_metagrad.boundaries.joint.JointRule` (blends: the
    signals rising together, each part of the way, with the loss up 10 %).

    Example:
        >>> det = default_detector("novelty", {"loss": 0.5})
        >>> det.signal, det.weights, det.warmup, det.max_warmup, det.cooldown
        ('novelty', {'loss': 0.5}, 20, 100, 0)
        >>> det.min_relative_jump, default_detector("loss").min_relative_jump
        (1.0, 0.5)
        >>> either = default_detector("novelty+direction")
        >>> either.mains, either.detectors[1].min_relative_jump
        (['novelty', 'direction'], 4.0)
    """
    if signal in _EITHER and recent is None:
        recent = _RECENT
    return _detector(signal, evidence, recent)


def _detector(signal: str, evidence: Mapping[str, float] | None, recent: float | None) -> Detector:
    """:func:`default_detector` for a direction whose ``recent`` is exactly ``recent``."""
    if signal in _EITHER:  # the evidence goes to the first (main) signal's detector
        first, *others = _EITHER[signal]
        singles = [_single_detector(first, evidence, recent)]
        singles += [_single_detector(name, None, recent) for name in others]
        return EitherDetector(singles, joint=JointRule(confirm=_JOINT_CONFIRM, spike=_SPIKE))
    return _single_detector(signal, evidence, recent)


def _single_detector(
    signal: str, evidence: Mapping[str, float] | None, recent: float | None
) -> ChangePointDetector:
    weights = _DEFAULT_EVIDENCE.get(signal, {}) if evidence is None else dict(evidence)
    # The per-step signals' detectors: a window of 15, the traced onset, the loss's
    # confirmation and the quiet after a loss spike.
    per_step: dict[str, Any] = {"window": 15, "patience": 8, "halflife": 100.0}
    per_step.update(trace_onset=_TRACE_ONSET, confirm=_CONFIRM, spike=_SPIKE)
    if signal in ("novelty", "inputs"):  # one noisy value a step: a larger jump
        shape: dict[str, Any] = {**per_step, "min_relative_jump": 1.0, "fast_jump": 3.0}
    elif signal == "direction":  # in [0, 2] with a within-task level near 0.5: 1.5-fold
        shape = {**per_step, "min_relative_jump": 0.5, "fast_jump": 1.0}
        if recent is not None:  # the recent steps' mean: near 0.05-0.15 within a task
            shape.update(min_relative_jump=4.0, fast_jump=7.0)
    else:
        shape = {"window": 9, "patience": 5, "min_relative_jump": 0.5, "halflife": 200.0}
    return ChangePointDetector(
        signal=signal, weights=weights, warmup=20, max_warmup=100, cooldown=0, **shape
    )


class AutoBoundaries(TaskBoundarySource):
    """Task switches detected from a jump in a signal of the training stream (section 5.1).

    Plain Python, fed by the callback (:meth:`on_gradients`, :meth:`on_pairs`,
    :meth:`on_loss`); no Trainer needed.

    ``signal`` chooses the main signal a
    :class:`~lightning_metagrad.boundaries.changepoint.ChangePointDetector` tests:

    * ``"novelty"``: the share of each step's gradient energy outside the current task's
      gradient subspace, per weight matrix and energy-weighted over them
      (:class:`~lightning_metagrad.boundaries.novelty.SubspaceNovelty`; fed by
      :meth:`on_gradients`). Scale free: a learning-rate change, a warm-up or a new batch size
      leave it alone, and it needs no labels or loss scale.
    * ``"loss"``: the mean training loss since the previous observation, by default with the
      meta-network's error as auxiliary evidence;
    * ``"error"``: a small coordinate-wise meta-network's reconstruction error (default
      1-32-32-1, the paper's h at a detector's size), trained on the step's
      ``(theta_j, target_j)`` pairs; its MSE on freshly drawn coordinates, *before* the
      update and in target units fixed at the start of each task: the paper's signal exactly.
    * ``"direction"``: one minus the cosine of each step's gradient with the task's running
      mean gradient direction, per tensor and energy-weighted
      (:class:`~lightning_metagrad.boundaries.signals.DirectionSignal`; fed by
      :meth:`on_gradients`). It sees a concept shift (the same inputs, new labels or a new
      teacher), which turns the gradient inside a subspace the novelty finds already full.
      Scale free like the novelty.
    * ``"novelty+direction"``: either of the two: a switch is declared when the novelty's
      detector or the direction's fires, and both then restart, so a switch both see counts
      once (:class:`~lightning_metagrad.boundaries.either.EitherDetector`). The direction here
      is the recent steps' mean direction in units of its value under noise alone
      (``DirectionSignal(recent=8, normalise=True)``, tested for a 5-fold jump): the per-step
      direction also fires on a batch-size change or a warm-up, and the raw one rises as a
      task converges. The
      novelty finds input shifts, the direction concept shifts; ``docs/detection.md``
      ("Either detector") has the measurements.

    ``evidence`` gives auxiliary signals and their weights (Stouffer's weighted z, see
    :class:`~lightning_metagrad.boundaries.changepoint.ChangePointDetector`), e.g.
    ``AutoBoundaries(signal="novelty", evidence={"loss": 0.5})``; they add evidence but cannot
    fire alone (with ``"novelty+direction"`` they go to the novelty's detector). A
    ``detector`` passed in decides itself (a
    :class:`~lightning_metagrad.boundaries.changepoint.ChangePointDetector`, or an
    :class:`~lightning_metagrad.boundaries.either.EitherDetector` of several): its ``signal``
    and ``weights`` may name ``"novelty"``, ``"loss"``, ``"error"`` and ``"direction"``.

    ``signal="novelty+direction"`` is the default (what ``task_boundaries="auto"`` builds):
    the only measured signal that found every abrupt switch of tasks of 200 steps on the
    input-shift and the concept-shift streams, with no false switch from a learning-rate drop,
    a warm-up, a loss spike or a batch-size change. How the signals compare on silent task
    streams, and where each fails, is measured in ``docs/detection.md``.

    Observations are taken every ``every`` optimizer steps (None: every step for the
    novelty and the direction, whose values are then pooled over the steps between; every 4
    steps for the loss, as their mean, and for the error). There is no fixed settling period
    or cooldown: :func:`default_detector`'s warm-up (20 observations after the start and after each
    switch) is extended while the main signal still moves, up to 100 observations, so a
    network leaving its random initialisation or a blend still going on is learned as the
    level, and tasks of 200 steps are still tested. Only the paper's error gets ``settle``
    observations at the start of the run that train the meta-network alone (None: 100 for
    ``signal="error"``, whose error first rises for hundreds of steps as the gradients grow,
    else 0). At a detected switch (or any new task) the detector restarts, the meta-network
    is re-initialised and the novelty's subspaces are rebuilt from the new task's gradients.
    ``novelty`` passes a configured
    :class:`~lightning_metagrad.boundaries.novelty.SubspaceNovelty` and ``direction`` a
    configured :class:`~lightning_metagrad.boundaries.signals.DirectionSignal` (default:
    ``DirectionSignal()`` for ``signal="direction"``, ``DirectionSignal(recent=8,
    normalise=True)`` for
    ``"novelty+direction"``; the default detector follows its ``recent``). Only the signals
    the detector names are built (:mod:`~lightning_metagrad.boundaries.signals`, one object
    each).

    ``undo_late_updates`` (default True): a detected switch is declared some steps after it
    began (:meth:`onset_steps`: the detector's estimate and, on the safe side, 5 steps
    more). Those steps' updates changed the
    weights before the finished task was protected; once it is folded in, the engine
    rewrites their sum by the rule (the default projects it out of the old tasks'
    subspaces), as given boundaries would have done step by step. For that the engine keeps
    a copy of the trainable parameters per step of :attr:`max_onset_steps` (30 with the
    default detector, which also reads a switch's start from its signal's trace) and warns
    above 1 GiB; False saves that memory.

    The default detectors' switches are **confirmed by the training loss**
    (``ChangePointDetector(confirm={"loss": 0.9})``): a switch is held back while the loss
    since its onset is more than 10 % below the loss before it, since learning itself turns
    the gradient (fast with Adam) while a new task does not make the loss fall. The callback
    feeds the loss; a plain loop calls :meth:`~lightning_metagrad.MetaGrad.observe_loss`
    after each step (without it nothing is held back). The loss also drives the either
    detector's joint rule, which finds blends of two tasks (a switch when the novelty and the
    direction rise together, each part of the way, and the loss rises 10 %), and the quiet
    after a transient loss spike (60 steps whose exceedances do not count).

    The source also watches the training batches' size: a new size restarts the detector
    without a switch, once :attr:`max_onset_steps` steps at the new size have passed with none
    declared (:meth:`on_batch_size_change`; the steps are in :attr:`batch_size_changes`).

    Example:
        >>> import torch
        >>> src = AutoBoundaries()  # signal="novelty+direction"
        >>> src.uses_gradients, src.uses_pairs, src.uses_loss  # the loss confirms a switch
        (True, False, True)
        >>> w = torch.zeros(4, 3)
        >>> src.on_gradients(["w"], [w], [torch.ones(4, 3)])
        False
        >>> AutoBoundaries(signal="error").uses_pairs
        True
        >>> sorted(AutoBoundaries(signal="novelty+direction").signals)
        ['direction', 'loss', 'novelty']
    """

    name = "auto"
    #: Version 2 keeps each signal's state under its name; version 1 (flat) still loads.
    _state_version = 2

    def __init__(
        self,
        every: int | None = None,
        hidden_sizes: Sequence[int] = (32, 32),
        coords_per_step: int = 1024,
        detector: Detector | None = None,
        settle: int | None = None,
        seed: int = 0,
        signal: Signal = _DEFAULT_SIGNAL,
        evidence: Mapping[str, float] | None = None,
        novelty: SubspaceNovelty | None = None,
        direction: DirectionSignal | None = None,
        inputs: SubspaceNovelty | None = None,
        undo_late_updates: bool = True,
    ) -> None:
        self._undo = check_bool("undo_late_updates", undo_late_updates)
        every = check_int("every", every, minimum=1, optional=True)
        settle = check_int("settle", settle, minimum=0, optional=True)
        signal = check_choice("signal", signal, _AUTO_SIGNALS)
        hidden_sizes = check_int_sequence("hidden_sizes", hidden_sizes)
        coords_per_step = check_int("coords_per_step", coords_per_step, minimum=1)
        seed = check_int("seed", seed)
        if evidence is not None and not isinstance(evidence, Mapping):
            raise ValueError(f"`evidence` must map signal names to weights, got {evidence!r}")
        for arg, value in (("novelty", novelty), ("inputs", inputs)):
            if value is not None and not isinstance(value, SubspaceNovelty):
                raise ValueError(f"`{arg}` must be a SubspaceNovelty, got {type(value).__name__}")
        if direction is not None and not isinstance(direction, DirectionSignal):
            raise ValueError(
                f"`direction` must be a DirectionSignal, got {type(direction).__name__}"
            )
        if direction is None and signal in _EITHER and "direction" in _EITHER[signal]:
            direction = DirectionSignal(recent=_RECENT, normalise=True)
        if detector is None:
            recent = None if direction is None else direction.recent
            detector = _detector(signal, evidence, recent)
        elif evidence is not None:
            raise ValueError("pass `evidence` or a `detector` (whose `weights` are the evidence)")
        if not isinstance(detector, (ChangePointDetector, EitherDetector)):
            raise ValueError(
                f"`detector` must be a ChangePointDetector or an EitherDetector, "
                f"got {type(detector).__name__}"
            )
        mains, named = _mains(detector), _named(detector)
        if not set(named) <= set(_SINGLE):
            raise ValueError(
                f"`detector` may only use the signals {_SINGLE} (as `signal` or in "
                f"`weights`), got {sorted(named)}"
            )
        if settle is None:  # the meta-network must first learn the gradients (see above)
            settle = 100 if "error" in mains else 0
        self.settle = settle
        if every is None:  # gradient signals every step; the loss and the error every 4
            every = 1 if any(m in _PER_STEP for m in mains) else 4
        self.every = every
        self.detector: Detector = detector
        self._mains = mains
        # Only the signals the detector names are built, fed and checkpointed.
        self.signals: dict[str, StreamSignal] = {}
        for name in named:
            if name == "novelty":
                self.signals[name] = NoveltySignal(novelty, seed=seed)
            elif name == "inputs":
                self.signals[name] = InputNoveltySignal(inputs, seed=seed)
            elif name == "error":
                self.signals[name] = ErrorSignal(hidden_sizes, coords_per_step, seed=seed)
            elif name == "direction" and direction is not None:
                self.signals[name] = direction
            else:
                self.signals[name] = SIGNALS[name]()
        self.steps = 0
        self._onset = 0  # observations before the latest detection the switch began
        #: The training batches' size (None before the first batch), and the optimizer steps
        #: at which it changed (:meth:`on_batch_size_change`).
        self.batch_size: int | None = None
        self.batch_size_changes: list[int] = []
        self._new_size: int | None = None  # a size differing from batch_size, how many
        self._new_held = 0  # batches in a row have had it, and the step of the first
        self._new_since = 0
        self._restart_at: int | None = None  # the step before which the detector restarts

    # ------------------------------------------------------------------ what is fed

    def _reading(self, reads: str) -> list[StreamSignal]:
        return [s for s in self.signals.values() if s.reads == reads]

    @property
    def novelty(self) -> SubspaceNovelty | None:
        """The novelty tracker, where the detector uses the novelty."""
        signal = self.signals.get("novelty")
        return signal.novelty if isinstance(signal, NoveltySignal) else None

    @property
    def last_error(self) -> float | None:
        """The meta-network's latest error, where the detector uses the error."""
        signal = self.signals.get("error")
        return signal.last_error if isinstance(signal, ErrorSignal) else None

    @property
    def uses_pairs(self) -> bool:
        return bool(self._reading("pairs"))

    @property
    def uses_gradients(self) -> bool:
        # Without pairs, on_gradients is also what ticks the observations of a loss-only
        # detector.
        return bool(self._reading("gradients")) or not self.uses_pairs

    @property
    def uses_loss(self) -> bool:
        return bool(self._reading("loss"))

    @property
    def uses_input_layers(self) -> bool:
        return "inputs" in self.signals

    def on_input_layers(self, names: Sequence[str]) -> None:
        signal = self.signals.get("inputs")
        if isinstance(signal, InputNoveltySignal):
            signal.layers = frozenset(names)

    def on_train_batch(self, batch: Any, batch_idx: int) -> bool:
        """Watches the batch size (dim 0 of the batch's first tensor); never a switch."""
        size = batch_size_of(batch)
        if self.batch_size is None or size == self.batch_size:
            self.batch_size, self._new_size, self._new_held = size, None, 0
            return False
        if size != self._new_size:
            self._new_size, self._new_held, self._new_since = size, 0, self.steps
        self._new_held += 1
        if self._new_held >= _SIZE_HOLDS:
            old, self.batch_size, self._new_size, self._new_held = self.batch_size, size, None, 0
            self.batch_size_changes.append(self._new_since)
            self.on_batch_size_change(old, size)
        return False

    def on_batch_size_change(self, old: int, new: int) -> None:
        """Called when the training batches' size changed from ``old`` to ``new`` (4 batches
        in a row of the new size; an epoch's smaller last batch is not a change).

        The default restarts the detector, without declaring a switch, once the new size
        has been trained on for :attr:`max_onset_steps` steps (30 with the default detector)
        with no switch declared and no run of exceedances under way (at the latest twice
        that): the detector's levels describe the gradients' noise at the old size, and with
        Adam a smaller batch raises the novelty and the direction for tens of steps, with the
        loss (``docs/detection.md``, "A batch-size change"). A task switch that comes with the
        new size is declared before, as any switch. Override to react otherwise, e.g.
        ``pass`` to keep the detector's levels.

        Example:
            >>> import torch
            >>> src = AutoBoundaries()
            >>> for size in [64] * 10 + [16] * 4:
            ...     _ = src.on_train_batch(torch.zeros(size, 3), 0)
            >>> src.batch_size, src.batch_size_changes
            (16, [0])
        """
        self._restart_at = self.batch_size_changes[-1] + self.max_onset_steps

    def on_pairs(self, theta: Tensor, target: Tensor) -> bool:
        if not self.uses_pairs:
            return False
        for signal in self._reading("pairs"):
            signal.on_pairs(theta, target, observing=self.steps % self.every == 0)
        if self.uses_gradients:
            return False  # the observation is taken in on_gradients, later in the same step
        return self._observe()

    def on_gradients(
        self, names: Sequence[str], thetas: Sequence[Tensor], targets: Sequence[Tensor]
    ) -> bool:
        if not self.uses_gradients:
            return False
        for signal in self._reading("gradients"):
            signal.on_gradients(names, targets)
        return self._observe()

    def on_loss(self, loss: Tensor) -> None:
        for signal in self._reading("loss"):
            signal.on_loss(loss)

    def _observe(self) -> bool:
        """One step; every ``every``-th, the detector is fed the signals."""
        step, self.steps = self.steps, self.steps + 1
        if self._restart_due(step):
            self._restart_at = None
            self.detector.restart()
        if step % self.every != 0:
            return False
        values = {name: signal.take() for name, signal in self.signals.items()}
        signals = {name: value for name, value in values.items() if value is not None}
        if step < self.settle * self.every:
            return False  # settling: the signals learn, the detector does not
        if not any(main in signals for main in self._mains):
            return False  # e.g. no loss since the last observation: nothing to test
        switched = self.detector.update(**signals)
        self._onset = self.detector.last_onset if switched else 0
        return switched

    def _restart_due(self, step: int) -> bool:
        """Whether the restart after a new batch size comes before ``step``: no switch came
        with the new size, and no run under way (a switch the new size slowed) may still end
        in one; a run waits at most :attr:`max_onset_steps` more."""
        if self._restart_at is None or step < self._restart_at:
            return False
        return not self.detector.running or step >= self._restart_at + self.max_onset_steps

    @property
    def max_onset_steps(self) -> int:
        return self.detector.max_onset * self.every

    def onset_steps(self) -> int:
        """The detector's estimate of where the latest switch began, plus a margin of 5
        observations (up to :attr:`max_onset_steps`): a new task's step left in the old
        task's statistic costs far more than an old task's step taken back."""
        if not self._onset:
            return 0
        return min(self._onset + _ONSET_MARGIN, self.detector.max_onset) * self.every

    @property
    def undo_late_updates(self) -> bool:
        return self._undo

    def on_task_start(self) -> None:
        self._restart_at = None
        self.detector.restart()
        for signal in self.signals.values():
            signal.start_task()

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        return {
            "version": self._state_version,
            "detector": self.detector.state_dict(),
            "steps": self.steps,
            "signals": {name: signal.state_dict() for name, signal in self.signals.items()},
            "batch_size": {
                "size": self.batch_size,
                "changes": list(self.batch_size_changes),
                "new_size": self._new_size,
                "new_held": self._new_held,
                "new_since": self._new_since,
                "restart_at": self._restart_at,
            },
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("version", 1) == 1:
            state = _from_version_1(state)
        check_state_version(type(self).__name__, state, self._state_version)
        # A single detector's state (e.g. from when "auto" tested the novelty alone) loads
        # into the either detector's detector on the same signals; not the other way round.
        if "detectors" in state["detector"] and not isinstance(self.detector, EitherDetector):
            raise ValueError(
                "state has several detectors (an EitherDetector), this source one: build the "
                "AutoBoundaries with the same `signal` (or `detector`)"
            )
        self.detector.load_state_dict(state["detector"])
        self.steps = int(state["steps"])
        sizes = state.get("batch_size", {})  # absent before the batch size was watched
        self.batch_size = sizes.get("size")
        self.batch_size_changes = [int(s) for s in sizes.get("changes", [])]
        self._new_size, self._new_held = sizes.get("new_size"), int(sizes.get("new_held", 0))
        self._new_since, self._restart_at = int(sizes.get("new_since", 0)), sizes.get("restart_at")
        for name, signal in self.signals.items():
            if name in state["signals"]:
                signal.load_state_dict(state["signals"][name])


def _mains(detector: Detector) -> list[str]:
    """The main signals of a detector (each can declare a switch)."""
    return detector.mains if isinstance(detector, EitherDetector) else [detector.signal]


def _named(detector: Detector) -> list[str]:
    """Every signal a detector names, main or auxiliary, each once."""
    if isinstance(detector, EitherDetector):
        return detector.signals
    return detector.accepted


def _from_version_1(state: dict) -> dict:
    """Version 1 held every signal's state flat, whatever the detector used."""
    return {
        "version": 2,
        "detector": state["detector"],
        "steps": state["steps"],
        "signals": {
            "error": {
                "meta": state["meta"],
                "generator": state["generator"],
                "needs_reset": state["needs_reset"],
                "last_error": state.get("last_error"),
            },
            "loss": {"sum": state.get("loss_sum"), "finite": state.get("loss_finite")},
            **({"novelty": state["novelty"]} if "novelty" in state else {}),
        },
    }
