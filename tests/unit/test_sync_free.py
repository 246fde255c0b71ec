"""The default's step needs no host-device synchronisation (issue 16), and a non-finite step
still never reaches what the predictor learns.

A host sync is a read of a device value on the host: ``Tensor.item()``, ``bool(t)``,
``float(t)``, all of which dispatch ``aten::_local_scalar_dense``. A ``TorchDispatchMode``
sees every such read on the CPU too, so the property is checked here without a GPU. Through a
real Trainer: ``tests/integration/test_sync_free_training.py``.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from lightning_metagrad import MetaGrad, SubspacePredictor
from lightning_metagrad.callback import build_predictor
from lightning_metagrad.meters import HostReads


def engine_and_step(predictor: str) -> tuple[MetaGrad, nn.Module, Any]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 4))
    core = MetaGrad(build_predictor(predictor))
    core.bind(model.named_parameters())
    x = torch.randn(32, 20)

    def step(bad: bool = False) -> None:
        model.zero_grad()
        model(x).pow(2).mean().backward()
        if bad:
            model[0].weight.grad[0, 0] = float("nan")  # type: ignore[index]
        core.step()

    for _ in range(8):
        step()
    core.end_task()
    return core, model, step


def test_the_default_step_reads_nothing_back_from_the_device() -> None:
    _, _, step = engine_and_step("subspace")
    step()  # first step of task 2 (allocations)
    with HostReads() as reads:
        for _ in range(8):  # every=4: covers observing and non-observing steps
            step()
    assert reads.count == 0


def test_elementwise_predictors_check_finiteness_on_the_host() -> None:
    # They learn from finite steps only and cannot mask a step out: a read every step.
    _, _, step = engine_and_step("anchored")
    with HostReads() as reads:
        for _ in range(4):
            step()
    assert reads.count >= 4


def test_a_non_finite_step_is_masked_out_of_the_subspace_moments() -> None:
    core, model, step = engine_and_step("subspace")
    predictor = core.predictor
    assert isinstance(predictor, SubspacePredictor)
    for _ in range(3):
        step()
    before = {n: c.clone() for n, c in predictor.state_dict()["cov"].items()}
    step(bad=True)  # the 12th step: an observation step (every=4)
    after = predictor.state_dict()["cov"]
    assert core.skipped_steps == 1
    assert all(torch.isfinite(c).all() for c in after.values())
    for name, cov in before.items():
        torch.testing.assert_close(after[name], cov)  # nothing was added
    # It still reaches the optimizer non-finite, as without the callback.
    assert not torch.isfinite(model[0].weight.grad).all()  # type: ignore[arg-type]


def test_the_host_checked_mode_leaves_a_non_finite_step_untouched() -> None:
    core, model, step = engine_and_step("subspace")
    core.sync_free = False
    step(bad=True)
    grad = model[0].weight.grad
    assert core.skipped_steps == 1
    assert int(torch.isnan(grad).sum()) == 1  # type: ignore[arg-type]  # passed on as it was


def test_a_masked_non_finite_step_does_not_blind_the_held_back_warning() -> None:
    # In the sync-free mode a non-finite step still reaches the diagnostics with a NaN figure;
    # it is left out, so the running share stays finite and can still warn.
    from lightning_metagrad.diagnostics import Diagnostics

    diag = Diagnostics(check_every=1)
    diag.observe_held_back(torch.tensor(float("nan")))
    assert diag.held_back_ema is None
    with pytest.warns(UserWarning, match="holds back"):
        for _ in range(3):
            diag.observe_held_back(torch.tensor(0.95))
    assert diag.held_back_ema == pytest.approx(0.95) and diag.holding_back
