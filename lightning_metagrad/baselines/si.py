"""Synaptic Intelligence (Zenke, Poole & Ganguli, 2017)."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_metagrad._validation import check_float
from lightning_metagrad.baselines._base import Params, TaskData, TensorDict
from lightning_metagrad.baselines._penalty import _QuadraticPenaltyCallback
from lightning_metagrad.boundaries.sources import BoundarySpec


class SICallback(_QuadraticPenaltyCallback):
    r"""Synaptic Intelligence (Zenke et al., 2017) for any ``LightningModule``.

    During a task the path integral of each parameter is accumulated at every optimizer step
    (Zenke et al., eq. 3)

    .. math:: \omega_k \mathrel{+}= -g_k \, \Delta\theta_k

    with ``g`` the gradient of the task loss *without* the penalty (as seen in
    ``on_before_optimizer_step``) and ``Δθ`` the parameter change the optimizer really made
    (momentum, penalty, clipping and weight decay included; steps skipped by the AMP scaler do
    not count). At the end of each task (eq. 5)

    .. math:: \Omega_k \mathrel{+}= \frac{\omega_k}{(\theta_k^{end} - \theta_k^{start})^2 + \xi},
              \qquad \theta^* \leftarrow \theta^{end}

    and later training is regularised by the paper's surrogate loss (eq. 4, no 1/2)

    .. math:: R(\theta) = c \sum_k \Omega_k (\theta_k - \theta^*_k)^2

    whose gradient ``2c · Ω (θ − θ*)`` is added before each optimizer step. As in the paper,
    ω (hence Ω) is not clipped at zero.

    Args:
        strength: c. 0 makes the callback a no-op (bit-identical training).
        damping: ξ > 0, keeps Ω finite for parameters that hardly moved (larger ξ = smaller Ω).
        task_boundaries: where a task ends, as for ``MetaGradCallback``: ``"fit"`` (each
            ``trainer.fit``), ``"batch"`` (a change of the batch's task id, consolidated
            before training on the new task's first batch), ``"manual"`` (:meth:`consolidate`
            by hand), a source, or a list of these; ``"auto"`` is refused (see the module).
        task_id_key: dict-batch key holding the task id, for ``task_boundaries="batch"``.
        task_id_fn: a function ``batch -> task id``, for ``task_boundaries="batch"``.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> si = SICallback(strength=1.0, damping=0.1)
        >>> trainer = Trainer(callbacks=[si], max_steps=1, logger=False)
        >>> si.grad_scale  # the gradient is 2c·Ω(θ − θ*)
        2.0
    """

    _importance_is_rank_local = False  # gradients are synced and parameters identical in DDP
    _non_finite_importance = (
        "Its path integral -g·Δθ met a NaN/inf gradient or overflowed during the task: keep "
        "the loss finite (lower learning rate, gradient clipping) and restart the task from a "
        "checkpoint (`fit(..., ckpt_path=...)`, which restores the path integral too)."
    )

    def __init__(
        self,
        *,
        strength: float = 1.0,
        damping: float = 0.1,
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
        self.damping = check_float("damping", damping, minimum=0, low_open=True)
        self._omega: TensorDict = {}  # path integral of the current task
        self._start: TensorDict | None = None  # θ at the current task's first step
        self._pending: tuple[list[str], list[Tensor], list[Tensor], list[Tensor]] | None = None
        self._hook_handle: Any = None

    @property
    @override
    def grad_scale(self) -> float:
        return 2.0 * self.strength

    @property
    def path_integral(self) -> TensorDict:
        """ω of the current task so far, by parameter name (empty before its first step)."""
        return self._omega

    @override
    def _config(self) -> dict[str, Any]:
        return {"strength": self.strength, "damping": self.damping}

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        for store in (self._omega, self._start or {}):  # e.g. restored from a CPU checkpoint
            for name, value in store.items():
                if name in self._params:
                    store[name] = value.to(self._params[name].device)
        # Fires only when the optimizer really stepped (not on AMP-skipped steps), after it.
        self._hook_handle = trainer.optimizers[0].register_step_post_hook(self._after_step)

    @override
    def _on_task_gradient(
        self, trainer: pl.Trainer, names: list[str], params: list[Tensor], grads: list[Tensor]
    ) -> None:
        if self._start is None:
            # Clones: on CPU `p.detach().cpu()` would be a live view and Δθ always 0.
            self._start = {n: p.detach().clone() for n, p in self._params.items()}
            self._omega = {
                n: torch.zeros_like(p, dtype=torch.float32) for n, p in self._params.items()
            }
        with torch.no_grad():
            neg_grads = list(torch._foreach_neg([g.detach() for g in grads]))  # new tensors
            before = [p.detach().clone() for p in params]
        self._pending = (names, params, neg_grads, before)

    def _after_step(self, optimizer: torch.optim.Optimizer, *args: Any) -> None:
        if self._pending is None:
            return
        names, params, neg_grads, before = self._pending
        self._pending = None
        with torch.no_grad():
            delta = torch._foreach_sub([p.detach() for p in params], before)  # actual Δθ
            torch._foreach_mul_(delta, neg_grads)  # −g · Δθ
            for name, p in zip(names, params):
                if name not in self._omega:  # unfrozen in the middle of the task
                    self._omega[name] = torch.zeros_like(p, dtype=torch.float32)
            torch._foreach_add_([self._omega[n] for n in names], delta)

    @override
    def _task_importance(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, params: Params, data: TaskData
    ) -> TensorDict:
        if self._start is None:
            rank_zero_warn(
                "SICallback: the task ended before any optimizer step; it adds zero importance."
            )
        importance: TensorDict = {}
        for name, p in params.items():
            omega = self._omega.get(name)
            start = None if self._start is None else self._start.get(name)
            if omega is None or start is None:
                importance[name] = torch.zeros_like(p, dtype=torch.float32)
                continue
            moved = p.detach().float() - start.to(p.device, torch.float32)
            importance[name] = omega.to(p.device) / (moved.square() + self.damping)
        return importance

    @override
    def _merge(self, anchors: TensorDict, importance: TensorDict) -> None:
        self._fold(anchors, importance)  # Ω ← Ω + ω/(Δ² + ξ), θ* ← θ_end
        self._omega = {}
        self._start = None  # the next task starts at its first step
        self._pending = None

    @override
    def _extra_state(self) -> dict[str, Any]:
        return {
            **super()._extra_state(),
            # A copy: the path integral grows in place, a state taken now must not.
            "omega": {n: t.clone() for n, t in self._omega.items()},
            "start": None if self._start is None else dict(self._start),
        }

    @override
    def _load_extra_state(self, state: dict[str, Any]) -> None:
        super()._load_extra_state(state)
        self._omega = dict(state["omega"])
        self._start = None if state["start"] is None else dict(state["start"])
        self._pending = None

    @override
    def _release(self) -> None:
        super()._release()
        if self._hook_handle is not None:
            self._hook_handle.remove()
            self._hook_handle = None
        self._pending = None
