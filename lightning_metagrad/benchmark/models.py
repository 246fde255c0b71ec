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

    ``bias=False`` builds every ``nn.Linear`` without a bias (GPM's PMNIST network).

    ``task_classes`` (one sequence of class labels per task) gives it a head per task, the
    task-incremental setting: in training and scoring, a batch's logits are restricted to the
    classes of its ``batch["task_id"]`` (the other logits are set to ``-inf``), so each task
    trains and is scored only on its own rows of the last layer. ``forward`` itself returns
    every logit.

    Example:
        >>> model = MLPClassifier(input_dim=64, num_classes=10, hidden_sizes=(32,))
        >>> model(torch.zeros(2, 64)).shape
        torch.Size([2, 10])
        >>> MLPClassifier(input_dim=64, hidden_sizes=(32,), bias=False).net[0]
        Linear(in_features=64, out_features=32, bias=False)
        >>> heads = MLPClassifier(input_dim=4, num_classes=4, hidden_sizes=(),
        ...                       task_classes=[(0, 1), (2, 3)])
        >>> batch = {"x": torch.zeros(2, 4), "y": torch.tensor([2, 3]),
        ...          "task_id": torch.tensor([1, 1])}
        >>> heads.task_logits(batch).isinf().tolist()
        [[True, True, False, False], [True, True, False, False]]
    """

    def __init__(
        self,
        input_dim: int = 784,
        num_classes: int = 10,
        hidden_sizes: Sequence[int] = (256, 256, 256),
        optimizer: str = "sgd",
        lr: float = 0.003,
        task_classes: Sequence[Sequence[int]] | None = None,
        bias: bool = True,
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
            layers += [nn.Linear(width, size, bias=bias), nn.ReLU()]
            width = size
        layers.append(nn.Linear(width, num_classes, bias=bias))
        self.net = nn.Sequential(*layers)
        # [tasks, classes]: True at each task's own classes (a head per task), or None.
        self.task_mask: torch.Tensor | None
        self.register_buffer("task_mask", None, persistent=False)
        if task_classes is not None:
            mask = torch.zeros(len(task_classes), num_classes, dtype=torch.bool)
            for task, classes in enumerate(task_classes):
                classes = [int(c) for c in classes]
                if not classes or not all(0 <= c < num_classes for c in classes):
                    raise ValueError(
                        f"`task_classes[{task}]` must name classes in [0, {num_classes}), got "
                        f"{list(classes)}"
                    )
                mask[task, classes] = True
            self.task_mask = mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))

    @staticmethod
    def unpack(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(batch, dict):
            return batch["x"], batch["y"]
        return batch[0], batch[1]

    def task_logits(self, batch: Any) -> torch.Tensor:
        """The logits of a batch; with a head per task, restricted to each sample's task."""
        x, _ = self.unpack(batch)
        logits = self(x)
        if self.task_mask is None:
            return logits
        if not isinstance(batch, dict) or "task_id" not in batch:
            raise ValueError(
                "MLPClassifier(task_classes=...) needs the task of every sample: give dict "
                "batches with a 'task_id' entry (the task streams' batches have one)"
            )
        allowed = self.task_mask[batch["task_id"].to(self.task_mask.device)]
        return logits.masked_fill(~allowed.to(logits.device), float("-inf"))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        _, y = self.unpack(batch)
        loss = nn.functional.cross_entropy(self.task_logits(batch), y)
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
            if isinstance(batch, dict):
                batch = {**batch, "x": x.to(self.device)}
            else:
                batch = (x.to(self.device), y)
            labels = self.task_logits(batch).argmax(dim=-1).to(metric.device)
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
