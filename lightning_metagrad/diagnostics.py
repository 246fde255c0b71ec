"""Cheap run-time diagnostics: is the prediction informative, are the weights running away?

The paper's rule can fail silently: a predictor that explains almost none of the gradient's
variance turns eq. 5 into a random one-way filter, and the weights can drift until training
ends in NaN (``docs/science.md`` measures when). These checks cost a few reductions every
``check_every`` steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lightning_metagrad._validation import (
    check_bool,
    check_float,
    check_fraction,
    check_int,
    check_state_version,
)
from lightning_metagrad.runtime import warn_user

if TYPE_CHECKING:
    from lightning_metagrad.engine import StepReport

_STATE_VERSION = 1


class Diagnostics:
    """Tracks prediction quality and parameter-norm drift; warns once per kind of problem.

    * ``metagrad/meta_rel_error``, the meta-network's held-out ``MSE / mean(target^2)``
      (1 minus the explained fraction), is averaged (EMA); once ``warmup`` values were seen in
      a task and the average stays above ``uninformative_error`` the prediction carries no
      information, and a warning says so.
    * ``metagrad/param_norm_growth`` is ``||theta|| / ||theta at the first step of the first
      task with old tasks||`` (where the rule starts acting: plain training away from a
      random initialisation may well grow the norm several-fold, which is not the rule's
      doing); above ``runaway_growth`` the weights are running away, and a warning says so.

    Example:
        >>> d = Diagnostics(warmup=2)
        >>> for _ in range(3):
        ...     d.observe_prediction_error(torch.tensor(0.999))
        >>> d.uninformative
        True
    """

    def __init__(
        self,
        warn: bool = True,
        warmup: int = 50,
        uninformative_error: float = 0.98,
        runaway_growth: float = 3.0,
        check_every: int = 50,
        held_back: float = 0.8,
        emit: Callable[[str], None] = warn_user,
    ) -> None:
        self.warn = check_bool("warn", warn)
        #: Called with each warning's message (the callback passes ``rank_zero_warn``).
        self.emit = emit
        self.warmup = check_int("warmup", warmup, minimum=1)
        self.uninformative_error = check_float(
            "uninformative_error", uninformative_error, minimum=0, low_open=True
        )
        self.runaway_growth = check_float("runaway_growth", runaway_growth, minimum=1)
        self.check_every = check_int("check_every", check_every, minimum=1)
        self.held_back = check_fraction("held_back", held_back)
        self.held_back_ema: float | None = None  # share of the update the rule holds back
        self.holding_back = False
        self._held_calls = 0
        self.error_ema: float | None = None
        self.error_count = 0
        self.initial_norm: float | None = None
        self.max_growth = 1.0
        self.steps = 0
        self.uninformative = False
        self.runaway = False
        self._task = 0
        self._rule_acting = False  # a step with old tasks was seen (the norm baseline's task)

    def observe(self, report: StepReport) -> None:
        """One optimizer step's report from the engine."""
        self.observe_prediction_error(report.prediction_error)
        self.observe_held_back(report.held_back)

    def observe_prediction_error(self, value: Tensor | float | None) -> None:
        """The predictor's held-out relative error (1 minus the explained fraction)."""
        if value is None:
            return
        error = float(value)
        if math.isnan(error):
            return
        self.error_ema = error if self.error_ema is None else 0.9 * self.error_ema + 0.1 * error
        self.error_count += 1
        if self.error_count >= self.warmup and self.error_ema >= self.uninformative_error:
            if not self.uninformative and self.warn:
                self.emit(
                    f"MetaGrad: the meta-network explains {100 * (1 - self.error_ema):.1f} % of "
                    "the gradient's variance on held-out coordinates: its prediction carries no "
                    "information, and eq. 5 then acts as a random one-way filter. Consider "
                    "predictor='anchored' (see docs/science.md)."
                )
            self.uninformative = True

    def observe_held_back(self, value: Tensor | float | None) -> None:
        """Track the share of the gradient / update the rule holds back (zeroed coordinates
        of eq. 5, or the energy a projection removed); warn once when it stays above
        ``held_back``: new tasks then have little left to learn with. Reads the figure every
        ``check_every`` calls only (a host sync)."""
        if value is None:
            return
        self._held_calls += 1
        if (self._held_calls - 1) % self.check_every != 0:
            return
        share = float(value)
        if not math.isfinite(share):  # a non-finite step, masked out by the engine
            return
        ema = self.held_back_ema
        self.held_back_ema = share if ema is None else 0.7 * ema + 0.3 * share
        if self._held_calls > 2 * self.check_every and self.held_back_ema > self.held_back:
            if not self.holding_back and self.warn:
                self.emit(
                    f"MetaGrad: the rule holds back {100 * self.held_back_ema:.0f} % of the "
                    "gradient/update: the current task has little left to learn with. With "
                    "optimizers other than plain SGD the rule acts on the update vector; "
                    "consider plain SGD, predictor='subspace' with a lower `threshold`, or "
                    "fewer protected layers (SubspacePredictor(layer_thresholds=...))."
                )
            self.holding_back = True

    def step(self, params: Sequence[Tensor], task_index: int) -> dict[str, Tensor]:
        """Per optimizer step; returns figures to log."""
        if task_index != self._task:
            self._task = task_index
            self.error_ema, self.error_count = None, 0
            self.held_back_ema, self._held_calls = None, 0
        self.steps += 1
        rebase = task_index > 0 and not self._rule_acting
        if rebase:  # the first step with old tasks: measure drift from here
            self._rule_acting, self.initial_norm, self.max_growth = True, None, 1.0
        if (self.steps - 1) % self.check_every != 0 and self.initial_norm is not None:
            return {}
        norms = torch._foreach_norm([p.detach() for p in params])
        norm = torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))
        value = float(norm)
        if self.initial_norm is None:
            self.initial_norm = value if value > 0 else 1.0
        growth = value / self.initial_norm
        self.max_growth = max(self.max_growth, growth) if growth == growth else float("inf")
        # Only once the rule acts: growth in the first task is plain training's own.
        if self._rule_acting and not growth <= self.runaway_growth:  # also catches NaN
            if not self.runaway and self.warn:
                self.emit(
                    f"MetaGrad: the parameter norm grew {growth:.1f}x since the rule started "
                    "acting (the first task with old tasks): the weights are running away (the "
                    "one-way filter of eq. 5 turns gradient noise into drift when the "
                    "prediction is uninformative). Consider a lower learning rate, or "
                    "predictor='anchored' if you use predictor='paper'."
                )
            self.runaway = True
        return {"metagrad/param_norm_growth": norm.new_tensor(growth)}

    def state_dict(self) -> dict:
        return {
            "version": _STATE_VERSION,
            "error_ema": self.error_ema,
            "error_count": self.error_count,
            "initial_norm": self.initial_norm,
            "max_growth": self.max_growth,
            "steps": self.steps,
            "uninformative": self.uninformative,
            "runaway": self.runaway,
            "task": self._task,
            "rule_acting": self._rule_acting,
            "held_back_ema": self.held_back_ema,
            "holding_back": self.holding_back,
            "held_calls": self._held_calls,
        }

    def load_state_dict(self, state: dict) -> None:
        check_state_version("Diagnostics", state, _STATE_VERSION, unversioned=1)
        self.error_ema = state["error_ema"]
        self.error_count = int(state["error_count"])
        self.initial_norm = state["initial_norm"]
        self.max_growth = float(state["max_growth"])
        self.steps = int(state["steps"])
        self.uninformative = bool(state["uninformative"])
        self.runaway = bool(state["runaway"])
        self._task = int(state["task"])
        self._rule_acting = bool(state["rule_acting"])
        self.held_back_ema = state["held_back_ema"]
        self.holding_back = bool(state["holding_back"])
        self._held_calls = int(state["held_calls"])
