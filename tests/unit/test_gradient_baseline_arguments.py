"""GPM, A-GEM and ER without a Trainer: GPM's basis update, argument errors that name the
argument, and the benchmark's names for them. Through real Trainers:
``tests/integration/test_gradient_baselines.py``."""

from __future__ import annotations

import re

import pytest
import torch

from lightning_metagrad.baselines import AGEMCallback, ERCallback, GPMCallback
from lightning_metagrad.baselines.gpm import grow_basis
from lightning_metagrad.benchmark.methods import make_callbacks


def test_grow_basis_keeps_a_basis_that_explains_enough() -> None:
    r = torch.randn(5, 40)
    basis = grow_basis(None, r @ r.T, 0.5)
    assert basis is not None
    assert grow_basis(basis, basis @ basis.T @ r @ r.T @ basis @ basis.T, 0.99) is basis


@pytest.mark.parametrize(
    ("cls", "kwargs", "name"),
    [
        (GPMCallback, {"threshold": 0.0}, "`threshold`"),
        (GPMCallback, {"threshold": 1.5}, "`threshold`"),
        (GPMCallback, {"threshold": "0.9"}, "`threshold`"),
        (GPMCallback, {"threshold": {}}, "`threshold`"),
        (GPMCallback, {"threshold": {"net.0": float("nan")}}, "`threshold['net.0']`"),
        (GPMCallback, {"samples": 0}, "`samples`"),
        (GPMCallback, {"samples": 2.5}, "`samples`"),
        (GPMCallback, {"threshold_increment": -0.1}, "`threshold_increment`"),
        (AGEMCallback, {"memory_batches": 0}, "`memory_batches`"),
        (AGEMCallback, {"memory_batches": True}, "`memory_batches`"),
        (AGEMCallback, {"seed": 1.5}, "`seed`"),
        (ERCallback, {"memory_batches": -1}, "`memory_batches`"),
        (ERCallback, {"seed": None}, "`seed`"),
    ],
)
def test_invalid_arguments_raise_naming_the_argument(cls: type, kwargs: dict, name: str) -> None:
    value = repr(next(iter(kwargs.values())))
    if isinstance(kwargs.get("threshold"), dict) and kwargs["threshold"]:
        value = "nan"
    with pytest.raises(ValueError, match=re.escape(name) + ".*" + re.escape(value)):
        cls(**kwargs)


def test_benchmark_knows_the_new_methods() -> None:
    names = {m: type(make_callbacks(m)[0]).__name__ for m in ("gpm", "agem", "er")}
    assert names == {"gpm": "GPMCallback", "agem": "AGEMCallback", "er": "ERCallback"}
