"""A switch detected some steps late: the new task's updates of those steps are undone from
the finished task's subspace once it is folded in (``AutoBoundaries(undo_late_updates=True)``,
the default), so the old task keeps the weights it had when the switch began.

Plain loops with :class:`MetaGrad` and a source that declares a switch a known number of
steps late; through a real Trainer: ``tests/integration/test_auto_boundaries_training.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
from torch import Tensor

from lightning_metagrad import AutoBoundaries, MetaGrad
from lightning_metagrad.boundaries.sources import TaskBoundarySource

STEPS, SWITCH, LATE = 60, 40, 5


class LateSwitch(TaskBoundarySource):
    """Declares one switch at step ``SWITCH + LATE`` and says it began ``LATE`` steps
    before (or never declares, with ``at=None``)."""

    name = "late"

    def __init__(self, at: int | None, undo: bool = True) -> None:
        self.at, self.undo, self.steps = at, undo, 0

    @property
    def uses_gradients(self) -> bool:
        return True

    def on_gradients(
        self, names: Sequence[str], thetas: Sequence[Tensor], targets: Sequence[Tensor]
    ) -> bool:
        self.steps += 1
        return self.steps == self.at

    @property
    def max_onset_steps(self) -> int:
        return 8

    def onset_steps(self) -> int:
        return LATE

    @property
    def undo_late_updates(self) -> bool:
        return self.undo


def inputs(subspace: int, n: int, gen: torch.Generator) -> Tensor:
    """Inputs in a 3-dimensional subspace of R^8; those of tasks 0 and 1 share a direction."""
    basis = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(9)))[0]
    return torch.randn(n, 3, generator=gen) @ basis[:, 2 * subspace : 2 * subspace + 3].T


def train(
    source: TaskBoundarySource, given: bool = False, adam: bool = False
) -> tuple[Tensor, Tensor]:
    """Task A's outputs on its inputs where task B began, and at the end."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    model = torch.nn.Linear(8, 4)
    teacher = [torch.randn(8, 4, generator=gen) for _ in range(2)]
    opt: torch.optim.Optimizer = (
        torch.optim.Adam(model.parameters(), lr=0.01)  # update mode: the rule acts on updates
        if adam
        else torch.optim.SGD(model.parameters(), lr=0.1)
    )
    core = MetaGrad(boundaries=source)
    core.bind(model)
    core.use_optimizer(opt)
    probe = inputs(0, 64, gen)
    at_switch = torch.empty(0)
    for step in range(STEPS):
        task = int(step >= SWITCH)
        if step == SWITCH:
            at_switch = model(probe).detach()
            if given:
                core.start_task()
        x = inputs(task, 32, gen)
        opt.zero_grad()
        (model(x) - x @ teacher[task]).pow(2).mean().backward()
        core.before_optimizer_step()
        opt.step()
    expected = int(given) + int(source.at is not None)  # type: ignore[attr-defined]
    assert core.task_index == expected
    return at_switch, model(probe).detach()


def drift(run: tuple[Tensor, Tensor]) -> float:
    at_switch, end = run
    return float((end - at_switch).norm() / at_switch.norm())


@pytest.mark.parametrize("adam", [False, True], ids=["sgd", "adam"])
def test_the_late_steps_no_longer_move_the_old_tasks_outputs(adam: bool) -> None:
    given = drift(train(LateSwitch(at=None), given=True, adam=adam))
    undone = drift(train(LateSwitch(at=SWITCH + LATE), adam=adam))
    kept = drift(train(LateSwitch(at=SWITCH + LATE, undo=False), adam=adam))
    assert kept > 0.05  # five unprotected steps of task B moved task A's outputs
    assert undone < 0.01 * kept
    assert undone == pytest.approx(given, abs=0.01)


def test_an_undo_reaches_back_no_further_than_the_latest_task_start() -> None:
    # A task started by hand at the switch, then a (false) detection 3 steps later that says
    # it began 5 steps back: only the 3 steps since the start are undone, so task A keeps
    # its own last updates and its outputs where the given boundary left them.
    given = drift(train(LateSwitch(at=None), given=True))
    both = drift(train(LateSwitch(at=SWITCH + 3), given=True))
    assert both == pytest.approx(given, abs=1e-4)


def test_without_a_detection_nothing_is_undone() -> None:
    untouched = train(LateSwitch(at=None, undo=False))
    with_undo = train(LateSwitch(at=None, undo=True))
    torch.testing.assert_close(untouched, with_undo, rtol=0, atol=0)


def test_auto_boundaries_undo_by_default_and_check_the_argument() -> None:
    assert AutoBoundaries().undo_late_updates
    assert not AutoBoundaries(undo_late_updates=False).undo_late_updates
    assert not TaskBoundarySource().undo_late_updates
    with pytest.raises(ValueError, match="undo_late_updates"):
        AutoBoundaries(undo_late_updates="yes")  # type: ignore[arg-type]


def test_a_large_history_is_warned_about(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_metagrad import engine

    monkeypatch.setattr(engine, "_HISTORY_WARN_BYTES", 1000)
    warned: list[str] = []
    core = MetaGrad(boundaries=LateSwitch(at=None), runtime=engine.Runtime(warn=warned.append))
    core.bind(torch.nn.Linear(8, 4))  # 36 floats, 8 copies: 1152 bytes
    assert len(warned) == 1 and "undo_late_updates=False" in warned[0]
    quiet: list[str] = []
    core = MetaGrad(
        boundaries=LateSwitch(at=None, undo=False), runtime=engine.Runtime(warn=quiet.append)
    )
    core.bind(torch.nn.Linear(8, 4))
    assert not quiet
