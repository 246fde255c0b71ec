"""EWC, online EWC, SI and MAS without a Trainer: argument errors name the argument, and the
state key tells configurations apart. Through real Trainers:
``tests/integration/test_baselines.py``."""

from __future__ import annotations

import pytest

from lightning_metagrad.baselines import EWCCallback, MASCallback, OnlineEWCCallback, SICallback


def test_state_keys_distinguish_configurations() -> None:
    keys = {
        EWCCallback(strength=1.0).state_key,
        EWCCallback(strength=2.0).state_key,
        OnlineEWCCallback(strength=1.0).state_key,
        OnlineEWCCallback(strength=1.0, gamma=0.5).state_key,
        SICallback(strength=1.0).state_key,
        MASCallback(strength=1.0).state_key,
    }
    assert len(keys) == 6


@pytest.mark.parametrize(
    ("cls", "kwargs", "name"),
    [
        (EWCCallback, {"strength": -1.0}, "strength"),
        (EWCCallback, {"strength": float("nan")}, "strength"),
        (SICallback, {"strength": float("inf")}, "strength"),
        (MASCallback, {"strength": "1"}, "strength"),
        (OnlineEWCCallback, {"strength": True}, "strength"),
        (EWCCallback, {"fisher_batches": 0}, "fisher_batches"),
        (OnlineEWCCallback, {"fisher_batches": 2.0}, "fisher_batches"),
        (OnlineEWCCallback, {"gamma": 0.0}, "gamma"),
        (OnlineEWCCallback, {"gamma": 1.5}, "gamma"),
        (SICallback, {"damping": 0.0}, "damping"),
        (MASCallback, {"importance_batches": -3}, "importance_batches"),
    ],
)
def test_invalid_arguments_raise_naming_the_argument(cls: type, kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=f"`{name}`"):
        cls(**kwargs)
