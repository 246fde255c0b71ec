"""The real mean old-task gradient, from an episodic memory of old training batches."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_metagrad._tensors import same_shape
from lightning_metagrad._validation import (
    check_float,
    check_int,
    check_state_version,
)
from lightning_metagrad.matrices import MatrixGroup
from lightning_metagrad.predictors.base import OldGradientPredictor, Prediction
from lightning_metagrad.replay_memory import ReplayMemory


class ReplayPredictor(OldGradientPredictor):
    """The real mean old-task gradient from an episodic memory of old training batches.

    The memory is A-GEM's and ER's :class:`~lightning_metagrad.replay_memory.ReplayMemory`:
    during a task, ``memory_batches`` of its batches are kept by reservoir sampling; at a
    boundary they join the memory, and the total stays at ``memory_batches`` batches shared
    evenly by the old tasks (constant memory; with more old tasks than ``memory_batches``, a
    uniform sample of them is represented, one batch each). Every ``refresh_every`` steps the
    gradient of the module's own ``training_step`` loss on each old task's batches is computed
    (eval mode, logging silenced, ``.grad`` untouched), averaged over the represented old tasks
    (eq. 2's mean) and reused until the next refresh. Under DDP each rank's estimate is
    averaged over ranks.

    ``free_below``: a magnitude-aware eq. 5. Coordinates whose old-task gradient is small carry
    no real constraint from the old tasks, so the rule keeps the current gradient there: those
    with ``|old_j| <= free_below * mean(|old|)`` (the mean over all parameters). ``0`` frees
    exactly-zero entries only (an input that is 0 in every stored sample, a dead ReLU);
    ``None`` applies eq. 5 literally. The default's choice is in ``docs/science.md``.

    Example:
        >>> ReplayPredictor(memory_batches=8, refresh_every=10).num_old_tasks
        0
    """

    needs_batch_loss = True

    #: Version 2 nests the memory's own state under ``"memory"``; version 1 (flat ``memory``,
    #: ``current``, ``seen`` and ``generator`` entries) still loads.
    _state_version = 2

    def __init__(
        self,
        memory_batches: int = 8,
        refresh_every: int = 10,
        seed: int = 0,
        free_below: float | None = 4.0,
    ) -> None:
        self.free_below = check_float("free_below", free_below, minimum=0, optional=True)
        self.memory_batches = check_int("memory_batches", memory_batches, minimum=1)
        self.refresh_every = check_int("refresh_every", refresh_every, minimum=1)
        #: The stored batches (shared evenly by the old tasks) and the current task's reservoir.
        self.replay_memory = ReplayMemory(self.memory_batches, check_int("seed", seed))
        self._calls = 0
        self._cached: dict[str, Tensor] | None = None  # the old gradient in use, by name
        self._trusted: dict[str, Tensor] | None = None
        self._params: dict[str, Tensor] = {}

    @property
    def num_old_tasks(self) -> int:
        return self.replay_memory.tasks_ended

    @property
    def memory(self) -> list[list[Any]]:
        """The stored batches of each represented old task."""
        return self.replay_memory.tasks

    @property
    def current(self) -> list[Any]:
        """The current task's reservoir of batches."""
        return self.replay_memory.current

    def bind(
        self,
        params: Mapping[str, Tensor],
        groups: Sequence[MatrixGroup] | None = None,
        modules: Mapping[str, nn.Module] | None = None,
    ) -> None:
        self._params = {n: p for n, p in params.items() if p.requires_grad}

    def observe_batch(self, batch: Any) -> None:
        self.replay_memory.observe(batch)

    def observe(
        self,
        names: Sequence[str],
        thetas: Sequence[Tensor],
        targets: Sequence[Tensor],
        finite: Tensor | None = None,
    ) -> dict[str, Tensor]:
        return {}

    def end_task(self, names: Sequence[str], thetas: Sequence[Tensor]) -> None:
        if not self.replay_memory.end_task():
            raise RuntimeError("the task ended before any batch was stored")
        self._cached, self._trusted = None, None

    def predict(self, names: Sequence[str], thetas: Sequence[Tensor]) -> list[Prediction]:
        if not self.memory:
            return [None] * len(thetas)
        # One call per step: recompute every `refresh_every` calls.
        if self._cached is None or self._calls % self.refresh_every == 0:
            self._cached = self._old_gradient()
            self._trusted = self._constrained(self._cached)
        self._calls += 1
        cached, trusted = self._cached, self._trusted
        out: list[Prediction] = []
        for name, theta in zip(names, thetas):
            old = cached.get(name)
            if old is None or not same_shape(old, theta):
                out.append(None)  # a parameter the memory's loss does not reach: free
                continue
            if old.device != theta.device:  # restored from a checkpoint saved on the CPU
                old = cached[name] = old.to(theta.device)
                if trusted is not None:
                    trusted[name] = trusted[name].to(theta.device)
            out.append((old, None if trusted is None else trusted[name]))
        return out

    def _constrained(self, old: dict[str, Tensor]) -> dict[str, Tensor] | None:
        """Where the old tasks constrain the update (the rule's "trusted" mask), by name."""
        if self.free_below is None:
            return None
        if self.free_below == 0:
            return {n: g.abs() > 0 for n, g in old.items()}
        total = sum(g.numel() for g in old.values())
        mean = sum(g.abs().sum() for g in old.values()) / max(total, 1)
        return {n: g.abs() > self.free_below * mean for n, g in old.items()}

    def _old_gradient(self) -> dict[str, Tensor]:
        batch_loss = self.runtime.batch_loss
        if batch_loss is None:
            raise RuntimeError(
                "ReplayPredictor needs the loss of a stored batch: pass "
                "`MetaGrad(..., batch_loss=fn)` (fn(batch) -> loss tensor), or use "
                "MetaGradCallback, which evaluates the module's own training_step"
            )
        names = list(self._params)
        params = list(self._params.values())
        total = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        reached = [False] * len(params)
        for batches in self.memory:
            for batch in batches:
                with torch.enable_grad():
                    loss = batch_loss(batch)
                    if loss is None:
                        continue
                    grads = torch.autograd.grad(loss, params, allow_unused=True)
                scale = 1.0 / (len(batches) * len(self.memory))
                for k, (acc, g) in enumerate(zip(total, grads)):
                    if g is not None:
                        acc.add_(g.float(), alpha=scale)
                        reached[k] = True
        total = [self.runtime.mean(t) for t in total]
        return {n: t for n, t, r in zip(names, total, reached) if r}

    def state_dict(self) -> dict:
        return {
            "version": self._state_version,
            "memory": self.replay_memory.state_dict(),
            "calls": self._calls,
            # The old gradient in use until the next refresh (so a resumed run rewrites the
            # same gradients as the uninterrupted one, not a fresh one at resumed weights).
            "cached": None
            if self._cached is None
            else {n: t.detach().cpu().clone() for n, t in self._cached.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        check_state_version(type(self).__name__, state, (1, self._state_version), unversioned=1)
        memory = state["memory"]
        if state.get("version", 1) == 1:  # the flat layout: no task was ever dropped
            memory = {
                "tasks": memory,
                "task_ids": list(range(len(memory))),
                "current": state["current"],
                "seen": state["seen"],
                "tasks_ended": len(memory),
                "generator": state["generator"],
            }
        self.replay_memory.load_state_dict(memory)
        self._calls = int(state["calls"])
        self._cached = None if state["cached"] is None else dict(state["cached"])
        self._trusted = None if self._cached is None else self._constrained(self._cached)
