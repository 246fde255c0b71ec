"""Several change-point tests at once: :class:`EitherDetector` declares a task switch when any
of its :class:`~lightning_metagrad.boundaries.changepoint.ChangePointDetector` s does, e.g. the
gradients' novelty (an input shift) or their direction (a concept shift, issue 25). Plain
Python."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, SupportsFloat

from lightning_metagrad._validation import check_state_version
from lightning_metagrad.boundaries.changepoint import ChangePointDetector
from lightning_metagrad.boundaries.joint import JointRule

__all__ = ["EitherDetector"]

_STATE_VERSION = 1


class EitherDetector:
    """Declares a switch when **any** of ``detectors`` declares one.

    Each detector tests its own main signal (with its own auxiliary ``weights``) and is fed
    only the signals it names. When one fires, **all** restart: the switch is counted once,
    and each detector's warm-up (its ``warmup`` observations, at least) is the shared least
    task length, so a second detector that sees the same switch a few observations later
    does not declare it again. The main signals must differ.

    With a ``joint`` :class:`~lightning_metagrad.boundaries.joint.JointRule`, a switch is also
    declared when the detectors' signals rise together, each below its own threshold (a blend
    of two tasks); its switches are logged as ``"joint"``.

    Duck-types the parts of a
    :class:`~lightning_metagrad.boundaries.changepoint.ChangePointDetector` that
    :class:`~lightning_metagrad.boundaries.auto.AutoBoundaries` uses: :meth:`update`,
    :meth:`restart`, ``last_onset``, ``max_onset``, ``signals`` (every signal named),
    ``num_observations``, ``num_switches``, ``switch_steps`` and the state.

    Attributes for logging: ``switch_signals``, the main signal of the detector behind each
    switch (in the order of ``switch_steps``).

    Example:
        >>> import math
        >>> a = ChangePointDetector(signal="a", warmup=20, patience=3, cooldown=0)
        >>> b = ChangePointDetector(signal="b", warmup=20, patience=3, cooldown=0)
        >>> det = EitherDetector([a, b])
        >>> wave = [1 + 0.1 * math.sin(i) for i in range(300)]
        >>> xs = [w * (4 if 100 <= i < 200 else 1) for i, w in enumerate(wave)]  # a moves
        >>> ys = [w * (4 if i >= 200 else 1) for i, w in enumerate(wave)]  # then b
        >>> [i for i in range(300) if det.update(a=xs[i], b=ys[i])]
        [106, 206]
        >>> det.switch_signals
        ['a', 'b']
    """

    def __init__(
        self, detectors: Sequence[ChangePointDetector], joint: JointRule | None = None
    ) -> None:
        detectors = list(detectors)
        if not detectors or not all(isinstance(d, ChangePointDetector) for d in detectors):
            raise ValueError(
                f"`detectors` must be a non-empty sequence of ChangePointDetector, "
                f"got {detectors!r}"
            )
        mains = [d.signal for d in detectors]
        if len(set(mains)) != len(mains):
            raise ValueError(f"the detectors' main signals must differ, got {mains}")
        if joint is not None and not isinstance(joint, JointRule):
            raise ValueError(f"`joint` must be a JointRule or None, got {joint!r}")
        self.detectors = detectors
        self.joint = joint
        self.num_observations = 0
        self.num_switches = 0
        self.switch_steps: list[int] = []
        self.last_onset = 0
        self.switch_signals: list[str] = []

    @property
    def signal(self) -> str:
        """The first detector's main signal (the one an observation needs to be counted)."""
        return self.detectors[0].signal

    @property
    def mains(self) -> list[str]:
        """Every detector's main signal, in order."""
        return [d.signal for d in self.detectors]

    @property
    def signals(self) -> list[str]:
        """Every signal a detector names (main or auxiliary), each once, in order."""
        names: dict[str, None] = {}
        for det in self.detectors:
            names.update(dict.fromkeys(det.accepted))
        if self.joint is not None:
            names.update(dict.fromkeys(self.joint.confirm))
        return list(names)

    @property
    def running(self) -> bool:
        """Whether any detector's run of exceedances, or the joint rule's, is under way."""
        joint = self.joint is not None and self.joint.running
        return joint or any(d.running for d in self.detectors)

    @property
    def max_onset(self) -> int:
        """The most observations before its detection a switch can be estimated to begin."""
        onsets = [d.max_onset for d in self.detectors]
        return max(onsets + ([self.joint.max_onset] if self.joint is not None else []))

    def update(self, **signals: SupportsFloat) -> bool:
        """One observation; True when any detector whose main signal is given declares a
        switch (all then restart). Signals no detector names are refused."""
        unknown = sorted(set(signals) - set(self.signals))
        if unknown:
            raise ValueError(f"update() got signals {unknown}; known: {self.signals}")
        counted = False
        fired: ChangePointDetector | None = None
        for det in self.detectors:
            if det.signal not in signals:
                continue
            mine = {k: v for k, v in signals.items() if k in det.accepted}
            before = det.num_observations
            if det.update(**mine) and fired is None:
                fired = det
            counted = counted or det.num_observations > before
        index = self.num_observations
        if counted:
            self.num_observations += 1
        if fired is not None:
            onset, by = fired.last_onset, fired.signal
        elif counted and self.joint is not None and self.joint.update(self.detectors, signals):
            onset, by = self.joint.onset, "joint"
        else:
            return False
        self.num_switches += 1
        self.switch_steps.append(index)
        self.last_onset = onset
        self.switch_signals.append(by)
        self.restart()
        return True

    def restart(self) -> None:
        """A new segment for every detector (a task started from elsewhere)."""
        for det in self.detectors:
            det.restart()
        if self.joint is not None:
            self.joint.restart()

    def reset(self) -> None:
        """Forget everything, switch history included."""
        for det in self.detectors:
            det.reset()
        if self.joint is not None:
            self.joint.reset()
        self.num_observations = self.num_switches = self.last_onset = 0
        self.switch_steps = []
        self.switch_signals = []

    def state_dict(self) -> dict[str, Any]:
        """Each detector's state by main signal, and the shared switch history."""
        return {
            "version": _STATE_VERSION,
            "detectors": {d.signal: d.state_dict() for d in self.detectors},
            "num_observations": self.num_observations,
            "num_switches": self.num_switches,
            "switch_steps": list(self.switch_steps),
            "last_onset": self.last_onset,
            "switch_signals": list(self.switch_signals),
            **({"joint": self.joint.state_dict()} if self.joint is not None else {}),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`. A single
        :class:`~lightning_metagrad.boundaries.changepoint.ChangePointDetector`'s state (e.g.
        a checkpoint from when ``"auto"`` tested the novelty alone) loads into the detector
        with the same signals; the others start afresh.

        Example:
            >>> old = ChangePointDetector(signal="a", warmup=5)
            >>> _ = [old.update(a=1.0) for _ in range(7)]
            >>> det = EitherDetector([ChangePointDetector(signal="a", warmup=5),
            ...                       ChangePointDetector(signal="b", warmup=5)])
            >>> det.load_state_dict(old.state_dict())
            >>> det.num_observations, det.detectors[0].num_observations
            (7, 7)
        """
        if "detectors" not in state and "signals" in state:
            self._load_single(state)
            return
        check_state_version("EitherDetector", state, _STATE_VERSION)
        if set(state["detectors"]) != set(self.mains):
            raise ValueError(
                f"state has detectors for {sorted(state['detectors'])}, this one for "
                f"{sorted(self.mains)}: build it with the same detectors"
            )
        for det in self.detectors:
            det.load_state_dict(state["detectors"][det.signal])
        self.num_observations = int(state["num_observations"])
        self.num_switches = int(state["num_switches"])
        self.switch_steps = [int(s) for s in state["switch_steps"]]
        self.last_onset = int(state["last_onset"])
        self.switch_signals = [str(s) for s in state["switch_signals"]]
        if self.joint is not None:  # a state from before the joint rule: it starts afresh
            self.joint.reset()
            if "joint" in state:
                self.joint.load_state_dict(state["joint"])

    def _load_single(self, state: Mapping[str, Any]) -> None:
        names = set(state["signals"])
        match = [d for d in self.detectors if {d.signal, *d.weights} == names]
        if not match:
            raise ValueError(
                f"state is a single detector's on {sorted(names)}; none of this one's "
                f"detectors tests exactly those signals ({self.signals})"
            )
        self.reset()
        match[0].load_state_dict(state)
        self.num_observations = match[0].num_observations
        self.num_switches = match[0].num_switches
        self.switch_steps = list(match[0].switch_steps)
        self.last_onset = match[0].last_onset
        self.switch_signals = [match[0].signal] * len(self.switch_steps)
