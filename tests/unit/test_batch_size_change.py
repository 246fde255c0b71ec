"""A change of the training batch size is not a task switch: ``AutoBoundaries`` watches the
batches' size and, once a new size has held for ``max_onset_steps`` steps with no switch,
restarts its detector (issue 25's within-task events; with Adam a smaller batch raised the
gradient signals for tens of steps)."""

from __future__ import annotations

import torch

from lightning_metagrad.boundaries import AutoBoundaries


def observe(src: AutoBoundaries, sizes: list[int], gen: torch.Generator) -> None:
    """One batch of each size, then the step's gradients of two weight matrices."""
    for size in sizes:
        src.on_train_batch({"x": torch.zeros(size, 3), "y": torch.zeros(size)}, 0)
        grads = [torch.randn(8, 6, generator=gen), torch.randn(4, 8, generator=gen)]
        src.on_gradients(["a", "b"], grads, grads)
        src.on_loss(torch.tensor(1.0))


def warming_up(src: AutoBoundaries) -> bool:
    """Whether the latest observation was the detectors' warm-up (no statistic yet)."""
    return all(det.last_statistic == 0.0 for det in src.detector.detectors)


def test_a_new_size_restarts_the_detector_after_max_onset_steps_without_a_switch() -> None:
    gen = torch.Generator().manual_seed(0)
    src = AutoBoundaries()
    observe(src, [64] * 60, gen)
    assert not warming_up(src) and src.batch_size == 64
    observe(src, [16] * 4, gen)
    assert src.batch_size == 16 and src.batch_size_changes == [60]  # its first batch
    # A switch that comes with the new size is still tested for max_onset_steps steps.
    observe(src, [16] * (src.max_onset_steps - 4), gen)
    assert not warming_up(src)
    observe(src, [16], gen)
    assert warming_up(src)  # then the levels are learned afresh at the new size
    assert src.detector.num_switches == 0


def test_a_task_start_in_between_cancels_the_pending_restart() -> None:
    gen = torch.Generator().manual_seed(0)
    src = AutoBoundaries()
    observe(src, [64] * 60 + [16] * 4, gen)
    src.on_task_start()  # e.g. a switch declared with the new size: the detector restarted
    observe(src, [16] * 40, gen)  # its warm-up of 20 is over, and no second restart comes
    assert not warming_up(src)


def test_an_epochs_smaller_last_batch_is_not_a_change() -> None:
    gen = torch.Generator().manual_seed(0)
    src = AutoBoundaries()
    observe(src, ([64] * 30 + [40]) * 3, gen)
    assert src.batch_size == 64 and src.batch_size_changes == []
    assert not warming_up(src)


def test_a_new_size_counts_only_after_four_batches_in_a_row() -> None:
    gen = torch.Generator().manual_seed(0)
    src = AutoBoundaries()
    observe(src, [64] * 5 + [16] * 3 + [64] + [16] * 3 + [32], gen)
    assert src.batch_size == 64 and src.batch_size_changes == []
    observe(src, [16] * 4, gen)
    assert src.batch_size == 16 and len(src.batch_size_changes) == 1


def test_overriding_the_policy_keeps_the_detector_going() -> None:
    class KeepGoing(AutoBoundaries):
        def on_batch_size_change(self, old: int, new: int) -> None:
            self.seen = (old, new)

    gen = torch.Generator().manual_seed(0)
    src = KeepGoing()
    observe(src, [64] * 60 + [16] * 40, gen)
    assert src.seen == (64, 16) and not warming_up(src)


def test_the_watched_size_round_trips_and_an_older_state_loads() -> None:
    gen = torch.Generator().manual_seed(0)
    src = AutoBoundaries()
    observe(src, [64] * 30 + [16] * 6 + [8] * 2, gen)
    clone = AutoBoundaries()
    clone.load_state_dict(src.state_dict())
    assert (clone.batch_size, clone.batch_size_changes) == (16, [30])
    observe(clone, [8] * 2, gen)  # the pending new size carried over: 4 batches of 8 in a row
    assert clone.batch_size == 8 and clone.batch_size_changes == [30, 36]
    # The pending restart carried over too: it comes max_onset_steps after the first 8.
    observe(clone, [8] * (36 + clone.max_onset_steps - clone.steps), gen)
    assert not warming_up(clone)
    observe(clone, [8], gen)
    assert warming_up(clone)

    older = src.state_dict()
    del older["batch_size"]  # as written before the batch size was watched
    fresh = AutoBoundaries()
    fresh.load_state_dict(older)
    assert fresh.batch_size is None and fresh.batch_size_changes == []
    assert fresh.steps == src.steps


def test_a_switch_slowed_past_max_onset_steps_is_still_declared() -> None:
    # From 64 samples a batch to 16 at step 100; from step 122 the gradients move, over 20
    # steps, from one 4-D subspace to another. The novelty's run is under way when the
    # restart falls due (step 130): it waits, and the switch is declared.
    gen = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(32, 32, generator=gen))[0]
    old, new = basis[:, :4], basis[:, 4:8]
    src = AutoBoundaries(signal="novelty")
    switches = []
    for step in range(200):
        src.on_train_batch(torch.zeros(64 if step < 100 else 16, 2), 0)
        share = min(max((step - 122) / 20, 0.0), 1.0)
        mix = (1 - share) * old @ torch.randn(4, 16, generator=gen)
        mix += share * new @ torch.randn(4, 16, generator=gen)
        grad = mix.T + 0.05 * torch.randn(16, 32, generator=gen)
        if src.on_gradients(["w"], [grad], [grad]):
            switches.append(step)
            src.on_task_start()
        src.on_loss(torch.tensor(1.0 + share))
    assert src.batch_size_changes == [100] and src.max_onset_steps == 30
    assert switches == [130]
