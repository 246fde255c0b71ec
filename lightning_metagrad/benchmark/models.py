"""The benchmark's learner: the paper's MLP as an ordinary LightningModule."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_metagrad.metrics import AccuracyMatrix

OPTIMIZERS = ("sgd", "momentum", "adam")


class MLPClassifier(pl.LightningModule):
    """``input_dim -> hidden... -> num_classes`` ReLU MLP (paper: 784-256-256-256-10).

    Takes dict batches ``{"x", "y", ...}`` or ``(x, y)`` tuples. Knows nothing of continual
    learning: the callbacks add that.

    Example:
        >>> model = MLPClassifier(input_dim=64, num_classes=10, hidden_sizes=(32,))
        >>> model(torch.zeros(2, 64)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        input_dim: int = 784,
        num_classes: int = 10,
        hidden_sizes: Sequence[int] = (256, 256, 256),
        optimizer: str = "sgd",
        lr: float = 0.003,
    ) -> None:
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"`optimizer` must be one of {OPTIMIZERS}, got {optimizer!r}")
        if lr <= 0:
            raise ValueError(f"`lr` must be > 0, got {lr}")
        self.save_hyperparameters()
        layers: list[nn.Module] = []
        width = input_dim
        for size in hidden_sizes:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))

    @staticmethod
    def unpack(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(batch, dict):
            return batch["x"], batch["y"]
        return batch[0], batch[1]

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = self.unpack(batch)
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True, batch_size=len(y))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        name, lr = self.hparams["optimizer"], self.hparams["lr"]
        if name == "adam":
            return torch.optim.Adam(self.parameters(), lr=lr)
        return torch.optim.SGD(self.parameters(), lr=lr, momentum=0.9 if name == "momentum" else 0)

    @torch.no_grad()
    def score(self, loader: Any, metric: AccuracyMatrix, trained_upto: int, eval_task: int) -> None:
        """Add the predictions on every batch of ``loader`` to ``metric``'s cell
        ``R[trained_upto][eval_task]`` (eval mode, restored afterwards; the metric stays on its
        device)."""
        was_training = self.training
        self.eval()
        for batch in loader:
            x, y = self.unpack(batch)
            labels = self(x.to(self.device)).argmax(dim=-1).to(metric.device)
            metric.update(labels, y.to(metric.device), trained_upto, eval_task)
        self.train(was_training)

    def accuracy(self, loader: Any) -> float:
        """Accuracy over a whole dataloader (eval mode, restored afterwards).

        Example:
            >>> model = MLPClassifier(input_dim=4, num_classes=3, hidden_sizes=())
            >>> model.accuracy([(torch.zeros(5, 4), torch.tensor([0, 1, 2, 0, 0]))]) in (0.2, 0.6)
            True
        """
        metric = AccuracyMatrix(num_tasks=1)
        metric.set_dtype(torch.float64)  # exact ratios, as Python's division gives
        self.score(loader, metric, trained_upto=0, eval_task=0)
        return float(metric.compute())  # a 1 x 1 matrix
