"""Memory Aware Synapses (Aljundi et al., 2018)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from lightning_metagrad.baselines._base import (
    TensorDict,
    _QuadraticPenaltyCallback,
    check_positive_int,
)


class MASCallback(_QuadraticPenaltyCallback):
    r"""Memory Aware Synapses (Aljundi et al., 2018) for any ``LightningModule``.

    At the end of each task the importance of each parameter is the mean sensitivity of the
    squared L2 norm of the model's output (Aljundi et al., eqs. 2-4)

    .. math:: \Omega_k = \operatorname{mean}_x \left| \frac{\partial \|f(x)\|_2^2}
              {\partial \theta_k} \right|

    — no labels needed. Importances are **summed** over tasks (``Ω ← Ω + Ω_new``, the paper's
    accumulation) and the anchor is the end of the latest task (``θ* ← θ_end``); later
    training is regularised by

    .. math:: R(\theta) = \frac{\lambda}{2} \sum_k \Omega_k (\theta_k - \theta^*_k)^2

    whose gradient ``λ · Ω (θ − θ*)`` is added before each optimizer step.

    The mean is batch-level: over ``importance_batches`` training batches, ``|∂ mean_batch
    ||f(x)||² / ∂θ|`` (cheaper than per-sample gradients, and a lower bound of the per-sample
    mean). Outputs come from :meth:`forward_batch`; override it for other batch layouts or
    models whose forward does not take the input tensor.

    Args:
        strength: λ. 0 makes the callback a no-op (bit-identical training).
        importance_batches: training batches averaged for Ω at each task end.

    Example:
        >>> import torch
        >>> from lightning.pytorch import Trainer
        >>> mas = MASCallback(strength=1.0)
        >>> trainer = Trainer(callbacks=[mas], max_steps=1, logger=False)
        >>> mas.forward_batch(torch.nn.Linear(2, 3), {"x": torch.ones(4, 2)}).shape
        torch.Size([4, 3])
    """

    def __init__(self, *, strength: float = 1.0, importance_batches: int = 32) -> None:
        super().__init__(strength=strength)
        self.importance_batches = check_positive_int("importance_batches", importance_batches)

    def forward_batch(self, pl_module: torch.nn.Module, batch: Any) -> Tensor:
        """The model's output ``f(x)`` for a training batch (already on the module's device).

        Default: ``pl_module(batch["x"])`` for dict batches, ``pl_module(batch[0])`` for tuple
        and list batches. Override it for any other layout.
        """
        if isinstance(batch, Mapping) and "x" in batch:
            return pl_module(batch["x"])
        if isinstance(batch, (tuple, list)) and len(batch) > 0:
            return pl_module(batch[0])
        raise TypeError(
            f"{type(self).__name__}.forward_batch cannot find the model input in a batch of type "
            f"{type(batch).__name__} (it handles dicts with an 'x' key and tuples/lists whose "
            "first item is the input). Subclass and override `forward_batch(self, pl_module, "
            "batch)` to return the model's output for your batches."
        )

    @override
    def _config(self) -> dict[str, Any]:
        return {"strength": self.strength, "importance_batches": self.importance_batches}

    @override
    def _task_importance(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        params: dict[str, torch.nn.Parameter],
        dataloader: Iterable[Any] | None,
    ) -> TensorDict:
        def squared_norm(batch: Any, batch_idx: int) -> Tensor:
            out = self.forward_batch(pl_module, batch)
            if not isinstance(out, Tensor):
                raise TypeError(
                    f"{type(self).__name__}.forward_batch must return a tensor, got "
                    f"{type(out).__name__}; override it to pick the output tensor."
                )
            out = out.float()
            per_sample = out.reshape(out.shape[0], -1) if out.dim() > 1 else out.reshape(-1, 1)
            return per_sample.square().sum(1).mean()  # mean over the batch of ||f(x)||²

        return self._data_importance(
            trainer,
            pl_module,
            params,
            dataloader,
            self.importance_batches,
            squared_norm,
            absolute=True,
        )

    @override
    def _merge(self, anchors: TensorDict, importance: TensorDict) -> None:
        self._fold(anchors, importance)  # Ω ← Ω + Ω_new, θ* ← θ_end
