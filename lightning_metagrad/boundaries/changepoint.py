"""The change-point test behind task-free detection (section 5.1): :class:`ChangePointDetector`
declares a switch when a positive signal of the training stream (the gradients' novelty by
default, the loss, or the paper's meta-network error) jumps and stays up;
:func:`simulate_detection` runs it over a recorded sequence. Short spikes, downward steps and
slow drift do not fire. The statistics are derived in ``docs/detection.md``. Plain Python.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, SupportsFloat

from lightning_metagrad._validation import (
    check_float,
    check_int,
    check_state_version,
    check_str,
)

__all__ = ["ChangePointDetector", "simulate_detection"]

_CLIP = 3.0  # Huber clip of deviations and differences, in noise standard deviations
_MIN_CLIP_N = 10  # deviations are clipped once a scale has this many of them
_FAST_Z = 4.0  # a window median this many standard errors below the baseline is adopted fast
_SE_CAP = 3.0  # the measured spread raises the i.i.d. standard error at most this many times
_MIN_STD = 1e-3  # floor on the noise std in log units (a 0.1% relative change)
_Z_CLIP = 5.0  # per-signal z-scores are clipped to +-_Z_CLIP * threshold before combining
_TINY = 1e-12  # zero-valued signals are floored here before taking the log
_STATE_VERSION = 2


def _ema(value: float, target: float, count: int, alpha: float) -> float:
    """Equal weights while ``count < 1 / alpha`` (a plain mean), exponential forgetting after."""
    a = max(1.0 / count, alpha)
    return value + a * (target - value)


class _SignalStats:
    """One signal's baseline, noise scales and recent window, all in log units.

    * ``window``: the last ``size`` values; its median is what is tested.
    * ``mean``: running mean of the window median (a spike cannot move a median). Upward it
      moves at the slow rate only (slow drift is followed, a switch stands out); a median
      more than ``_FAST_Z`` standard errors *below* the baseline is adopted at rate
      ``1 / size`` until it is reached (a learning-rate drop).
    * ``lag``: running mean of ``median - mean``. While it is negative (a falling learning
      curve, which the slow ``mean`` trails) the baseline is ``mean + lag`` (double
      exponential smoothing, no lag on a linear trend); a rise is never extrapolated.
    * ``var``: noise variance from consecutive differences, ``mean((x_t - x_{t-1})^2) / 2``,
      which level shifts and trends leave alone; ``lvar``: twice the lower semivariance of
      ``x - baseline`` (downward deviations only, so a rise never inflates it), which also
      sees slowly wandering (autocorrelated) noise. The noise std is the larger of the two.
    * ``dvar``: twice the lower semivariance of ``median - baseline``, the measured spread
      of the tested quantity; it raises the i.i.d. standard error of a median (autocorrelated
      noise) at most ``_SE_CAP``-fold, so no transient can blind the test.

    Fast adoptions are kept out of ``lag``, ``lvar`` and ``dvar``: they describe a stable
    level. Deviations are Huber-clipped at ``_CLIP`` standard deviations (errors).
    """

    __slots__ = (
        "dvar",
        "falling",
        "lag",
        "lvar",
        "mean",
        "n",
        "nd",
        "nl",
        "nv",
        "size",
        "var",
        "window",
    )

    def __init__(self, size: int) -> None:
        self.size = size
        self.window: list[float] = []
        self.n = 0  # window medians in ``mean``
        self.mean = 0.0
        self.lag = 0.0  # running mean of ``median - mean``
        self.nv = 0  # differences in ``var``
        self.var = 0.0
        self.nl = 0  # deviations in ``lvar``
        self.lvar = 0.0
        self.nd = 0  # median deviations in ``dvar``
        self.dvar = 0.0
        self.falling = False  # adopting a clear decrease

    def push(self, x: float) -> None:
        self.window.append(x)
        if len(self.window) > self.size:
            del self.window[0]

    def median(self) -> float:
        ordered = sorted(self.window)
        k, mid = len(ordered), len(ordered) // 2
        return ordered[mid] if k % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])

    @property
    def baseline(self) -> float:
        return self.mean + min(self.lag, 0.0)

    def jump(self) -> float:
        """Median of the window minus the baseline."""
        return self.median() - self.baseline

    @property
    def std(self) -> float:
        return max(math.sqrt(self.var), math.sqrt(self.lvar), _MIN_STD)

    def se(self) -> float:
        """Standard error of :meth:`jump` under "no change"."""
        k = len(self.window)
        # The median of k i.i.d. Gaussian draws has std ~ sqrt(pi / 2k) times theirs.
        iid = self.std * (1.0 / math.sqrt(k) if k <= 2 else math.sqrt(math.pi / (2 * k)))
        return min(max(iid, math.sqrt(self.dvar)), _SE_CAP * iid)

    def learn(self, alpha: float) -> None:
        """Learn from the newest observation (already pushed to the window)."""
        x, std, se = self.window[-1], self.std, self.se()
        if len(self.window) >= 2:
            d = x - self.window[-2]
            if self.nv >= _MIN_CLIP_N:
                d = min(max(d, -_CLIP * math.sqrt(2.0) * std), _CLIP * math.sqrt(2.0) * std)
            self.nv += 1
            self.var = _ema(self.var, 0.5 * d * d, self.nv, alpha)
        if self.n == 0:
            self.n = 1
            self.mean = x
            return
        jump = self.jump()
        # Fast adoption starts on a clear decrease and goes on until the baseline is reached.
        self.falling = jump < (0.0 if self.falling else -_FAST_Z * se)
        fast = self.falling
        if not fast:
            dev = min(x - self.baseline, 0.0)
            if self.nl >= _MIN_CLIP_N:
                dev = max(dev, -_CLIP * std)
            self.nl += 1
            self.lvar = _ema(self.lvar, 2.0 * dev * dev, self.nl, alpha)
            if len(self.window) == self.size:
                dd = max(min(jump, 0.0), -_CLIP * se)
                self.nd += 1
                self.dvar = _ema(self.dvar, 2.0 * dd * dd, self.nd, alpha)
        self.n += 1
        median = self.median()
        if not fast:
            self.lag = _ema(self.lag, median - self.mean, self.n - 1, alpha)
        self.mean = _ema(self.mean, median, self.n, 1.0 / self.size if fast else alpha)

    def to_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {name: getattr(self, name) for name in _STAT_FIELDS}
        state["falling"] = int(self.falling)
        state["window"] = list(self.window)
        return state

    @classmethod
    def from_dict(cls, size: int, state: Mapping[str, Any]) -> _SignalStats:
        stats = cls(size)
        for name in _STAT_FIELDS:
            kind = int if name.startswith("n") else float
            setattr(stats, name, kind(state[name]))
        stats.falling = bool(state["falling"])
        stats.window = [float(v) for v in state["window"]][-size:]
        return stats


_STAT_FIELDS = ("n", "mean", "lag", "nv", "var", "nl", "lvar", "nd", "dvar")


class ChangePointDetector:
    """Declares a task switch when a positive signal jumps and stays up.

    Feed one observation per call to :meth:`update`, with the main signal under the keyword
    ``signal`` and, optionally, auxiliary signals named in ``weights``; all are used as
    ``log(value)``. :meth:`update` returns True at the observation where a switch is declared;
    the statistics then restart for the new task. The window median of the main signal is
    tested against a slowly following baseline, in robust standard errors (Stouffer's
    weighted z with the auxiliary signals), and must also have grown ``1 + min_relative_jump``
    fold, ``patience`` times in a row; the statistics are derived in ``docs/detection.md``
    ("The change-point test, in detail"). Observations whose main signal is not a finite
    number ``>= 0`` are ignored.

    Attributes for logging: ``num_observations``, ``num_switches``, ``switch_steps``,
    ``last_statistic`` (``Z``) and ``last_relative_jump``.

    Args:
        signal: keyword of the main signal in :meth:`update`.
        threshold: z-score ``Z`` an observation must exceed (default 4: with ``window`` 9 and
            ``patience`` 5 a false alarm on i.i.d. noise is astronomically rare, while an
            error that jumps 2.7x (1 in log) with noise std 0.3 still gives ``Z ~ 8``).
        window: number of recent observations whose median is tested (default 9: ignores up
            to 4 outliers; a level shift shows after 5 observations).
        patience: consecutive exceedances needed to declare a switch (default 5).
        warmup: observations after a (re)start used only to learn the baseline (default 50).
        cooldown: observations after a switch during which no switch is declared (default
            100; it only matters when larger than ``warmup``).
        min_relative_jump: least relative increase of the main signal (window median over
            baseline) for an exceedance (default 0.5: the error must grow 1.5x, while a new
            task typically multiplies it several times).
        halflife: half-life, in observations, of the baseline's forgetting (default 200:
            long against the ~10 observations a switch needs, short against slow drift).
        weights: ``{name: weight}`` of auxiliary signals accepted by :meth:`update` (weight
            ``>= 0``; 0 accepts the signal but ignores it). Default: none.
        max_warmup: make the warm-up adaptive: when it ends with the main signal still
            moving (the median of its last ``window`` values more than 2 standard errors
            from the median of the ``window`` before), the warm-up starts over, until at
            most ``max_warmup`` observations after the (re)start. None (default): a fixed
            warm-up. A network leaving its random initialisation, or a gradual switch still
            going on after the switch was declared, then neither sets the baseline nor
            inflates the noise estimate the later tests use.
        fast_jump: a second, faster rule for large jumps (None, the default: off): a switch
            is also declared after ``fast_patience`` consecutive observations whose main
            signal's median over the last ``fast_window`` observations is more than
            ``1 + fast_jump`` times the baseline and ``threshold`` standard errors of that
            shorter median above it. A new task that moves the signal many-fold is then
            declared sooner; an excursion must still last ``fast_patience`` observations
            to fire it (the main rule ignores up to ``window // 2``).
        fast_window: observations of the fast rule's median (None: ``window // 3``).
        fast_patience: consecutive fast exceedances needed (None: ``patience // 2``).
        min_contrast: require the jump to be abrupt (None, the default: off): a switch is
            declared only if the main signal's median over the rule's last window is also
            more than ``1 + min_contrast`` times its median over the window that ended where a
            change firing now began (``patience + window // 2`` observations back). A slow
            ramp (the level creeping up over many windows) then does not fire, however far
            above the baseline it climbs.
        trace_onset: estimate where a declared change began from the main signal's own trace
            as well (None, the default: off): the run of the last observations more than one
            noise standard deviation above the baseline (one value in the noise does not end
            it), up to ``trace_onset`` of them. The
            estimate (:attr:`last_onset`) is the larger of that run and the rule's (its run of
            exceedances plus half its window), so a switch the rule declares late, after a
            slow climb, is still placed where the climb began. :attr:`max_onset` grows to
            ``trace_onset``.
        confirm: ``{name: ratio}`` of signals that must confirm a switch (None, the default:
            none). A switch the rules declare is held back unless each such signal's median
            over the observations since the estimated onset (at least 3) is at least
            ``ratio`` times its median over a ``window`` of observations before the onset
            (ending ``window // 2`` observations before it, so that an onset placed a little
            late does not count the switch itself as "before"), e.g.
            ``{"loss": 0.9}``: a switch does not come with a training loss falling by more
            than 10 %. A held-back switch is not lost: the run goes on and the test is
            repeated at the next observation. Without that much history of a signal (it was
            not fed), it does not hold a switch back.
        spike: with ``confirm``, a confirming signal's transient spike (a value at least
            ``spike`` times its median over the ``window`` before, back under
            ``sqrt(spike)`` times it at the next observation: a few batches of garbage)
            starts a quiet spell of ``2 * max_onset`` observations whose exceedances do not
            count (None, the default: off). An optimizer with momentum (Adam) carries such a
            spike on: it pushes the weights off, and the gradients' signals rise and decay
            over tens of steps as if a new task had begun.

    Example:
        >>> det = ChangePointDetector(warmup=20, patience=3)
        >>> errors = [0.2 * (1 + 0.1 * math.sin(i)) for i in range(200)]
        >>> errors[100:] = [4 * e for e in errors[100:]]  # a new task: the error jumps 4x
        >>> [i for i, e in enumerate(errors) if det.update(error=e)]
        [106]
        >>> det.num_switches, det.switch_steps
        (1, [106])
    """

    def __init__(
        self,
        signal: str = "error",
        *,
        threshold: float = 4.0,
        window: int = 9,
        patience: int = 5,
        warmup: int = 50,
        cooldown: int = 100,
        min_relative_jump: float = 0.5,
        halflife: float = 200.0,
        weights: Mapping[str, float] | None = None,
        max_warmup: int | None = None,
        fast_jump: float | None = None,
        fast_window: int | None = None,
        fast_patience: int | None = None,
        min_contrast: float | None = None,
        trace_onset: int | None = None,
        confirm: Mapping[str, float] | None = None,
        spike: float | None = None,
    ) -> None:
        self.signal = check_str("signal", signal)
        self.threshold = check_float("threshold", threshold, minimum=0, low_open=True)
        self.window = check_int("window", window, minimum=1)
        self.patience = check_int("patience", patience, minimum=1)
        self.warmup = check_int("warmup", warmup, minimum=2)
        self.cooldown = check_int("cooldown", cooldown, minimum=0)
        self.min_relative_jump = check_float("min_relative_jump", min_relative_jump, minimum=0)
        self.halflife = check_float("halflife", halflife, minimum=0, low_open=True)
        self.weights = _signal_values("weights", "weight", weights, self.signal)
        if max_warmup is not None:
            check_int("max_warmup", max_warmup, minimum=self.warmup)
        self.max_warmup = max_warmup
        if fast_jump is not None:
            check_float("fast_jump", fast_jump, minimum=0, low_open=True)
        self.fast_jump = fast_jump
        self._log_fast = None if fast_jump is None else math.log1p(fast_jump)
        self._fast_window = (
            max(1, self.window // 3)
            if fast_window is None
            else check_int("fast_window", fast_window, minimum=1)
        )
        self._fast_patience = (
            max(1, self.patience // 2)
            if fast_patience is None
            else check_int("fast_patience", fast_patience, minimum=1)
        )
        if min_contrast is not None:
            check_float("min_contrast", min_contrast, minimum=0, low_open=True)
        self.min_contrast = min_contrast
        self.trace_onset = check_int("trace_onset", trace_onset, minimum=1, optional=True)
        self.confirm = _signal_values("confirm", "ratio", confirm, self.signal, positive=True)
        self.spike = spike
        self._alpha = 1.0 - 0.5 ** (1.0 / self.halflife)
        self._log_jump = math.log1p(self.min_relative_jump)
        self._confirming = ConfirmingSignals(self.confirm, self.window, self.max_onset, spike)
        self.reset()

    # ------------------------------------------------------------------ state

    def reset(self) -> None:
        """Forget everything: statistics, switch history and the observation count.

        Example:
            >>> det = ChangePointDetector(warmup=5)
            >>> _ = [det.update(error=0.1) for _ in range(10)]
            >>> det.reset(); det.num_observations
            0
        """
        self._stats = {name: _SignalStats(self.window) for name in self._names}
        self.num_observations = 0
        self.num_switches = 0
        self.switch_steps: list[int] = []
        self.last_statistic = 0.0
        self.last_relative_jump = 0.0
        #: At a declared switch: how many observations before it the change is estimated to
        #: have begun (0 before the first).
        self.last_onset = 0
        self._since = 0  # observations since the last (re)start
        self._run = 0  # consecutive exceedances
        self._fast_run = 0  # consecutive fast exceedances
        self._cooldown_left = 0
        self._segment = 0  # observations since the last (re)start, warm-up restarts included
        self._recent: list[float] = []  # the main signal's last values (see _kept)
        self._confirming.clear()

    def restart(self) -> None:
        """Start a new segment as after a switch, without counting one.

        For a boundary known from elsewhere (a task started by hand): the statistics are
        forgotten, then ``warmup`` and ``cooldown`` apply as after a detected switch.

        Example:
            >>> det = ChangePointDetector(warmup=5, cooldown=10)
            >>> _ = [det.update(error=0.1) for _ in range(8)]
            >>> det.restart(); det.num_switches, det.num_observations
            (0, 8)
        """
        self._stats = {name: _SignalStats(self.window) for name in self._names}
        self._since = 0
        self._run = 0
        self._fast_run = 0
        self._cooldown_left = self.cooldown
        self._segment = 0
        self._recent = []
        self._confirming.clear()

    @property
    def running(self) -> bool:
        """Whether a run of exceedances is under way (a switch may be declared soon)."""
        return self._run > 0 or self._fast_run > 0

    @property
    def _names(self) -> list[str]:
        return [self.signal, *self.weights]

    @property
    def accepted(self) -> list[str]:
        """Every signal :meth:`update` takes: the main one, ``weights`` and ``confirm``."""
        return [*self._names, *(n for n in self.confirm if n not in self.weights)]

    @property
    def max_onset(self) -> int:
        """The most observations before its detection that :attr:`last_onset` can place a
        switch's start: the longer rule's patience plus half its window.

        Example:
            >>> ChangePointDetector(window=9, patience=5).max_onset
            9
        """
        slow = self.patience + self.window // 2
        fast = self._fast_patience + self._fast_window // 2 if self.fast_jump is not None else 0
        return max(slow, fast, self.trace_onset or 0)

    def state_dict(self) -> dict[str, Any]:
        """The detector's state as plain ints, floats, strings, lists and dicts.

        Safe inside a Lightning checkpoint loaded with ``torch.load(weights_only=True)``.
        The constructor arguments are not included: build the detector with the same ones.

        Example:
            >>> det = ChangePointDetector(warmup=5)
            >>> det.update(error=0.3)
            False
            >>> state = det.state_dict(); state["num_observations"]
            1
            >>> other = ChangePointDetector(warmup=5); other.load_state_dict(state)
            >>> other.state_dict() == state
            True
        """
        return {
            "version": _STATE_VERSION,
            "num_observations": self.num_observations,
            "num_switches": self.num_switches,
            "switch_steps": list(self.switch_steps),
            "last_statistic": self.last_statistic,
            "last_relative_jump": self.last_relative_jump,
            "since": self._since,
            "run": self._run,
            "fast_run": self._fast_run,
            "cooldown_left": self._cooldown_left,
            "segment": self._segment,
            "recent": list(self._recent),
            "confirming": self._confirming.histories(),
            "quiet": self._confirming.quiet,
            "spike_bases": self._confirming.bases(),
            "signals": {name: stats.to_dict() for name, stats in self._stats.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; detection then continues exactly where it was.

        Example:
            >>> det = ChangePointDetector(warmup=5)
            >>> det.load_state_dict(ChangePointDetector(warmup=5).state_dict())
        """
        # Version 1: no adaptive warm-up state.
        check_state_version("ChangePointDetector", state, (1, _STATE_VERSION))
        signals = state["signals"]
        if set(signals) != set(self._names):
            raise ValueError(
                f"state has signals {sorted(signals)}, this detector {sorted(self._names)}: "
                "build it with the same `signal` and `weights`"
            )
        self._stats = {
            name: _SignalStats.from_dict(self.window, signals[name]) for name in self._names
        }
        self.num_observations = int(state["num_observations"])
        self.num_switches = int(state["num_switches"])
        self.switch_steps = [int(s) for s in state["switch_steps"]]
        self.last_statistic = float(state["last_statistic"])
        self.last_relative_jump = float(state["last_relative_jump"])
        self._since = int(state["since"])
        self._run = int(state["run"])
        self._fast_run = int(state.get("fast_run", 0))
        self._cooldown_left = int(state["cooldown_left"])
        self._segment = int(state.get("segment", self._since))
        recent = [float(v) for v in state.get("recent", [])]
        self._recent = recent[-self._kept :] if self._kept else []
        self._confirming.load(
            state.get("confirming", {}), state.get("quiet", 0), state.get("spike_bases")
        )

    # ------------------------------------------------------------------ detection

    def update(self, **signals: SupportsFloat) -> bool:
        """Add one observation; True when a switch is declared at it.

        The main signal is required; auxiliary ones (named in ``weights``) are optional.
        Values may be Python numbers or one-element tensors. Sets :attr:`last_statistic`
        (the combined z-score ``Z``, 0 during warm-up) and :attr:`last_relative_jump` (the
        main signal's window median over its baseline, minus 1) for logging.

        Example:
            >>> det = ChangePointDetector(weights={"loss": 0.5}, warmup=5)
            >>> det.update(error=0.2, loss=1.3)
            False
            >>> det.update(error=float("nan"), loss=1.2), det.num_observations  # ignored
            (False, 1)
        """
        if self.signal not in signals:
            raise ValueError(f"update() needs the main signal {self.signal!r}")
        unknown = sorted(set(signals) - set(self.accepted))
        if unknown:
            raise ValueError(
                f"update() got signals {unknown} not declared in `weights` or `confirm`; "
                f"known: {self.accepted}"
            )
        values: dict[str, float] = {}
        for name, value in signals.items():
            x = _log_value(name, value)
            if x is not None:
                values[name] = x
        if self.signal not in values:
            return False  # ignored: not counted, not learned

        index = self.num_observations
        self.num_observations += 1
        self._segment += 1
        if self._kept:
            self._recent = [*self._recent, values[self.signal]][-self._kept :]
        self._confirming.tick()
        self._confirming.push(values)
        if self._still_moving():
            # The warm-up ends with the main signal still moving (a network leaving its
            # random initialisation, a blend still going on): its statistics would describe a
            # level that is not there any more, so the warm-up starts over on what follows.
            self._stats = {name: _SignalStats(self.window) for name in self._names}
            self._since = 0
        for name, x in values.items():
            if name in self._stats:
                self._stats[name].push(x)

        exceedance = fast = False
        if self._since >= self.warmup:
            z, jump = self._combined_score(values)
            self.last_statistic = z
            self.last_relative_jump = math.expm1(jump)
            exceedance = z > self.threshold and jump > self._log_jump
            fast = self._fast_exceedance()
        else:
            self.last_statistic = 0.0
            self.last_relative_jump = 0.0
        self._since += 1
        self._run = self._run + 1 if exceedance else 0
        self._fast_run = self._fast_run + 1 if fast else 0
        if self._confirming.quiet:  # a spike's aftermath (see `spike`): exceedances don't count
            self._run = self._fast_run = 0
        in_cooldown = self._cooldown_left > 0
        self._cooldown_left = max(self._cooldown_left - 1, 0)

        declared = self._run >= self.patience or self._fast_run >= self._fast_patience
        if declared and self.min_contrast is not None and not self._abrupt():
            declared = False  # a ramp: the runs go on, and an abrupt rise may still come
        onset = self._onset() if declared else 0
        if declared and not self._confirming.confirmed(onset):
            declared = False  # held back: the runs go on, and the test is repeated
        if declared and not in_cooldown:
            self.num_switches += 1
            self.switch_steps.append(index)
            self.last_onset = onset
            self.restart()
            return True
        for name in values:
            if name in self._stats:
                self._stats[name].learn(self._alpha)
        return False

    def _onset(self) -> int:
        """Where a change declared now began, in observations back (this one included)."""
        # The exceedances that declared it, plus the half window a median needs to move.
        if self._run >= self.patience:
            rule = self._run + self.window // 2
        else:
            rule = self._fast_run + self._fast_window // 2
        return min(max(rule, self._traced_onset()), self.max_onset)

    @property
    def _kept(self) -> int:
        """How many of the main signal's last values are kept (for the adaptive warm-up, the
        contrast test and the traced onset; 0: none)."""
        kept = 2 * self.window if self.max_warmup is not None else 0
        if self.min_contrast is not None:
            kept = max(kept, self.patience + self.window // 2 + 2 * self.window)
        if self.trace_onset is not None:
            kept = max(kept, self.trace_onset)
        return kept

    def _traced_onset(self) -> int:
        """With ``trace_onset``: how many of the main signal's last values (this one
        included) lie more than one noise std above the baseline, in a row, where a
        single value at the level does not end the row (0: off)."""
        if self.trace_onset is None:
            return 0
        main = self._stats[self.signal]
        level = main.baseline + main.std
        run = below = 0
        for back, x in enumerate(reversed(self._recent[-self.trace_onset :]), start=1):
            if x > level:
                run, below = back, 0
            else:
                below += 1
                if below == 2:  # one value in the noise is not yet the end of the climb
                    break
        return run

    def _abrupt(self) -> bool:
        """The contrast test: the median of the firing rule's last window against that of
        the window before where a change firing now began (True without enough history)."""
        slow = self._run >= self.patience
        patience = self.patience if slow else self._fast_patience
        width = self.window if slow else self._fast_window
        # Where an abrupt change that just fired would have begun (fixed, not the run's
        # length: a ramp's run goes on, and its start must not recede into the flat level).
        back = patience + width // 2
        recent = self._recent
        if len(recent) < back + width + 1 or self.min_contrast is None:
            return True
        now = _median(recent[-width:])
        before = _median(recent[-(back + width) : -back])
        return now - before > math.log1p(self.min_contrast)

    def _fast_exceedance(self) -> bool:
        """With ``fast_jump``: the median of the main signal's last ``window // 3``
        observations is more than ``1 + fast_jump`` times the baseline and ``threshold``
        standard errors (of that shorter median) above it."""
        if self._log_fast is None:
            return False
        main = self._stats[self.signal]
        k = min(self._fast_window, len(main.window))
        short = _median(main.window[-k:])
        iid_long = main.std * math.sqrt(math.pi / (2 * max(len(main.window), 3)))
        inflation = main.se() / iid_long if iid_long > 0 else 1.0
        se = main.std * (1.0 / math.sqrt(k) if k <= 2 else math.sqrt(math.pi / (2 * k)))
        jump = short - main.baseline
        return jump > self._log_fast and jump > self.threshold * se * inflation

    def _still_moving(self) -> bool:
        """At the end of a warm-up (with ``max_warmup``): whether the median of the main
        signal's last ``window`` values differs from the median of the ``window`` before by
        more than 2 standard errors of that difference (the warm-up is then extended)."""
        if self.max_warmup is None or self._since != self.warmup:
            return False
        if self._segment > self.max_warmup or len(self._recent) < 2 * self.window:
            return False
        w = self.window
        recent = self._recent[-2 * w :]
        before, last = _median(recent[:w]), _median(recent[w:])
        std = self._stats[self.signal].std
        se_diff = math.sqrt(2.0) * std * (1.0 if w <= 2 else math.sqrt(math.pi / (2 * w)))
        return abs(last - before) > 2.0 * se_diff

    def _combined_score(self, values: Mapping[str, float]) -> tuple[float, float]:
        zmax = _Z_CLIP * self.threshold
        main = self._stats[self.signal]
        jump = main.jump()
        z_main = jump / main.se()
        total = min(max(z_main, -zmax), zmax)
        norm = 1.0
        for name, weight in self.weights.items():
            stats = self._stats[name]
            if weight == 0.0 or name not in values or stats.n < self.warmup:
                continue
            z = stats.jump() / stats.se()
            total += weight * min(max(z, -zmax), zmax)
            norm += weight * weight
        return total / math.sqrt(norm), jump


def _signal_values(
    arg: str, what: str, values: Mapping[str, float] | None, signal: str, positive: bool = False
) -> dict[str, float]:
    """``weights`` or ``confirm``: ``{name: value}`` of other signals than the main one, each
    value ``>= 0`` (``> 0`` if ``positive``)."""
    if values is not None and not isinstance(values, Mapping):
        raise ValueError(f"`{arg}` must be a mapping name -> {what}, got {values!r}")
    checked: dict[str, float] = {}
    for name, value in (values or {}).items():
        if not isinstance(name, str) or not name or name == signal:
            raise ValueError(
                f"`{arg}` keys must be non-empty strings other than the main signal "
                f"{signal!r}, got {name!r}"
            )
        checked[name] = check_float(f"{arg}[{name!r}]", value, minimum=0, low_open=positive)
    return checked


class ConfirmingSignals:
    """The signals that must confirm a change (``confirm``: ``{name: ratio}``) and the quiet
    after a transient spike in one of them (``spike``), for
    :class:`ChangePointDetector` and :class:`~lightning_metagrad.boundaries.joint.JointRule`:
    each signal's last log values (enough for an onset up to ``max_onset`` observations back
    and its ``window`` before) and the observations left in a spike's aftermath
    (``2 * max_onset`` from the spike). Plain Python.

    Example:
        >>> sig = ConfirmingSignals({"loss": 1.1}, window=5, max_onset=4, spike=5.0)
        >>> for x in [0.0] * 10 + [math.log(50), 0.0]:
        ...     sig.tick(); sig.push({"loss": x})
        >>> sig.quiet, sig.confirmed(onset=3)
        (8, False)
    """

    def __init__(
        self, ratios: Mapping[str, float], window: int, max_onset: int, spike: float | None
    ) -> None:
        if spike is not None:
            check_float("spike", spike, minimum=1, low_open=True)
            if not ratios:
                raise ValueError(
                    "`spike` needs `confirm`: it watches the `confirm` signals, and `confirm` "
                    "is empty; name a signal in `confirm` or pass spike=None"
                )
        self.ratios, self.window, self.spike = dict(ratios), window, spike
        self._keep = max_onset + window + window // 2
        self._quiet_for = 2 * max_onset
        self.clear()

    def clear(self) -> None:
        """Forget the history and any quiet spell."""
        self._history: dict[str, list[float]] = {name: [] for name in self.ratios}
        self.quiet = 0  # observations left in a spike's aftermath
        self._bases: dict[str, float] = {}  # per spiked signal: its log median before it

    def tick(self) -> None:
        """One observation of the quiet spell has passed."""
        self.quiet = max(self.quiet - 1, 0)

    def push(self, values: Mapping[str, float]) -> None:
        """Record the confirming signals among ``values`` (log values); a spike in one starts
        a quiet spell."""
        for name, history in self._history.items():
            if name in values:
                history.append(values[name])
                del history[: -self._keep]
                if self.spike is not None and spiked(history, self.window, self.spike):
                    self.quiet = self._quiet_for
                    self._bases[name] = _median(history[-(self.window + 2) : -2])
        if self.quiet and self.spike is not None and self._lasting():
            self.quiet = 0  # the signal stays up: a new level (a switch), not a spike's aftermath
            self._bases = {}

    def _lasting(self) -> bool:
        """Whether a spiked signal's median over its last ``_LASTING`` values is again at least
        ``spike`` times its median before the spike (with Adam a low training loss has single
        batches 5 times its median; a switch that follows keeps it there)."""
        assert self.spike is not None
        for name, base in self._bases.items():
            recent = self._history[name][-_LASTING:]
            if len(recent) == _LASTING and _median(recent) - base >= math.log(self.spike):
                return True
        return False

    def confirmed(self, onset: int) -> bool:
        """Whether every signal confirms a change that began ``onset`` observations back
        (:func:`confirms`; True with no signals)."""
        return all(
            confirms(self._history[name], onset, self.window, ratio)
            for name, ratio in self.ratios.items()
        )

    def histories(self) -> dict[str, list[float]]:
        """Each signal's recorded log values (for a state)."""
        return {name: list(v) for name, v in self._history.items()}

    def bases(self) -> dict[str, float]:
        """Each spiked signal's log median before its spike (for a state)."""
        return dict(self._bases)

    def load(
        self,
        histories: Mapping[str, Sequence[float]],
        quiet: int,
        bases: Mapping[str, float] | None = None,
    ) -> None:
        """Restore :meth:`histories`, the quiet spell and :meth:`bases` (signals not given
        start empty)."""
        self._history = {name: [float(v) for v in histories.get(name, [])] for name in self.ratios}
        self.quiet = int(quiet)
        self._bases = {k: float(v) for k, v in (bases or {}).items() if k in self.ratios}


#: Observations of a spiked signal whose median, back at ``spike`` times its level before the
#: spike, ends the quiet spell (see :meth:`ConfirmingSignals.push`).
_LASTING = 5


def confirms(history: Sequence[float], onset: int, window: int, ratio: float) -> bool:
    """Whether a signal's log ``history`` confirms a change that began ``onset`` observations
    back (at least 3): its median since then is at least ``ratio`` times its median over the
    ``window`` observations ending ``window // 2`` before the onset (so an onset placed a
    little late does not count the change itself as "before"). A history too short to judge
    (the signal was not fed) confirms.

    Example:
        >>> flat, rising = [0.0] * 30, [0.0] * 20 + [math.log(1.5)] * 10
        >>> confirms(flat, 10, 9, 0.9), confirms(flat, 10, 9, 1.1), confirms(rising, 10, 9, 1.1)
        (True, False, True)
    """
    since, gap = max(onset, 3), window // 2
    if len(history) < since + gap + 3:
        return True
    before = history[-(since + gap + window) : -(since + gap)]
    return _median(history[-since:]) - _median(before) >= math.log(ratio)


def spiked(history: Sequence[float], window: int, spike: float) -> bool:
    """Whether a signal's log ``history`` ends just after a transient spike: its previous
    value at least ``spike`` times the median of the ``window`` values before it, its latest
    back under ``sqrt(spike)`` times that median (a few batches of garbage, not a new level).

    Example:
        >>> calm = [0.0] * 20
        >>> spiked(calm + [math.log(50), 0.1], 15, 5.0), spiked(calm + [4.0, 4.0], 15, 5.0)
        (True, False)
    """
    if len(history) < window + 2:
        return False
    base = _median(history[-(window + 2) : -2])
    return history[-2] - base >= math.log(spike) > 2 * (history[-1] - base)


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    k, mid = len(ordered), len(ordered) // 2
    return ordered[mid] if k % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])


def _log_value(name: str, value: SupportsFloat) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"signal {name!r} must be a number, got {value!r}") from err
    if not math.isfinite(v) or v < 0:
        return None
    return math.log(max(v, _TINY))


def simulate_detection(
    signal: Sequence[SupportsFloat | Mapping[str, SupportsFloat]], detector: ChangePointDetector
) -> list[int]:
    """Feed a whole sequence to ``detector``; the positions where it declared a switch.

    Each item is either a number (the main signal) or a mapping of signal name to value.
    Positions index ``signal`` (ignored non-finite items included), unlike
    :attr:`ChangePointDetector.switch_steps`, which counts valid observations only.

    Example:
        >>> errors = [0.1 * (1.1 if i % 2 else 1.0) for i in range(300)]
        >>> errors[150:] = [0.5] * 150
        >>> simulate_detection(errors, ChangePointDetector(warmup=30))
        [158]
    """
    hits = []
    for i, item in enumerate(signal):
        obs = dict(item) if isinstance(item, Mapping) else {detector.signal: item}
        if detector.update(**obs):
            hits.append(i)
    return hits
