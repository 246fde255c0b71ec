"""The episodic memory of A-GEM and ER, and the replayed-gradient machinery they share."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import apply_to_collection
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_metagrad._module_utils import loss_of, quiet_eval
from lightning_metagrad._validation import check_int, check_state_version
from lightning_metagrad.baselines._base import (
    _TaskCallback,
    all_finite,
    extra_pass_context,
)

_STATE_VERSION = 1


def _detached(batch: Any) -> Any:
    return apply_to_collection(batch, Tensor, lambda t: t.detach().clone())


class EpisodicMemory:
    """A constant-size memory of training batches, shared evenly by the old tasks.

    During a task, :meth:`observe` keeps ``capacity`` of its batches by reservoir sampling
    (every batch of the task has the same chance to be kept; kept batches are detached clones).
    At :meth:`end_task` they join the memory, and the old tasks share ``capacity`` batches in
    total: ``capacity // T`` each, the remainder going to the most recent tasks (a task keeps a
    random subset of its batches). With more old tasks than ``capacity``, each stored task
    holds one batch and the tasks themselves are reservoir-sampled, so every old task has the
    same chance ``capacity / T`` of being represented. All randomness comes from one seeded
    ``torch.Generator``, whose state is part of :meth:`state_dict`.

    Batches are stored as they came (e.g. on the training device); put only tensors, numbers,
    strings and lists/tuples/dicts of them in batches that must survive a checkpoint
    (``weights_only`` loading).

    Example:
        >>> memory = EpisodicMemory(capacity=4, seed=0)
        >>> for task in range(3):
        ...     for i in range(10):
        ...         memory.observe({"x": torch.full((2,), float(i)), "task": task})
        ...     memory.end_task()
        True
        True
        True
        >>> memory.num_batches, [len(batches) for batches in memory.tasks]
        (4, [1, 1, 2])
    """

    def __init__(self, capacity: int, seed: int = 0) -> None:
        self.capacity = check_int("capacity", capacity, minimum=1)
        self.generator = torch.Generator().manual_seed(check_int("seed", seed))
        #: The stored batches of each represented old task.
        self.tasks: list[list[Any]] = []
        #: Which task (0-based, in order of :meth:`end_task`) each entry of :attr:`tasks` is.
        self.task_ids: list[int] = []
        #: The current task's reservoir.
        self.current: list[Any] = []
        self.seen = 0  # batches of the current task observed
        self.tasks_ended = 0

    @property
    def num_batches(self) -> int:
        """Batches stored for the old tasks."""
        return sum(len(batches) for batches in self.tasks)

    def _randint(self, high: int) -> int:
        return int(torch.randint(high, (1,), generator=self.generator))

    def observe(self, batch: Any) -> None:
        """Offer one batch of the current task to the reservoir."""
        self.seen += 1
        if len(self.current) < self.capacity:
            self.current.append(_detached(batch))
            return
        slot = self._randint(self.seen)
        if slot < self.capacity:
            self.current[slot] = _detached(batch)

    def end_task(self) -> bool:
        """The current task's batches join the memory; False (nothing stored) if it had none."""
        if not self.current:
            return False
        order = torch.randperm(len(self.current), generator=self.generator).tolist()
        batches = [self.current[i] for i in order]  # any prefix is now a uniform subset
        task_id = self.tasks_ended
        self.tasks_ended += 1
        self.current, self.seen = [], 0
        if len(self.tasks) < self.capacity:
            self.tasks.append(batches)
            self.task_ids.append(task_id)
            count = len(self.tasks)
            base, extra = divmod(self.capacity, count)
            # The last `extra` tasks keep one batch more; quotas only shrink as tasks come.
            self.tasks = [b[: base + (i >= count - extra)] for i, b in enumerate(self.tasks)]
        else:  # one batch per stored task: reservoir sampling over the tasks
            slot = self._randint(self.tasks_ended)
            if slot < self.capacity:
                self.tasks[slot] = batches[:1]
                self.task_ids[slot] = task_id
        return True

    def sample(self, device: torch.device | None = None) -> tuple[Any, int] | None:
        """One stored batch drawn uniformly (on ``device``) and its index; None if empty."""
        flat = [batch for batches in self.tasks for batch in batches]
        if not flat:
            return None
        index = self._randint(len(flat))
        batch = flat[index]
        if device is not None:
            batch = apply_to_collection(batch, Tensor, lambda t: t.to(device))
        return batch, index

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "tasks": [list(batches) for batches in self.tasks],
            "task_ids": list(self.task_ids),
            "current": list(self.current),
            "seen": self.seen,
            "tasks_ended": self.tasks_ended,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state_version("EpisodicMemory", state, _STATE_VERSION, unversioned=1)
        self.tasks = [list(batches) for batches in state["tasks"]]
        self.task_ids = [int(i) for i in state["task_ids"]]
        self.current = list(state["current"])
        self.seen = int(state["seen"])
        self.tasks_ended = int(state["tasks_ended"])
        self.generator.set_state(state["generator"].cpu())


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

    def __init__(self, *, memory_batches: int, seed: int) -> None:
        super().__init__()
        self.memory_batches = check_int("memory_batches", memory_batches, minimum=1)
        self.seed = check_int("seed", seed)
        #: The stored batches (see :class:`EpisodicMemory`).
        self.memory = EpisodicMemory(self.memory_batches, self.seed)
        # Parameters (name -> shape) the old tasks trained, and those the current task trained
        # so far: only the former are edited.
        self._old_shapes: dict[str, tuple[int, ...]] = {}
        self._trained: dict[str, tuple[int, ...]] = {}
        self._params: dict[str, Tensor] = {}
        self._owner: pl.LightningModule | None = None
        self._warned_reference = False

    def _combine(self, grads: list[Tensor], reference: list[Tensor]) -> None:
        """Rewrite ``grads`` (the ``.grad`` tensors) in place given the replayed gradient."""
        raise NotImplementedError

    @override
    def _config(self) -> dict[str, Any]:
        return {"memory_batches": self.memory_batches, "seed": self.seed}

    @override
    def _end_task(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        dataloader: Iterable[Any] | None,
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
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self._owner is not pl_module:
            self._params = {n: p for n, p in pl_module.named_parameters() if p.requires_grad}
            self._owner = pl_module
        named = [(n, p) for n, p in self._params.items() if p.grad is not None]
        if not named:
            return
        self._steps_in_task += 1
        for n, p in named:
            if n not in self._trained:
                self._trained[n] = tuple(p.shape)
        # A parameter the old tasks never trained (in this shape) is free: left out.
        params = [p for n, p in named if self._old_shapes.get(n) == tuple(p.shape)]
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
            flat = torch.cat([r.reshape(-1).float() for r in reference])
            flag = torch.tensor([float(valid)], device=flat.device)
            flat = trainer.strategy.reduce(torch.cat([flat, flag]), reduce_op="mean")
            share = float(flat[-1])
            valid = share > 0
            if valid:
                pieces = (flat[:-1] / share).split([r.numel() for r in reference])
                reference = [x.view_as(r).to(r.dtype) for x, r in zip(pieces, reference)]
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

    @override
    def _release(self) -> None:
        self._params = {}
        self._owner = None


def flat_dot(a: list[Tensor], b: list[Tensor]) -> Tensor:
    """``Σ_i <a_i, b_i>`` over two tensor lists, in float32 (a 0-d tensor)."""
    return torch.stack(
        [torch.dot(x.reshape(-1).float(), y.reshape(-1).float()) for x, y in zip(a, b)]
    ).sum()
