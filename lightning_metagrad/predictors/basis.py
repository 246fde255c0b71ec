"""The energy rule of Gradient Projection Memory (Saha et al., ICLR 2021), shared by the default
predictor (:mod:`~lightning_metagrad.predictors.subspace`, on gradient second moments) and the GPM
baseline (:mod:`~lightning_metagrad.baselines.gpm`, on layer-input second moments). Plain
PyTorch."""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Directions of the residual whose energy is at most this fraction of the layer's total are
# numerical noise (float32 accumulation), never added to a basis (matters for threshold=1).
_NOISE = 1e-6


def grow_basis(basis: Tensor | None, covariance: Tensor, threshold: float) -> Tensor | None:
    """GPM's basis update from the uncentred covariance ``C = R Rᵀ`` of a task's inputs.

    With ``M`` the stored orthonormal basis (None or 0 columns on the first task), the energy
    ``‖Mᵀ R‖² / ‖R‖²`` it explains already is ``tr(MᵀCM) / tr(C)``; the eigenvectors of
    ``(I − MMᵀ) C (I − MMᵀ)`` (the residual's left singular vectors, eigenvalues its squared
    singular values) are added in decreasing order until ``threshold`` of ``‖R‖²`` is
    explained (GPM eqs. 8-9; on the first task: the smallest ``k`` with
    ``‖R_k‖² ≥ threshold ‖R‖²``). The result is re-orthonormalised (QR). Returns ``basis``
    unchanged when it already explains enough (or the task has no energy).

    Example:
        >>> R = torch.diag(torch.tensor([3.0, 2.0, 1.0, 0.1]))  # features x samples
        >>> grow_basis(None, R @ R.T, 0.9).shape  # 9 + 4 = 13 of 14.01 > 0.9
        torch.Size([4, 2])
        >>> grow_basis(torch.eye(4)[:, :1], R @ R.T, 0.99).shape
        torch.Size([4, 3])
    """
    cov = covariance.double()
    cov = (cov + cov.T) / 2
    total = float(torch.trace(cov))
    if not math.isfinite(total) or total <= 0:
        return basis
    features = cov.shape[0]
    if basis is None or basis.shape[1] == 0:
        kept, residual, old = 0.0, cov, cov.new_zeros(features, 0)
    else:
        old = basis.to(cov)
        kept = float(torch.trace(old.T @ cov @ old)) / total
        projector = torch.eye(features, dtype=cov.dtype, device=cov.device) - old @ old.T
        residual = projector @ cov @ projector
    if kept >= threshold or old.shape[1] >= features:
        return basis
    values, vectors = symmetric_eigh((residual + residual.T) / 2, total)
    values, vectors = values.flip(0).clamp_min(0) / total, vectors.flip(1)
    explained = kept + torch.cumsum(values, 0)
    needed = int((explained < threshold).sum()) + 1  # the first index reaching the threshold
    usable = int((values > _NOISE).sum())
    count = min(needed, usable, features - old.shape[1])
    if count <= 0:
        return basis
    merged, _ = torch.linalg.qr(torch.cat([old, vectors[:, :count]], 1))
    return merged.float()


def symmetric_eigh(matrix: Tensor, total: float, jitter: bool = False) -> tuple[Tensor, Tensor]:
    """``torch.linalg.eigh`` of a symmetric PSD ``matrix`` with trace ``total``. LAPACK's
    solver can fail to converge on a large matrix with big clusters of equal eigenvalues (the
    input moment of a wide conv layer after a few steps is mostly exact zeros); then (or with
    ``jitter=True``) it runs on ``matrix + j I`` with ``j = 1e-9 total / n``, which moves every
    eigenvalue by a share of the total far below the rule's noise floor and leaves the
    eigenvectors of distinct eigenvalues as they were.

    Example:
        >>> m = torch.diag(torch.tensor([2.0, 1.0, 0.0, 0.0], dtype=torch.float64))
        >>> symmetric_eigh(m, 3.0, jitter=True)[0].round(decimals=6)
        tensor([0., 0., 1., 2.], dtype=torch.float64)
    """
    if not jitter:
        try:
            return torch.linalg.eigh(matrix)
        except torch.linalg.LinAlgError:
            pass
    n = matrix.shape[0]
    shift = 1e-9 * total / n
    eye = torch.eye(n, dtype=matrix.dtype, device=matrix.device)
    values, vectors = torch.linalg.eigh(matrix + shift * eye)
    return values - shift, vectors


def complement_of(basis: Tensor) -> Tensor:
    """An orthonormal basis of the orthogonal complement of ``basis``'s columns.

    Example:
        >>> complement_of(torch.eye(3)[:, :1]).abs()
        tensor([[0., 0.],
                [1., 0.],
                [0., 1.]])
    """
    cols, k = basis.shape
    if k == 0:
        return torch.eye(cols, dtype=basis.dtype, device=basis.device)
    # The complete QR's last columns span the complement (no eigensolver on the projector,
    # whose eigenvalues are all 0 or 1: the clusters LAPACK's solver can fail on).
    q, _ = torch.linalg.qr(basis.double(), mode="complete")
    return q[:, k:].to(basis.dtype)
