"""The joint rule of an :class:`~lightning_metagrad.boundaries.either.EitherDetector`: a switch
when its detectors' signals rise **together**, each below its own threshold. A blend from one
task into the next (a blurry switch, e.g. rotations of one dataset) raises the novelty and the
direction only part of the way each, and their references follow the blend before either
detector's run completes; the sum of their jumps, in units of each detector's threshold, still
crosses one. Learning leaving its start-up raises them together too, so a joint switch also
needs the training loss to rise (docs/detection.md, "The joint rule"). Plain Python."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from lightning_metagrad._validation import check_float, check_int, check_state_version
from lightning_metagrad.boundaries.changepoint import (
    ChangePointDetector,
    ConfirmingSignals,
    _log_value,
    _signal_values,
)

__all__ = ["JointRule"]

_STATE_VERSION = 1


class JointRule:
    """A switch when the detectors' jumps, each in units of its own threshold, add up to
    ``need``, with their combined z-score above ``threshold``, for ``patience`` observations in
    a row, and each ``confirm`` signal has risen by its ratio.

    The unit of a detector is its jump in log, ``log(1 + last_relative_jump)``, over the log of
    the jump it needs alone, ``log(1 + min_relative_jump)``: a detector half-way to its own
    threshold counts 1/2. The combined z-score is Stouffer's over the detectors'
    ``last_statistic``. While any detector is warming up (its statistic is 0) the run starts
    over. The confirmation is
    :class:`~lightning_metagrad.boundaries.changepoint.ChangePointDetector`'s ``confirm``: each
    named signal's median since the onset (the run plus ``window // 2``) against its median
    over ``window`` observations before; a held-back switch is tested again at the next
    observation, and a signal never fed does not hold it back. The switch is placed
    (:attr:`onset`) where the run began, plus half the window.

    Args:
        need: the sum of units that makes an exceedance (default 1: as far, together, as one
            detector alone must go).
        patience: exceedances in a row to declare a switch (default 8).
        threshold: the least combined z-score of an exceedance (default 4).
        window: the confirmation's window, in observations (default 15).
        each_threshold: the least z-score of every detector in an exceedance (None, the
            default: no such test): each signal's rise must be significant on its own.
        confirm: ``{name: ratio}`` of signals that must have risen (default ``{"loss": 1.1}``:
            a 10 % higher training loss; learning leaving its start-up makes it fall).
        max_onset: the most observations back a switch is placed (default 30).
        spike: a confirming signal's value at least ``spike`` times its median over the
            ``window`` before, back under ``sqrt(spike)`` times it at the next observation,
            is a transient perturbation (a few batches of garbage): for ``2 * max_onset``
            observations after it, the joint rule declares nothing (default 5; None: off;
            it needs a ``confirm`` signal).
            An optimizer with momentum (Adam) carries such a spike on for some steps and
            leaves the loss and both signals raised, as a blend would.

    Example:
        >>> rule = JointRule(confirm={}, spike=None)
        >>> rule.need, rule.patience, rule.threshold
        (1.0, 8, 4.0)
    """

    def __init__(
        self,
        need: float = 1.0,
        patience: int = 8,
        threshold: float = 4.0,
        window: int = 15,
        each_threshold: float | None = None,
        confirm: Mapping[str, float] | None = None,
        max_onset: int = 30,
        spike: float | None = 5.0,
    ) -> None:
        self.need = check_float("need", need, minimum=0, low_open=True)
        self.patience = check_int("patience", patience, minimum=1)
        self.threshold = check_float("threshold", threshold, minimum=0)
        self.window = check_int("window", window, minimum=1)
        if each_threshold is not None:
            check_float("each_threshold", each_threshold, minimum=0)
        self.each_threshold = each_threshold
        confirm = {"loss": 1.1} if confirm is None else confirm
        self.confirm = _signal_values("confirm", "ratio", confirm, "", positive=True)
        self.max_onset = check_int("max_onset", max_onset, minimum=1)
        self.spike = spike
        self._confirming = ConfirmingSignals(self.confirm, self.window, self.max_onset, spike)
        self.reset()

    def reset(self) -> None:
        """Forget the run and the confirming signals' history."""
        self._run = 0
        self._confirming.clear()

    def restart(self) -> None:
        """A new segment: the run starts over. The confirming signals' history is kept (the
        detectors' warm-up outlasts the confirmation's window anyway)."""
        self._run = 0

    @property
    def running(self) -> bool:
        """Whether a joint run is under way."""
        return self._run > 0

    @property
    def onset(self) -> int:
        """Where a switch declared now began, in observations back: the run plus half the
        window, at most ``max_onset``."""
        return min(self._run + self.window // 2, self.max_onset)

    def units(self, detectors: Sequence[ChangePointDetector]) -> float:
        """The detectors' latest jumps, each in units of its own threshold, summed."""
        return sum(
            max(math.log1p(max(d.last_relative_jump, 0.0)), 0.0) / math.log1p(d.min_relative_jump)
            for d in detectors
            if d.min_relative_jump > 0
        )

    def update(self, detectors: Sequence[ChangePointDetector], signals: Mapping[str, Any]) -> bool:
        """One observation, after every detector was fed it and none fired; True when the
        joint rule declares a switch (the caller restarts everything)."""
        logs = {name: _log_value(name, signals[name]) for name in self.confirm if name in signals}
        self._confirming.push({name: v for name, v in logs.items() if v is not None})
        self._confirming.tick()
        if self._confirming.quiet:
            self._run = 0  # the aftermath of a transient perturbation
            return False
        if any(d.last_statistic == 0.0 for d in detectors):
            self._run = 0  # a detector is warming up: nothing to combine
            return False
        z = sum(d.last_statistic for d in detectors) / math.sqrt(len(detectors))
        exceeds = self.units(detectors) >= self.need and z > self.threshold
        if self.each_threshold is not None:
            exceeds = exceeds and all(d.last_statistic > self.each_threshold for d in detectors)
        self._run = self._run + 1 if exceeds else 0
        if self._run < self.patience:
            return False
        # Held back while a confirming signal has not risen; the run goes on.
        return self._confirming.confirmed(self.onset)

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "run": self._run,
            "quiet": self._confirming.quiet,
            "history": self._confirming.histories(),
            "spike_bases": self._confirming.bases(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        check_state_version("JointRule", state, _STATE_VERSION)
        self._run = int(state["run"])
        self._confirming.load(
            state.get("history", {}), state.get("quiet", 0), state.get("spike_bases")
        )
