"""Workflows users really have (issue 15): revisited task ids, mixed batches, evaluation
between tasks from older checkpoints, continuing from a finished task's ``last.ckpt``, bad input."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import DictDataset, TinyClassifier, loader, make_trainer, task_data
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import ConcatDataset, DataLoader

from lightning_metagrad import AnchoredPredictor, MetaGradCallback


def _task_stream(order: list[int], batch_size: int = 16) -> DataLoader:
    """Dict batches of the tasks in ``order`` (each a whole 128-sample task, 8 batches)."""
    parts = [DictDataset(*task_data(t), task_id=t) for t in order]
    return DataLoader(ConcatDataset(parts), batch_size=batch_size, shuffle=False)


def test_a_revisited_task_id_maps_back_to_its_task() -> None:
    cb = MetaGradCallback(task_boundaries="batch")
    seen: list[int] = []

    class Recorder(TinyClassifier):
        def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
            seen.append(cb.task_index)

    make_trainer([cb], max_steps=48).fit(Recorder(), _task_stream([0, 1, 2, 0, 1, 2]))
    # Two epochs over 3 tasks are 3 tasks, not 6; each task folded in once.
    assert seen == [t for t in [0, 1, 2, 0, 1, 2] for _ in range(8)]
    assert cb.num_old_tasks == 3  # 0 and 1 in the first pass, 2 when the stream left it


def test_a_revisited_task_trains_with_the_rule_but_is_not_folded_in_again() -> None:
    cb = MetaGradCallback(task_boundaries="batch", predictor=AnchoredPredictor())
    model = TinyClassifier()
    make_trainer([cb], max_steps=32).fit(model, _task_stream([0, 1, 0, 1]))
    # 0 is folded in when the stream moves to 1, 1 when it returns to 0; the second pass over
    # both trains with the rule acting and folds nothing in again.
    assert cb.num_old_tasks == 2
    assert not cb.engine.learning and cb.task_index == 1


def test_a_batch_that_mixes_task_ids_is_refused_with_the_fix() -> None:
    cb = MetaGradCallback(task_boundaries="batch")
    shuffled = DataLoader(
        ConcatDataset([DictDataset(*task_data(t), task_id=t) for t in range(3)]),
        batch_size=16,
        shuffle=True,
    )
    with pytest.raises(ValueError, match=r"mixes the task ids .*task_id_fn"):
        make_trainer([cb], max_steps=4).fit(TinyClassifier(), shuffled)


def test_a_mixed_batch_may_be_mapped_to_one_task_by_task_id_fn() -> None:
    cb = MetaGradCallback(
        task_boundaries="batch", task_id_fn=lambda b: int(b["task_id"].mode().values)
    )
    make_trainer([cb], max_steps=8).fit(TinyClassifier(), _task_stream([0, 1], batch_size=24))
    assert cb.task_index == 1


class Evaluated(TinyClassifier):
    def test_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.training_step(batch, batch_idx)

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.training_step(batch, batch_idx)


@pytest.mark.parametrize("stage", ["test", "validate"])
def test_evaluating_an_older_checkpoint_keeps_the_continual_learning_state(
    tmp_path: Path, stage: str
) -> None:
    cb, model = MetaGradCallback(), Evaluated()
    trainer = make_trainer([cb], max_steps=8)
    trainer.fit(model, loader(0))
    trainer.save_checkpoint(tmp_path / "task0.ckpt")
    for task in (1, 2):
        make_trainer([cb], max_steps=8).fit(model, loader(task))
    before = cb.state_dict()
    evaluator = make_trainer([cb])
    getattr(evaluator, stage)(model, loader(0), ckpt_path=tmp_path / "task0.ckpt")
    assert cb.task_index == 2 and cb.num_old_tasks == 2
    assert cb.state_dict()["engine"]["steps_in_task"] == before["engine"]["steps_in_task"]
    make_trainer([cb], max_steps=8).fit(model, loader(3))
    assert cb.task_index == 3 and cb.num_old_tasks == 3  # the next fit is the right task


def test_continuing_from_a_finished_tasks_last_checkpoint_starts_the_next_task(
    tmp_path: Path,
) -> None:
    cb, model = MetaGradCallback(), TinyClassifier()
    last = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    make_trainer([cb, last], max_steps=8, enable_checkpointing=True).fit(model, loader(0))
    # The route most users take: a new Trainer on the next task's data, resuming last.ckpt.
    new_cb, new_model = MetaGradCallback(), TinyClassifier()
    make_trainer([new_cb], max_steps=16).fit(new_model, loader(1), ckpt_path=tmp_path / "last.ckpt")
    assert new_cb.task_index == 1 and new_cb.num_old_tasks == 1


def test_a_failed_evaluation_does_not_stop_a_later_fit_from_resuming(tmp_path: Path) -> None:
    class Failing(Evaluated):
        def test_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            raise RuntimeError("broken test_step")

    cb, model = MetaGradCallback(), Failing()
    trainer = make_trainer([cb], max_steps=4)
    trainer.fit(model, loader(0))
    trainer.save_checkpoint(tmp_path / "t0.ckpt")  # after fit: the next fit is task 1
    make_trainer([cb], max_steps=4).fit(model, loader(1))
    with pytest.raises(RuntimeError, match="broken test_step"):
        make_trainer([cb]).test(model, loader(0))
    # Resuming the checkpoint restores the callback's state: this fit is task 1 again.
    make_trainer([cb], max_steps=8).fit(model, loader(1), ckpt_path=tmp_path / "t0.ckpt")
    assert cb.task_index == 1 and cb.num_old_tasks == 1
