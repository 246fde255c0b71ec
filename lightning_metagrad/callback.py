"""``MetaGradCallback``: the paper's method wired into Lightning's hooks.

The callback only connects hooks to the plain-PyTorch parts:

* :class:`~lightning_metagrad.meta_network.MetaNetwork` learns h on ``(theta_j, target_j)``
  pairs during a task (section 2.2);
* :class:`~lightning_metagrad.distillation.RunningMeanDistiller` folds each finished h into
  the predictor g of the mean old-task gradient (eqs. 6-7);
* :class:`~lightning_metagrad.tabulation.TabulatedFunction` evaluates the frozen g in O(P);
* :mod:`~lightning_metagrad.combination` rewrites the update (eq. 5, or eq. 2's average);
* :mod:`~lightning_metagrad.boundaries` decides where tasks start.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.core.optimizer import _configure_optimizers
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from typing_extensions import override

from lightning_metagrad.boundaries import (
    BatchTaskIdBoundaries,
    NewFitBoundaries,
    TaskBoundarySource,
)
from lightning_metagrad.combination import joint_average, sign_agreement
from lightning_metagrad.distillation import RunningMeanDistiller
from lightning_metagrad.meta_network import CoordinateMLP, MetaNetwork
from lightning_metagrad.tabulation import TabulatedFunction

_COMBINE = ("sign", "average")
_TARGETS = ("auto", "gradient", "update")
_BOUNDARIES = ("fit", "batch", "manual")


def _flat(tensors: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.detach().reshape(-1).float() for t in tensors])


def _write_flat(dest: Sequence[Tensor], flat: Tensor) -> None:
    pieces = flat.split([d.numel() for d in dest])
    torch._foreach_copy_(list(dest), [p.view_as(d) for p, d in zip(pieces, dest)])


def _several_optimizers_message(count: int) -> str:
    return (
        f"MetaGradCallback supports exactly one optimizer, got {count}. Return a single "
        "optimizer from `configure_optimizers` (use parameter groups for per-module settings)."
    )


def _count_optimizers(pl_module: pl.LightningModule) -> int | None:
    """How many optimizers ``configure_optimizers`` returns, or None if it cannot be told yet."""
    try:
        optimizers, _, _ = _configure_optimizers(pl_module.configure_optimizers())  # type: ignore[arg-type]
    except Exception:  # Lightning reports a broken configure_optimizers itself, later.
        return None
    return len(optimizers)


class MetaGradCallback(Callback):
    r"""Continual learning for any ``LightningModule`` with meta-learned old-task gradients.

    During each task a coordinate-wise meta-network ``h`` learns to reconstruct the task's
    gradient (or, for optimizers other than plain SGD, its update vector) from the parameter
    value alone. From the second task on, the predicted mean old-task gradient
    :math:`\bar\nabla = g(\theta)` is combined with the current gradient by the sign-agreement
    rule (eq. 5) and written into ``.grad`` before ``optimizer.step()``, so clipping and the
    optimizer see the rewritten gradient. At each task boundary h is distilled into g (eqs. 6-7).

    Args:
        hidden_sizes: widths of h's hidden layers (paper: 256, 256, 256).
        activation: ``"relu"``, ``"tanh"`` or ``"silu"``.
        coords_per_step: coordinates sampled for each meta-network update.
        meta_lr: Adam learning rate of h.
        meta_update_every: train h on every k-th optimizer step (1 = every step).
        combine: ``"sign"`` (eq. 5) or ``"average"`` (eq. 2 with predicted old gradients).
        target: what h reconstructs: ``"gradient"`` (plain SGD), ``"update"`` (the optimizer's
            update vector; the rule then applies to that update), or ``"auto"``: gradient for
            ``torch.optim.SGD`` without momentum and weight decay, update otherwise.
        task_boundaries: ``"fit"`` (each new ``trainer.fit`` starts a task), ``"batch"`` (a
            change of the task id read from the batch), ``"manual"`` (only
            :meth:`start_new_task`), or a
            :class:`~lightning_metagrad.boundaries.TaskBoundarySource`.
        task_id_key: dict-batch key holding the task id, for ``task_boundaries="batch"``.
        task_id_fn: a function ``batch -> task id``, for ``task_boundaries="batch"``.
        distill_steps: Adam steps distilling h into g at each boundary (eq. 7).
        distill_samples: parameter values drawn per distillation step.
        table_points: grid size of the tabulated g.
        seed: seed of the meta-networks' initialisation and coordinate sampling (identical on
            every DDP rank, so all ranks keep identical meta-networks).

    Example:
        >>> from lightning.pytorch import Trainer
        >>> cb = MetaGradCallback(hidden_sizes=(32, 32))
        >>> trainer = Trainer(callbacks=[cb], max_steps=1, logger=False)
        >>> cb.task_index
        0
    """

    def __init__(
        self,
        *,
        hidden_sizes: Sequence[int] = (256, 256, 256),
        activation: str = "relu",
        coords_per_step: int = 4096,
        meta_lr: float = 1e-3,
        meta_update_every: int = 8,
        combine: Literal["sign", "average"] = "sign",
        target: Literal["auto", "gradient", "update"] = "auto",
        task_boundaries: str | TaskBoundarySource = "fit",
        task_id_key: str = "task_id",
        task_id_fn: Callable[[Any], Hashable] | None = None,
        distill_steps: int = 200,
        distill_samples: int = 4096,
        table_points: int = 4097,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if combine not in _COMBINE:
            raise ValueError(f"`combine` must be one of {_COMBINE}, got {combine!r}")
        if target not in _TARGETS:
            raise ValueError(f"`target` must be one of {_TARGETS}, got {target!r}")
        if not isinstance(meta_update_every, int) or meta_update_every < 1:
            raise ValueError(f"`meta_update_every` must be an int >= 1, got {meta_update_every!r}")
        if not isinstance(table_points, int) or table_points < 2:
            raise ValueError(f"`table_points` must be an int >= 2, got {table_points!r}")
        if not isinstance(seed, int):
            raise ValueError(f"`seed` must be an int, got {seed!r}")
        if isinstance(task_boundaries, TaskBoundarySource):
            self.boundaries = task_boundaries
        elif task_boundaries == "fit":
            self.boundaries = NewFitBoundaries()
        elif task_boundaries == "batch":
            self.boundaries = BatchTaskIdBoundaries(key=task_id_key, fn=task_id_fn)
        elif task_boundaries == "manual":
            self.boundaries = TaskBoundarySource()
        else:
            raise ValueError(
                f"`task_boundaries` must be one of {_BOUNDARIES} or a TaskBoundarySource, "
                f"got {task_boundaries!r}"
            )
        if task_id_fn is not None and task_boundaries != "batch":
            raise ValueError("`task_id_fn` is only used with `task_boundaries='batch'`")

        self.hidden_sizes = tuple(hidden_sizes)
        self.activation = activation
        self.combine = combine
        self.target = target
        self.meta_update_every = meta_update_every
        self.table_points = table_points
        self.seed = seed
        self._generator = torch.Generator().manual_seed(seed)
        self._meta = MetaNetwork(
            CoordinateMLP(hidden_sizes, activation),
            coords_per_step=coords_per_step,
            lr=meta_lr,
            generator=self._generator,
        )
        self._meta.net.reset_parameters(self._generator)
        self._distiller = RunningMeanDistiller(
            steps=distill_steps, num_samples=distill_samples, lr=meta_lr
        )
        self._table: TabulatedFunction | None = None

        # Task bookkeeping (all of it checkpointed).
        self.task_index = 0
        self._in_scale: float | None = None
        self._steps_in_task = 0
        self._skipped_steps = 0

        # Per-fit run-time state (rebuilt in on_fit_start).
        self._params: list[torch.nn.Parameter] = []
        self._resolved_target: str | None = None
        self._hook_handle: Any = None
        self._theta_before: Tensor | None = None
        self._step_params: list[torch.nn.Parameter] = []
        self._stepped = False
        self._to_log: dict[str, Tensor | float] = {}

    # ------------------------------------------------------------------ public API

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            hidden_sizes=self.hidden_sizes, combine=self.combine, target=self.target, seed=self.seed
        )

    @property
    def num_old_tasks(self) -> int:
        """Tasks folded into the predictor g (``t`` in eqs. 6-7)."""
        return self._distiller.num_tasks

    @property
    def meta_network(self) -> CoordinateMLP:
        """The current task's meta-network h."""
        return self._meta.net

    @property
    def predictor(self) -> CoordinateMLP | None:
        """The distilled predictor g of the mean old-task gradient (None during task 1)."""
        return self._distiller.g

    def predict_old_gradient(self, theta: Tensor) -> Tensor:
        """The predicted mean old-task gradient at ``theta`` (tabulated g), zeros before task 2."""
        if self._table is None:
            return torch.zeros_like(theta, dtype=torch.float32)
        return self._table(theta)

    def start_new_task(self, pl_module: pl.LightningModule | None = None) -> None:
        """End the current task and start the next one: distil h into g (eq. 7), reset h.

        Call it by hand between tasks (e.g. with ``task_boundaries="manual"``); ``pl_module``
        is needed only outside a running ``fit``.
        """
        params = self._params or (
            [p for p in pl_module.parameters() if p.requires_grad] if pl_module else []
        )
        if not params:
            raise RuntimeError(
                "start_new_task() needs the model's parameters: call it during fit, or pass "
                "`pl_module=`."
            )
        theta = _flat(params)
        if self._meta.num_updates == 0:
            rank_zero_warn(
                f"MetaGrad: task {self.task_index} ended before its meta-network had any update; "
                "it is not added to the old-task predictor."
            )
        else:
            self._distiller.add_task(self._meta.net, theta, generator=self._generator)
            self._tabulate(theta)
        self.task_index += 1
        self._steps_in_task = 0
        self._meta.reset(self._in_scale if self._in_scale is not None else 1.0)

    # ------------------------------------------------------------------ hooks

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not pl_module.automatic_optimization:
            raise MisconfigurationException(
                "MetaGradCallback rewrites gradients between backward and optimizer.step, which "
                "Lightning's manual optimization does not expose. Use automatic optimization "
                "(remove `self.automatic_optimization = False`)."
            )
        strategy = type(trainer.strategy).__name__
        if "FSDP" in strategy or "DeepSpeed" in strategy:
            raise MisconfigurationException(
                f"MetaGradCallback does not support the {strategy} (sharded parameters); use a "
                "single device or strategy='ddp'."
            )
        # Lightning itself rejects several optimizers under automatic optimization, advising
        # manual optimization, which MetaGrad cannot support: say so first.
        num_optimizers = _count_optimizers(pl_module)
        if num_optimizers is not None and num_optimizers > 1:
            raise MisconfigurationException(_several_optimizers_message(num_optimizers))
        self._meta.net.to(pl_module.device)
        if self._distiller.g is not None:
            self._distiller.g.to(pl_module.device)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if len(trainer.optimizers) != 1:
            raise MisconfigurationException(_several_optimizers_message(len(trainer.optimizers)))
        self._params = [p for p in pl_module.parameters() if p.requires_grad]
        if not self._params:
            raise MisconfigurationException(
                "MetaGradCallback found no trainable parameters (all have requires_grad=False). "
                "Unfreeze the parameters to train, or remove the callback."
            )
        device = self._params[0].device
        self._meta.net.to(device)
        if self._distiller.g is not None:
            self._distiller.g.to(device)
        if self._table is not None:
            self._table = self._table.to(device)
        optimizer = trainer.optimizers[0]
        self._resolved_target = self._resolve_target(optimizer)
        if self._resolved_target == "update":
            self._hook_handle = optimizer.register_step_post_hook(self._after_optimizer_step)
        if self._in_scale is None:
            # One input scale for every task's network: the parameters' spread at the start.
            std = float(_flat(self._params).std())
            self._in_scale = std if math.isfinite(std) and std > 0 else 1.0
            self._meta.reset(self._in_scale)
        if self.boundaries.on_fit_start():
            self.start_new_task()

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.boundaries.on_fit_end()
        self._release()

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._release()

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.boundaries.on_train_batch(batch, batch_idx):
            self.start_new_task()

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # Fires once per real optimizer step, after unscaling (AMP) and the whole accumulation
        # window, before clipping: the right place to read and rewrite the gradient.
        params = [p for p in self._params if p.grad is not None]
        self._step_params = params
        self._stepped = False
        if not params:
            return
        theta = _flat(params)
        if self._resolved_target == "update":
            self._theta_before = theta  # finished in _after_optimizer_step
            return
        grad = _flat([p.grad for p in params])  # type: ignore[misc]
        self._record_pairs(theta, grad)
        if self._table is not None:
            new_grad, _ = self._combine(theta, grad)
            _write_flat([p.grad for p in params], new_grad)  # type: ignore[misc]
        self._stepped = True

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if not self._stepped:
            return
        self._stepped = False
        self._steps_in_task += 1
        self._to_log["metagrad/task"] = float(self.task_index)
        for name, value in self._to_log.items():
            pl_module.log(name, value, on_step=True, on_epoch=False, batch_size=1)
        self._to_log = {}

    # ------------------------------------------------------------------ checkpointing

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
            "task_index": self.task_index,
            "in_scale": self._in_scale,
            "steps_in_task": self._steps_in_task,
            "skipped_steps": self._skipped_steps,
            "meta": self._meta.state_dict(),
            "distiller": self._distiller.state_dict(),
            "table": None if self._table is None else self._table.state_dict(),
            "generator": self._generator.get_state(),
            "boundaries": self.boundaries.state_dict(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.task_index = int(state_dict["task_index"])
        self._in_scale = state_dict["in_scale"]
        self._steps_in_task = int(state_dict["steps_in_task"])
        self._skipped_steps = int(state_dict["skipped_steps"])
        self._meta.load_state_dict(state_dict["meta"])
        self._distiller.load_state_dict(state_dict["distiller"], template=self._meta.net)
        table = state_dict["table"]
        self._table = None if table is None else TabulatedFunction.from_state_dict(table)
        self._generator.set_state(state_dict["generator"])
        self.boundaries.load_state_dict(state_dict["boundaries"])

    # ------------------------------------------------------------------ internals

    def _resolve_target(self, optimizer: torch.optim.Optimizer) -> str:
        if self.target != "auto":
            return self.target
        plain_sgd = type(optimizer) is torch.optim.SGD and all(
            not group.get("momentum") and not group.get("weight_decay")
            for group in optimizer.param_groups
        )
        return "gradient" if plain_sgd else "update"

    def _record_pairs(self, theta: Tensor, target: Tensor) -> None:
        """Train h on this step's ``(theta_j, target_j)`` pairs, every k-th step (section 2.2)."""
        if self._steps_in_task % self.meta_update_every != 0:
            return
        if not bool(torch.isfinite(target).all()):
            self._skipped_steps += 1
            rank_zero_warn(
                "MetaGrad: non-finite gradient/update at this step; its pairs are not used to "
                "train the meta-network.",
            )
            return
        index = self._meta.sample_indices(theta.numel(), theta.device)
        loss = self._meta.observe(theta, target, index)
        self._to_log["metagrad/meta_loss"] = loss

    def _combine(self, theta: Tensor, current: Tensor) -> tuple[Tensor, Tensor | None]:
        """The rewritten direction, and for eq. 5 the mask of zeroed coordinates."""
        assert self._table is not None
        predicted = self._table(theta)
        if self.combine == "average":
            return joint_average(current, predicted, self.num_old_tasks), None
        combined, zeroed = sign_agreement(current, predicted)
        self._to_log["metagrad/zeroed_fraction"] = zeroed.float().mean()
        return combined, zeroed

    def _after_optimizer_step(self, optimizer: torch.optim.Optimizer, *args: Any) -> None:
        """Update-vector mode: pairs from the update, and the rule applied to the update."""
        if self._theta_before is None:
            return
        theta_before, self._theta_before = self._theta_before, None
        params = self._step_params
        with torch.no_grad():
            theta_after = _flat(params)
            update = theta_before - theta_after  # gradient-like sign: theta' = theta - update
            self._record_pairs(theta_before, update)
            if self._table is not None:
                new_update, zeroed = self._combine(theta_before, update)
                if zeroed is None:
                    _write_flat(params, theta_before - new_update)
                else:  # eq. 5 on the update: a zeroed coordinate keeps its old value exactly
                    _write_flat(params, torch.where(zeroed, theta_before, theta_after))
        self._stepped = True

    def _tabulate(self, theta: Tensor) -> None:
        g = self._distiller.g
        assert g is not None and self._in_scale is not None
        reach = max(2.0 * float(theta.abs().max()), 8.0 * self._in_scale)
        self._table = TabulatedFunction.from_function(
            g, -reach, reach, num_points=self.table_points, device=theta.device
        )

    def _release(self) -> None:
        if self._hook_handle is not None:
            self._hook_handle.remove()
            self._hook_handle = None
        self._theta_before = None
