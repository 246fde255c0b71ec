"""Experience Replay (Chaudhry et al., 2019, "On Tiny Episodic Memories in Continual Learning";
reservoir memory as in Riemer et al., 2019), in gradient form."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import torch
from torch import Tensor
from typing_extensions import override

from lightning_metagrad.baselines.memory import _ReplayCallback
from lightning_metagrad.boundaries.sources import BoundarySpec


class ERCallback(_ReplayCallback):
    r"""Experience Replay for any ``LightningModule``, written as a gradient edit.

    The memory is :class:`AGEMCallback`'s (``memory_batches`` stored batches shared evenly by
    the old tasks). From the second task on, before every optimizer step the gradient
    ``g_replay`` of the module's own ``training_step`` loss on one stored batch is computed (the
    same extra forward/backward as A-GEM's ``g_ref``) and the step uses

    .. math:: g \leftarrow \tfrac{1}{2} \left( g + g_{replay} \right),

    the gradient of ``(L_current + L_replay) / 2``: ER's joining of a memory batch to the
    current batch (equal sizes), in gradient terms, on the parameters the old tasks trained. A
    parameter they never trained (a new head, a layer unfrozen later) is free: its gradient
    reaches the optimizer unchanged. Two differences from concatenating the batches inside
    ``training_step``: the replayed pass runs in eval mode (no dropout, BatchNorm statistics
    untouched) with logging silenced, and the model needs no change. The
    average weighs the whole memory like one task, whatever the number of old tasks (not
    ``(g + t·g_old)/(t + 1)``), and halves the current task's share of the step; raise the
    learning rate to compensate if needed. Under DDP ``g_replay`` is averaged over ranks;
    non-finite gradients are passed to the optimizer untouched.

    Args:
        memory_batches: training batches stored for all old tasks together.
        seed: seed of the memory's generator (reservoir, shares and draws).
        task_boundaries: where a task ends, as for ``MetaGradCallback``: ``"fit"`` (each
            ``trainer.fit``), ``"batch"`` (a change of the batch's task id, consolidated
            before training on the new task's first batch), ``"manual"`` (:meth:`consolidate`
            by hand), a source, or a list of these; ``"auto"`` is refused (see the module).
        task_id_key: dict-batch key holding the task id, for ``task_boundaries="batch"``.
        task_id_fn: a function ``batch -> task id``, for ``task_boundaries="batch"``.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> er = ERCallback(memory_batches=8, seed=1)
        >>> trainer = Trainer(callbacks=[er], max_steps=1, logger=False)
        >>> er.state_key
        "ERCallback{'memory_batches': 8, 'seed': 1}"
    """

    _edit = "averages gradients"

    def __init__(
        self,
        *,
        memory_batches: int = 8,
        seed: int = 0,
        task_boundaries: BoundarySpec = "fit",
        task_id_key: str = "task_id",
        task_id_fn: Callable[[Any], Hashable] | None = None,
    ) -> None:
        super().__init__(
            memory_batches=memory_batches,
            seed=seed,
            task_boundaries=task_boundaries,
            task_id_key=task_id_key,
            task_id_fn=task_id_fn,
        )

    @override
    def _combine(self, grads: list[Tensor], reference: list[Tensor]) -> None:
        torch._foreach_add_(grads, reference)
        torch._foreach_mul_(grads, 0.5)
