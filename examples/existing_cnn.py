"""Your existing CNN, unchanged, made continual with one callback.

``ConvNetClassifier`` below stands for a ``LightningModule`` you already have: two conv blocks
and a linear head, a ``training_step`` with cross-entropy, an ordinary optimizer. It knows
nothing of tasks or continual learning. The script trains it on a stream of rotated-image tasks
(images ``[B, 1, H, W]``, one ``trainer.fit`` per task) twice -- once plainly, once with
``callbacks=[MetaGradCallback()]`` -- and prints both accuracy matrices (row: after training
task i, column: test accuracy on task j) with ACC and BWT. The model class, its code and its
parameters are the same in both runs: the callback adds nothing to the module.

Run (no download; scikit-learn's bundled 8x8 digits, under half a minute on CPU)::

    python examples/existing_cnn.py

On Rotated Fashion-MNIST (torchvision layout under ``--root``)::

    python examples/existing_cnn.py --dataset fashion_mnist --root ../shared/data \
        --tasks 5 --steps 1000
"""

from __future__ import annotations

import argparse
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_metagrad import MetaGradCallback
from lightning_metagrad.benchmark.quiet import quiet_trainer_kwargs, silence_lightning
from lightning_metagrad.data import RotatedStream
from lightning_metagrad.metrics import average_accuracy, backward_transfer


class ConvNetClassifier(pl.LightningModule):
    """An ordinary small CNN image classifier (no continual-learning code anywhere).

    Example:
        >>> ConvNetClassifier(num_classes=10)(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),  # any input size (8x8 digits, 28x28 Fashion-MNIST)
        )
        self.head = nn.Linear(64 * 2 * 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch["x"], batch["y"]
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, batch_size=len(y))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams["lr"], momentum=0.9)

    @torch.no_grad()
    def accuracy(self, loader: Any) -> float:
        self.eval()
        correct = total = 0
        for batch in loader:
            pred = self(batch["x"].to(self.device)).argmax(-1)
            correct += int((pred == batch["y"].to(self.device)).sum())
            total += len(batch["y"])
        self.train()
        return correct / max(total, 1)


def train_over_tasks(
    stream: RotatedStream, steps: int, lr: float, seed: int, metagrad: bool
) -> tuple[ConvNetClassifier, torch.Tensor]:
    """One ``fit`` per task; return the trained model and the accuracy matrix R[i, j]."""
    pl.seed_everything(seed, verbose=False)
    model = ConvNetClassifier(stream.image_shape[0], stream.num_classes, lr=lr)
    callbacks = [MetaGradCallback()] if metagrad else []  # the only difference between runs
    R = torch.zeros(stream.num_tasks, stream.num_tasks)
    for task in range(stream.num_tasks):
        stream.set_task(task)
        trainer = pl.Trainer(
            max_steps=steps,
            callbacks=callbacks,  # the same callback instance: each new fit() is a new task
            accelerator="cpu",
            **quiet_trainer_kwargs(),  # no logger, checkpoints, progress bar or model summary
        )
        trainer.fit(model, train_dataloaders=stream.train_dataloader())  # task `task`'s batches
        for j in range(stream.num_tasks):
            R[task, j] = model.accuracy(stream.task_dataloader(j, split="test"))
    return model, R


def show(name: str, R: torch.Tensor) -> None:
    print(f"\n{name}: ACC {average_accuracy(R):.3f}  BWT {backward_transfer(R):+.3f}")
    for i, row in enumerate(R.tolist()):
        print(f"  after task {i}: " + " ".join(f"{a:.3f}" for a in row))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="digits", choices=["digits", "mnist", "fashion_mnist"])
    parser.add_argument("--root", default=None, help="torchvision data folder (MNIST-like sets)")
    parser.add_argument("--tasks", type=int, default=3, help="rotations evenly over 0..180 deg")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per task")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    silence_lightning()  # one fit per task: no per-fit banners

    stream = RotatedStream(
        dataset=args.dataset, root=args.root, num_tasks=args.tasks, seed=args.seed, flatten=False
    )
    print(f"tasks: rotations by {stream.angles} degrees; images {stream.input_shape}")
    results: dict[str, Any] = {}
    models = {}
    for name, metagrad in (("plain", False), ("MetaGrad", True)):
        models[name], results[name] = train_over_tasks(
            stream, args.steps, args.lr, args.seed, metagrad
        )
        show(name, results[name])
    # The callback changed how the weights moved, not what the model is.
    plain, meta = models["plain"].state_dict(), models["MetaGrad"].state_dict()
    results["same_model"] = (
        type(models["plain"]) is type(models["MetaGrad"]) is ConvNetClassifier
        and plain.keys() == meta.keys()
        and all(plain[k].shape == meta[k].shape for k in plain)
    )
    print(f"\nsame model class and parameters with and without MetaGrad: {results['same_model']}")
    return results


if __name__ == "__main__":
    main()
