"""Memory Aware Synapses (Aljundi et al., 2018)."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from typing_extensions import override

from lightning_metagrad._module_utils import quiet_eval
from lightning_metagrad._validation import check_int
from lightning_metagrad.baselines._base import Params, TaskData, TensorDict, extra_pass_context
from lightning_metagrad.baselines._penalty import _QuadraticPenaltyCallback
from lightning_metagrad.boundaries.sources import BoundarySpec

_OVERRIDE = (
    "subclass MASCallback and override `forward_batch(self, pl_module, batch)` to return the "
    "model's output for a training batch (e.g. `return pl_module.net(batch[0])`)"
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
    models whose forward does not take the input tensor. A fit refuses at its start a module
    without ``forward()`` (unless ``forward_batch`` is overridden), and tries
    :meth:`forward_batch` on its first training batch (eval mode, no gradient), so that a batch
    it cannot read fails then rather than at the end of the task.

    Args:
        strength: λ. 0 makes the callback a no-op (bit-identical training).
        importance_batches: training batches averaged for Ω at each task end.
        task_boundaries: where a task ends, as for ``MetaGradCallback``: ``"fit"`` (each
            ``trainer.fit``), ``"batch"`` (a change of the batch's task id, consolidated
            before training on the new task's first batch), ``"manual"`` (:meth:`consolidate`
            by hand), a source, or a list of these; ``"auto"`` is refused (see the module).
        task_id_key: dict-batch key holding the task id, for ``task_boundaries="batch"``.
        task_id_fn: a function ``batch -> task id``, for ``task_boundaries="batch"``.

    Example:
        >>> import torch
        >>> from lightning.pytorch import Trainer
        >>> mas = MASCallback(strength=1.0)
        >>> trainer = Trainer(callbacks=[mas], max_steps=1, logger=False)
        >>> mas.forward_batch(torch.nn.Linear(2, 3), {"x": torch.ones(4, 2)}).shape
        torch.Size([4, 3])
    """

    def __init__(
        self,
        *,
        strength: float = 1.0,
        importance_batches: int = 32,
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
        self.importance_batches = check_int("importance_batches", importance_batches, minimum=1)
        self._output_checked = False  # forward_batch tried on this fit's first batch

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
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        overridden = type(self).forward_batch is not MASCallback.forward_batch
        if not overridden and type(pl_module).forward is pl.LightningModule.forward:
            raise MisconfigurationException(
                f"MASCallback computes the model output f(x) at each task end with "
                f"`pl_module(x)`, but {type(pl_module).__name__} defines no `forward()` (its "
                "training_step calls its layers directly). Define `forward(self, x)` on the "
                f"module, or {_OVERRIDE}."
            )
        super().on_fit_start(trainer, pl_module)
        self._output_checked = False

    @override
    def _data_batches(self) -> int:
        return self.importance_batches

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        if self._output_checked:
            return
        self._output_checked = True
        # The importance needs f(x) at the task end: a batch layout or forward signature that
        # does not fit should fail now, not after the whole task trained.
        with quiet_eval(pl_module), extra_pass_context(trainer), torch.no_grad():
            try:
                out = self.forward_batch(pl_module, batch)
            except Exception as err:
                if isinstance(err, torch.OutOfMemoryError) or "forward_batch" in str(err):
                    raise  # not a layout problem, or already says what to do
                raise MisconfigurationException(
                    f"MASCallback could not compute the model output on a training batch "
                    f"({type(err).__name__}: {err}); it needs it for the importances at the end "
                    f"of the task. Make `pl_module(x)` accept the batch input, or {_OVERRIDE}."
                ) from err
        if not isinstance(out, Tensor):
            raise TypeError(
                f"MASCallback.forward_batch must return a tensor, got {type(out).__name__}; "
                "override it to pick the output tensor."
            )

    @override
    def _task_importance(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, params: Params, data: TaskData
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
            data,
            self.importance_batches,
            squared_norm,
            absolute=True,
        )

    @override
    def _merge(self, anchors: TensorDict, importance: TensorDict) -> None:
        self._fold(anchors, importance)  # Ω ← Ω + Ω_new, θ* ← θ_end
