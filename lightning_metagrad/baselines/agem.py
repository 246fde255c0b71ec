"""Averaged Gradient Episodic Memory (Chaudhry et al., ICLR 2019)."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import torch
from torch import Tensor
from typing_extensions import override

from lightning_metagrad.baselines.memory import _ReplayCallback, flat_dot
from lightning_metagrad.boundaries.sources import BoundarySpec


class AGEMCallback(_ReplayCallback):
    r"""A-GEM (Chaudhry et al., 2019, "Efficient Lifelong Learning with A-GEM") for any
    ``LightningModule``.

    Keeps an episodic memory of old-task training batches (:class:`EpisodicMemory`:
    ``memory_batches`` batches in total, shared evenly by the old tasks, reservoir-sampled
    within each task). From the second task on, before every optimizer step it computes the
    reference gradient ``g_ref`` of the module's own ``training_step`` loss on one stored batch
    (drawn uniformly with a seeded generator; eval mode, logging silenced, ``.grad`` untouched)
    and, if the task gradient ``g`` conflicts with it, projects (A-GEM, eq. 11)

    .. math:: g \leftarrow g - \frac{g^\top g_{ref}}{g_{ref}^\top g_{ref}} \, g_{ref}
              \quad \text{if } g^\top g_{ref} < 0,

    the dot products taken over the parameters that have a gradient and that the old tasks
    trained, so that afterwards ``g·g_ref = 0``: to first order the step does not increase the
    memory loss. Otherwise ``g`` is left alone. A parameter the old tasks never trained (a new
    head, a layer unfrozen later) is free: its gradient reaches the optimizer unchanged. Costs
    one extra forward/backward per step; under DDP ``g_ref`` is averaged over ranks.
    Non-finite gradients are passed to the optimizer untouched.

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
        >>> agem = AGEMCallback(memory_batches=8)
        >>> trainer = Trainer(callbacks=[agem], max_steps=1, logger=False)
        >>> agem.num_tasks, agem.num_projections, agem.memory.num_batches
        (0, 0, 0)
    """

    _edit = "projects gradients"

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
        #: Optimizer steps on which the gradient was projected (it conflicted with ``g_ref``).
        self.num_projections = 0

    @override
    def _combine(self, grads: list[Tensor], reference: list[Tensor]) -> None:
        dot, ref_sq = torch.stack([flat_dot(grads, reference), flat_dot(reference, reference)])
        dot_f, ref_sq_f = float(dot), float(ref_sq)
        if dot_f >= 0 or ref_sq_f <= 0:
            return
        torch._foreach_add_(grads, reference, alpha=-dot_f / ref_sq_f)
        self.num_projections += 1

    @override
    def _extra_state(self) -> dict:
        return {**super()._extra_state(), "num_projections": self.num_projections}

    @override
    def _load_extra_state(self, state: dict) -> None:
        super()._load_extra_state(state)
        self.num_projections = int(state["num_projections"])
