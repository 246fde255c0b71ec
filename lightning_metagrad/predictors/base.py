"""The predictor protocol: what the engine asks of a predictor of the old tasks' gradients.

A predictor is trained during a task on the gradients (or the optimizer's update vectors) the
callback sees, folds the finished task in at each boundary (eqs. 6-7), and from the second
task on tells the engine (:class:`~lightning_metagrad.engine.MetaGrad`) how to rewrite the
current gradient. Everything works per parameter tensor, by name, so a parameter without a
gradient on a step, or one the old tasks never trained, is simply absent. Plain PyTorch.

Two kinds, declared by :attr:`OldGradientPredictor.rule` (the engine dispatches on it):

* ``"elementwise"``: :meth:`~OldGradientPredictor.predict` returns the predicted mean old-task
  gradient per tensor, and the engine applies eq. 5 (or eq. 2's average) coordinate by
  coordinate. Built in: :class:`MetaNetPredictor` (the paper exactly), :class:`AnchoredPredictor`
  (a diagonal Taylor model with a trust region) and :class:`ReplayPredictor` (the real old-task
  gradient from a small episodic memory).
* ``"projection"``: the predictor rewrites the gradient itself
  (:meth:`~OldGradientPredictor.rewrite_`): the default,
  :class:`~lightning_metagrad.predictors.subspace.SubspacePredictor`, removes each weight
  matrix's component in the old tasks' gradient subspace.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from lightning_metagrad._validation import check_state_version
from lightning_metagrad.matrices import MatrixGroup
from lightning_metagrad.runtime import Runtime
from lightning_metagrad.sharding import Shards


class NothingToFold(RuntimeError):
    """Raised by :meth:`OldGradientPredictor.end_task` when the task taught the predictor
    nothing it could fold in (too short a task, or only non-finite steps); the engine then
    skips the task with a warning, and the run goes on."""


#: Per tensor: ``(mean old-task gradient, trusted mask or None)``, or None (the tensor is free).
Prediction = tuple[Tensor, Tensor | None] | None


class OldGradientPredictor:
    """Interface of a predictor of the old tasks' gradients (subclass to add one).

    The engine calls :meth:`connect` once with the loop's services, :meth:`bind` with the
    parameters by name, :meth:`learn_from` with what the targets are, :meth:`observe` on
    every optimizer step with the tensors that have a gradient, :meth:`end_task` at a boundary,
    and, from the second task on, :meth:`predict` (``rule = "elementwise"``) or
    :meth:`rewrite_` (``rule = "projection"``). ``names``, ``thetas`` and ``targets`` are
    parallel lists; ``targets`` are gradients or update vectors, float32 or lower precision.

    Example:
        >>> class ZeroPredictor(OldGradientPredictor):
        ...     def observe(self, names, thetas, targets):
        ...         return {}
        ...     def end_task(self, names, thetas):
        ...         self._old_tasks += 1
        ...     def predict(self, names, thetas):
        ...         return [(torch.zeros_like(t), None) for t in thetas]
        >>> pred = ZeroPredictor()
        >>> pred.end_task(["w"], [torch.ones(2)])
        >>> pred.predict(["w"], [torch.ones(2)])
        [(tensor([0., 0.]), None)]
        >>> pred.state_dict()
        {'version': 1, 'num_old_tasks': 1}
        >>> from lightning_metagrad import MetaGradCallback
        >>> MetaGradCallback(predictor=pred).predictor_name
        'ZeroPredictor'
    """

    rule: ClassVar[Literal["elementwise", "projection"]] = "elementwise"
    #: Whether :meth:`observe` accepts ``finite=`` (a 0-dim bool device tensor) and leaves a
    #: step out of what it learns where it is False: the engine then checks finiteness
    #: without a host sync per step. Otherwise it only sees finite steps.
    masks_non_finite: ClassVar[bool] = False
    #: Whether it replays stored batches (it needs ``runtime.batch_loss`` and every training
    #: batch through ``MetaGrad.observe_batch``).
    needs_batch_loss: ClassVar[bool] = False
    #: The layout version :meth:`state_dict` writes (bumped when the layout changes).
    _state_version: ClassVar[int] = 1
    _old_tasks = 0
    #: The services of the loop around the engine (warnings, a batch loss, a cross-rank
    #: mean); set by :meth:`connect`.
    runtime: Runtime = Runtime()
    #: How the bound parameters are split over processes (FSDP2 row shards); set by the
    #: engine before :meth:`bind`, which then gets each process's local rows.
    shards: Shards = Shards()

    def sharding_unsupported(self) -> str | None:
        """Why this predictor cannot learn from row-sharded parameters (FSDP2), or None if it
        can: it must reduce what it learns over :attr:`shards` so that every process holds
        the same state. The default: it cannot."""
        return "it learns elementwise from whole tensors"

    @property
    def num_old_tasks(self) -> int:
        """Tasks folded into the old-task state (``t`` in eqs. 6-7)."""
        return self._old_tasks

    def bind(
        self,
        params: Mapping[str, Tensor],
        groups: Sequence[MatrixGroup] | None = None,
        modules: Mapping[str, nn.Module] | None = None,
    ) -> None:
        """Adopt the model's parameters (name -> tensor) at each fit start; ``groups`` are its
        weight matrices grouped by owner module (:mod:`~lightning_metagrad.matrices`), and
        ``modules`` its ``named_modules()`` when the engine was bound to an ``nn.Module`` (a
        predictor that reads layer inputs hooks them here)."""

    def connect(self, runtime: Runtime) -> None:
        """Adopt the services of the loop around the engine (the engine calls it once)."""
        self.runtime = runtime

    def learn_from(
        self, target: Literal["gradient", "update"], optimizer: torch.optim.Optimizer | None
    ) -> None:
        """Called at each fit start with what the targets will be: the gradients, or the
        ``optimizer``'s update vectors. A predictor whose statistic depends on it (the
        subspace predictor's step weighting) chooses here; by default nothing changes."""

    def observe_batch(self, batch: Any) -> None:
        """Called with every training batch (on the device); only a memory needs it."""

    def observe(
        self,
        names: Sequence[str],
        thetas: Sequence[Tensor],
        targets: Sequence[Tensor],
        finite: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Learn from one step's targets; return figures to log (name -> scalar).

        ``finite`` is None when the targets were checked finite on the host; otherwise (only
        for predictors that declare :attr:`masks_non_finite`) a 0-dim bool device tensor, and
        a step where it is False must leave what the predictor learned unchanged.
        """
        raise NotImplementedError

    def prediction_error(self) -> Tensor | None:
        """The predictor's latest held-out relative error (1 minus the explained fraction of
        the targets' variance), where it measures one; None by default."""
        return None

    def rename(self, renamed: Mapping[str, str]) -> None:
        """Parameters the model renamed between fits (old name -> new name: a layer inserted
        before them, pruning's ``weight`` -> ``weight_orig``): move their state along. The
        default holds no per-name state."""

    def task_figures(self) -> dict[str, float]:
        """Figures to log after a task was folded in (e.g. the protected dimensions)."""
        return {}

    def end_task(self, names: Sequence[str], thetas: Sequence[Tensor]) -> None:
        """Fold the finished task in (eqs. 6-7); ``thetas`` are its end point. Raise
        :class:`NothingToFold` if the task taught nothing to fold in."""
        raise NotImplementedError

    def keep_history(self, steps: int) -> None:
        """Keep what each of the last ``steps`` optimizer steps added to the current task, so
        that :meth:`forget_recent` can take it back (task switches detected some steps
        late). The default keeps nothing."""

    def forget_recent(self, steps: int) -> bool:
        """Before :meth:`end_task`: take back what the last ``steps`` steps added to the task
        (they belong to the next one). False if nothing could be taken back (the default)."""
        return False

    def predict(self, names: Sequence[str], thetas: Sequence[Tensor]) -> list[Prediction]:
        """Elementwise rule: per tensor ``(mean old-task gradient, trusted mask or None)``.

        Where the mask is 0 the rule keeps the current gradient whatever its sign; the mask may
        be boolean or 0/1 floats. A None entry leaves that tensor free.
        """
        raise NotImplementedError

    def rewrite_(
        self, names: Sequence[str], thetas: Sequence[Tensor], targets: Sequence[Tensor]
    ) -> Tensor | None:
        """Projection rule: rewrite ``targets`` in place; return the share of their energy
        the rule removed (a 0-dim tensor), or None."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        """Plain values and tensors only (Lightning checkpoints load with ``weights_only``),
        with a ``"version"``; calling it changes nothing. The default holds the old-task
        count, enough for a predictor whose state is that count alone."""
        return {"version": self._state_version, "num_old_tasks": self._old_tasks}

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict`; ValueError for a version this release cannot read."""
        check_state_version(type(self).__name__, state, self._state_version, unversioned=1)
        self._old_tasks = int(state["num_old_tasks"])


def _flat(tensors: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.detach().reshape(-1).float() for t in tensors])


def rename_keys(store: dict, renamed: Mapping[str, str]) -> dict:
    """``store`` with the keys in ``renamed`` replaced, all at once (``a -> b, b -> c`` moves
    both); a key renamed onto replaces what was there (for :meth:`OldGradientPredictor.rename`).

    Example:
        >>> rename_keys({"a": 1, "b": 2, "c": 3}, {"a": "b", "b": "d"})
        {'c': 3, 'b': 1, 'd': 2}
    """
    targets = set(renamed.values())
    kept = {k: v for k, v in store.items() if k not in renamed and k not in targets}
    kept.update({renamed[k]: v for k, v in store.items() if k in renamed})
    return kept
