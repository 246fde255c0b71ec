"""Small Lightning helpers shared by ``MetaGradCallback`` and the baselines (private): the
refusals of set-ups they cannot support, the loss of a ``training_step`` output, and quiet
extra passes. Private Lightning APIs live in :mod:`lightning_metagrad._lightning`."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.seed import isolate_rng
from torch import Tensor

from lightning_metagrad._lightning import (
    is_model_parallel,
    runs_in_worker_processes,
    shards_parameters,
    tensor_parallel_size,
)

_ONE_OPTIMIZER = (
    "Return a single optimizer from `configure_optimizers` (use parameter groups for "
    "per-module settings)."
)


def refuse_unsupported(
    name: str,
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    *,
    edit: str,
    alternative: str = "",
    refuse_spawn: bool = True,
    fsdp2: bool = False,
) -> None:
    """The ``setup`` (stage ``"fit"``) refusals of ``MetaGradCallback`` and the baselines:
    manual optimization, spawned/forked processes (if ``refuse_spawn``) and sharded
    strategies, each a ``MisconfigurationException`` naming the problem and the fix.

    ``edit`` says what the callback does between backward and ``optimizer.step`` ("rewrites
    gradients"); ``alternative`` is a way out other than automatic optimization, if any.
    The optimizer count is checked in ``on_fit_start`` (:func:`refuse_at_fit_start`), from
    ``trainer.optimizers``: ``configure_optimizers`` is never called a second time.
    """
    if not pl_module.automatic_optimization:
        raise MisconfigurationException(
            f"{name} {edit} between backward and optimizer.step, which Lightning's manual "
            "optimization does not expose. Use automatic optimization (remove "
            "`self.automatic_optimization = False`) with a single optimizer (parameter groups "
            f"give per-module settings){alternative}."
        )
    if refuse_spawn and runs_in_worker_processes(trainer):
        # Runs in the worker: its state would never reach the caller's callback object.
        raise MisconfigurationException(
            f"{name} does not support spawned/forked processes (ddp_spawn, ddp_fork, "
            "ddp_notebook): the callback's state stays in the worker processes and is lost when "
            "they exit. Use strategy='ddp', or devices=1."
        )
    strategy = trainer.strategy
    if fsdp2 and is_model_parallel(strategy):
        if tensor_parallel_size(strategy) > 1:
            raise MisconfigurationException(
                f"{name} supports ModelParallelStrategy with data parallelism only (FSDP2's "
                f"fully_shard); tensor_parallel_size is {tensor_parallel_size(strategy)}. Use "
                "ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1), "
                "with N the number of devices."
            )
        return
    if shards_parameters(strategy):
        fix = (
            "use ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1) with "
            "fully_shard in configure_model (FSDP2), strategy='ddp', or a single device."
            if fsdp2
            else "use a single device or strategy='ddp'."
        )
        raise MisconfigurationException(
            f"{name} does not support the {type(strategy).__name__} (sharded parameters that "
            f"it cannot read between backward and the optimizer step); {fix}"
        )


def refuse_at_fit_start(name: str, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """The ``on_fit_start`` refusals: exactly one optimizer (counted in ``trainer.optimizers``)
    and at least one trainable parameter."""
    count = len(trainer.optimizers)
    if count != 1:
        raise MisconfigurationException(
            f"{name} supports exactly one optimizer, got {count}. {_ONE_OPTIMIZER}"
        )
    if not any(p.requires_grad for p in pl_module.parameters()):
        raise MisconfigurationException(
            f"{name} found no trainable parameters (all have requires_grad=False), so there is "
            "no task to learn or protect. Unfreeze the parameters to train, or remove the "
            "callback."
        )


def explain_lightning_refusal(name: str, exception: BaseException) -> None:
    """``on_exception``: Lightning refuses several optimizers under automatic optimization
    (before any callback hook sees them) and advises manual optimization, which the callbacks
    cannot support. A note on that exception says what to do instead (Python >= 3.11 shows
    notes with the traceback)."""
    if not isinstance(exception, RuntimeError):
        return
    if "multiple optimizers is only supported with manual optimization" not in str(exception):
        return
    add_note = getattr(exception, "add_note", None)
    note = (
        f"{name} supports exactly one optimizer and needs automatic optimization, so "
        f"switching to manual optimization does not help here. {_ONE_OPTIMIZER}"
    )
    if add_note is not None and note not in getattr(exception, "__notes__", []):
        add_note(note)


def loss_of(output: Any) -> Tensor | None:
    """The loss tensor of a ``training_step`` output (a tensor, ``{"loss": ...}`` or None)."""
    if output is None or isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping) and isinstance(output.get("loss"), Tensor):
        return output["loss"]
    raise TypeError(
        "`training_step` must return a loss tensor, a dict with a 'loss' tensor, or None to "
        f"be used for the importance estimate; got {type(output).__name__}."
    )


def batch_loss_of(pl_module: pl.LightningModule) -> Callable[[Any], Tensor | None]:
    """The module's own ``training_step`` loss on a stored batch, in :func:`quiet_eval`:
    what a replaying predictor differentiates (``Runtime.batch_loss``)."""

    def loss(batch: Any) -> Tensor | None:
        with quiet_eval(pl_module):
            return loss_of(pl_module.training_step(batch, 0))

    return loss


@contextlib.contextmanager
def quiet_eval(pl_module: pl.LightningModule) -> Iterator[None]:
    """Eval mode, ``self.log`` / ``self.log_dict`` as no-ops and isolated RNG, all restored after.

    Eval mode keeps dropout off and BatchNorm statistics untouched; the RNG isolation keeps
    the data order and dropout masks of later training identical to a run without the callback.
    """
    modes = {m: m.training for m in pl_module.modules()}
    include_cuda = pl_module.device.type == "cuda"

    def _no_log(*args: Any, **kwargs: Any) -> None:
        return None

    pl_module.eval()
    # Instance attributes shadow the methods; `del` brings the class methods back.
    object.__setattr__(pl_module, "log", _no_log)
    object.__setattr__(pl_module, "log_dict", _no_log)
    try:
        with isolate_rng(include_cuda=include_cuda), torch.enable_grad():
            yield
    finally:
        object.__delattr__(pl_module, "log")
        object.__delattr__(pl_module, "log_dict")
        for module, mode in modes.items():
            module.training = mode
