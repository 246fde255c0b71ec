"""The baselines' ``task_boundaries=`` (the sources of ``MetaGradCallback``), and a task that
ends with NaN/inf weights handled as ``MetaGradCallback`` handles it; tiny real Trainers.

One ``fit`` holds two tasks whose batches carry their ``task_id`` (the shipped CLI example's
layout): with ``task_boundaries="batch"`` the first task is consolidated once, at the batch
whose id changes, from its own batches, and protected; with the default ``"fit"`` nothing is
consolidated before the fit ends, and a warning says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import (
    DictDataset,
    TinyClassifier,
    assert_same_state,
    make_trainer,
    run_cli_example,
    task_data,
)
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from torch.utils.data import ConcatDataset, DataLoader

from lightning_metagrad import MetaGradCallback
from lightning_metagrad.baselines import (
    AGEMCallback,
    ERCallback,
    EWCCallback,
    GPMCallback,
    MASCallback,
    OnlineEWCCallback,
    SICallback,
)
from lightning_metagrad.boundaries import AutoBoundaries, ManualBoundaries

ALL = [
    EWCCallback,
    OnlineEWCCallback,
    SICallback,
    MASCallback,
    GPMCallback,
    AGEMCallback,
    ERCallback,
]


def make(cls: type, **kwargs: Any) -> Any:
    """A baseline configured to be fast."""
    if cls is GPMCallback:
        return cls(threshold=0.8, samples=32, **kwargs)
    if cls in (AGEMCallback, ERCallback):
        return cls(memory_batches=2, **kwargs)
    if cls is MASCallback:
        return cls(strength=1.0, importance_batches=2, **kwargs)
    if cls is SICallback:
        return cls(strength=1.0, **kwargs)
    return cls(strength=1.0, fisher_batches=2, **kwargs)


def stream(tasks: tuple[int, ...] = (0, 1), repeat: int = 1) -> DataLoader:
    """One loader over the tasks in order, each ``repeat`` times 8 batches of 16."""
    parts = [DictDataset(*task_data(t), t) for t in tasks for _ in range(repeat)]
    return DataLoader(ConcatDataset(parts), batch_size=16, shuffle=False)


def accuracy(model: pl.LightningModule, task: int) -> float:
    x, y = task_data(task)
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


class Recorder(TinyClassifier):
    """Records the task ids of the batches its ``training_step`` sees in eval mode (the
    baselines' passes over the finished task's data)."""

    def __init__(self) -> None:
        super().__init__()
        self.eval_task_ids: list[int] = []

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        if not self.training:
            self.eval_task_ids += batch["task_id"].tolist()
        return super().training_step(batch, batch_idx)


class TasksAtBatchStart(Callback):
    """Placed after the baseline: ``(task id, tasks consolidated)`` at each batch start."""

    def __init__(self, baseline: Any) -> None:
        self.baseline = baseline
        self.seen: list[tuple[int, int]] = []

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, i: int) -> None:
        self.seen.append((int(batch["task_id"][0]), self.baseline.num_tasks))


# ---------------------------------------------------------------------------- "batch"


@pytest.mark.parametrize("cls", ALL)
def test_batch_ids_consolidate_each_task_where_its_id_changes_from_its_own_batches(
    cls: type,
) -> None:
    cb, model = make(cls, task_boundaries="batch"), Recorder()
    probe = TasksAtBatchStart(cb)
    make_trainer([cb, probe], max_steps=-1, max_epochs=1).fit(model, stream())
    assert cb.num_tasks == 1  # task 0 at the id change; task 1 goes on (no later boundary)
    # Consolidated at the first task-1 batch, before training on it.
    assert probe.seen == [(0, 0)] * 8 + [(1, 1)] * 8
    # The finished task's data were its own batches (trainer.train_dataloader mixes both).
    assert set(model.eval_task_ids) <= {0}
    assert cb.state_dict()["boundaries"]["current_id"] == 1


@pytest.mark.parametrize(
    ("cls", "kwargs"),
    [
        (GPMCallback, {}),
        (EWCCallback, {"strength": 100.0}),
    ],
)
def test_batch_ids_protect_the_first_task_in_one_fit(cls: type, kwargs: dict) -> None:
    def run(callbacks: list) -> pl.LightningModule:
        pl.seed_everything(0, verbose=False)
        model = TinyClassifier()
        make_trainer(callbacks, max_steps=-1, max_epochs=1).fit(model, stream(repeat=8))
        return model

    plain = run([])
    cb = cls(task_boundaries="batch", **kwargs)
    protected = run([cb])
    assert cb.num_tasks == 1
    # Measured: task 0 at 0.55 after plain training on task 1, GPM 0.86, EWC(100) 0.71.
    assert accuracy(protected, 0) > accuracy(plain, 0) + 0.1
    # The default ("fit") ends the task with the fit: on this single fit it is plain training.
    with pytest.warns(
        UserWarning, match=r"'task_id' changed within one `fit`.*task_boundaries='batch'"
    ):
        per_fit = run([cls(**kwargs)])
    torch.testing.assert_close(accuracy(per_fit, 0), accuracy(plain, 0))


def test_gpm_in_place_of_metagrad_in_the_cli_example_consolidates_each_task(
    tmp_path: Path,
) -> None:
    override = tmp_path / "gpm.yaml"
    override.write_text(
        "trainer:\n"
        "  callbacks:\n"
        "    - class_path: lightning_metagrad.baselines.GPMCallback\n"
        "      init_args:\n"
        "        task_boundaries: batch\n"
        "        task_id_key: task_id\n"
    )
    results = run_cli_example(tmp_path, override)
    assert results["metagrad"] is None  # the second config replaced the callback list
    [gpm] = [c for c in results["trainer"].callbacks if isinstance(c, GPMCallback)]
    assert gpm.num_tasks == 1 and gpm.bases  # task 0 consolidated when the id changed


def test_batch_ids_state_is_checkpointed_and_the_default_layout_unchanged() -> None:
    cb = make(EWCCallback, task_boundaries="batch", task_id_key="task_id")
    make_trainer([cb], max_steps=-1, max_epochs=1).fit(TinyClassifier(), stream())
    state = cb.state_dict()
    restored = make(EWCCallback, task_boundaries="batch")
    restored.load_state_dict(state)
    assert restored.boundaries.current_id == 1 and restored.boundaries.seen_ids == [0, 1]
    assert "boundaries" not in make(EWCCallback).state_dict()  # "fit": version 1's layout


def test_manual_boundaries_consolidate_only_by_hand_from_the_tasks_batches() -> None:
    cb, model = make(EWCCallback, task_boundaries="manual"), Recorder()
    assert isinstance(cb.boundaries, ManualBoundaries)
    trainer = make_trainer([cb], max_steps=4)
    trainer.fit(model, stream())
    assert cb.num_tasks == 0  # the fit end is not a task end
    cb.consolidate(trainer, model)
    assert cb.num_tasks == 1 and set(model.eval_task_ids) == {0}


@pytest.mark.parametrize("spec", ["auto", ["fit", "auto"], AutoBoundaries(signal="loss")])
@pytest.mark.parametrize("cls", [GPMCallback, EWCCallback, AGEMCallback])
def test_detected_boundaries_are_refused_at_construction_with_the_fix(cls: type, spec: Any) -> None:
    with pytest.raises(ValueError, match=r"`task_boundaries`.*AutoBoundaries") as err:
        cls(task_boundaries=spec)
    for fix in ("task_boundaries='batch'", "'manual'", "MetaGradCallback(task_boundaries='auto')"):
        assert fix in str(err.value)


def test_invalid_boundary_arguments_name_the_argument() -> None:
    with pytest.raises(ValueError, match="`task_boundaries` must be one of"):
        GPMCallback(task_boundaries="epoch")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`task_id_key` is only used with"):
        EWCCallback(task_id_key="task")


# ---------------------------------------------------------------------------- divergence


class NaNFrom(TinyClassifier):
    """Its loss turns NaN from global step ``nan_from`` of a fit on (the weights with it)."""

    def __init__(self) -> None:
        super().__init__()
        self.nan_from: int | None = None

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        if self.nan_from is not None and self.trainer.global_step >= self.nan_from:
            loss = loss * float("nan")
        return loss


SAME_REFUSAL = (
    r"task 1: the model's parameters are non-finite at the end of the task.*"
    r"Resume from the last good checkpoint.*keep the loss finite"
)


def _consolidated(state: dict) -> dict:
    """The part of a baseline's state that holds the consolidated tasks."""
    kept = {k: state[k] for k in ("num_tasks", "terms", "bases") if k in state}
    if "memory" in state:
        kept["memory"] = state["memory"]["tasks"]
    return kept


def _callback(cls: type, **kwargs: Any) -> Any:
    return cls(**kwargs) if cls is MetaGradCallback else make(cls, **kwargs)


@pytest.mark.parametrize("cls", [MetaGradCallback, *ALL])
def test_a_diverged_fit_warns_and_the_next_fit_is_refused_as_by_metagrad(cls: type) -> None:
    cb, model = _callback(cls), NaNFrom()
    make_trainer([cb], max_steps=4).fit(model, stream((0,)))
    before = cb.state_dict()
    model.nan_from = 1
    with pytest.warns(UserWarning, match="non-finite"):  # no exception at the task's end
        make_trainer([cb], max_steps=4).fit(model, stream((1,)))
    model.nan_from = None
    trainer = make_trainer([cb], max_steps=4)
    with pytest.raises(RuntimeError, match=SAME_REFUSAL):
        trainer.fit(model, stream((2,)))
    assert trainer.global_step == 0  # refused at the next task's start
    if cls is not MetaGradCallback:
        assert cb.num_tasks == 1  # what protects task 0 is as it was
        assert_same_state(_consolidated(cb.state_dict()), _consolidated(before))
        with pytest.raises(RuntimeError, match=SAME_REFUSAL):  # every retry, until resumed
            make_trainer([cb], max_steps=4).fit(model, stream((2,)))


@pytest.mark.parametrize("cls", [MetaGradCallback, *ALL])
def test_a_diverged_task_is_refused_at_the_batch_whose_id_changes_as_by_metagrad(
    cls: type,
) -> None:
    cb, model = _callback(cls, task_boundaries="batch"), NaNFrom()
    model.nan_from = 12  # in task 1 (steps 8..15)
    trainer = make_trainer([cb], max_steps=-1, max_epochs=1)
    with pytest.raises(RuntimeError, match=SAME_REFUSAL):
        trainer.fit(model, stream((0, 1, 2)))
    assert trainer.global_step == 16  # tasks 0 and 1 trained; refused before task 2's first
    if cls is not MetaGradCallback:
        assert cb.num_tasks == 1
