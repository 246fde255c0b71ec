"""A sync-free run through a real Trainer reports its non-finite step and keeps the basis
finite (issue 16). The step itself, without a Trainer: ``tests/unit/test_sync_free.py``."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers import TinyClassifier, loader, make_trainer

from lightning_metagrad import MetaGradCallback, SubspacePredictor


class NaNOnce(TinyClassifier):
    """A NaN in one gradient entry at global step 2 of its fit; the user's guard (a module
    hook, after the callbacks') zeroes it, so the weights stay finite."""

    def on_after_backward(self) -> None:
        if self.trainer.global_step == 2:
            self.net[0].weight.grad[0, 0] = float("nan")  # type: ignore[index]

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        for p in self.parameters():
            torch.nan_to_num_(p.grad, nan=0.0)  # type: ignore[arg-type]


def test_a_sync_free_run_reports_its_non_finite_step_and_keeps_the_basis_finite() -> None:
    cb = MetaGradCallback(predictor=SubspacePredictor(every=1))
    model = NaNOnce()
    make_trainer([cb], max_steps=6).fit(model, loader(0))
    with pytest.warns(UserWarning, match=r"1 step\(s\) with a non-finite"):
        make_trainer([cb], max_steps=6).fit(model, loader(1))
    assert cb.engine.skipped_steps == 2  # one per fit; the first fit warned already
    predictor = cb.predictor
    assert isinstance(predictor, SubspacePredictor) and predictor.num_old_tasks == 1
    for name in predictor.subspace_dims():
        assert torch.isfinite(predictor.basis(name)).all()
    assert all(torch.isfinite(p).all() for p in model.parameters())
