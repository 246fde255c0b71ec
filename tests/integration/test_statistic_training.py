"""The sketch's memory bound through a real Trainer and ``MetaGradCallback`` (issue 23)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import make_trainer
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_metagrad import MetaGradCallback, SubspacePredictor
from lightning_metagrad.meters import PeakTensorMemory


class WideThin(pl.LightningModule):
    """A bag-of-words-like layer: a wide fan-in, few outputs (Linear(2048, 8))."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2048, 8), nn.ReLU(), nn.Linear(8, 3))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _loader(task: int) -> DataLoader:
    g = torch.Generator().manual_seed(task)
    x = torch.randn(64, 2048, generator=g)
    return DataLoader(TensorDataset(x, torch.randint(3, (64,), generator=g)), batch_size=16)


@pytest.mark.parametrize(
    "make",
    [
        lambda: SubspacePredictor(statistic="both", sketch=32, every=1),
        lambda: SubspacePredictor(every=1),  # the default: sketch="auto" sketches the wide layer
    ],
    ids=["both-sketch32", "default"],
)
def test_the_sketch_stays_within_one_float_per_parameter_through_the_callback(
    make: Callable[[], SubspacePredictor],
) -> None:
    pred = make()
    peak = 0.0
    for name in ("_read_inputs", "observe", "rewrite_", "end_task"):
        fn = getattr(pred, name)

        def call(*args: Any, _fn: Any = fn, **kwargs: Any) -> Any:
            nonlocal peak
            held = pred.memory_floats()
            with PeakTensorMemory() as mem:
                out = _fn(*args, **kwargs)
            peak = max(peak, held + mem.peak / 4, pred.memory_floats())
            return out

        setattr(pred, name, call)
    cb = MetaGradCallback(predictor=pred)
    model = WideThin()
    params = sum(p.numel() for p in model.parameters())
    for task in range(3):
        make_trainer([cb], max_steps=6).fit(model, _loader(task))
    assert cb.num_old_tasks == 2 and pred._hooked == {"net.0.weight", "net.2.weight"}
    assert sum(pred.subspace_dims().values()) > 0
    assert 0 < peak <= params  # state + workspace <= 1 float per parameter
