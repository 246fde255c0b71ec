"""A batch-size change is not a task switch, through a real Trainer (issue 25's within-task
events): permuted Fashion-MNIST, one task of 800 steps under Adam, 64 samples a batch, then
16 from step 400. The smaller batch raises the gradients' novelty and the loss for tens of
steps; ``AutoBoundaries`` sees the new size and, with no switch declared in its first 30
steps, restarts its detector instead. A task switch that comes with a new size is still
found."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from helpers import make_trainer
from torch.utils.data import DataLoader

from lightning_metagrad import AutoBoundaries, MetaGradCallback
from lightning_metagrad.benchmark import MLPClassifier
from lightning_metagrad.data import PermutedStream

ROOT = Path(__file__).resolve().parents[2].parent / "shared" / "data"
STEPS, CHANGE = 800, 400

needs_fashion = pytest.mark.skipif(
    not (ROOT / "FashionMNIST" / "raw").is_dir(),
    reason=f"Fashion-MNIST not found under {ROOT} (no download in tests)",
)


class KeepGoing(AutoBoundaries):
    """The detector keeps its levels across the new batch size."""

    def on_batch_size_change(self, old: int, new: int) -> None:
        pass


def permuted(dataset: str, tasks: int, steps: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """``tasks`` permutations of ``steps`` full batches of 64 each, no task ids."""
    root = ROOT if dataset == "fashion_mnist" else None
    stream = PermutedStream(dataset=dataset, root=root, num_tasks=tasks, seed=seed)
    stream.setup("fit")
    out: list[dict[str, torch.Tensor]] = []
    for task in range(tasks):
        stream.set_task(task)
        while len(out) < (task + 1) * steps:
            full = [b for b in stream.train_dataloader() if len(b["y"]) == 64]
            out += [{"x": b["x"], "y": b["y"]} for b in full][: (task + 1) * steps - len(out)]
    return out


def batches(seed: int) -> list[dict[str, torch.Tensor]]:
    out = permuted("fashion_mnist", 1, STEPS, seed)
    return out[:CHANGE] + [{k: v[:16] for k, v in b.items()} for b in out[CHANGE:]]


def fit(source: AutoBoundaries, seed: int) -> MetaGradCallback:
    pl.seed_everything(seed, verbose=False)
    data = batches(seed)
    model = MLPClassifier(input_dim=784, hidden_sizes=(128, 128), optimizer="adam", lr=1e-3)
    cb = MetaGradCallback(task_boundaries=source)
    make_trainer([cb], max_steps=STEPS).fit(model, DataLoader(data, batch_size=None))
    return cb


@pytest.mark.slow
@needs_fashion
def test_with_adam_a_smaller_batch_is_not_a_switch() -> None:
    cb = fit(AutoBoundaries(), seed=0)
    assert cb.detected_switches == [] and cb.task_index == 0
    # Seen from its first batch of 16; the detector restarted 30 steps later, no switch.
    assert cb.boundaries.batch_size_changes == [CHANGE]


@pytest.mark.slow
@needs_fashion
def test_without_the_restart_the_same_run_declares_a_switch() -> None:
    # What the restart prevents (the measured false switches of docs/detection.md).
    cb = fit(KeepGoing(), seed=0)
    assert len(cb.detected_switches) == 1 and cb.detected_switches[0] > CHANGE


@pytest.mark.slow
def test_a_switch_that_comes_with_a_new_batch_size_is_found() -> None:
    # Permuted digits, 3 tasks of 200 steps; the second task's batches have 32 samples.
    pl.seed_everything(0, verbose=False)
    data = permuted("digits", 3, 200, seed=0)
    data = [{k: v[:32] for k, v in b.items()} if 200 <= i < 400 else b for i, b in enumerate(data)]
    model = MLPClassifier(input_dim=64, hidden_sizes=(128, 128), lr=0.03)
    cb = MetaGradCallback(task_boundaries=AutoBoundaries())
    make_trainer([cb], max_steps=len(data)).fit(model, DataLoader(data, batch_size=None))
    assert cb.boundaries.batch_size_changes == [200, 400]
    assert len(cb.detected_switches) == 2
    assert all(0 <= d - t <= 30 for d, t in zip(cb.detected_switches, [200, 400]))
