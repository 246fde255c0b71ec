"""Quickstart: Permuted MNIST-style continual learning, plain training vs MetaGrad.

Trains the same MLP on a stream of pixel-permuted tasks twice, once plainly and once with
``MetaGradCallback``, and prints both accuracy matrices (row: after training task i,
column: accuracy on task j) with ACC and BWT.

Run (no download; scikit-learn's bundled 8x8 digits)::

    python examples/permuted_quickstart.py

On real Permuted Fashion-MNIST (torchvision layout under ``--root``)::

    python examples/permuted_quickstart.py --dataset fashion_mnist --root ../shared/data \
        --steps 2000 --lr 0.03
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch

from lightning_metagrad import MetaGradCallback
from lightning_metagrad.benchmark.models import MLPClassifier
from lightning_metagrad.benchmark.quiet import quiet_trainer_kwargs, silence_lightning
from lightning_metagrad.data import PermutedStream
from lightning_metagrad.metrics import average_accuracy, backward_transfer


def run(stream: PermutedStream, steps: int, lr: float, seed: int, metagrad: bool) -> torch.Tensor:
    """Train on every task of ``stream`` in turn; return the accuracy matrix R[i, j]."""
    pl.seed_everything(seed, verbose=False)
    model = MLPClassifier(input_dim=stream.input_dim, num_classes=stream.num_classes, lr=lr)
    callbacks = [MetaGradCallback()] if metagrad else []  # the one line that adds MetaGrad
    R = torch.zeros(stream.num_tasks, stream.num_tasks)
    for task in range(stream.num_tasks):
        stream.set_task(task)
        trainer = pl.Trainer(
            max_steps=steps,
            callbacks=callbacks,  # the same callback instance: each new fit() is a new task
            **quiet_trainer_kwargs(),  # no logger, checkpoints, progress bar or model summary
        )
        trainer.fit(model, datamodule=stream)
        for j in range(stream.num_tasks):
            R[task, j] = model.accuracy(stream.task_dataloader(j, split="test"))
    return R


def show(name: str, R: torch.Tensor) -> None:
    print(f"\n{name}: ACC {average_accuracy(R):.3f}  BWT {backward_transfer(R):+.3f}")
    for i, row in enumerate(R.tolist()):
        print(f"  after task {i}: " + " ".join(f"{a:.3f}" for a in row))


def main(argv: list[str] | None = None) -> dict[str, torch.Tensor]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="digits", choices=["digits", "mnist", "fashion_mnist"])
    parser.add_argument("--root", default=None, help="torchvision data folder (MNIST-like sets)")
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per task")
    parser.add_argument("--lr", type=float, default=0.03)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    silence_lightning()  # one fit per task: no per-fit banners

    stream = PermutedStream(
        dataset=args.dataset, root=args.root, num_tasks=args.tasks, seed=args.seed
    )
    results = {}
    for name, metagrad in (("plain SGD", False), ("MetaGrad", True)):
        results[name] = run(stream, args.steps, args.lr, args.seed, metagrad)
        show(name, results[name])
    return results


if __name__ == "__main__":
    main()
