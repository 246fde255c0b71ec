"""A task stream drives a real Trainer: the training batches are the current task's, the test
loaders one per task. The streams themselves: ``tests/unit/test_streams.py``."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_metagrad.data import SplitStream


class _Probe(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(64, 10)
        self.train_tasks: set[int] = set()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.train_tasks.update(batch["task_id"].tolist())
        return nn.functional.cross_entropy(self.net(batch["x"]), batch["y"])

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        assert set(batch["task_id"].tolist()) == {dataloader_idx}
        self.log("task", batch["task_id"].float().mean(), batch_size=len(batch["y"]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.filterwarnings("ignore:You passed in a `val_dataloader` but have no")
def test_stream_drives_a_trainer_with_one_test_loader_per_task() -> None:
    stream, model = SplitStream(num_tasks=5, batch_size=32, eval_batch_size=256), _Probe()
    stream.set_task(4)
    trainer = pl.Trainer(
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(model, datamodule=stream)
    assert model.train_tasks == {4}
    results = trainer.test(model, datamodule=stream, verbose=False)
    assert [r[f"task/dataloader_idx_{t}"] for t, r in enumerate(results)] == [0, 1, 2, 3, 4]
