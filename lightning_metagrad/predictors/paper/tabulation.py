"""O(P) evaluation of a frozen scalar function by tabulation and linear interpolation.

The distilled predictor g is a frozen 1-D function of theta_j. Running a 256-wide MLP on every
coordinate every step costs ~2*(3*256^2) FLOP per coordinate (~90 GFLOP a step for the paper's
335k-parameter MLP); a table of ``num_points`` values evaluated once per task boundary and
linearly interpolated costs a handful of elementwise operations per coordinate.

Error bound: for a function with bounded second derivative ``|f''| <= M`` on the table's
range, linear interpolation on a grid of spacing ``h`` errs by at most ``M h^2 / 8``. A ReLU MLP
is piecewise linear, so its error is non-zero only in the grid cells that contain a kink.
Outside the range the table extrapolates linearly from its end cells, which is exact for a ReLU
MLP once all kinks lie inside the range. ``tests/test_core.py`` checks the error
(``test_tabulated_mlp_error_is_bounded``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from lightning_metagrad._validation import check_float, check_int


class TabulatedFunction:
    """A scalar function stored as ``num_points`` samples on ``[low, high]``, linearly interpolated.

    Example:
        >>> f = TabulatedFunction.from_function(torch.sin, -3.0, 3.0, num_points=2049)
        >>> x = torch.tensor([-1.0, 0.5, 2.0])
        >>> bool((f(x) - torch.sin(x)).abs().max() < 1e-5)
        True
    """

    def __init__(self, values: Tensor, low: float, high: float):
        if values.dim() != 1 or values.numel() < 2:
            raise ValueError("`values` must be a 1-D tensor with at least 2 entries")
        low, high = check_float("low", low), check_float("high", high)
        if not high > low:
            raise ValueError(f"`high` must be greater than `low` ({low}), got {high!r}")
        self.values = values
        self.low = float(low)
        self.high = float(high)
        self._step = (self.high - self.low) / (values.numel() - 1)
        # Per-cell slopes, so that evaluation is one gather of value and slope plus an FMA.
        self._slopes = (values[1:] - values[:-1]) / self._step

    @classmethod
    @torch.no_grad()
    def from_function(
        cls,
        fn: Callable[[Tensor], Tensor],
        low: float,
        high: float,
        num_points: int = 4097,
        device: torch.device | str | None = None,
    ) -> TabulatedFunction:
        """Tabulate ``fn`` (a batched 1-D -> 1-D callable) on an evenly spaced grid."""
        num_points = check_int("num_points", num_points, minimum=2)
        grid = torch.linspace(low, high, num_points, device=device)
        return cls(fn(grid).detach().float(), low, high)

    @property
    def num_points(self) -> int:
        return self.values.numel()

    def to(self, device: torch.device | str) -> TabulatedFunction:
        return TabulatedFunction(self.values.to(device), self.low, self.high)

    def __call__(self, x: Tensor) -> Tensor:
        """Evaluate at every entry of ``x`` (any shape); linear extrapolation outside the range."""
        pos = (x.float() - self.low) / self._step
        # NaN in -> NaN out (a NaN position must not become the index INT64_MIN).
        cell = torch.nan_to_num(pos.floor(), nan=0.0).clamp_(0, self.num_points - 2)
        idx = cell.long()
        return torch.addcmul(self.values[idx], self._slopes[idx], (pos - cell).mul_(self._step))

    def state_dict(self) -> dict:
        return {"values": self.values, "low": self.low, "high": self.high}

    @classmethod
    def from_state_dict(cls, state: dict) -> TabulatedFunction:
        return cls(state["values"], state["low"], state["high"])
