"""Checkpoint state: versions checked on load, ``state_dict()`` changes nothing, no dead
fields, a working default for the base predictor, and what a 0.1.0 checkpoint gives."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from conftest import TinyClassifier, loader, make_trainer, small_predictor
from lightning.pytorch.callbacks import Callback

from lightning_metagrad import (
    AnchoredPredictor,
    AutoBoundaries,
    BatchTaskIdBoundaries,
    CombinedBoundaries,
    MetaGrad,
    MetaGradCallback,
    NewFitBoundaries,
    OldGradientPredictor,
    ReplayPredictor,
    SubspacePredictor,
    TaskBoundarySource,
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
from lightning_metagrad.diagnostics import Diagnostics

V010_CHECKPOINT = Path(__file__).parent / "data" / "metagrad-0.1.0.ckpt"


def same(a: Any, b: Any) -> bool:
    """Deep equality of nested states (tensors by value, generator states included)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and torch.equal(a.cpu(), b.cpu())
        )
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return bool(a == b)


class ZeroPredictor(OldGradientPredictor):
    """The base class's docstring example: only the three methods, the default state."""

    def observe(self, names: Sequence[str], thetas: Sequence[Any], targets: Sequence[Any]) -> dict:
        return {}

    def end_task(self, names: Sequence[str], thetas: Sequence[Any]) -> None:
        self._old_tasks += 1

    def predict(self, names: Sequence[str], thetas: Sequence[Any]) -> list:
        return [(torch.zeros_like(t), None) for t in thetas]


PREDICTORS: dict[str, Callable[[], OldGradientPredictor]] = {
    "subspace": lambda: SubspacePredictor(every=1),
    "subspace-sign": lambda: SubspacePredictor(every=1, in_basis="sign"),
    "anchored": AnchoredPredictor,
    "paper": small_predictor,
    "replay": lambda: ReplayPredictor(memory_batches=2, refresh_every=2),
    "base-default": ZeroPredictor,
}


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
    assert same(first, second)  # two calls in a row: equal results
    # ... and the run goes on exactly as one whose state was never taken.
    assert same(spied.state_dict(), plain.state_dict())
    for a, b in zip(spied_model.parameters(), plain_model.parameters()):
        assert torch.equal(a, b)
    # A state taken earlier is not changed by what follows (no live views into the object).
    assert same(first, second)
    assert not same(first["engine"], spied.state_dict()["engine"])


@pytest.mark.parametrize("name", sorted(PREDICTORS))
def test_every_predictor_state_round_trips_through_a_checkpoint(name: str, tmp_path: Path) -> None:
    cb, model, _ = run_two_tasks(PREDICTORS[name], spy_step=None)
    trainer = make_trainer([cb], max_steps=6)
    trainer.fit(model, loader(1))  # nothing to do: restores the loop state only
    trainer.save_checkpoint(tmp_path / "state.ckpt")
    restored = MetaGradCallback(predictor=PREDICTORS[name]())
    checkpoint = torch.load(tmp_path / "state.ckpt", weights_only=True)
    restored.load_state_dict(checkpoint["callbacks"][restored.state_key])
    assert same(restored.state_dict()["engine"], cb.state_dict()["engine"])


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


def _states() -> list[tuple[str, Callable[[], Any]]]:
    def engine() -> MetaGrad:
        return MetaGrad(SubspacePredictor())

    return [
        ("MetaGradCallback", MetaGradCallback),
        ("MetaGrad engine", engine),
        *[(n, f) for n, f in PREDICTORS.items()],
        ("TaskBoundarySource", TaskBoundarySource),
        ("NewFitBoundaries", NewFitBoundaries),
        ("BatchTaskIdBoundaries", BatchTaskIdBoundaries),
        ("AutoBoundaries", AutoBoundaries),
        ("CombinedBoundaries", lambda: CombinedBoundaries([NewFitBoundaries()])),
        ("ChangePointDetector", ChangePointDetector),
        ("SubspaceNovelty", SubspaceNovelty),
        ("Diagnostics", Diagnostics),
        ("EpisodicMemory", lambda: EpisodicMemory(capacity=2)),
        ("EWCCallback", EWCCallback),
        ("OnlineEWCCallback", OnlineEWCCallback),
        ("SICallback", SICallback),
        ("MASCallback", MASCallback),
        ("GPMCallback", GPMCallback),
        ("AGEMCallback", AGEMCallback),
        ("ERCallback", ERCallback),
    ]


@pytest.mark.parametrize(("name", "make"), _states(), ids=[n for n, _ in _states()])
def test_every_state_carries_a_version_checked_on_load(name: str, make: Callable) -> None:
    obj = make()
    state = obj.state_dict()
    assert isinstance(state.get("version"), int)
    obj.load_state_dict(state)  # its own version loads
    with pytest.raises(ValueError) as err:
        make().load_state_dict({**state, "version": 99})
    message = str(err.value)
    assert "state version 99 cannot be read" in message
    assert "written by another lightning-metagrad release" in message
    assert "load_state_dict(torch.load(path)['state_dict'])" in message  # what to do


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
