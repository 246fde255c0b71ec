"""The quadratic penalty of EWC, online EWC, SI and MAS, on the baselines' task lifecycle.

Every such baseline keeps, per parameter name, one or more *terms* ``(anchor θ*, importance
Ω)`` and regularises towards them with the penalty

.. math:: R(\\theta) = \\frac{c}{2} \\sum_{\\text{terms}} \\sum_k
          \\Omega_k (\\theta_k - \\theta^*_k)^2

whose gradient ``c · Σ Ω (θ − θ*)`` is *added to* ``p.grad`` in ``on_before_optimizer_step``:
the user's loss is left alone, the hook fires once per real optimizer step, after AMP unscaling
and after the whole gradient-accumulation window, and before gradient clipping. ``c`` is
:attr:`_QuadraticPenaltyCallback.grad_scale` (``strength`` for EWC/MAS, ``2 * strength`` for SI,
whose paper writes the penalty without the 1/2). A task end (see
:class:`~lightning_metagrad.baselines._base._TaskCallback`) with a NaN/inf importance is
refused with a RuntimeError and changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from typing_extensions import override

from lightning_metagrad._module_utils import quiet_eval
from lightning_metagrad._tensors import same_shape
from lightning_metagrad._validation import check_float
from lightning_metagrad.baselines._base import (
    Params,
    TaskData,
    TensorDict,
    _TaskCallback,
    check_finite_importance,
    extra_pass_context,
    mean_over_ranks,
    training_batches,
)
from lightning_metagrad.boundaries.sources import BoundarySpec


class _Term:
    """One ``(anchor, importance)`` pair aligned with the live parameters (rebuilt per fit)."""

    __slots__ = ("anchors", "importances", "params")

    def __init__(self, params: list[Tensor], anchors: list[Tensor], importances: list[Tensor]):
        self.params = params
        self.anchors = anchors
        self.importances = importances


class _QuadraticPenaltyCallback(_TaskCallback):
    """Base of the quadratic-penalty baselines: penalty gradient, importance estimation, terms.

    Subclasses implement :meth:`_task_importance` (the new task's Ω) and :meth:`_merge` (how it
    joins the stored terms), and may use :meth:`_on_task_gradient` to see the task gradient.
    """

    _edit = "adds its penalty gradient"
    _alternative = (
        ", or leave the callback out of the Trainer, add its `penalty(pl_module)` to your "
        "loss and call its `consolidate(trainer, pl_module)` at the end of each task"
    )
    _refuse_spawn = False  # unchanged behaviour of the quadratic baselines
    #: Whether the new task's importance differs between DDP ranks (data-based estimates do).
    _importance_is_rank_local = True
    #: Where a NaN/inf importance comes from, and the fix (the end of the refusal message).
    _non_finite_importance = (
        "The training loss is NaN/inf (or its gradient overflows) on the training batches the "
        "importance is estimated from (in eval mode): keep the loss finite on the training data."
    )

    def __init__(
        self,
        *,
        strength: float,
        task_boundaries: BoundarySpec = "fit",
        task_id_key: str = "task_id",
        task_id_fn: Callable[[Any], Hashable] | None = None,
    ) -> None:
        super().__init__(
            task_boundaries=task_boundaries, task_id_key=task_id_key, task_id_fn=task_id_fn
        )
        self.strength = check_float("strength", strength, minimum=0)
        self._terms: list[tuple[TensorDict, TensorDict]] = []  # [(anchors, importances)]
        self._cache: list[_Term] = []  # per fit: the terms aligned with `_params`

    # ------------------------------------------------------------------ public API

    @property
    def grad_scale(self) -> float:
        """``c`` in the added gradient ``c · Σ Ω (θ − θ*)`` (``strength`` unless overridden)."""
        return self.strength

    @property
    def terms(self) -> list[tuple[TensorDict, TensorDict]]:
        """The stored ``(anchors θ*, importances Ω)`` pairs, each a dict keyed by parameter name."""
        return self._terms

    def penalty(self, pl_module: pl.LightningModule) -> Tensor:
        """The penalty ``grad_scale / 2 · Σ Ω (θ − θ*)²``, differentiable w.r.t. the parameters.

        Its gradient is what the callback adds to ``p.grad``; call it for monitoring, or to add
        the penalty to a loss yourself (then do not also use the callback in the Trainer).
        """
        named = dict(pl_module.named_parameters())
        device = next(iter(named.values())).device if named else torch.device("cpu")
        total = torch.zeros((), device=device)
        for anchors, importances in self._terms:
            for name, anchor in anchors.items():
                if name in named and named[name].requires_grad:
                    p = named[name]
                    diff = p.float() - anchor.to(p.device, torch.float32)
                    total = total + (importances[name].to(p.device) * diff.square()).sum()
        return 0.5 * self.grad_scale * total

    # ------------------------------------------------------------------ subclass API

    def _task_importance(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, params: Params, data: TaskData
    ) -> TensorDict:
        raise NotImplementedError

    def _merge(self, anchors: TensorDict, importance: TensorDict) -> None:
        raise NotImplementedError

    def _data_batches(self) -> int:
        """Training batches the task's importance reads at its end (0: none)."""
        return 0

    @override
    def _wants_task_batch(self, batches: int, examples: int) -> bool:
        return batches < self._data_batches()

    def _on_task_gradient(
        self, trainer: pl.Trainer, names: list[str], params: list[Tensor], grads: list[Tensor]
    ) -> None:
        """Sees the task gradient (before the penalty is added) at every optimizer step."""

    # ------------------------------------------------------------------ helpers for subclasses

    def _fold(self, anchors: TensorDict, importance: TensorDict, decay: float = 1.0) -> None:
        """Single-term update ``Ω ← decay·Ω + Ω_new``, ``θ* ← θ_end`` (out of place, so earlier
        ``state_dict()`` results stay valid); names not trained now keep their old anchor."""
        old_anchors, old_imp = self._terms[0] if self._terms else ({}, {})
        merged = {n: v * decay for n, v in old_imp.items()} if decay != 1.0 else dict(old_imp)
        for name, value in importance.items():
            merged[name] = merged[name].to(value.device) + value if name in merged else value
        self._terms = [({**old_anchors, **anchors}, merged)]

    def _data_importance(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        params: dict[str, torch.nn.Parameter],
        dataloader: Iterable[Any] | None,
        num_batches: int,
        objective: Any,
        absolute: bool,
    ) -> TensorDict:
        """Mean over ``num_batches`` batches of ``g²`` (``absolute=False``) or ``|g|``, where
        ``g`` is the gradient of ``objective(batch, batch_idx)`` w.r.t. the trainable params.

        The module is in eval mode, its ``self.log`` calls are no-ops and the global RNG state
        is restored afterwards; ``p.grad`` is not touched (``torch.autograd.grad``).
        """
        names = list(params)
        tensors = [params[n] for n in names]
        totals = [torch.zeros_like(p, dtype=torch.float32) for p in tensors]
        counted = 0
        # Under AMP the estimate runs in full precision; other plugins keep their context.
        with quiet_eval(pl_module), extra_pass_context(trainer):
            for batch_idx, batch in enumerate(self._batches(trainer, pl_module, dataloader)):
                if batch_idx >= num_batches:
                    break
                value = objective(batch, batch_idx)
                if value is None or not value.requires_grad:
                    continue
                grads = torch.autograd.grad(value, tensors, allow_unused=True)
                used = [(t, g) for t, g in zip(totals, grads) if g is not None]
                if used:
                    raw = [g.detach().float() for _, g in used]
                    stat = torch._foreach_abs(raw) if absolute else torch._foreach_mul(raw, raw)
                    torch._foreach_add_([t for t, _ in used], stat)
                counted += 1
        if counted == 0:
            rank_zero_warn(
                f"{type(self).__name__}: no batch gave a loss for the importance estimate; the "
                "task gets zero importance."
            )
        else:
            torch._foreach_div_(totals, float(counted))
        return dict(zip(names, totals))

    def _batches(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        dataloader: Iterable[Any] | None,
    ) -> Iterator[Any]:
        """Training batches, moved to the module's device with Lightning's transfer hooks."""
        return training_batches(type(self).__name__, trainer, pl_module, dataloader)

    # ------------------------------------------------------------------ task end

    @override
    def _end_task(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, dataloader: TaskData
    ) -> None:
        """Estimate the task's importances and anchor the current parameters."""
        name = type(self).__name__
        params = {n: p for n, p in pl_module.named_parameters() if p.requires_grad}
        if not params:
            raise MisconfigurationException(
                f"{name} found no trainable parameters to consolidate (all have "
                "requires_grad=False); unfreeze the parameters of the task."
            )
        importance = self._task_importance(trainer, pl_module, params, dataloader)
        if self._importance_is_rank_local and trainer.world_size > 1:
            names = list(importance)
            means = mean_over_ranks(trainer, [importance[n] for n in names])
            importance = dict(zip(names, means))
        check_finite_importance(name, importance, self.num_tasks, self._non_finite_importance)
        self._merge({n: p.detach().clone() for n, p in params.items()}, importance)

    # ------------------------------------------------------------------ hooks

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        self._warn_if_unstable(trainer.optimizers[0])

    @override
    def _edit_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, names: list[str]
    ) -> None:
        params: list[Tensor] = [self._params[n] for n in names]
        grads: list[Tensor] = [p.grad for p in params]  # type: ignore[misc]
        self._on_task_gradient(trainer, names, params, grads)
        if self.grad_scale == 0.0:
            return  # strength 0: exactly the run without the callback
        with torch.no_grad():
            for term in self._cache:
                ps, anchors, imps = term.params, term.anchors, term.importances
                if any(p.grad is None for p in ps):
                    keep = [i for i, p in enumerate(ps) if p.grad is not None]
                    ps = [ps[i] for i in keep]
                    anchors = [anchors[i] for i in keep]
                    imps = [imps[i] for i in keep]
                if not ps:
                    continue
                # c · Ω ⊙ (θ − θ*), added to the gradient the optimizer (and clipping) will see.
                diff = torch._foreach_sub([p.detach() for p in ps], anchors)
                torch._foreach_mul_(diff, imps)
                torch._foreach_add_([p.grad for p in ps], diff, alpha=self.grad_scale)  # type: ignore[misc]

    # ------------------------------------------------------------------ checkpointing

    @override
    def _extra_state(self) -> dict[str, Any]:
        return {
            "terms": [
                {"anchors": dict(anchors), "importances": dict(imp)} for anchors, imp in self._terms
            ]
        }

    @override
    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self._terms = [
            (dict(term["anchors"]), dict(term["importances"])) for term in state["terms"]
        ]

    # ------------------------------------------------------------------ internals

    @override
    def _bind(self, pl_module: pl.LightningModule, check: bool) -> None:
        """Align the stored terms with the live parameters (by name), on their device and
        dtype; a stored anchor of another shape than its parameter is refused."""
        super()._bind(pl_module, check)
        named = dict(pl_module.named_parameters())
        self._cache = []
        unknown: set[str] = set()
        for anchors, importances in self._terms:
            ps: list[Tensor] = []
            ans: list[Tensor] = []
            imps: list[Tensor] = []
            for name in list(anchors):
                p = named.get(name)
                if p is None:
                    unknown.add(name)
                    continue
                if not same_shape(anchors[name], p):
                    raise MisconfigurationException(
                        f"{type(self).__name__}: parameter {name!r} has shape {tuple(p.shape)}, "
                        f"but its stored anchor has shape {tuple(anchors[name].shape)}."
                    )
                anchors[name] = anchors[name].to(device=p.device, dtype=p.dtype)
                importances[name] = importances[name].to(device=p.device, dtype=torch.float32)
                ps.append(p)
                ans.append(anchors[name])
                imps.append(importances[name])
            if ps:
                self._cache.append(_Term(ps, ans, imps))
        if check and unknown:
            rank_zero_warn(
                f"{type(self).__name__}: stored state names parameters the model does not have; "
                f"they are not regularised: {sorted(unknown)[:5]}"
            )

    def _warn_if_unstable(self, optimizer: torch.optim.Optimizer) -> None:
        """Plain/heavy-ball SGD diverges on the quadratic penalty if lr · curvature > 2(1 + μ)."""
        if not isinstance(optimizer, torch.optim.SGD) or not self._cache or self.grad_scale == 0:
            return
        curvature: dict[int, Tensor] = {}
        for term in self._cache:
            for p, imp in zip(term.params, term.importances):
                curvature[id(p)] = curvature[id(p)] + imp if id(p) in curvature else imp
        group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        worst = 0.0
        for key, curv in curvature.items():
            group = group_of.get(key)
            if group is None:
                continue
            lr = float(group.get("lr", 0.0))
            limit = 2.0 * (1.0 + float(group.get("momentum", 0.0)))
            worst = max(worst, lr * self.grad_scale * float(curv.max()) / limit)
        if worst > 1.0:
            rank_zero_warn(
                f"{type(self).__name__}: learning rate × penalty curvature is {worst:.3g}× the "
                "SGD stability limit 2(1 + momentum); training will diverge on the penalty. "
                "Lower `strength` or the learning rate."
            )

    @override
    def _release(self) -> None:
        super()._release()
        self._cache = []
