"""The callback's and its predictors' constructors refuse bad input naming the argument, and a
state of an unknown version is refused with what to do; no Trainer needed. (Every
constructor's rule set: ``tests/unit/test_validation.py``.)"""

from __future__ import annotations

from typing import Any

import pytest

from lightning_metagrad import (
    AnchoredPredictor,
    MetaGradCallback,
    MetaNetPredictor,
    ReplayPredictor,
)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"combine": "max"}, "combine"),
        ({"target": "hessian"}, "target"),
        ({"predictor": "oracle"}, "predictor"),
        ({"task_boundaries": "sometimes"}, "task_boundaries"),
        ({"task_id_fn": len}, "task_id_fn"),
    ],
)
def test_invalid_arguments_name_the_argument(kwargs: dict, argument: str) -> None:
    with pytest.raises(ValueError, match=argument):
        MetaGradCallback(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"update_every": 0}, "update_every"),
        ({"coords_per_step": 0}, "coords_per_step"),
        ({"lr": -1.0}, "lr"),
        ({"hidden_sizes": (0,)}, "hidden_sizes"),
        ({"activation": "gelu"}, "activation"),
        ({"distill_steps": -1}, "steps"),
        ({"table_points": 1}, "table_points"),
        ({"seed": "x"}, "seed"),
    ],
)
def test_invalid_predictor_arguments_name_the_argument(kwargs: dict, argument: str) -> None:
    with pytest.raises(ValueError, match=argument):
        MetaNetPredictor(**kwargs)


@pytest.mark.parametrize(
    ("make", "argument"),
    [
        (lambda: MetaGradCallback(predictor=3), "predictor"),  # type: ignore[arg-type]
        (lambda: MetaGradCallback(task_boundaries=None), "task_boundaries"),  # type: ignore[arg-type]
        (lambda: AnchoredPredictor(radius=0.0), "radius"),
        (lambda: ReplayPredictor(memory_batches=0), "memory_batches"),
        (lambda: ReplayPredictor(refresh_every=0), "refresh_every"),
    ],
)
def test_more_invalid_arguments_name_the_argument(make: Any, argument: str) -> None:
    with pytest.raises(ValueError, match=argument):
        make()


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [({"task_id_key": ""}, "task_id_key"), ({"task_id_fn": 5}, "task_id_fn")],
)
def test_invalid_task_id_arguments_name_the_callback_argument(kwargs: dict, argument: str) -> None:
    with pytest.raises(ValueError) as err:
        MetaGradCallback(task_boundaries="batch", **kwargs)
    assert f"`{argument}`" in str(err.value)


def test_an_unknown_state_version_is_refused_with_what_to_do() -> None:
    cb = MetaGradCallback()
    state = cb.state_dict()
    with pytest.raises(ValueError, match=r"version 2 cannot be read.*load its model weights"):
        cb.load_state_dict({**state, "version": 2})


@pytest.mark.parametrize(
    ("make", "argument"),
    [
        (lambda: AnchoredPredictor(radius="0.1"), "radius"),  # type: ignore[arg-type]
        (lambda: AnchoredPredictor(radius=float("inf")), "radius"),
        (lambda: MetaNetPredictor(distill_steps=-1), "distill_steps"),
        (lambda: MetaGradCallback(task_id_key="tid"), "task_id_key"),
    ],
)
def test_bad_input_is_refused_naming_the_argument(make: Any, argument: str) -> None:
    with pytest.raises(ValueError, match=f"`{argument}`"):
        make()
