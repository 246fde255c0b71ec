"""The replay memory of A-GEM and ER (:class:`EpisodicMemory`, the package's one
:class:`~lightning_metagrad.replay_memory.ReplayMemory`), and the replayed-gradient machinery
they share."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_metagrad._module_utils import loss_of, quiet_eval
from lightning_metagrad._tensors import all_finite, same_shape
from lightning_metagrad._validation import check_int
from lightning_metagrad.baselines._base import (
    TaskData,
    _TaskCallback,
    extra_pass_context,
    mean_over_ranks,
)
from lightning_metagrad.boundaries.sources import BoundarySpec
from lightning_metagrad.replay_memory import ReplayMemory

#: The memory of A-GEM and ER: :class:`~lightning_metagrad.replay_memory.ReplayMemory` (the
#: memory of ``ReplayPredictor`` too), under the name it has had here.
EpisodicMemory = ReplayMemory


class _ReplayCallback(_TaskCallback):
    """Base of A-GEM and ER: the episodic memory and one replayed gradient per step.

    Every training batch is offered to :attr:`memory` (``on_train_batch_end``); a task end
    adds the task's reservoir to it. From the second task on, every optimizer step
    (``on_before_optimizer_step``: once per real step, after AMP unscaling and the whole
    accumulation window, before clipping) draws one stored batch and computes ``g_ref``, the
    gradient of the module's own ``training_step`` loss on it w.r.t. the parameters that have
    a gradient, in eval mode with ``self.log`` silenced and the global RNG state restored
    (``.grad`` untouched; full precision under AMP). Under DDP ``g_ref`` is averaged over the
    ranks (each rank replays its own memory). Subclasses combine it with the task gradient in
    :meth:`_combine`. Only parameters the old tasks trained (had a gradient in them, in the
    same shape) take part: one they never trained (a new head, a layer unfrozen later, a tensor
    that changed shape) keeps its gradient, as does one without a gradient on the step. A step
    whose gradient is non-finite is passed on untouched (so an AMP scaler still sees the inf/NaN
    and skips it); a non-finite ``g_ref`` skips the edit.
    """

    def __init__(
        self,
        *,
        memory_batches: int,
        seed: int,
        task_boundaries: BoundarySpec = "fit",
        task_id_key: str = "task_id",
        task_id_fn: Callable[[Any], Hashable] | None = None,
    ) -> None:
        super().__init__(
            task_boundaries=task_boundaries,
            task_id_key=task_id_key,
            task_id_fn=task_id_fn,
        )
        self.memory_batches = check_int("memory_batches", memory_batches, minimum=1)
        self.seed = check_int("seed", seed)
        #: The stored batches (see :class:`~lightning_metagrad.replay_memory.ReplayMemory`).
        self.memory = ReplayMemory(self.memory_batches, self.seed)
        # Parameters (name -> shape) the old tasks trained, and those the current task trained
        # so far: only the former are edited.
        self._old_shapes: dict[str, tuple[int, ...]] = {}
        self._trained: dict[str, tuple[int, ...]] = {}
        self._warned_reference = False

    def _combine(self, grads: list[Tensor], reference: list[Tensor]) -> None:
        """Rewrite ``grads`` (the ``.grad`` tensors) in place given the replayed gradient."""
        raise NotImplementedError

    @override
    def _config(self) -> dict[str, Any]:
        return {"memory_batches": self.memory_batches, "seed": self.seed}

    @override
    def _end_task(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, dataloader: TaskData
    ) -> None:
        if not self.memory.end_task():
            rank_zero_warn(
                f"{type(self).__name__}: no training batch was seen in this task; it adds "
                "nothing to the memory."
            )
        self._old_shapes.update(self._trained)
        self._trained = {}

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self.memory.observe(batch)

    @override
    def _edit_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, names: list[str]
    ) -> None:
        live = [self._params[n] for n in names]
        for n, p in zip(names, live):
            self._trained.setdefault(n, tuple(p.shape))
        # A parameter the old tasks never trained (in this shape) is free: left out.
        params = [p for n, p in zip(names, live) if same_shape(self._old_shapes.get(n), p)]
        if not params:
            return  # first task (nothing to replay), or only new parameters on this step
        drawn = self.memory.sample(pl_module.device)
        if drawn is None:
            return
        grads: list[Tensor] = [p.grad for p in params]  # type: ignore[misc]
        if not all_finite(grads):
            return  # identical on every DDP rank (synced gradients): no collective skipped
        reference = self._reference(trainer, pl_module, params, *drawn)
        if reference is None:
            return
        with torch.no_grad():
            self._combine(grads, reference)

    def _reference(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        params: list[Tensor],
        batch: Any,
        index: int,
    ) -> list[Tensor] | None:
        """``g_ref`` on ``batch`` (averaged over ranks), or None when there is none to use."""
        with quiet_eval(pl_module), extra_pass_context(trainer):
            loss = loss_of(pl_module.training_step(batch, index))
            valid = loss is not None and loss.requires_grad
            grads = (
                torch.autograd.grad(loss, params, allow_unused=True)  # type: ignore[arg-type]
                if valid
                else [None] * len(params)
            )
        reference = [
            torch.zeros_like(p) if g is None else g.detach().to(p.dtype)
            for p, g in zip(params, grads)
        ]
        if trainer.world_size > 1:
            # One all-reduce: the gradients and how many ranks had a loss (a rank without one
            # contributes zeros and is left out of the mean).
            flag = torch.tensor([float(valid)], device=reference[0].device)
            *means, share_of = mean_over_ranks(trainer, [*(r.float() for r in reference), flag])
            share = float(share_of)
            valid = share > 0
            if valid:
                reference = [(m / share).to(r.dtype) for m, r in zip(means, reference)]
        if not valid:
            return None
        if not all_finite(reference):
            if not self._warned_reference:
                rank_zero_warn(
                    f"{type(self).__name__}: the replayed gradient on a memory batch is not "
                    "finite; such steps use the current gradient unchanged."
                )
                self._warned_reference = True
            return None
        return reference

    @override
    def _extra_state(self) -> dict[str, Any]:
        return {
            "memory": self.memory.state_dict(),
            "old_shapes": {n: list(s) for n, s in self._old_shapes.items()},
            "trained": {n: list(s) for n, s in self._trained.items()},
        }

    @override
    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.memory.load_state_dict(state["memory"])
        self._old_shapes = {n: tuple(int(x) for x in s) for n, s in state["old_shapes"].items()}
        self._trained = {n: tuple(int(x) for x in s) for n, s in state["trained"].items()}


def flat_dot(a: list[Tensor], b: list[Tensor]) -> Tensor:
    """``Σ_i <a_i, b_i>`` over two tensor lists, in float32 (a 0-d tensor).

    Example:
        >>> flat_dot([torch.ones(2), torch.ones(2, 2)], [torch.full((2,), 2.0), torch.eye(2)])
        tensor(6.)
    """
    return torch.stack(
        [torch.dot(x.reshape(-1).float(), y.reshape(-1).float()) for x, y in zip(a, b)]
    ).sum()
