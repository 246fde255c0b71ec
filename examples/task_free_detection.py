"""Task-free continual learning: one long ``fit``, no task ids, switches detected.

The tasks of a Permuted stream are concatenated into one stream of batches that carry only
``x`` and ``y`` -- the model and the callback are never told where a task ends. One
``trainer.fit`` runs over all of it with ``MetaGradCallback(task_boundaries="auto")``, which
watches the share of each step's gradient energy outside the current task's gradient
subspace (per weight matrix; :class:`~lightning_metagrad.boundaries.novelty.SubspaceNovelty`) and
starts a new task when it jumps and stays up (paper section 5.1; docs/detection.md). ``--signal
loss`` tests the training loss instead, ``--signal error`` the paper's signal (a
meta-network's reconstruction error). The script prints the detected switches
(``callback.detected_switches``, global steps) against the true ones, and the accuracy
matrix measured at the true task ends.

There is no settling period: the first task's start-up is learned by an adaptive warm-up, so
tasks of 200 steps are found (``--steps-per-task 200``), about 15 steps late.

Run (no download; scikit-learn's bundled 8x8 digits, under half a minute on CPU)::

    python examples/task_free_detection.py

On Permuted Fashion-MNIST (torchvision layout under ``--root``)::

    python examples/task_free_detection.py --dataset fashion_mnist --root ../shared/data \
        --tasks 4 --steps-per-task 500
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from lightning_metagrad import AutoBoundaries, MetaGradCallback
from lightning_metagrad.benchmark.models import MLPClassifier
from lightning_metagrad.data import PermutedStream
from lightning_metagrad.metrics import average_accuracy, backward_transfer


def silent_batches(stream: PermutedStream, steps_per_task: int) -> list[dict[str, torch.Tensor]]:
    """``steps_per_task`` training batches of each task in turn, with the task id removed."""
    batches: list[dict[str, torch.Tensor]] = []
    for task in range(stream.num_tasks):
        stream.set_task(task)
        taken = 0
        while taken < steps_per_task:
            for batch in stream.train_dataloader():  # a new shuffle each pass
                batches.append({"x": batch["x"], "y": batch["y"]})  # no "task_id"
                taken += 1
                if taken == steps_per_task:
                    break
    return batches


class AccuracyAtTrueTaskEnds(pl.Callback):
    """Test accuracy on every task whenever a true task ends (the example knows; MetaGrad not)."""

    def __init__(self, stream: PermutedStream, steps_per_task: int) -> None:
        self.stream, self.steps_per_task = stream, steps_per_task
        self.rows: list[list[float]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
        if trainer.global_step % self.steps_per_task == 0:
            loaders = [self.stream.task_dataloader(j) for j in range(self.stream.num_tasks)]
            self.rows.append([pl_module.accuracy(loader) for loader in loaders])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="digits", choices=["digits", "mnist", "fashion_mnist"])
    parser.add_argument("--root", default=None, help="torchvision data folder (MNIST-like sets)")
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--steps-per-task", type=int, default=600)
    parser.add_argument("--lr", type=float, default=0.03)
    parser.add_argument("--signal", choices=["novelty", "loss", "error"], default="novelty")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # quiet banners

    pl.seed_everything(args.seed, verbose=False)
    stream = PermutedStream(
        dataset=args.dataset, root=args.root, num_tasks=args.tasks, seed=args.seed
    )
    batches = silent_batches(stream, args.steps_per_task)
    model = MLPClassifier(
        input_dim=stream.input_dim, num_classes=stream.num_classes, hidden_sizes=(128, 128),
        lr=args.lr,
    )  # fmt: skip
    if args.signal == "novelty":
        callback = MetaGradCallback(task_boundaries="auto")  # = AutoBoundaries(signal="novelty")
    else:  # the training loss, or the paper's signal: a meta-network's reconstruction error
        callback = MetaGradCallback(task_boundaries=AutoBoundaries(signal=args.signal))
    recorder = AccuracyAtTrueTaskEnds(stream, args.steps_per_task)
    trainer = pl.Trainer(
        max_steps=len(batches),
        callbacks=[callback, recorder],
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    # batch_size=None: the list already holds whole batches, served in order.
    trainer.fit(model, train_dataloaders=DataLoader(batches, batch_size=None))

    true = [args.steps_per_task * t for t in range(1, args.tasks)]
    detected = list(callback.detected_switches)
    R = torch.tensor(recorder.rows)
    print(f"\ntrue task switches (global step): {true}")
    print(f"detected switches (global step):  {detected}")
    print(f"tasks MetaGrad saw: {callback.task_index + 1} (true: {args.tasks})")
    print(f"\naccuracy at the true task ends: ACC {average_accuracy(R):.3f}  "
          f"BWT {backward_transfer(R):+.3f}")  # fmt: skip
    for i, row in enumerate(R.tolist()):
        print(f"  after task {i}: " + " ".join(f"{a:.3f}" for a in row))
    return {
        "true_switches": true,
        "detected_switches": detected,
        "tasks_seen": callback.task_index + 1,
        "matrix": R,
    }


if __name__ == "__main__":
    main()
