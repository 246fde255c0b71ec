"""Elastic Weight Consolidation (Kirkpatrick et al., 2017) and its online variant
(Schwarz et al., 2018, "Progress & Compress")."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import lightning.pytorch as pl
import torch
from typing_extensions import override

from lightning_metagrad._module_utils import loss_of
from lightning_metagrad._validation import check_fraction, check_int
from lightning_metagrad.baselines._base import Params, TaskData, TensorDict
from lightning_metagrad.baselines._penalty import _QuadraticPenaltyCallback
from lightning_metagrad.boundaries.sources import BoundarySpec


class _FisherMixin(_QuadraticPenaltyCallback):
    fisher_batches: int

    @override
    def _task_importance(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, params: Params, data: TaskData
    ) -> TensorDict:
        # Batch-level empirical Fisher: F = mean over batches b of (∂L_b/∂θ)², L_b the module's
        # own training loss on batch b (true labels, not sampled ones). It is about
        # 1/batch_size of the per-sample Fisher; `strength` absorbs the constant.
        def loss(batch: Any, batch_idx: int) -> torch.Tensor | None:
            return loss_of(pl_module.training_step(batch, batch_idx))

        return self._data_importance(
            trainer, pl_module, params, data, self.fisher_batches, loss, absolute=False
        )

    @override
    def _data_batches(self) -> int:
        return self.fisher_batches


class EWCCallback(_FisherMixin):
    r"""Elastic Weight Consolidation (Kirkpatrick et al., 2017) for any ``LightningModule``.

    After each task ``i`` (each ``trainer.fit``) the diagonal Fisher ``F_i`` and the parameters
    ``θ*_i`` are stored; later training is regularised by (Kirkpatrick et al., eq. 3, summed
    over old tasks)

    .. math:: R(\theta) = \sum_i \frac{\lambda}{2} \sum_k F_{i,k} (\theta_k - \theta^*_{i,k})^2

    by adding ``λ · Σ_i F_i (θ − θ*_i)`` to the gradients before each optimizer step. Memory
    grows by two parameter copies per task (that is EWC; see :class:`OnlineEWCCallback`).

    ``F`` is the batch-level empirical Fisher: the mean over ``fisher_batches`` training
    batches of the squared gradient of the module's own ``training_step`` loss, computed in
    eval mode with ``self.log`` silenced and the global RNG state restored afterwards.

    Args:
        strength: λ. 0 makes the callback a no-op (bit-identical training).
        fisher_batches: training batches averaged for the Fisher at each task end.
        task_boundaries: where a task ends, as for ``MetaGradCallback``: ``"fit"`` (each
            ``trainer.fit``), ``"batch"`` (a change of the batch's task id, consolidated
            before training on the new task's first batch), ``"manual"`` (:meth:`consolidate`
            by hand), a source, or a list of these; ``"auto"`` is refused (see the module).
        task_id_key: dict-batch key holding the task id, for ``task_boundaries="batch"``.
        task_id_fn: a function ``batch -> task id``, for ``task_boundaries="batch"``.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> ewc = EWCCallback(strength=100.0)
        >>> trainer = Trainer(callbacks=[ewc], max_steps=1, logger=False)
        >>> ewc.num_tasks, ewc.state_key
        (0, "EWCCallback{'strength': 100.0, 'fisher_batches': 32}")
    """

    def __init__(
        self,
        *,
        strength: float = 100.0,
        fisher_batches: int = 32,
        task_boundaries: BoundarySpec = "fit",
        task_id_key: str = "task_id",
        task_id_fn: Callable[[Any], Hashable] | None = None,
    ) -> None:
        super().__init__(
            strength=strength,
            task_boundaries=task_boundaries,
            task_id_key=task_id_key,
            task_id_fn=task_id_fn,
        )
        self.fisher_batches = check_int("fisher_batches", fisher_batches, minimum=1)

    @override
    def _config(self) -> dict[str, Any]:
        return {"strength": self.strength, "fisher_batches": self.fisher_batches}

    @override
    def _merge(self, anchors: TensorDict, importance: TensorDict) -> None:
        self._terms.append((anchors, importance))  # one (θ*_i, F_i) per task


class OnlineEWCCallback(_FisherMixin):
    r"""Online EWC (Schwarz et al., 2018, "Progress & Compress") for any ``LightningModule``.

    One anchor and one running Fisher: at the end of each task ``F ← γ·F + F_new`` and
    ``θ* ← θ_end``; later training is regularised by

    .. math:: R(\theta) = \frac{\lambda}{2} \sum_k F_k (\theta_k - \theta^*_k)^2

    (gradient ``λ · F (θ − θ*)``, added before each optimizer step). Memory stays constant.
    ``F_new`` is the same batch-level empirical Fisher as in :class:`EWCCallback`.

    Args:
        strength: λ. 0 makes the callback a no-op (bit-identical training).
        gamma: γ in (0, 1], the decay of the old Fisher (1 = no forgetting of importance).
        fisher_batches: training batches averaged for the Fisher at each task end.
        task_boundaries: where a task ends, as for ``MetaGradCallback``: ``"fit"`` (each
            ``trainer.fit``), ``"batch"`` (a change of the batch's task id, consolidated
            before training on the new task's first batch), ``"manual"`` (:meth:`consolidate`
            by hand), a source, or a list of these; ``"auto"`` is refused (see the module).
        task_id_key: dict-batch key holding the task id, for ``task_boundaries="batch"``.
        task_id_fn: a function ``batch -> task id``, for ``task_boundaries="batch"``.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> online = OnlineEWCCallback(strength=100.0, gamma=0.9)
        >>> trainer = Trainer(callbacks=[online], max_steps=1, logger=False)
        >>> online.gamma, online.num_tasks
        (0.9, 0)
    """

    def __init__(
        self,
        *,
        strength: float = 100.0,
        gamma: float = 1.0,
        fisher_batches: int = 32,
        task_boundaries: BoundarySpec = "fit",
        task_id_key: str = "task_id",
        task_id_fn: Callable[[Any], Hashable] | None = None,
    ) -> None:
        super().__init__(
            strength=strength,
            task_boundaries=task_boundaries,
            task_id_key=task_id_key,
            task_id_fn=task_id_fn,
        )
        self.gamma = check_fraction("gamma", gamma)
        self.fisher_batches = check_int("fisher_batches", fisher_batches, minimum=1)

    @override
    def _config(self) -> dict[str, Any]:
        return {
            "strength": self.strength,
            "gamma": self.gamma,
            "fisher_batches": self.fisher_batches,
        }

    @override
    def _merge(self, anchors: TensorDict, importance: TensorDict) -> None:
        self._fold(anchors, importance, decay=self.gamma)  # F ← γF + F_new, θ* ← θ_end
