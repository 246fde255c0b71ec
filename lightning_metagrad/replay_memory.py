"""The replay memory of ``ReplayPredictor``, A-GEM and ER: a constant number of old training
batches, shared evenly by the old tasks. Plain PyTorch (no Lightning)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from lightning_metagrad._tensors import detached_copy, map_tensors
from lightning_metagrad._validation import check_int, check_state_version


class ReplayMemory:
    """A constant-size memory of training batches, shared evenly by the old tasks.

    During a task, :meth:`observe` keeps ``capacity`` of its batches by reservoir sampling
    (every batch of the task has the same chance to be kept; kept batches are detached clones).
    At :meth:`end_task` they join the memory, and the old tasks share ``capacity`` batches in
    total: ``capacity // T`` each, the remainder going to the most recent tasks (a task keeps a
    random subset of its batches). With more old tasks than ``capacity``, each stored task
    holds one batch and the tasks themselves are reservoir-sampled, so every old task has the
    same chance ``capacity / T`` of being represented. All randomness comes from one seeded
    ``torch.Generator``, whose state is part of :meth:`state_dict`.

    Batches are stored as they came (e.g. on the training device); put only tensors, numbers,
    strings and lists/tuples/dicts of them in batches that must survive a checkpoint
    (``weights_only`` loading).

    Args:
        capacity: batches stored for all old tasks together (and kept of the current task).
        seed: seed of the generator (reservoir, shares and draws).

    Example:
        >>> memory = ReplayMemory(capacity=4, seed=0)
        >>> for task in range(3):
        ...     for i in range(10):
        ...         memory.observe({"x": torch.full((2,), float(i)), "task": task})
        ...     memory.end_task()
        True
        True
        True
        >>> memory.num_batches, [len(batches) for batches in memory.tasks]
        (4, [1, 1, 2])
        >>> batch, index = memory.sample()
        >>> sorted(batch)
        ['task', 'x']
    """

    #: The layout version :meth:`state_dict` writes (that of ``EpisodicMemory`` before it).
    _state_version: ClassVar[int] = 1

    def __init__(self, capacity: int, seed: int = 0) -> None:
        self.capacity = check_int("capacity", capacity, minimum=1)
        self.generator = torch.Generator().manual_seed(check_int("seed", seed))
        #: The stored batches of each represented old task.
        self.tasks: list[list[Any]] = []
        #: Which task (0-based, in order of :meth:`end_task`) each entry of :attr:`tasks` is.
        self.task_ids: list[int] = []
        #: The current task's reservoir.
        self.current: list[Any] = []
        #: Batches of the current task observed so far.
        self.seen = 0
        #: Tasks that joined the memory (represented or not).
        self.tasks_ended = 0

    @property
    def num_batches(self) -> int:
        """Batches stored for the old tasks."""
        return sum(len(batches) for batches in self.tasks)

    def _randint(self, high: int) -> int:
        return int(torch.randint(high, (1,), generator=self.generator))

    def observe(self, batch: Any) -> None:
        """Offer one batch of the current task to the reservoir."""
        self.seen += 1
        if len(self.current) < self.capacity:
            self.current.append(detached_copy(batch))
            return
        slot = self._randint(self.seen)
        if slot < self.capacity:
            self.current[slot] = detached_copy(batch)

    def end_task(self) -> bool:
        """The current task's batches join the memory; False (nothing changes) if it had none."""
        if not self.current:
            return False
        order = torch.randperm(len(self.current), generator=self.generator).tolist()
        batches = [self.current[i] for i in order]  # any prefix is now a uniform subset
        task_id = self.tasks_ended
        self.tasks_ended += 1
        self.current, self.seen = [], 0
        if len(self.tasks) < self.capacity:
            self.tasks.append(batches)
            self.task_ids.append(task_id)
            count = len(self.tasks)
            base, extra = divmod(self.capacity, count)
            # The last `extra` tasks keep one batch more; quotas only shrink as tasks come.
            self.tasks = [b[: base + (i >= count - extra)] for i, b in enumerate(self.tasks)]
        else:  # one batch per stored task: reservoir sampling over the tasks
            slot = self._randint(self.tasks_ended)
            if slot < self.capacity:
                self.tasks[slot] = batches[:1]
                self.task_ids[slot] = task_id
        return True

    def sample(self, device: torch.device | None = None) -> tuple[Any, int] | None:
        """One stored batch drawn uniformly (moved to ``device``) and its index; None if the
        memory is empty."""
        flat = [batch for batches in self.tasks for batch in batches]
        if not flat:
            return None
        index = self._randint(len(flat))
        batch = flat[index]
        if device is not None:
            batch = map_tensors(batch, lambda t: t.to(device))
        return batch, index

    def state_dict(self) -> dict[str, Any]:
        """The stored batches, the reservoir and the generator state (copies of the lists: a
        later task does not change a state taken now)."""
        return {
            "version": self._state_version,
            "tasks": [list(batches) for batches in self.tasks],
            "task_ids": list(self.task_ids),
            "current": list(self.current),
            "seen": self.seen,
            "tasks_ended": self.tasks_ended,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; ValueError for a version this release cannot read."""
        check_state_version(type(self).__name__, state, self._state_version, unversioned=1)
        self.tasks = [list(batches) for batches in state["tasks"]]
        self.task_ids = [int(i) for i in state["task_ids"]]
        self.current = list(state["current"])
        self.seen = int(state["seen"])
        self.tasks_ended = int(state["tasks_ended"])
        self.generator.set_state(state["generator"].cpu())
