"""The one replay memory (of ReplayPredictor, A-GEM and ER), without a Trainer."""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any, NamedTuple

import pytest
import torch
from helpers import assert_imports_without_lightning

from lightning_metagrad import ReplayPredictor
from lightning_metagrad.baselines import AGEMCallback, EpisodicMemory, ERCallback
from lightning_metagrad.replay_memory import ReplayMemory


def fill(memory: ReplayMemory, task: int, batches: int) -> None:
    for i in range(batches):
        memory.observe({"x": torch.tensor([float(i)]), "task": task})
    memory.end_task()


def test_every_memory_of_the_package_is_the_one_class() -> None:
    assert EpisodicMemory is ReplayMemory
    assert isinstance(ReplayPredictor().replay_memory, ReplayMemory)
    assert isinstance(AGEMCallback().memory, ReplayMemory)
    assert isinstance(ERCallback().memory, ReplayMemory)


@pytest.mark.slow  # a fresh interpreter
def test_the_memory_module_does_not_import_lightning() -> None:
    assert_imports_without_lightning("lightning_metagrad.replay_memory")


def test_the_reservoir_keeps_a_uniform_sample_of_the_task() -> None:
    kept: Counter[int] = Counter()
    runs = 400
    for seed in range(runs):
        memory = ReplayMemory(capacity=2, seed=seed)
        for i in range(8):
            memory.observe(torch.tensor(i))
        assert memory.seen == 8 and len(memory.current) == 2
        kept.update(int(t) for t in memory.current)
    # Each batch is kept with probability 2/8: 100 of 400 runs (binomial sd about 8.7).
    assert all(60 < kept[i] < 140 for i in range(8)), kept


def test_kept_batches_are_detached_copies_of_any_layout() -> None:
    class Pair(NamedTuple):
        x: torch.Tensor
        y: torch.Tensor

    @dataclasses.dataclass(frozen=True)
    class Batch:
        x: torch.Tensor
        name: str

    w = torch.ones(2, requires_grad=True)
    batches: list[Any] = [
        {"x": w * 2, "ids": [w * 3, "a"]},
        Pair(w * 4, torch.zeros(1)),
        Batch(w * 5, "b"),
    ]
    memory = ReplayMemory(capacity=3)
    for batch in batches:
        memory.observe(batch)
    stored = memory.current
    assert type(stored[1]) is Pair and type(stored[2]) is Batch and stored[2].name == "b"
    tensors = [stored[0]["x"], stored[0]["ids"][0], stored[1].x, stored[2].x]
    assert all(not t.requires_grad for t in tensors)
    originals = [batches[0]["x"], batches[0]["ids"][0], batches[1].x, batches[2].x]
    assert all(t.data_ptr() != o.data_ptr() for t, o in zip(tensors, originals))
    assert [float(t[0]) for t in tensors] == [2.0, 3.0, 4.0, 5.0]


def test_old_tasks_share_the_capacity_evenly() -> None:
    memory = ReplayMemory(capacity=5, seed=0)
    for task in range(3):
        fill(memory, task, batches=10)
    assert memory.num_batches == 5 and memory.tasks_ended == 3
    assert [len(b) for b in memory.tasks] == [1, 2, 2]  # the remainder to the recent tasks
    assert memory.task_ids == [0, 1, 2]
    assert all(b["task"] == t for batches, t in zip(memory.tasks, memory.task_ids) for b in batches)
    assert memory.current == [] and memory.seen == 0


def test_more_tasks_than_capacity_keep_a_sample_of_the_tasks() -> None:
    memory = ReplayMemory(capacity=3, seed=1)
    for task in range(9):
        fill(memory, task, batches=4)
    assert memory.tasks_ended == 9 and memory.num_batches == 3
    assert [len(b) for b in memory.tasks] == [1, 1, 1]
    assert len(set(memory.task_ids)) == 3
    assert all(b["task"] == t for batches, t in zip(memory.tasks, memory.task_ids) for b in batches)


def test_a_task_without_batches_changes_nothing() -> None:
    memory = ReplayMemory(capacity=2)
    before = memory.state_dict()
    assert memory.end_task() is False
    assert memory.tasks_ended == 0 and memory.tasks == []
    assert torch.equal(before["generator"], memory.generator.get_state())
    assert memory.sample() is None


def test_sample_draws_a_stored_batch_and_moves_it() -> None:
    memory = ReplayMemory(capacity=4, seed=0)
    fill(memory, 0, batches=4)
    flat = [b for batches in memory.tasks for b in batches]
    drawn = memory.sample(torch.device("meta"))
    assert drawn is not None
    batch, index = drawn
    assert 0 <= index < 4 and batch["x"].is_meta and batch["task"] == 0
    assert flat[index]["x"].device.type == "cpu"  # the stored batch stays where it was


def test_the_state_round_trips_and_a_taken_state_does_not_change() -> None:
    memory = ReplayMemory(capacity=3, seed=2)
    fill(memory, 0, batches=5)
    memory.observe({"x": torch.tensor([9.0]), "task": 1})
    state = memory.state_dict()
    restored = ReplayMemory(capacity=3, seed=123)
    restored.load_state_dict(state)
    for m in (memory, restored):
        for i in range(6):
            m.observe({"x": torch.tensor([float(i)]), "task": 1})
        m.end_task()
    assert memory.task_ids == restored.task_ids and memory.seen == restored.seen
    for a, b in zip(memory.tasks, restored.tasks):
        assert [float(x["x"]) for x in a] == [float(x["x"]) for x in b]
    assert [len(b) for b in state["tasks"]] == [3] and len(state["current"]) == 1
    assert state["tasks_ended"] == 1 and state["seen"] == 1


def test_an_unknown_state_version_is_refused() -> None:
    state = ReplayMemory(capacity=2).state_dict()
    ReplayMemory(capacity=2).load_state_dict({k: v for k, v in state.items() if k != "version"})
    with pytest.raises(ValueError, match="state version 7 cannot be read"):
        ReplayMemory(capacity=2).load_state_dict({**state, "version": 7})


def test_replay_predictor_loads_its_version_1_layout() -> None:
    # The layout ReplayPredictor wrote before it shared the memory: flat lists of batches.
    generator = torch.Generator().manual_seed(5)
    old_tasks = [[(torch.ones(2), 0), (torch.zeros(2), 0)], [(torch.ones(2), 1)]]
    old = {
        "version": 1,
        "memory": old_tasks,
        "current": [(torch.full((2,), 3.0), 2)],
        "seen": 4,
        "calls": 7,
        "generator": generator.get_state(),
        "cached": {"w": torch.ones(2)},
    }
    replay = ReplayPredictor(memory_batches=4)
    replay.load_state_dict(old)
    assert replay.num_old_tasks == 2 and replay.memory == old_tasks
    assert replay.replay_memory.task_ids == [0, 1] and replay.replay_memory.seen == 4
    assert len(replay.current) == 1
    assert torch.equal(replay.replay_memory.generator.get_state(), generator.get_state())
    state = replay.state_dict()  # written in today's layout
    assert state["version"] == 2 and state["calls"] == 7
    assert state["memory"]["tasks_ended"] == 2 and state["memory"]["current"] == replay.current
    replay.end_task([], [])  # the restored reservoir joins the memory as the third task
    assert replay.num_old_tasks == 3 and [len(b) for b in replay.memory] == [1, 1, 1]
