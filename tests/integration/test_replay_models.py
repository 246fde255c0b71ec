"""``predictor="replay"`` on the models of issue 22's item 6, through tiny real Trainers: a
parameter without a gradient on some steps (in the current batches and in the replayed ones)
and BatchNorm, over three tasks.

Eq. 5 with the replayed old-task gradient keeps each coordinate of the step's gradient or
zeroes it, so what the optimizer receives is, per coordinate, the raw gradient or 0; a
parameter without a gradient on a step is left out of it; the replayed passes run in eval mode,
so BatchNorm's running statistics count the training batches only.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers import GradSpy, TinyClassifier, loader, make_trainer
from torch import Tensor, nn

from lightning_metagrad import MetaGradCallback


class SometimesUsed(TinyClassifier):
    """A second head used only on batches whose first input is positive: no gradient on the
    other steps, and none from the stored batches that do not use it either."""

    def __init__(self, optimizer: str = "sgd") -> None:
        super().__init__(optimizer=optimizer)
        self.branch = nn.Linear(10, 3)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        out = self(x)
        if bool(x[0, 0] > 0):
            out = out + self.branch(x)
        return nn.functional.cross_entropy(out, y)


class WithBatchNorm(TinyClassifier):
    def __init__(self, optimizer: str = "sgd") -> None:
        super().__init__(optimizer=optimizer)
        self.net = nn.Sequential(nn.Linear(10, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))


def _assert_kept_or_zeroed(raw: dict[str, Tensor], out: dict[str, Tensor]) -> None:
    assert raw.keys() == out.keys()  # no gradient created or dropped
    for name, g in raw.items():
        kept = torch.isclose(out[name], g) | (out[name] == 0)
        assert bool(kept.all()), name


@pytest.mark.parametrize("model_cls", [SometimesUsed, WithBatchNorm])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_replay_trains_three_tasks_and_rewrites_by_eq_5(model_cls: type, optimizer: str) -> None:
    model = model_cls(optimizer=optimizer)
    cb = MetaGradCallback(predictor="replay", target="gradient")
    for task in range(3):
        before, after = GradSpy(), GradSpy()
        make_trainer([before, cb, after], max_steps=8).fit(model, loader(task))
        for raw, out in zip(before.steps, after.steps):
            _assert_kept_or_zeroed(raw, out)
        if task:
            assert any(
                not torch.equal(raw[n], out[n])
                for raw, out in zip(before.steps, after.steps)
                for n in raw
            )  # the rule acted
    assert cb.num_old_tasks == 2
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    if model_cls is SometimesUsed:
        used = [("branch.weight" in s) for s in before.steps]
        assert any(used) and not all(used)  # really without a gradient on some steps
    else:  # eval-mode replays leave BatchNorm's statistics to the 24 training batches
        assert int(model.net[1].num_batches_tracked) == 24
