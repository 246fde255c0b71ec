"""Scaled Gradient Projection (Saha & Roy, AAAI 2023): GPM with a soft importance per direction.

SGP keeps GPM's bases (:class:`~lightning_metagrad.baselines.GPMCallback` builds them, with the
same thresholds) and gives each basis direction an importance ``λ_i`` in ``(0, 1]``: before
each optimizer step only that share of the gradient along the direction is removed,
``G <- G - (G M) diag(λ) Mᵀ``. The most used old directions stay (almost) frozen, the rarely
used ones can still move, so later tasks keep more room to learn.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from typing_extensions import override

from lightning_metagrad._validation import check_float
from lightning_metagrad.baselines._base import TensorDict
from lightning_metagrad.baselines.gpm import GPMCallback
from lightning_metagrad.boundaries.sources import BoundarySpec


def scaled_importance(sigma: Tensor, scale: float) -> Tensor:
    r"""SGP's importance (eq. 2) of directions with singular values ``sigma``:

    .. math:: λ_i = \frac{(α + 1)\,σ_i}{α\,σ_i + \max_j σ_j},

    1 for the strongest direction and near 1 for every direction unless ``σ_i ≪ max σ / α``;
    ``scale`` is α (the official code's ``scale_coff``: 10 on CIFAR-100, 3 on its 20-task
    superclass split). α → ∞ gives GPM (every λ = 1).

    Example:
        >>> scaled_importance(torch.tensor([4.0, 2.0, 0.4, 0.0]), scale=10.0)
        tensor([1.0000, 0.9167, 0.5500, 0.0000])
    """
    return (scale + 1) * sigma / (scale * sigma + sigma.max())


def update_importance(
    basis: Tensor, covariance: Tensor, previous: Tensor | None, scale: float
) -> Tensor | None:
    """The importances of ``basis``'s columns after a task whose inputs have the uncentred
    covariance ``covariance``; ``previous``: those of its first columns (the old basis, as
    :func:`~lightning_metagrad.predictors.basis.grow_basis` keeps them first), None on the
    first task.

    As the official code (``update_SGP``): each column's strength on the task is
    ``σ_i = ‖m_iᵀ R‖`` (here ``sqrt(m_iᵀ C m_i)``: a singular value of the task's inputs ``R``
    for a new direction, the norm of their projection on an old one); all are scaled together
    by :func:`scaled_importance`, and an old direction adds its new importance to its previous
    one, clipped to 1. A task without input energy leaves ``previous`` as it is.

    Example:
        >>> cov = torch.diag(torch.tensor([16.0, 4.0, 0.16]))
        >>> first = update_importance(torch.eye(3)[:, :2], cov, None, scale=10.0)
        >>> first
        tensor([1.0000, 0.9167])
        >>> update_importance(torch.eye(3), torch.diag(torch.tensor([0.0, 0.0, 1.0])), first, 10.0)
        tensor([1.0000, 0.9167, 1.0000])
    """
    m = basis.double()
    sigma = ((m.T @ covariance.double()) * m.T).sum(1).clamp_min(0).sqrt()  # diag(Mᵀ C M)
    top = float(sigma.max()) if sigma.numel() else 0.0
    if not top > 0 or not torch.isfinite(sigma).all():
        return previous
    importance = scaled_importance(sigma, scale)
    if previous is not None:
        old = min(previous.numel(), importance.numel())
        importance[:old] = (importance[:old] + previous[:old].to(importance)).clamp(0, 1)
    return importance.float()


class SGPCallback(GPMCallback):
    r"""Scaled Gradient Projection (Saha & Roy, AAAI 2023) for any ``LightningModule``.

    Everything :class:`~lightning_metagrad.baselines.GPMCallback` does (the layers it protects,
    the bases it builds at each task end with the same ``threshold``, tied weights, AMP, DDP,
    task boundaries), except that the projection is soft: each basis direction ``m_i`` has an
    importance ``λ_i`` in ``[0, 1]`` (:func:`update_importance`, :func:`scaled_importance`) and

    .. math:: G \leftarrow G - (G M)\,\mathrm{diag}(λ)\,M^\top,

    so a direction with importance 1 is removed exactly (as GPM does) and one with importance
    ``λ < 1`` keeps ``1 - λ`` of its share. Same step cost as GPM; memory adds one float per
    basis direction.

    Args:
        threshold: as for ``GPMCallback``: one float, one per protected layer in model order
            (``[0.95, 0.99, 0.99]`` for GPM's permuted-MNIST MLP), or ``{layer name: ε}``.
            The official SGP code uses 0.97 (+0.003 per task) on CIFAR-100.
        scale: α ≥ 0 of the importance (the official ``scale_coff``); larger is closer to GPM.
        samples: examples collected per task, as for ``GPMCallback``.
        threshold_increment: added to ε per finished task, as for ``GPMCallback``.
        task_boundaries: where a task ends, as for ``GPMCallback``.
        task_id_key: dict-batch key holding the task id, for ``task_boundaries="batch"``.
        task_id_fn: a function ``batch -> task id``, for ``task_boundaries="batch"``.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> sgp = SGPCallback()
        >>> trainer = Trainer(callbacks=[sgp], max_steps=1, logger=False)
        >>> sgp.scale, sgp.importances
        (10.0, {})
    """

    _when_full = (
        "new tasks move its weights only along the directions whose importance is below 1, "
        "by 1 - importance (they add up towards 1 with every task). Lower `threshold`."
    )

    def __init__(
        self,
        *,
        threshold: float | Sequence[float] | Mapping[str, float] = 0.97,
        scale: float = 10.0,
        samples: int = 300,
        threshold_increment: float = 0.0,
        task_boundaries: BoundarySpec = "fit",
        task_id_key: str = "task_id",
        task_id_fn: Callable[[Any], Hashable] | None = None,
    ) -> None:
        super().__init__(
            threshold=threshold,
            samples=samples,
            threshold_increment=threshold_increment,
            task_boundaries=task_boundaries,
            task_id_key=task_id_key,
            task_id_fn=task_id_fn,
        )
        self.scale = check_float("scale", scale, minimum=0)
        self._importance: TensorDict = {}

    @property
    def importances(self) -> TensorDict:
        """Per layer, the importance of each column of its basis (:attr:`bases`), in order."""
        return self._importance

    @override
    def _basis_grown(self, name: str, basis: Tensor, covariance: Tensor) -> None:
        importance = update_importance(basis, covariance, self._importance.get(name), self.scale)
        if importance is not None:
            self._importance[name] = importance

    @override
    def _importance_of(self, name: str, device: torch.device) -> Tensor | None:
        importance = self._importance.get(name)
        if importance is not None:
            importance = importance.to(device=device, dtype=torch.float32)
            self._importance[name] = importance
        return importance

    @override
    def _config(self) -> dict[str, Any]:
        return {**super()._config(), "scale": self.scale}

    @override
    def _extra_state(self) -> dict[str, Any]:
        return {**super()._extra_state(), "importance": dict(self._importance)}

    @override
    def _load_extra_state(self, state: dict[str, Any]) -> None:
        importance = dict(state["importance"])
        for name, basis in state["bases"].items():
            if name not in importance or importance[name].numel() != basis.shape[1]:
                got = None if name not in importance else importance[name].numel()
                raise ValueError(
                    f"SGPCallback: the checkpoint's basis of layer {name!r} has "
                    f"{basis.shape[1]} directions but {got} importances."
                )
        super()._load_extra_state(state)
        self._importance = importance
