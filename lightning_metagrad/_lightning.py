"""Everything the package needs from Lightning beyond its public API, in one place (private).

Lightning may change private names in any release; ``setup.cfg`` bounds the supported range
(``lightning>=2.2,<2.7``), and ``tests/test_lightning_internals.py`` pins what each function
relies on, so an upgrade that breaks one fails there first. Each function says why no public
API does the job; where a public one does, it is used instead (the strategy ``isinstance``
checks below, as ``callbacks/stochastic_weight_avg.py`` does, and the logging-step rule).

Checked against Lightning 2.6 (``lightning/pytorch/`` in site-packages).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, Strategy

# Private: no public API tells a strategy that runs `fit` in spawned or forked worker
# processes (ddp_spawn, ddp_fork, ddp_notebook) from one that runs it in this process; the
# launcher's class is the only mark (`_MultiProcessingLauncher`, since Lightning 1.8).
from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher

try:  # Lightning >= 2.4: FSDP2 / tensor parallelism, also sharded.
    from lightning.pytorch.strategies import ModelParallelStrategy

    _SHARDED: tuple[type[Strategy], ...] = (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)
    _MODEL_PARALLEL: type[Strategy] | None = ModelParallelStrategy
except ImportError:  # pragma: no cover - Lightning 2.2 / 2.3
    _SHARDED = (FSDPStrategy, DeepSpeedStrategy)
    _MODEL_PARALLEL = None


def runs_in_worker_processes(trainer: pl.Trainer) -> bool:
    """Whether ``fit`` runs in spawned/forked worker processes, whose callback state never
    reaches the caller's callback object (``ddp_spawn``, ``ddp_fork``, ``ddp_notebook``).

    Private API: ``_MultiProcessingLauncher`` (see the import above).
    """
    return isinstance(getattr(trainer.strategy, "launcher", None), _MultiProcessingLauncher)


def shards_parameters(strategy: Strategy) -> bool:
    """Whether the strategy shards parameters (FSDP, DeepSpeed, model parallel), so that no
    rank holds whole tensors. Public API: ``isinstance``, as Lightning's own
    ``StochasticWeightAveraging`` refuses these strategies."""
    return isinstance(strategy, _SHARDED)


def is_model_parallel(strategy: Strategy) -> bool:
    """Whether the strategy is Lightning's ``ModelParallelStrategy`` (FSDP2 / tensor
    parallelism on a device mesh). Public API: ``isinstance``."""
    return _MODEL_PARALLEL is not None and isinstance(strategy, _MODEL_PARALLEL)


def tensor_parallel_size(strategy: Strategy) -> int:
    """The size of a ``ModelParallelStrategy``'s tensor-parallel mesh dimension (1 for any
    other strategy). Public API: the strategy's ``device_mesh`` (set up before ``setup``)."""
    if not is_model_parallel(strategy):
        return 1
    return int(strategy.device_mesh["tensor_parallel"].size())  # type: ignore[attr-defined]


def logs_this_step(trainer: pl.Trainer) -> bool:
    """In ``on_train_batch_end`` of a batch that stepped the optimizer: whether Lightning
    writes this step's logs (``log_every_n_steps``), as Lightning's ``LearningRateMonitor``
    asks.

    Public API only: Lightning's private rule (``trainer._logger_connector.should_update_logs``)
    tests ``batches_that_stepped + 1``, which equals ``trainer.global_step`` there under
    automatic optimization with one optimizer (what the callbacks accept); also on the last
    step (``trainer.should_stop``). ``tests/test_lightning_internals.py`` checks the two agree.
    """
    every: int = trainer.log_every_n_steps  # type: ignore[attr-defined]  # set in __init__
    if every == 0:
        return False
    return trainer.global_step % every == 0 or trainer.should_stop


def before_batch_transfer(pl_module: pl.LightningModule, batch: Any) -> Any:
    """A batch the callback reads from a dataloader itself, through the module's (or the
    datamodule's) ``on_before_batch_transfer`` hook, as the training loop does
    (``loops/training_epoch_loop.py``) before ``strategy.batch_to_device``.

    Private API: ``LightningModule._on_before_batch_transfer`` picks the datamodule's hook when
    the datamodule overrides it (through the trainer's private data connector); calling
    ``pl_module.on_before_batch_transfer`` directly would skip a datamodule's override.
    """
    return pl_module._on_before_batch_transfer(batch, dataloader_idx=0)


def generate_state_key(callback: pl.Callback, **config: Any) -> str:
    """The callback's ``state_key`` from its configuration, so that several instances with
    different arguments keep separate checkpoint entries.

    Protected API: ``Callback._generate_state_key`` is the helper Lightning's docs and its own
    callbacks (``EarlyStopping``, ``ModelCheckpoint``) use for this; it has no public name.
    """
    return callback._generate_state_key(**config)
