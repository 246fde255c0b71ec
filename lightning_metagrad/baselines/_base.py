"""Shared machinery of the quadratic-penalty baselines (EWC, online EWC, SI, MAS).

Every baseline keeps, per parameter name, one or more *terms* ``(anchor θ*, importance Ω)`` and
regularises towards them with the penalty

.. math:: R(\\theta) = \\frac{c}{2} \\sum_{\\text{terms}} \\sum_k
          \\Omega_k (\\theta_k - \\theta^*_k)^2

whose gradient ``c · Σ Ω (θ − θ*)`` is *added to* ``p.grad`` in ``on_before_optimizer_step``:
the user's loss is left alone, the hook fires once per real optimizer step, after AMP unscaling
and after the whole gradient-accumulation window, and before gradient clipping. ``c`` is
:attr:`_QuadraticPenaltyCallback.grad_scale` (``strength`` for EWC/MAS, ``2 * strength`` for SI,
whose paper writes the penalty without the 1/2).

A task ends when a ``trainer.fit`` ends (``on_train_end``, where ``trainer.train_dataloader`` is
still available) or when :meth:`_QuadraticPenaltyCallback.consolidate` is called by hand. A task
end with NaN/inf weights (or importances) is refused with a RuntimeError and changes nothing.

Every baseline refuses a model without trainable parameters at ``on_fit_start``, and keeps its
state when ``trainer.test/validate/predict`` load a checkpoint (only ``fit`` restores it; see
:class:`_FitStateCallback`).

The gradient-editing baselines (GPM, A-GEM, ER) share the task bookkeeping, refusals and state
handling of :class:`_TaskCallback`, and the functions below (the batch iterator and the
precision context of the extra passes). The refusals of set-ups they cannot support are
:mod:`lightning_metagrad._module_utils`'s, shared with ``MetaGradCallback``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.combined_loader import CombinedLoader
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from typing_extensions import override

from lightning_metagrad._lightning import before_batch_transfer, generate_state_key
from lightning_metagrad._module_utils import (
    explain_lightning_refusal,
    quiet_eval,
    refuse_at_fit_start,
    refuse_unsupported,
)
from lightning_metagrad._validation import check_float, check_state_version

TensorDict = dict[str, Tensor]

_STATE_VERSION = 1


# ---------------------------------------------------------------------------- shared checks


def check_finite_weights(name: str, pl_module: torch.nn.Module, task: int) -> None:
    """RuntimeError naming the first parameter with a NaN/inf entry (at a task end)."""
    for pname, p in pl_module.named_parameters():
        if not bool(torch.isfinite(p.detach()).all()):
            raise RuntimeError(
                f"{name}: parameter {pname!r} is not finite at the end of task {task + 1}; the "
                "task is not consolidated (its state would hold NaN/inf). Training diverged: "
                "lower the learning rate, or clip gradients."
            )


def check_finite_importance(
    name: str, importance: Mapping[str, Tensor], task: int, cause: str
) -> None:
    """RuntimeError naming the first parameter whose new importance has a NaN/inf entry;
    ``cause`` says where such values come from and what to do."""
    names = list(importance)
    if all_finite([importance[n] for n in names]):
        return
    for pname in names:
        if not bool(torch.isfinite(importance[pname]).all()):
            raise RuntimeError(
                f"{name}: the importance of parameter {pname!r} is not finite at the end of task "
                f"{task + 1}; the task is not consolidated (its state would hold NaN/inf). "
                f"{cause}"
            )


def extra_pass_context(trainer: pl.Trainer) -> contextlib.AbstractContextManager[Any]:
    """The precision context of the baselines' extra forward/backward passes.

    Under AMP they run in full precision (no loss scaler here to keep fp16 gradients from
    underflowing); other plugins (e.g. ``"16-true"``) keep their context.
    """
    plugin = trainer.precision_plugin
    if isinstance(plugin, MixedPrecision):
        return contextlib.nullcontext()
    return plugin.train_step_context()


def training_batches(
    name: str,
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    dataloader: Iterable[Any] | None,
    purpose: str = "to estimate importances",
) -> Iterator[Any]:
    """Training batches, moved to the module's device with Lightning's transfer hooks."""
    source: Any = dataloader if dataloader is not None else trainer.train_dataloader
    if source is None:
        raise MisconfigurationException(
            f"{name} needs training data {purpose}: call `consolidate` during `fit`, or pass "
            "`dataloader=`."
        )
    if isinstance(source, (Mapping, list, tuple)):  # several train dataloaders
        source = CombinedLoader(source, "max_size_cycle")
    for item in source:
        batch = item[0] if isinstance(source, CombinedLoader) else item
        # The training loop's own steps (loops/training_epoch_loop.py).
        batch = trainer.precision_plugin.convert_input(batch)
        batch = before_batch_transfer(pl_module, batch)
        yield trainer.strategy.batch_to_device(batch, pl_module.device, dataloader_idx=0)


# ---------------------------------------------------------------------------- small helpers


class _Term:
    """One ``(anchor, importance)`` pair aligned with the live parameters (rebuilt per fit)."""

    __slots__ = ("anchors", "importances", "params")

    def __init__(self, params: list[Tensor], anchors: list[Tensor], importances: list[Tensor]):
        self.params = params
        self.anchors = anchors
        self.importances = importances


# ---------------------------------------------------------------------------- stage awareness


class _FitStateCallback(Callback):
    """Keeps the continual-learning state out of ``trainer.test/validate/predict``.

    Those calls load the callback state of a ``ckpt_path`` as ``fit`` does; an older checkpoint
    would roll the consolidated tasks back (as :class:`~lightning_metagrad.MetaGradCallback`,
    only ``fit`` restores the state). ``setup`` records the stage; ``teardown`` and
    ``on_exception`` (a failed evaluation calls no ``teardown``) clear it.
    """

    def __init__(self) -> None:
        super().__init__()
        self._evaluating = False
        self._first_step = 0

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._evaluating = stage != "fit"

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._evaluating = False

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._evaluating = False
        explain_lightning_refusal(type(self).__name__, exception)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._first_step = trainer.global_step  # after a resumed checkpoint is restored

    def _warn_no_task(self, trainer: pl.Trainer) -> None:
        """``on_train_end`` of a fit in which no trainable parameter had a gradient."""
        if trainer.global_step > self._first_step:
            reason = (
                "no optimizer step of this `fit` had a gradient (`training_step` returned None, "
                "or the loss does not depend on the trainable parameters)"
            )
        else:
            reason = (
                "this `fit` made no optimizer step (use a new Trainer per task; a finished one "
                "trains nothing)"
            )
        rank_zero_warn(f"{type(self).__name__}: {reason}, so no task was consolidated.")

    def _ignore_loaded_state(self) -> bool:
        """Whether ``load_state_dict`` is called by an evaluation (and must change nothing)."""
        if self._evaluating:
            rank_zero_info(
                f"{type(self).__name__}: trainer.test/validate/predict loaded a checkpoint; the "
                "callback's continual-learning state is kept as it is (only `fit` restores it)."
            )
        return self._evaluating


# ---------------------------------------------------------------------------- the base class


class _QuadraticPenaltyCallback(_FitStateCallback):
    """Base of the baselines: task bookkeeping, penalty gradient, importance estimation, state.

    Subclasses implement :meth:`_task_importance` (the new task's Ω) and :meth:`_merge` (how it
    joins the stored terms), and may use :meth:`_on_task_gradient` to see the task gradient.
    """

    #: Whether the new task's importance differs between DDP ranks (data-based estimates do).
    _importance_is_rank_local = True
    #: Where a NaN/inf importance comes from, and the fix (the end of the refusal message).
    _non_finite_importance = (
        "The training loss is NaN/inf (or its gradient overflows) on the training batches the "
        "importance is estimated from (in eval mode): keep the loss finite on the training data."
    )

    def __init__(self, *, strength: float) -> None:
        super().__init__()
        self.strength = check_float("strength", strength, minimum=0)
        #: Tasks consolidated so far.
        self.num_tasks = 0
        self._terms: list[tuple[TensorDict, TensorDict]] = []  # [(anchors, importances)]
        self._steps_in_task = 0
        # Per-fit run-time state.
        self._params: dict[str, torch.nn.Parameter] = {}
        self._cache: list[_Term] = []
        self._cache_owner: pl.LightningModule | None = None

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

    def consolidate(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        dataloader: Iterable[Any] | None = None,
    ) -> None:
        """End the current task: estimate its importances and anchor the current parameters.

        Called automatically at the end of every ``trainer.fit``; call it by hand only to end a
        task in the middle of a fit. ``dataloader`` defaults to ``trainer.train_dataloader``.

        Raises:
            RuntimeError: a weight, or the new task's importance, is NaN/inf (nothing changes).
        """
        name = type(self).__name__
        params = {n: p for n, p in pl_module.named_parameters() if p.requires_grad}
        if not params:
            raise MisconfigurationException(
                f"{name} found no trainable parameters to consolidate (all have "
                "requires_grad=False); unfreeze the parameters of the task."
            )
        check_finite_weights(name, pl_module, self.num_tasks)
        importance = self._task_importance(trainer, pl_module, params, dataloader)
        if self._importance_is_rank_local and trainer.world_size > 1:
            importance = self._mean_over_ranks(trainer, importance)
        check_finite_importance(name, importance, self.num_tasks, self._non_finite_importance)
        anchors = {n: p.detach().clone() for n, p in params.items()}
        self._merge(anchors, importance)
        self.num_tasks += 1
        self._steps_in_task = 0
        self._cache_owner = None  # rebuilt lazily for the next step

    # ------------------------------------------------------------------ subclass API

    def _task_importance(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        params: dict[str, torch.nn.Parameter],
        dataloader: Iterable[Any] | None,
    ) -> TensorDict:
        raise NotImplementedError

    def _merge(self, anchors: TensorDict, importance: TensorDict) -> None:
        raise NotImplementedError

    def _on_task_gradient(
        self, trainer: pl.Trainer, names: list[str], params: list[Tensor], grads: list[Tensor]
    ) -> None:
        """Sees the task gradient (before the penalty is added) at every optimizer step."""

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def _config(self) -> dict[str, Any]:
        """The arguments that tell two configurations apart (for :attr:`state_key`)."""
        return {"strength": self.strength}

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

    # ------------------------------------------------------------------ hooks

    @property
    @override
    def state_key(self) -> str:
        return generate_state_key(self, **self._config())

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        refuse_unsupported(
            type(self).__name__,
            trainer,
            pl_module,
            edit="adds its penalty gradient",
            alternative=(
                ", or leave the callback out of the Trainer, add its `penalty(pl_module)` to your "
                "loss and call its `consolidate(trainer, pl_module)` at the end of each task"
            ),
            refuse_spawn=False,  # unchanged behaviour of the quadratic baselines
        )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        refuse_at_fit_start(type(self).__name__, trainer, pl_module)
        self._build_cache(pl_module, check=True)
        self._warn_if_unstable(trainer.optimizers[0])

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._steps_in_task == 0:
            self._warn_no_task(trainer)
            return
        self.consolidate(trainer, pl_module)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self._cache_owner is not pl_module:
            self._build_cache(pl_module, check=False)
        names = [n for n, p in self._params.items() if p.grad is not None]
        if not names:
            return
        self._steps_in_task += 1
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

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._release()

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        super().on_exception(trainer, pl_module, exception)
        self._release()

    # ------------------------------------------------------------------ checkpointing

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "num_tasks": self.num_tasks,
            "steps_in_task": self._steps_in_task,
            "terms": [
                {"anchors": dict(anchors), "importances": dict(imp)} for anchors, imp in self._terms
            ],
            **self._extra_state(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._ignore_loaded_state():
            return
        check_state_version(type(self).__name__, state_dict, _STATE_VERSION)
        self.num_tasks = int(state_dict["num_tasks"])
        self._steps_in_task = int(state_dict["steps_in_task"])
        self._terms = [
            (dict(term["anchors"]), dict(term["importances"])) for term in state_dict["terms"]
        ]
        self._load_extra_state(state_dict)
        self._cache_owner = None

    # ------------------------------------------------------------------ internals

    def _mean_over_ranks(self, trainer: pl.Trainer, importance: TensorDict) -> TensorDict:
        names = list(importance)
        flat = torch.cat([importance[n].reshape(-1) for n in names])
        flat = trainer.strategy.reduce(flat, reduce_op="mean")
        pieces = flat.split([importance[n].numel() for n in names])
        return {n: piece.view_as(importance[n]) for n, piece in zip(names, pieces)}

    def _build_cache(self, pl_module: pl.LightningModule, check: bool) -> None:
        """Align stored terms with the live parameters (by name), on their device and dtype."""
        named = dict(pl_module.named_parameters())
        self._params = {n: p for n, p in named.items() if p.requires_grad}
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
                if anchors[name].shape != p.shape:
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
        self._cache_owner = pl_module

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

    def _release(self) -> None:
        self._params = {}
        self._cache = []
        self._cache_owner = None


# ---------------------------------------------------------------------------- gradient editors


class _TaskCallback(_FitStateCallback):
    """Base of the gradient-editing baselines (GPM, A-GEM, ER).

    Each ``trainer.fit`` is one task, ended in ``on_train_end`` (where ``trainer.train_dataloader``
    is still available) by :meth:`consolidate`, which refuses non-finite weights; the shared
    refusals (``refuse_unsupported``) run in ``setup``. Subclasses implement :meth:`_end_task`,
    :meth:`_config` and the gradient edit in ``on_before_optimizer_step`` (counting the steps
    that saw a gradient in ``_steps_in_task``), and add their state with
    :meth:`_extra_state` / :meth:`_load_extra_state`.
    """

    _STATE_VERSION = 1
    #: What the callback does between backward and ``optimizer.step`` (for the refusal message).
    _edit = "rewrites gradients"

    def __init__(self) -> None:
        super().__init__()
        #: Tasks consolidated so far.
        self.num_tasks = 0
        self._steps_in_task = 0

    # ------------------------------------------------------------------ public API

    def consolidate(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        dataloader: Iterable[Any] | None = None,
    ) -> None:
        """End the current task (called automatically at the end of every ``trainer.fit``).

        Call it by hand only to end a task in the middle of a fit. ``dataloader`` (for methods
        that read the finished task's data) defaults to ``trainer.train_dataloader``.

        Raises:
            RuntimeError: a weight is NaN/inf (nothing is stored).
        """
        check_finite_weights(type(self).__name__, pl_module, self.num_tasks)
        self._end_task(trainer, pl_module, dataloader)
        self.num_tasks += 1
        self._steps_in_task = 0

    # ------------------------------------------------------------------ subclass API

    def _end_task(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        dataloader: Iterable[Any] | None,
    ) -> None:
        raise NotImplementedError

    def _config(self) -> dict[str, Any]:
        """The arguments that tell two configurations apart (for :attr:`state_key`)."""
        raise NotImplementedError

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def _release(self) -> None:
        """Drop references to the module between fits."""

    # ------------------------------------------------------------------ hooks

    @property
    @override
    def state_key(self) -> str:
        return generate_state_key(self, **self._config())

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        refuse_unsupported(type(self).__name__, trainer, pl_module, edit=self._edit)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        refuse_at_fit_start(type(self).__name__, trainer, pl_module)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._steps_in_task == 0:
            self._warn_no_task(trainer)
            return
        self.consolidate(trainer, pl_module)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._release()

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        super().on_exception(trainer, pl_module, exception)
        self._release()

    # ------------------------------------------------------------------ checkpointing

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": self._STATE_VERSION,
            "num_tasks": self.num_tasks,
            "steps_in_task": self._steps_in_task,
            **self._extra_state(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._ignore_loaded_state():
            return
        check_state_version(type(self).__name__, state_dict, self._STATE_VERSION)
        self.num_tasks = int(state_dict["num_tasks"])
        self._steps_in_task = int(state_dict["steps_in_task"])
        self._load_extra_state(state_dict)


def all_finite(tensors: list[Tensor]) -> bool:
    """Whether every entry of every tensor is finite (one device sync)."""
    if not tensors:
        return True
    peaks = torch._foreach_norm(tensors, math.inf)  # max |x|: no overflow, NaN propagates
    return bool(torch.isfinite(torch.stack([p.float() for p in peaks])).all())
