"""The method's per-step work in plain PyTorch, on the model's named parameter tensors.

:class:`MetaGrad` is to :class:`~lightning_metagrad.callback.MetaGradCallback` what
``torch_ema``'s ``ExponentialMovingAverage`` is to an EMA callback: usable in any training
loop, with no Trainer. It binds the trainable parameters by name, and on each optimizer step
feeds the predictor the step's targets (gradients, or update vectors) and rewrites them in
place from the second task on; :meth:`MetaGrad.end_task` folds the finished task in
(eqs. 6-7). A parameter with no gradient on a step is left out of that step; one the old tasks
never trained (a new head, a layer unfrozen later, a tensor that changed shape) is left free.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_metagrad._validation import check_choice, check_state_version
from lightning_metagrad.combination import joint_average_, sign_agreement_
from lightning_metagrad.predictors import OldGradientPredictor

_STATE_VERSION = 1


class MetaGrad:
    """The plain-PyTorch core: bind, step (observe + rewrite), end a task, state.

    Args:
        predictor: an :class:`~lightning_metagrad.predictors.OldGradientPredictor`.
        combine: for elementwise predictors, ``"sign"`` (eq. 5) or ``"average"`` (eq. 2);
            projection predictors rewrite by their own rule.

    Example (a training loop without Lightning):
        >>> from lightning_metagrad import SubspacePredictor
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> core = MetaGrad(SubspacePredictor(every=1))
        >>> core.bind(model.named_parameters())
        >>> for task in range(2):
        ...     for _ in range(3):
        ...         opt.zero_grad()
        ...         model(torch.randn(8, 4)).pow(2).mean().backward()
        ...         _ = core.step()  # reads and rewrites the bound parameters' .grad
        ...         opt.step()
        ...     _ = core.end_task()
        >>> core.num_old_tasks
        2
    """

    def __init__(
        self, predictor: OldGradientPredictor, combine: Literal["sign", "average"] = "sign"
    ) -> None:
        if not isinstance(predictor, OldGradientPredictor):
            raise ValueError(
                f"`predictor` must be an OldGradientPredictor, got {type(predictor).__name__}"
            )
        check_choice("combine", combine, ("sign", "average"))
        self.predictor = predictor
        self.combine = combine
        self.params: dict[str, Tensor] = {}
        self.steps_in_task = 0
        # Non-finite steps not learned from: an int, or a device tensor while steps are
        # checked without a host sync (see ``sync_free``); read it with ``skipped_steps``.
        self._skipped: int | Tensor = 0
        #: Check finiteness on the device, without a host sync per step, where the predictor
        #: can mask a non-finite step out of what it learns (``masks_non_finite``); set it to
        #: False when the caller must know at once whether a step was finite.
        self.sync_free = True
        #: Whether steps are learned from (False while training on a task already folded in,
        #: e.g. a revisited task id: it is not folded in twice; the rule still acts).
        self.learning = True
        # Parameters (name -> shape) the old tasks trained; only these are rewritten.
        self._old_shapes: dict[str, tuple[int, ...]] = {}
        self._trained: set[str] = set()  # had a target in the current task

    @property
    def skipped_steps(self) -> int:
        """Steps with a non-finite target, not learned from (a host sync on the device)."""
        return int(self._skipped)

    @property
    def num_old_tasks(self) -> int:
        """Tasks folded into the predictor (``t`` in eqs. 6-7)."""
        return self.predictor.num_old_tasks

    def bind(self, named_parameters: Iterable[tuple[str, Tensor]]) -> None:
        """Adopt the model's parameters, by name.

        Frozen ones are bound too (a layer frozen for one task keeps what the old tasks
        learned about it, and is protected again once unfrozen); only parameters that require
        a gradient and have one take part in a step.
        """
        self.params = dict(named_parameters)
        if not any(p.requires_grad for p in self.params.values()):
            raise ValueError(
                "no trainable parameters to bind (all have requires_grad=False): unfreeze "
                "the parameters to train"
            )
        self.predictor.bind(self.params)

    def step(self) -> dict[str, Tensor]:
        """Gradient mode: observe and rewrite the bound parameters' ``.grad`` in place.

        Call between ``backward()`` and ``optimizer.step()``. Returns figures to log.
        """
        names = [n for n, p in self.params.items() if p.requires_grad and p.grad is not None]
        thetas = [self.params[n].detach() for n in names]
        grads: list[Tensor] = [self.params[n].grad for n in names]  # type: ignore[misc]
        return self.step_(names, thetas, grads)

    @torch.no_grad()
    def step_(
        self, names: Sequence[str], thetas: Sequence[Tensor], targets: Sequence[Tensor]
    ) -> dict[str, Tensor]:
        """Observe one step's ``(theta, target)`` pairs, then rewrite ``targets`` in place.

        A step with a non-finite target is not learned from. Checked on the host (one sync),
        it is not rewritten either, and ``finite`` (0) is in the returned figures: a NaN is
        passed on to the optimizer or grad scaler as is. Checked on the device (``sync_free``
        and a predictor that ``masks_non_finite``), the predictor masks it out of what it
        learns and the rule still runs: the non-finite entries spread along the rows the
        projection touches, and the step still reaches the optimizer or grad scaler as
        non-finite.
        """
        if not names:
            return {}
        if self.sync_free and self.predictor.masks_non_finite:
            finite = _finite_flag(targets)  # a device tensor: no host sync
            self._skipped = (~finite).to(torch.int64) + self._skipped
            return self._learn_and_rewrite(names, thetas, targets, finite)
        if not _all_finite(targets):
            self._skipped = int(self._skipped) + 1
            return {"finite": torch.zeros(())}
        return self._learn_and_rewrite(names, thetas, targets, None)

    def _learn_and_rewrite(
        self,
        names: Sequence[str],
        thetas: Sequence[Tensor],
        targets: Sequence[Tensor],
        finite: Tensor | None,
    ) -> dict[str, Tensor]:
        logs: dict[str, Tensor] = {}
        if self.learning:
            if finite is None:
                logs.update(self.predictor.observe(names, thetas, targets))
            else:
                # masks_non_finite: the predictor takes ``finite=`` (SubspacePredictor)
                observe = self.predictor.observe
                logs.update(observe(names, thetas, targets, finite=finite))  # type: ignore[call-arg]
            self.steps_in_task += 1
            self._trained.update(names)
        logs.update(self.rewrite_(names, thetas, targets))
        return logs

    @torch.no_grad()
    def rewrite_(
        self, names: Sequence[str], thetas: Sequence[Tensor], targets: Sequence[Tensor]
    ) -> dict[str, Tensor]:
        """Rewrite finite ``targets`` in place by the predictor's rule (from task 2 on)."""
        if self.predictor.num_old_tasks == 0:
            return {}
        chosen = self.protected(names, targets)
        if not chosen:
            return {}
        names = [names[i] for i in chosen]
        thetas = [thetas[i] for i in chosen]
        targets = [targets[i] for i in chosen]
        if self.predictor.rule == "projection":
            return self.predictor.rewrite_(names, thetas, targets)
        predictions = self.predictor.predict(names, thetas)
        pairs = [(t, p) for t, p in zip(targets, predictions) if p is not None]
        if not pairs:
            return {}
        currents, given = [t for t, _ in pairs], [p for _, p in pairs]
        if self.combine == "average":
            joint_average_(currents, given, self.predictor.num_old_tasks)
            return {}
        kept, total = sign_agreement_(currents, given)
        return {"metagrad/zeroed_fraction": 1.0 - kept / max(total, 1)}

    def protected(self, names: Sequence[str], tensors: Sequence[Tensor]) -> list[int]:
        """Indices of the tensors the rule may rewrite: those the old tasks trained, in the
        shape they trained. The rest (a new head, a layer unfrozen later) is free."""
        if self.predictor.num_old_tasks == 0:
            return []
        return [
            i for i, n in enumerate(names) if self._old_shapes.get(n) == tuple(tensors[i].shape)
        ]

    @torch.no_grad()
    def end_task(self, forget_steps: int = 0) -> bool:
        """Fold the finished task into the predictor (eqs. 6-7) at the bound parameters.

        ``forget_steps``: the last steps belonged to the next task already (a switch detected
        that many steps late); what they taught the predictor is taken back first, where it
        keeps that history (:meth:`OldGradientPredictor.keep_history`).

        Returns False (and changes nothing) if the task had no optimizer step. Raises if the
        parameters are non-finite: such a task is never folded in.
        """
        if self.steps_in_task == 0:
            return False
        names = [n for n in self.params if n in self._trained]
        thetas = [self.params[n].detach() for n in names]
        if not _all_finite(thetas):
            raise RuntimeError(
                "the model's parameters are non-finite at the end of the task; it cannot be "
                "folded into the old-task predictor, which was left unchanged. Resume from the "
                "last good checkpoint and keep the loss finite (lower learning rate, gradient "
                "clipping, or skip such steps)."
            )
        if forget_steps > 0:
            self.predictor.forget_recent(forget_steps)
        self.predictor.end_task(names, thetas)
        for n, t in zip(names, thetas):
            self._old_shapes[n] = tuple(t.shape)
        self.steps_in_task = 0
        self._trained = set()
        return True

    def state_dict(self) -> dict[str, Any]:
        """Plain values and tensors; does not change the object."""
        return {
            "version": _STATE_VERSION,
            "steps_in_task": self.steps_in_task,
            "skipped_steps": self.skipped_steps,  # a host sync, at checkpoints only
            "learning": self.learning,
            "old_shapes": {n: list(s) for n, s in self._old_shapes.items()},
            "trained": sorted(self._trained),
            "predictor": self.predictor.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state_version("MetaGrad engine", state, _STATE_VERSION)
        self.steps_in_task = int(state["steps_in_task"])
        self._skipped = int(state["skipped_steps"])
        self.learning = bool(state["learning"])
        self._old_shapes = {n: tuple(int(x) for x in s) for n, s in state["old_shapes"].items()}
        self._trained = set(state["trained"])
        self.predictor.load_state_dict(state["predictor"])


def _finite_flag(tensors: Sequence[Tensor]) -> Tensor:
    """Whether every entry is finite, as a 0-dim bool tensor on the tensors' device."""
    norms = torch._foreach_norm([t.float() if t.dtype != torch.float32 else t for t in tensors])
    # One reduction per tensor; a norm that overflows float32 (entries near 1e19 and above)
    # counts as non-finite too: such a step is not learned from either.
    return torch.isfinite(torch.stack(norms)).all()


def _all_finite(tensors: Sequence[Tensor]) -> bool:
    """:func:`_finite_flag` read on the host; where a norm overflowed, the exact check over
    the entries decides."""
    if bool(_finite_flag(tensors)):
        return True
    return all(bool(torch.isfinite(t).all()) for t in tensors)
