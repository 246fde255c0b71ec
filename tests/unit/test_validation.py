"""Every constructor checks its arguments with one rule set, and each error names the
argument the user passed (``lightning_metagrad._validation``)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
import torch

from lightning_metagrad import (
    AnchoredPredictor,
    AutoBoundaries,
    BatchTaskIdBoundaries,
    MetaGrad,
    MetaGradCallback,
    MetaNetPredictor,
    ReplayPredictor,
    SubspacePredictor,
)
from lightning_metagrad.baselines import (
    AGEMCallback,
    EpisodicMemory,
    ERCallback,
    EWCCallback,
    GPMCallback,
    MASCallback,
    OnlineEWCCallback,
    SICallback,
)
from lightning_metagrad.boundaries.changepoint import ChangePointDetector
from lightning_metagrad.boundaries.novelty import SubspaceNovelty
from lightning_metagrad.data import PermutedStream, RotatedStream, SplitStream
from lightning_metagrad.diagnostics import Diagnostics
from lightning_metagrad.predictors.paper.distillation import RunningMeanDistiller
from lightning_metagrad.predictors.paper.meta_network import CoordinateMLP, MetaNetwork
from lightning_metagrad.predictors.paper.tabulation import TabulatedFunction

Make = Callable[..., Any]

CASES: list[tuple[Make, dict[str, Any], str]] = [
    # The callback and the engine.
    (MetaGradCallback, {"predictor": "subspac"}, "predictor"),
    (MetaGradCallback, {"combine": "mean"}, "combine"),
    (MetaGradCallback, {"target": "grad"}, "target"),
    (MetaGradCallback, {"task_boundaries": "epoch"}, "task_boundaries"),
    (MetaGradCallback, {"task_boundaries": 3}, "task_boundaries"),
    (MetaGradCallback, {"task_boundaries": "batch", "task_id_key": ""}, "task_id_key"),
    (MetaGradCallback, {"task_boundaries": "batch", "task_id_fn": 3}, "task_id_fn"),
    (MetaGradCallback, {"diagnostics": "yes"}, "diagnostics"),
    (lambda **k: MetaGrad(SubspacePredictor(), **k), {"combine": "mean"}, "combine"),
    # Predictors: the names the user passed, not those of the parts they build.
    (SubspacePredictor, {"threshold": 0.0}, "threshold"),
    (SubspacePredictor, {"threshold": True}, "threshold"),
    (SubspacePredictor, {"input_threshold": 1.5}, "input_threshold"),
    (SubspacePredictor, {"layer_thresholds": {"w": 2.0}}, "layer_thresholds['w']"),
    (SubspacePredictor, {"every": 0}, "every"),
    (SubspacePredictor, {"sample_rows": 2.0}, "sample_rows"),
    (SubspacePredictor, {"full_rank_warning": -1}, "full_rank_warning"),
    (SubspacePredictor, {"seed": "0"}, "seed"),
    (SubspacePredictor, {"in_basis": "rotate"}, "in_basis"),
    (SubspacePredictor, {"normalize_steps": "yes"}, "normalize_steps"),
    (SubspacePredictor, {"normalize_steps": 1}, "normalize_steps"),
    (AnchoredPredictor, {"radius": 0}, "radius"),
    (AnchoredPredictor, {"radius": float("nan")}, "radius"),
    (MetaNetPredictor, {"distill_steps": -1}, "distill_steps"),
    (MetaNetPredictor, {"distill_samples": 0}, "distill_samples"),
    (MetaNetPredictor, {"coords_per_step": 0}, "coords_per_step"),
    (MetaNetPredictor, {"lr": 0.0}, "lr"),
    (MetaNetPredictor, {"hidden_sizes": ()}, "hidden_sizes"),
    (MetaNetPredictor, {"hidden_sizes": (8, True)}, "hidden_sizes"),
    (MetaNetPredictor, {"activation": "gelu"}, "activation"),
    (MetaNetPredictor, {"update_every": 0}, "update_every"),
    (MetaNetPredictor, {"table_points": 1}, "table_points"),
    (MetaNetPredictor, {"seed": 1.0}, "seed"),
    (ReplayPredictor, {"memory_batches": 0}, "memory_batches"),
    (ReplayPredictor, {"refresh_every": True}, "refresh_every"),
    (ReplayPredictor, {"free_below": -1.0}, "free_below"),
    (ReplayPredictor, {"seed": None}, "seed"),
    # The paper predictor's parts, used on their own.
    (CoordinateMLP, {"hidden_sizes": [0]}, "hidden_sizes"),
    (CoordinateMLP, {"activation": "elu"}, "activation"),
    (lambda **k: MetaNetwork(CoordinateMLP((4,)), **k), {"coords_per_step": 0}, "coords_per_step"),
    (lambda **k: MetaNetwork(CoordinateMLP((4,)), **k), {"lr": -1}, "lr"),
    (RunningMeanDistiller, {"steps": -1}, "steps"),
    (RunningMeanDistiller, {"num_samples": 0}, "num_samples"),
    (RunningMeanDistiller, {"lr": float("inf")}, "lr"),
    (
        lambda **k: TabulatedFunction.from_function(torch.sin, 0.0, 1.0, **k),
        {"num_points": 1},
        "num_points",
    ),
    (lambda **k: TabulatedFunction(torch.zeros(3), **k), {"low": 1.0, "high": 0.0}, "high"),
    # Boundaries, detection, novelty, diagnostics.
    (BatchTaskIdBoundaries, {"key": ""}, "key"),
    (BatchTaskIdBoundaries, {"fn": "task"}, "fn"),
    (AutoBoundaries, {"every": 0}, "every"),
    (AutoBoundaries, {"settle": -1}, "settle"),
    (AutoBoundaries, {"signal": "gradient"}, "signal"),
    (AutoBoundaries, {"hidden_sizes": (0,)}, "hidden_sizes"),
    (AutoBoundaries, {"coords_per_step": 0}, "coords_per_step"),
    (AutoBoundaries, {"seed": 0.5}, "seed"),
    (ChangePointDetector, {"signal": ""}, "signal"),
    (ChangePointDetector, {"threshold": 0}, "threshold"),
    (ChangePointDetector, {"window": True}, "window"),
    (ChangePointDetector, {"warmup": 1}, "warmup"),
    (ChangePointDetector, {"min_relative_jump": -0.1}, "min_relative_jump"),
    (ChangePointDetector, {"weights": {"loss": -1.0}}, "weights['loss']"),
    (ChangePointDetector, {"max_warmup": 10}, "max_warmup"),
    (ChangePointDetector, {"fast_jump": 0.0}, "fast_jump"),
    (SubspaceNovelty, {"energy": 1.0}, "energy"),
    (SubspaceNovelty, {"halflife": 0}, "halflife"),
    (SubspaceNovelty, {"lag": -1}, "lag"),
    (SubspaceNovelty, {"sample_rows": 0}, "sample_rows"),
    (Diagnostics, {"warmup": 0}, "warmup"),
    (Diagnostics, {"held_back": 1.5}, "held_back"),
    (Diagnostics, {"warn": 1}, "warn"),
    # Baselines.
    (EWCCallback, {"strength": -1.0}, "strength"),
    (EWCCallback, {"fisher_batches": True}, "fisher_batches"),
    (OnlineEWCCallback, {"gamma": 0.0}, "gamma"),
    (SICallback, {"damping": 0}, "damping"),
    (MASCallback, {"importance_batches": 0}, "importance_batches"),
    (GPMCallback, {"threshold": 1.5}, "threshold"),
    (GPMCallback, {"threshold": {"net.0": 0.0}}, "threshold['net.0']"),
    (GPMCallback, {"samples": 0}, "samples"),
    (GPMCallback, {"threshold_increment": -0.1}, "threshold_increment"),
    (AGEMCallback, {"memory_batches": 0}, "memory_batches"),
    (ERCallback, {"seed": "1"}, "seed"),
    (EpisodicMemory, {"capacity": 0}, "capacity"),
    # Task streams.
    (PermutedStream, {"num_tasks": 0}, "num_tasks"),
    (PermutedStream, {"batch_size": True}, "batch_size"),
    (PermutedStream, {"val_fraction": 1.0}, "val_fraction"),
    (PermutedStream, {"dataset": "cifar"}, "dataset"),
    (SplitStream, {"seed": -1}, "seed"),
    (RotatedStream, {"eval_batch_size": 0}, "eval_batch_size"),
]


def _id(case: tuple[Make, dict[str, Any], str]) -> str:
    make, kwargs, _ = case
    owner = getattr(make, "__name__", "factory")
    return f"{owner}-" + "-".join(f"{k}={v!r}" for k, v in kwargs.items())


@pytest.mark.parametrize(("make", "kwargs", "argument"), CASES, ids=[_id(c) for c in CASES])
def test_a_bad_argument_is_refused_naming_it(make: Make, kwargs: dict, argument: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"`{argument}`")) as err:
        make(**kwargs)
    assert "got" in str(err.value)  # and the value it got


def test_the_rule_set_is_one() -> None:
    from lightning_metagrad._validation import check_float, check_fraction, check_int

    # Bools are not numbers; integers are floats; floats are not integers.
    for check in (check_int, check_float, check_fraction):
        with pytest.raises(ValueError, match="`x`"):
            check("x", True)
    assert check_float("x", 1) == 1.0 and isinstance(check_float("x", 1), float)
    with pytest.raises(ValueError, match="an int"):
        check_int("x", 2.0)
    with pytest.raises(ValueError, match="None or"):
        check_int("x", "a", optional=True)
    assert check_int("x", None, optional=True) is None
