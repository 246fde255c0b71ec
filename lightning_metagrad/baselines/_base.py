"""The one task lifecycle of the baselines, and the functions their extra passes share.

:class:`_TaskCallback` is the base of every baseline: the quadratic penalties (EWC, online
EWC, SI, MAS: :class:`~lightning_metagrad.baselines._penalty._QuadraticPenaltyCallback`) and
the gradient editors (GPM, A-GEM, ER). Each ``trainer.fit`` is one task, ended when the fit
ends (``on_train_end``, where ``trainer.train_dataloader`` is still available) or when
:meth:`_TaskCallback.consolidate` is called by hand. A task end with NaN/inf weights is refused
with a RuntimeError and changes nothing.

Every baseline refuses the set-ups it cannot support (``setup`` and ``on_fit_start``: the
refusals of :mod:`lightning_metagrad._module_utils`, shared with ``MetaGradCallback``),
including a model without trainable parameters, and keeps its state when
``trainer.test/validate/predict`` load a checkpoint (only ``fit`` restores it).

Finiteness is checked with :mod:`lightning_metagrad._tensors`, the engine's helpers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, ClassVar

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
    refuse_at_fit_start,
    refuse_unsupported,
)
from lightning_metagrad._tensors import first_non_finite
from lightning_metagrad._validation import check_state_version

TensorDict = dict[str, Tensor]
#: The trainable parameters of a task end, by name.
Params = dict[str, torch.nn.Parameter]
#: Where a task end reads the finished task's data (None: ``trainer.train_dataloader``).
TaskData = Iterable[Any] | None


# ---------------------------------------------------------------------------- shared checks


def check_finite_weights(name: str, pl_module: torch.nn.Module, task: int) -> None:
    """RuntimeError naming the first parameter with a NaN/inf entry (at a task end)."""
    bad = first_non_finite({n: p.detach() for n, p in pl_module.named_parameters()})
    if bad is not None:
        raise RuntimeError(
            f"{name}: parameter {bad!r} is not finite at the end of task {task + 1}; the "
            "task is not consolidated (its state would hold NaN/inf). Training diverged: "
            "lower the learning rate, or clip gradients."
        )


def check_finite_importance(
    name: str, importance: Mapping[str, Tensor], task: int, cause: str
) -> None:
    """RuntimeError naming the first parameter whose new importance has a NaN/inf entry;
    ``cause`` says where such values come from and what to do."""
    bad = first_non_finite(importance)
    if bad is not None:
        raise RuntimeError(
            f"{name}: the importance of parameter {bad!r} is not finite at the end of task "
            f"{task + 1}; the task is not consolidated (its state would hold NaN/inf). {cause}"
        )


# ---------------------------------------------------------------------------- extra passes


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


def mean_over_ranks(trainer: pl.Trainer, tensors: Sequence[Tensor]) -> list[Tensor]:
    """Each tensor averaged over the DDP ranks, in one all-reduce (in their promoted dtype)."""
    if not tensors:
        return []
    flat = torch.cat([t.reshape(-1) for t in tensors])
    flat = trainer.strategy.reduce(flat, reduce_op="mean")
    pieces = flat.split([t.numel() for t in tensors])
    return [piece.view_as(t) for piece, t in zip(pieces, tensors)]


# ---------------------------------------------------------------------------- the base class


class _TaskCallback(Callback):
    """The task lifecycle of every baseline.

    Each ``trainer.fit`` is one task, ended in ``on_train_end`` by :meth:`consolidate` (a fit in
    which no trainable parameter had a gradient ends none, and says why). The refusals shared
    with ``MetaGradCallback`` run in ``setup`` (``refuse_unsupported``) and ``on_fit_start``
    (``refuse_at_fit_start``). Before every optimizer step (``on_before_optimizer_step``: once
    per real step, after AMP unscaling and the whole accumulation window, before clipping) a
    step on which a trainable parameter has a gradient counts for the task and is handed to
    :meth:`_edit_step`.

    ``trainer.test/validate/predict`` load the callback state of a ``ckpt_path`` as ``fit``
    does; an older checkpoint would roll the consolidated tasks back, so (as for
    :class:`~lightning_metagrad.MetaGradCallback`) only ``fit`` restores the state. ``setup``
    records the stage; ``teardown`` and ``on_exception`` (a failed evaluation calls no
    ``teardown``) clear it.

    Subclasses implement :meth:`_end_task`, :meth:`_config` and :meth:`_edit_step`, may extend
    :meth:`_bind` and :meth:`_release` (the run-time state of a fit), and add their state with
    :meth:`_extra_state` / :meth:`_load_extra_state`.
    """

    #: The layout version :meth:`state_dict` writes (bumped when the layout changes).
    _state_version: ClassVar[int] = 1
    #: What the callback does between backward and ``optimizer.step`` (for the refusal message).
    _edit = "rewrites gradients"
    #: Another way out of the manual-optimization refusal, if any (for the refusal message).
    _alternative = ""
    #: Whether spawned/forked processes (whose state never reaches the caller) are refused.
    _refuse_spawn = True

    def __init__(self) -> None:
        super().__init__()
        #: Tasks consolidated so far.
        self.num_tasks = 0
        self._steps_in_task = 0
        self._evaluating = False
        self._first_step = 0
        # Per-fit run-time state: the trainable parameters by name, of the module `_owner`.
        self._params: dict[str, Tensor] = {}
        self._owner: pl.LightningModule | None = None

    # ------------------------------------------------------------------ public API

    def consolidate(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        dataloader: Iterable[Any] | None = None,
    ) -> None:
        """End the current task: store what protects it (importances and anchors, subspace
        bases, or the task's batches).

        Called automatically at the end of every ``trainer.fit``; call it by hand only to end a
        task in the middle of a fit. ``dataloader`` (for methods that read the finished task's
        data) defaults to ``trainer.train_dataloader``.

        Raises:
            RuntimeError: a weight, or the new task's importance, is NaN/inf (nothing changes).
        """
        check_finite_weights(type(self).__name__, pl_module, self.num_tasks)
        self._end_task(trainer, pl_module, dataloader)
        self.num_tasks += 1
        self._steps_in_task = 0
        self._owner = None  # rebuilt lazily for the next step

    # ------------------------------------------------------------------ subclass API

    def _end_task(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, dataloader: TaskData
    ) -> None:
        """Store what protects the finished task (the weights are finite)."""
        raise NotImplementedError

    def _config(self) -> dict[str, Any]:
        """The arguments that tell two configurations apart (for :attr:`state_key`)."""
        raise NotImplementedError

    def _edit_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, names: list[str]
    ) -> None:
        """Edit the gradients of a step; ``names``: the trainable parameters with a gradient."""
        raise NotImplementedError

    def _bind(self, pl_module: pl.LightningModule, check: bool) -> None:
        """Align the run-time state with ``pl_module`` (at the fit start with ``check``, whose
        problems are reported then; lazily without, after a task end or a state load)."""
        self._params = {n: p for n, p in pl_module.named_parameters() if p.requires_grad}
        self._owner = pl_module

    def _release(self) -> None:
        """Drop the references to the module between fits."""
        self._params = {}
        self._owner = None

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    # ------------------------------------------------------------------ hooks

    @property
    @override
    def state_key(self) -> str:
        return generate_state_key(self, **self._config())

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._evaluating = stage != "fit"
        if stage != "fit":
            return
        refuse_unsupported(
            type(self).__name__,
            trainer,
            pl_module,
            edit=self._edit,
            alternative=self._alternative,
            refuse_spawn=self._refuse_spawn,
        )

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._evaluating = False

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        refuse_at_fit_start(type(self).__name__, trainer, pl_module)
        self._bind(pl_module, check=True)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._first_step = trainer.global_step  # after a resumed checkpoint is restored

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self._owner is not pl_module:
            self._bind(pl_module, check=False)
        names = [n for n, p in self._params.items() if p.grad is not None]
        if not names:
            return
        self._steps_in_task += 1
        self._edit_step(trainer, pl_module, names)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._steps_in_task > 0:
            self.consolidate(trainer, pl_module)
            return
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

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._release()

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._evaluating = False
        explain_lightning_refusal(type(self).__name__, exception)
        self._release()

    # ------------------------------------------------------------------ checkpointing

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": self._state_version,
            "num_tasks": self.num_tasks,
            "steps_in_task": self._steps_in_task,
            **self._extra_state(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        name = type(self).__name__
        if self._evaluating:  # test/validate/predict: the state is kept as it is
            rank_zero_info(
                f"{name}: trainer.test/validate/predict loaded a checkpoint; the callback's "
                "continual-learning state is kept as it is (only `fit` restores it)."
            )
            return
        check_state_version(name, state_dict, self._state_version)
        self.num_tasks = int(state_dict["num_tasks"])
        self._steps_in_task = int(state_dict["steps_in_task"])
        self._load_extra_state(state_dict)
        self._owner = None  # rebuilt lazily for the next step
