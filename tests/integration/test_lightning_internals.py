"""What ``lightning_metagrad._lightning`` relies on from Lightning, pinned.

A Lightning upgrade that changes one of these facts fails here first (see ``setup.cfg`` for
the supported range). The facts that need no Trainer: ``tests/unit/test_lightning_strategies.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import TinyClassifier, loader, make_trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_metagrad import MetaGradCallback
from lightning_metagrad._lightning import (
    logs_this_step,
    runs_in_worker_processes,
)
from lightning_metagrad.baselines import EWCCallback, GPMCallback


class CountsConfigureOptimizers(TinyClassifier):
    def __init__(self) -> None:
        super().__init__()
        self.configure_calls = 0

    def configure_optimizers(self) -> torch.optim.Optimizer:
        self.configure_calls += 1
        return super().configure_optimizers()


@pytest.mark.parametrize(
    "make",
    [MetaGradCallback, lambda: EWCCallback(fisher_batches=1), lambda: GPMCallback(samples=8)],
    ids=["MetaGradCallback", "EWCCallback", "GPMCallback"],
)
def test_configure_optimizers_runs_once_per_fit(make: Any) -> None:
    model, callback = CountsConfigureOptimizers(), make()
    for task in range(2):
        make_trainer([callback], max_steps=3).fit(model, loader(task))
        assert model.configure_calls == task + 1  # Lightning's own call only


class LogStepSpy(Callback):
    """Compares the public rule with Lightning's private one on every stepping batch."""

    def __init__(self) -> None:
        self.last_step = -1
        self.checked: list[tuple[int, bool]] = []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.last_step = trainer.global_step  # after a checkpoint is restored

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.last_step:
            return  # an accumulating batch: no optimizer step, the callbacks log nothing
        self.last_step = trainer.global_step
        private = trainer._logger_connector.should_update_logs
        assert logs_this_step(trainer) == private, trainer.global_step
        self.checked.append((trainer.global_step, private))


@pytest.mark.parametrize("accumulate", [1, 2])
def test_the_public_logging_step_rule_is_lightnings(tmp_path: Path, accumulate: int) -> None:
    spy = LogStepSpy()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1)
    trainer = make_trainer(
        [spy, checkpoint],
        max_steps=10,
        log_every_n_steps=3,
        accumulate_grad_batches=accumulate,
        enable_checkpointing=True,
    )
    trainer.fit(TinyClassifier(), loader(0))
    assert [s for s, logged in spy.checked if logged] == [3, 6, 9]
    # Resumed mid-run: the counters are restored consistently.
    resumed = LogStepSpy()
    make_trainer(
        [resumed], max_steps=10, log_every_n_steps=3, accumulate_grad_batches=accumulate
    ).fit(TinyClassifier(), loader(0), ckpt_path=tmp_path / "epoch=0-step=4.ckpt")
    assert [s for s, logged in resumed.checked if logged] == [6, 9]


def test_no_logging_step_with_log_every_n_steps_0() -> None:
    spy = LogStepSpy()
    make_trainer([spy], max_steps=4, log_every_n_steps=0).fit(TinyClassifier(), loader(0))
    assert spy.checked and not any(logged for _, logged in spy.checked)


def test_spawned_processes_are_told_by_the_launcher() -> None:
    spawn = pl.Trainer(strategy="ddp_spawn", accelerator="cpu", devices=1, logger=False)
    assert runs_in_worker_processes(spawn)
    assert not runs_in_worker_processes(make_trainer([]))
    assert not runs_in_worker_processes(
        pl.Trainer(strategy="ddp", accelerator="cpu", devices=1, logger=False)
    )
