"""Checkpoint state through real Trainers: ``state_dict()`` changes nothing, every predictor's
state round-trips and has no dead fields, the base predictor has a working default, and what
a 0.1.0 checkpoint (``tests/data/``) gives. The version check of every state object:
``tests/unit/test_state.py``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import (
    PREDICTORS,
    TESTS,
    TinyClassifier,
    ZeroPredictor,
    loader,
    make_trainer,
    same_state,
)
from lightning.pytorch.callbacks import Callback

from lightning_metagrad import MetaGradCallback, OldGradientPredictor

V010_CHECKPOINT = TESTS / "data" / "metagrad-0.1.0.ckpt"


class TwiceStateDict(Callback):
    """Takes the callback's state twice in a row at one step, as a checkpoint would."""

    def __init__(self, cb: MetaGradCallback, at_step: int) -> None:
        self.cb, self.at_step = cb, at_step
        self.states: list[dict] = []

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.at_step:
            self.states = [self.cb.state_dict(), self.cb.state_dict()]


def run_two_tasks(make: Callable[[], OldGradientPredictor], spy_step: int | None) -> tuple:
    torch.manual_seed(0)
    cb, model = MetaGradCallback(predictor=make()), TinyClassifier()
    spies = [TwiceStateDict(cb, spy_step)] if spy_step is not None else []
    make_trainer([cb], max_steps=4).fit(model, loader(0))
    make_trainer([cb, *spies], max_steps=6).fit(model, loader(1))
    return cb, model, spies


@pytest.mark.parametrize("name", sorted(PREDICTORS))
def test_state_dict_changes_nothing(name: str) -> None:
    spied, spied_model, (spy,) = run_two_tasks(PREDICTORS[name], spy_step=3)
    plain, plain_model, _ = run_two_tasks(PREDICTORS[name], spy_step=None)
    first, second = spy.states
    assert same_state(first, second)  # two calls in a row: equal results
    # ... and the run goes on exactly as one whose state was never taken.
    assert same_state(spied.state_dict(), plain.state_dict())
    for a, b in zip(spied_model.parameters(), plain_model.parameters()):
        assert torch.equal(a, b)
    # A state taken earlier is not changed by what follows (no live views into the object).
    assert same_state(first, second)
    assert not same_state(first["engine"], spied.state_dict()["engine"])


@pytest.mark.parametrize("name", sorted(PREDICTORS))
def test_every_predictor_state_round_trips_through_a_checkpoint(name: str, tmp_path: Path) -> None:
    cb, model, _ = run_two_tasks(PREDICTORS[name], spy_step=None)
    trainer = make_trainer([cb], max_steps=6)
    trainer.fit(model, loader(1))  # nothing to do: restores the loop state only
    trainer.save_checkpoint(tmp_path / "state.ckpt")
    restored = MetaGradCallback(predictor=PREDICTORS[name]())
    checkpoint = torch.load(tmp_path / "state.ckpt", weights_only=True)
    restored.load_state_dict(checkpoint["callbacks"][restored.state_key])
    assert same_state(restored.state_dict()["engine"], cb.state_dict()["engine"])


def test_the_base_predictor_has_a_working_default_state(tmp_path: Path) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    cb, model = MetaGradCallback(predictor=ZeroPredictor()), TinyClassifier()
    last = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    make_trainer([cb, last], max_steps=4, enable_checkpointing=True).fit(model, loader(0))
    resumed = MetaGradCallback(predictor=ZeroPredictor())
    make_trainer([resumed], max_steps=8).fit(
        TinyClassifier(), loader(1), ckpt_path=tmp_path / "last.ckpt"
    )
    assert resumed.task_index == 1 and resumed.num_old_tasks == 1


@pytest.mark.parametrize("name", sorted(set(PREDICTORS) - {"base-default"}))
def test_every_field_of_a_predictor_state_is_read(name: str) -> None:
    cb, _, _ = run_two_tasks(PREDICTORS[name], spy_step=None)
    state = cb.predictor.state_dict()
    for key in sorted(set(state) - {"version"}):
        partial = {k: v for k, v in state.items() if k != key}
        with pytest.raises(KeyError):
            PREDICTORS[name]().load_state_dict(partial)


# --------------------------------------------------------------------------- release 0.1.0


class Evaluated(TinyClassifier):
    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.training_step(batch, batch_idx)


def test_a_0_1_0_checkpoint_is_refused_with_what_to_do() -> None:
    # tests/data/make_0.1.0_checkpoint.py wrote it with release 0.1.0 (one task, 4 steps).
    # Its paper-only predictor state cannot map onto today's predictors: resuming it fails
    # at once, with the way out, instead of resuming the loops with a blank callback.
    with pytest.raises(ValueError) as err:
        make_trainer([MetaGradCallback()], max_steps=8).fit(
            TinyClassifier(), loader(1), ckpt_path=V010_CHECKPOINT
        )
    message = str(err.value)
    assert "written by lightning-metagrad 0.1.0" in message
    assert "Start a new run" in message
    assert "model.load_state_dict(torch.load(path)['state_dict'])" in message


def test_a_0_1_0_checkpoint_still_gives_its_weights() -> None:
    # What the message advises, and what evaluation does: the model weights load.
    model = TinyClassifier()
    model.load_state_dict(torch.load(V010_CHECKPOINT, weights_only=True)["state_dict"])
    cb = MetaGradCallback()
    make_trainer([cb]).validate(Evaluated(), loader(0), ckpt_path=V010_CHECKPOINT)
    assert cb.task_index == 0 and cb.num_old_tasks == 0
    # A new run from those weights: a fresh task stream.
    make_trainer([cb], max_steps=4).fit(model, loader(0))
    assert cb.task_index == 0
