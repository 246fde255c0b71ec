"""Tiny real models and data for the tests (BoringModel-style)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_metagrad.predictors import MetaNetPredictor


class DictDataset(Dataset):
    """Dict batches {"x", "y", "task_id"}."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, task_id: int):
        self.x, self.y, self.task_id = x, y, task_id

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"x": self.x[i], "y": self.y[i], "task_id": self.task_id}


def task_data(task: int, n: int = 128, dim: int = 10, classes: int = 3) -> tuple:
    """A learnable synthetic classification task; each task has its own labelling rule."""
    g = torch.Generator().manual_seed(1000 + task)
    x = torch.randn(n, dim, generator=g)
    w = torch.randn(dim, classes, generator=g)
    return x, (x @ w).argmax(1)


def loader(task: int, dict_batches: bool = False, batch_size: int = 16, n: int = 128) -> DataLoader:
    x, y = task_data(task, n=n)
    ds: Dataset = DictDataset(x, y, task) if dict_batches else TensorDataset(x, y)
    return DataLoader(ds, batch_size=batch_size, shuffle=False)


class TinyClassifier(pl.LightningModule):
    """A two-layer MLP; ``optimizer`` picks SGD, momentum SGD or Adam."""

    def __init__(self, optimizer: str = "sgd", lr: float = 0.1, hidden: int = 16):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(10, hidden), nn.ReLU(), nn.Linear(hidden, 3))
        self.optimizer_name = optimizer
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = (batch["x"], batch["y"]) if isinstance(batch, dict) else batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        momentum = 0.9 if self.optimizer_name == "momentum" else 0.0
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=momentum)


def make_trainer(callbacks: list, max_steps: int = 8, **kwargs: Any) -> pl.Trainer:
    defaults: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    defaults.update(kwargs)
    return pl.Trainer(callbacks=callbacks, max_steps=max_steps, **defaults)


def small_predictor() -> MetaNetPredictor:
    """The paper's predictor, kept tiny and trained every step."""
    return MetaNetPredictor(
        hidden_sizes=(16, 16),
        coords_per_step=128,
        update_every=1,
        distill_steps=20,
        distill_samples=256,
    )


def small_callback_kwargs() -> dict[str, Any]:
    """MetaGradCallback settings for fast tests (a fresh predictor each call)."""
    return {"predictor": small_predictor()}


@pytest.fixture(autouse=True)
def _seed() -> None:
    pl.seed_everything(0, verbose=False)
