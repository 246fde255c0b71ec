"""LightningCLI: a model, a task-stream datamodule and ``MetaGradCallback`` from a YAML file.

The whole continual run is one ``fit``: ``TaskSequence`` serves task ``t`` for
``epochs_per_task`` epochs, then task ``t + 1`` (Lightning reloads the train dataloader every
epoch), and every batch carries its ``task_id``. ``config.yaml`` adds the callback under
``trainer.callbacks`` with ``task_boundaries: batch``, so a change of task id starts a new
task. Validation runs on every task after each epoch (``val_acc/dataloader_idx_j``), and the
accuracy matrix at the end of each task is printed and returned.

Run (no download; scikit-learn's bundled 8x8 digits, under half a minute on CPU)::

    python examples/cli/train.py fit --config examples/cli/config.yaml

Override anything from the command line, e.g. plain training without the callback, or real
Rotated Fashion-MNIST (torchvision layout under ``root``)::

    python examples/cli/train.py fit --config examples/cli/config.yaml --trainer.callbacks=null
    python examples/cli/train.py fit --config examples/cli/config.yaml \
        --data.stream.init_args.dataset fashion_mnist \
        --data.stream.init_args.root ../shared/data --data.stream.init_args.num_tasks 5 \
        --data.epochs_per_task 2 --trainer.max_epochs 10

``python examples/cli/train.py fit --print_config`` shows every option. Why one ``fit`` and not
one CLI call per task: ``fit(ckpt_path=...)`` restores Lightning's loop progress (and the
stream's current task), so it resumes an interrupted task rather than starting the next one
(see docs/supported-setups.md, "Resuming between tasks").
"""

from __future__ import annotations

import logging
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LightningCLI
from torch import nn

from lightning_metagrad import MetaGradCallback
from lightning_metagrad.data import TaskStream
from lightning_metagrad.metrics import average_accuracy, backward_transfer


class ConvNet(pl.LightningModule):
    """An ordinary CNN classifier with per-dataloader validation accuracy; no CL code."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 2 * 2, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = nn.functional.cross_entropy(self(batch["x"]), batch["y"])
        self.log("train_loss", loss, batch_size=len(batch["y"]))
        return loss

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        acc = (self(batch["x"]).argmax(-1) == batch["y"]).float().mean()
        self.log("val_acc", acc, batch_size=len(batch["y"]))  # -> val_acc/dataloader_idx_j

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        acc = (self(batch["x"]).argmax(-1) == batch["y"]).float().mean()
        self.log("test_acc", acc, batch_size=len(batch["y"]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams["lr"], momentum=0.9)


class TaskSequence(pl.LightningDataModule):
    """Tasks one after another inside one ``fit``: ``epochs_per_task`` epochs each.

    Set ``trainer.max_epochs`` to ``num_tasks * epochs_per_task`` and
    ``trainer.reload_dataloaders_every_n_epochs`` to 1 (extra epochs stay on the last task).
    Validation and test loaders hold every task (``dataloader_idx`` = task).
    """

    def __init__(self, stream: TaskStream, epochs_per_task: int = 10) -> None:
        super().__init__()
        if epochs_per_task < 1:
            raise ValueError(f"`epochs_per_task` must be >= 1, got {epochs_per_task}")
        self.stream, self.epochs_per_task = stream, epochs_per_task

    @property
    def num_classes(self) -> int:
        return self.stream.num_classes

    @property
    def in_channels(self) -> int:
        return self.stream.image_shape[0]

    @property
    def current_task(self) -> int:
        return self.stream.current_task

    def setup(self, stage: str) -> None:
        self.stream.setup(stage)

    def train_dataloader(self) -> Any:
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        self.stream.set_task(min(epoch // self.epochs_per_task, self.stream.num_tasks - 1))
        return self.stream.train_dataloader()

    def val_dataloader(self) -> Any:
        return self.stream.val_dataloader()

    def test_dataloader(self) -> Any:
        return self.stream.test_dataloader()


class AccuracyMatrix(pl.Callback):
    """Row ``i``: validation accuracy on every task at the last epoch of training task ``i``."""

    def __init__(self) -> None:
        self.rows: dict[int, list[float]] = {}

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        data = trainer.datamodule
        metrics = trainer.callback_metrics
        tasks = data.stream.num_tasks  # type: ignore[union-attr]
        row = [float(metrics[f"val_acc/dataloader_idx_{j}"]) for j in range(tasks)]
        self.rows[data.current_task] = row  # type: ignore[union-attr]  # the last epoch wins

    def matrix(self) -> torch.Tensor:
        return torch.tensor([self.rows[i] for i in sorted(self.rows)])


class ContinualCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: Any) -> None:
        # The model's shape follows the data: no need to repeat it in the YAML.
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.in_channels", "model.in_channels", apply_on="instantiate")

    def instantiate_classes(self) -> None:
        # A value the type hints accept but a constructor refuses (e.g. a predictor's
        # threshold above 1) is reported like a parse error, exit status 2, with the
        # constructor's message naming the argument, instead of a long traceback.
        try:
            super().instantiate_classes()
        except ValueError as err:
            self.parser.error(f"invalid configuration value: {err}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # quiet banners
    recorder = AccuracyMatrix()
    cli = ContinualCLI(
        ConvNet,
        TaskSequence,
        args=argv,
        trainer_defaults={"callbacks": [recorder]},  # added to those of the YAML
    )
    metagrad = [c for c in cli.trainer.callbacks if isinstance(c, MetaGradCallback)]
    results: dict[str, Any] = {
        "trainer": cli.trainer,
        "metagrad": metagrad[0] if metagrad else None,
    }
    if recorder.rows:
        R = recorder.matrix()
        results["matrix"] = R
        name = "MetaGrad" if metagrad else "plain"
        print(f"\n{name}: R[i, j] = val accuracy on task j after training task i")
        for i, row in enumerate(R.tolist()):
            print(f"  after task {i}: " + " ".join(f"{a:.3f}" for a in row))
        if len(R) == len(R[0]):
            print(f"ACC {average_accuracy(R):.3f}  BWT {backward_transfer(R):+.3f}")
        if metagrad:
            print(f"MetaGrad saw {metagrad[0].task_index + 1} tasks")
    return results


if __name__ == "__main__":
    main()
