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
        if combine not in ("sign", "average"):
            raise ValueError(f"`combine` must be 'sign' or 'average', got {combine!r}")
        self.predictor = predictor
        self.combine = combine
        self.params: dict[str, Tensor] = {}
        self.steps_in_task = 0
        self.skipped_steps = 0
        #: Whether steps are learned from (False while training on a task already folded in,
        #: e.g. a revisited task id: it is not folded in twice; the rule still acts).
        self.learning = True
        # Parameters (name -> shape) the old tasks trained; only these are rewritten.
        self._old_shapes: dict[str, tuple[int, ...]] = {}
        self._trained: set[str] = set()  # had a target in the current task

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

        A step with a non-finite target is neither learned from nor rewritten (``finite`` is
        0 in the returned figures): a NaN is passed on to the optimizer or grad scaler as is.
        """
        if not names:
            return {}
        if not _all_finite(targets):
            self.skipped_steps += 1
            return {"finite": torch.zeros(())}
        logs: dict[str, Tensor] = {}
        if self.learning:
            logs.update(self.predictor.observe(names, thetas, targets))
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
    def end_task(self) -> bool:
        """Fold the finished task into the predictor (eqs. 6-7) at the bound parameters.

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
            "skipped_steps": self.skipped_steps,
            "learning": self.learning,
            "old_shapes": {n: list(s) for n, s in self._old_shapes.items()},
            "trained": sorted(self._trained),
            "predictor": self.predictor.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        version = state.get("version")
        if version != _STATE_VERSION:
            raise ValueError(
                f"MetaGrad engine state version {version!r} is not supported (this version "
                f"reads {_STATE_VERSION}); the checkpoint was written by another "
                "lightning-metagrad release."
            )
        self.steps_in_task = int(state["steps_in_task"])
        self.skipped_steps = int(state["skipped_steps"])
        self.learning = bool(state["learning"])
        self._old_shapes = {n: tuple(int(x) for x in s) for n, s in state["old_shapes"].items()}
        self._trained = set(state["trained"])
        self.predictor.load_state_dict(state["predictor"])


def _all_finite(tensors: Sequence[Tensor]) -> bool:
    # One reduction per tensor instead of an elementwise isfinite + all: a sum of squares is
    # finite iff every entry is, unless it overflows (then the exact check decides).
    norms = torch._foreach_norm([t.float() if t.dtype != torch.float32 else t for t in tensors])
    if bool(torch.isfinite(torch.stack(norms)).all()):
        return True
    return all(bool(torch.isfinite(t).all()) for t in tensors)
