"""A bounded-memory stand-in for a weight matrix's ``cols x cols`` second moment: a Frequent
Directions sketch (Liberty, KDD 2013; Ghashami et al., SIAM J. Comput. 2016), GPM's energy rule
(Saha et al., ICLR 2021) applied to it. Plain PyTorch. (The bound is measured with
:class:`~lightning_metagrad.meters.PeakTensorMemory`.)

A sketch of ``ell`` rows keeps ``B`` (at most ``2·ell x cols``) such that for every stream of
rows ``A`` inserted, ``0 ⪯ AᵀA − BᵀB`` and ``‖AᵀA − BᵀB‖₂ ≤ ‖A‖²_F / ell`` (more precisely
``≤ ‖A − A_k‖²_F / (ell − k)`` for every ``k < ell``). Memory ``2·ell·cols`` floats, a shrink
``O(cols·ell²)``: a ``2ell x 2ell`` eigendecomposition, never a ``cols x cols`` one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_metagrad.predictors.basis import _NOISE


class FrequentDirections:
    """A streaming sketch of the rows added to it (rows of ``cols`` features).

    Example:
        >>> fd = FrequentDirections(cols=5, ell=2)
        >>> a = torch.randn(40, 5)
        >>> fd.add(a)
        >>> err = torch.linalg.matrix_norm(a.T @ a - fd.gram(), ord=2)
        >>> bool(err <= a.pow(2).sum() / 2 + 1e-4)
        True
    """

    __slots__ = ("buffer", "ell", "energy", "filled")

    def __init__(
        self,
        cols: int,
        ell: int,
        device: torch.device | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.ell = max(1, int(ell))
        self.buffer = torch.zeros(2 * self.ell, cols, device=device, dtype=dtype)
        self.filled = 0  # rows of the buffer in use (a host count: no sync)
        # The exact energy ‖A‖²_F of every row added (a 0-dim device tensor).
        self.energy = torch.zeros((), device=device, dtype=torch.float64)

    @property
    def cols(self) -> int:
        return self.buffer.shape[1]

    def numel(self) -> int:
        return self.buffer.numel()

    @torch.no_grad()
    def add(self, rows: Tensor) -> None:
        """Insert rows (``n x cols``); shrink whenever the buffer fills."""
        rows = rows.reshape(-1, self.cols)
        self.energy += torch.linalg.vector_norm(rows).double().square()
        start = 0
        while start < rows.shape[0]:
            if self.filled == self.buffer.shape[0]:
                self._shrink()
            take = min(rows.shape[0] - start, self.buffer.shape[0] - self.filled)
            self.buffer[self.filled : self.filled + take] = rows[start : start + take]
            self.filled += take
            start += take

    def rows(self) -> Tensor:
        """The sketch ``B`` (a view: ``filled x cols``)."""
        return self.buffer[: self.filled]

    def gram(self) -> Tensor:
        """``BᵀB``: a ``cols x cols`` estimate of the second moment (for tests and small
        matrices only)."""
        b = self.rows()
        return b.T @ b

    @torch.no_grad()
    def _shrink(self) -> None:
        """Keep the top ``ell`` directions, each squared singular value lowered by the
        ``ell``-th's (the FD step), through the Gram ``B Bᵀ`` (2ell x 2ell)."""
        b = self.rows()
        values, vectors = _top_directions(b)
        cut = values[self.ell] if values.shape[0] > self.ell else values.new_zeros(())
        kept = (values[: self.ell] - cut).clamp_min(0)
        # New rows: sqrt(kept_i) v_i with v_i = u_iᵀ B / sigma_i.
        scale = (kept / values[: self.ell].clamp_min(1e-30)).sqrt()
        top = (vectors[:, : self.ell] * scale).T.to(b.dtype) @ b  # ell x cols
        self.buffer.zero_()
        self.buffer[: top.shape[0]] = top
        self.filled = top.shape[0]

    def state_dict(self) -> dict[str, Any]:
        return {"buffer": self.rows().clone(), "ell": self.ell, "energy": self.energy.clone()}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> FrequentDirections:
        rows = state["buffer"]
        fd = cls(rows.shape[1], int(state["ell"]), device=rows.device, dtype=rows.dtype)
        fd.buffer[: rows.shape[0]] = rows
        fd.filled = rows.shape[0]
        fd.energy = state["energy"].clone()
        return fd

    def to(self, device: torch.device) -> FrequentDirections:
        self.buffer = self.buffer.to(device)
        self.energy = self.energy.to(device)
        return self


def _top_directions(b: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues (decreasing, ≥ 0) and eigenvectors of ``B Bᵀ`` (``rows x rows``; in the
    sketch's float32, so that with ``ell <= cols / 8`` it stays below the sketch's size)."""
    gram = b @ b.T
    values, vectors = torch.linalg.eigh(gram.add_(gram.T.clone()).mul_(0.5))
    return values.flip(0).clamp_min(0), vectors.flip(1)


@torch.no_grad()
def new_directions(
    blocks: Sequence[Tensor],
    sketch: Tensor,
    total: float,
    residual: float,
    threshold: float,
    limit: int,
) -> tuple[Tensor | None, bool]:
    """GPM's energy rule (eqs. 8-9) on a sketch of the task's rows *outside* the stored basis
    (its orthonormal column ``blocks``, mutually orthogonal).

    ``total`` is the task's whole energy ``‖R‖²``, ``residual`` the part outside the basis
    (``‖(I − MMᵀ)R‖²``, exact), and ``sketch`` a Frequent Directions sketch of those residual
    rows. Directions of the sketch are added in decreasing energy until ``threshold`` of
    ``total`` is explained, at most ``limit`` columns in the basis in all (the memory budget).
    Cost ``O(cols·(ell² + k·ell))``, never ``cols³``. Returns the new block (``cols x n``,
    orthogonal to ``blocks``; None when nothing is added) and whether ``limit`` stopped it
    short of the threshold.

    Example:
        >>> r = torch.diag(torch.tensor([3.0, 2.0, 1.0, 0.1]))
        >>> block, capped = new_directions([], r, 14.01, 14.01, 0.9, limit=4)
        >>> block.shape, capped
        (torch.Size([4, 2]), False)
        >>> new_directions([block], r[2:], 14.01, 1.01, 0.99, limit=3)[0].shape
        torch.Size([4, 1])
    """
    if not math.isfinite(total) or total <= 0 or sketch.shape[0] == 0:
        return None, False
    have = sum(b.shape[1] for b in blocks)
    kept = max(0.0, 1.0 - residual / total)
    if kept >= threshold:
        return None, False
    values, vectors = _top_directions(sketch)
    shares = values / total
    explained = kept + torch.cumsum(shares, 0)
    needed = int((explained < threshold).sum()) + 1
    usable = int((shares > _NOISE).sum())
    count = min(needed, usable, sketch.shape[1] - have)
    capped = count > limit - have
    count = min(count, limit - have)
    if count <= 0:
        return None, capped
    top = vectors[:, :count] / values[:count].sqrt()
    new = (top.T.to(sketch.dtype) @ sketch).T  # cols x count, orthonormal in theory
    for _ in range(2):  # re-orthogonalise against the stored basis (float error)
        for old in blocks:
            new -= old @ (old.T @ new)
    new, _ = torch.linalg.qr(new)
    return new.contiguous(), capped
