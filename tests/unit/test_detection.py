"""Task-switch detection (section 5.1), each test one specified behaviour, no Trainer.

Signals are synthetic but shaped like the meta-network's relative reconstruction error: a
base level with log-normal noise; at a new task the error jumps (x e, +1 in log space) and
decays back over ~300 observations while a meta-network learns the new task.
"""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
import pytest
import torch

from lightning_metagrad.boundaries.changepoint import ChangePointDetector, simulate_detection

BASE = 0.3  # a typical relative error of a meta-network that has learned its task
NOISE = 0.15  # std of the log error from one observation to the next
# A clear jump shows in the window median after window // 2 + 1 observations, and a switch is
# declared patience - 1 observations later; allow a few more for noise.
MAX_DELAY = 9 // 2 + 5 + 3


def log_noise(n: int, seed: int, sd: float = NOISE) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, sd, n)


def new_task_bump(n: int, start: int, height: float = 1.0, decay: float = 300.0) -> np.ndarray:
    """The log-error excess of a new task: +height at ``start``, decaying as h relearns."""
    t = np.arange(n)
    return np.where(t >= start, height * np.exp(-(t - start) / decay), 0.0)


def errors(log_excess: np.ndarray, base: float = BASE) -> list[float]:
    return (base * np.exp(log_excess)).tolist()


# ------------------------------------------------------------------ switches are detected


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("sd", [0.05, NOISE, 0.3])
def test_abrupt_switch_is_detected_within_a_few_observations(seed: int, sd: float) -> None:
    start = 1000
    signal = errors(log_noise(2000, seed, sd) + new_task_bump(2000, start))
    hits = simulate_detection(signal, ChangePointDetector())
    assert len(hits) == 1
    assert 0 <= hits[0] - start <= MAX_DELAY


@pytest.mark.parametrize("seed", range(5))
def test_blurry_switch_is_detected_during_the_mix(seed: int) -> None:
    # Over 200 observations a growing fraction a of the batches comes from the new task; the
    # error is the mixture of the old (base) and new task's errors, and the new task's excess
    # decays with the number of new-task batches seen.
    start, n = 1000, 2000
    t = np.arange(n)
    a = np.clip((t - start) / 200.0, 0.0, 1.0)
    new_excess = np.exp(1.0 * np.exp(-np.cumsum(a) / 300.0))
    signal = errors(log_noise(n, seed) + np.log((1.0 - a) + a * new_excess))
    hits = simulate_detection(signal, ChangePointDetector())
    assert len(hits) == 1
    assert 0 <= hits[0] - start <= 200


def test_consecutive_tasks_give_one_switch_each() -> None:
    starts = [1500, 3000, 4500, 6000]
    log_error = log_noise(7500, seed=7)
    bases = [0.0, 0.3, -0.2, 0.1, -0.4]  # each task trains to its own error level
    for k, start in enumerate(starts):
        log_error[start:] += bases[k + 1] - bases[k]
        log_error += new_task_bump(7500, start, height=1.0 + 0.1 * k)
    det = ChangePointDetector()
    hits = simulate_detection(errors(log_error), det)
    assert det.num_switches == len(starts) == len(hits)
    assert det.switch_steps == hits  # no invalid observations: indices agree
    assert all(0 <= hit - start <= MAX_DELAY for hit, start in zip(hits, starts))


def test_switch_after_a_learning_rate_drop_is_still_detected() -> None:
    # The error falls to a third (learning-rate drop) 300 observations before the next task.
    log_error = log_noise(3000, seed=3) - 1.1 * (np.arange(3000) >= 1000)
    log_error += new_task_bump(3000, 1300)
    hits = simulate_detection(errors(log_error), ChangePointDetector())
    assert len(hits) == 1 and 0 <= hits[0] - 1300 <= MAX_DELAY


# ------------------------------------------------------------------ within-task events do not fire


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("kind", ["gaussian", "heavy_tailed", "autocorrelated"])
def test_no_false_switch_on_stationary_noise(seed: int, kind: str) -> None:
    n = 10_000
    rng = np.random.default_rng(100 + seed)
    if kind == "gaussian":
        log_error = rng.normal(0.0, NOISE, n)
    elif kind == "heavy_tailed":  # Student t with 3 degrees of freedom: frequent outliers
        log_error = NOISE * rng.standard_t(3, n)
    else:  # AR(1), rho = 0.5: the level wanders slowly
        eps = rng.normal(0.0, NOISE * math.sqrt(1 - 0.5**2), n)
        log_error = np.zeros(n)
        for i in range(1, n):
            log_error[i] = 0.5 * log_error[i - 1] + eps[i]
    det = ChangePointDetector()
    assert simulate_detection(errors(log_error), det) == []
    assert det.num_observations == n


@pytest.mark.parametrize("length", [1, 2, 3, 4])
def test_no_false_switch_on_short_spikes_of_ten_times_the_error(length: int) -> None:
    # A bad batch: the error is 10x for `length` observations (up to window // 2 = 4), every
    # 500 observations.
    n = 5000
    t = np.arange(n)
    spikes = (t >= 200) & (t % 500 < length)
    log_error = log_noise(n, seed=length) + math.log(10.0) * spikes
    assert simulate_detection(errors(log_error), ChangePointDetector()) == []


def test_no_false_switch_when_the_error_steps_down() -> None:
    # A learning-rate drop: the error falls to a third, and afterwards keeps falling slowly.
    n = 5000
    t = np.arange(n)
    log_error = log_noise(n, seed=11) - 1.1 * (t >= 2000) - 0.3 * np.clip((t - 2000) / 3000, 0, 1)
    det = ChangePointDetector()
    assert simulate_detection(errors(log_error), det) == []
    assert det.last_statistic < 4.0


@pytest.mark.parametrize("seed", range(3))
def test_no_false_switch_on_slow_upward_drift(seed: int) -> None:
    # The error grows 2.7x over 5000 observations (e.g. the gradient becoming noise-dominated
    # as the main network converges): slow drift is followed, not declared a switch.
    n = 6000
    drift = np.clip((np.arange(n) - 500) / 5000, 0.0, 1.0)
    assert simulate_detection(errors(log_noise(n, seed) + drift), ChangePointDetector()) == []


@pytest.mark.parametrize("seed", range(3))
def test_with_min_contrast_a_ramp_is_not_a_switch_but_a_jump_is(seed: int) -> None:
    # A ramp 20-fold over 60 observations (the direction's creep under the old tasks'
    # projection), then a 5-fold jump.
    n = 600
    ramp = np.clip((np.arange(n) - 150) / 60, 0.0, 1.0) * math.log(20.0)
    jump = np.where(np.arange(n) >= 450, math.log(5.0), 0.0)
    signal = errors(log_noise(n, seed) + ramp + jump)
    kw = {"warmup": 20, "window": 15, "patience": 8, "cooldown": 0, "halflife": 100.0,
          "min_relative_jump": 4.0}  # fmt: skip
    assert simulate_detection(signal[:400], ChangePointDetector(**kw))  # the ramp fires...
    contrast = ChangePointDetector(**kw, min_contrast=2.0)
    found = simulate_detection(signal, contrast)
    assert len(found) == 1 and 450 <= found[0] <= 450 + 15 + 3  # ...not with the contrast


@pytest.mark.parametrize("seed", range(3))
def test_with_trace_onset_a_late_declared_climb_is_placed_where_it_began(seed: int) -> None:
    # A switch seen through a recent mean: the signal climbs 20-fold over 20 observations
    # from observation 300, and the 8-fold fast rule declares it near the top of the climb.
    n, start = 500, 300
    climb = np.clip((np.arange(n) - start) / 20, 0.0, 1.0) * math.log(20.0)
    signal = errors(log_noise(n, seed) + climb)
    kw = {"warmup": 20, "window": 15, "patience": 8, "cooldown": 0, "halflife": 100.0,
          "min_relative_jump": 4.0, "fast_jump": 7.0}  # fmt: skip
    plain, traced = ChangePointDetector(**kw), ChangePointDetector(**kw, trace_onset=40)
    [found] = simulate_detection(signal, plain)
    assert simulate_detection(signal, traced) == [found]  # the same decision...
    began = found - start + 1  # observations since the climb began, this one included
    assert began >= 15 and plain.last_onset <= 8  # ...the rule places it a few back...
    assert began - 3 <= traced.last_onset <= began + 2  # ...the trace where it began
    assert traced.max_onset == 40


def confirm_run(
    loss: np.ndarray | None, seed: int = 0, spike: float | None = None
) -> tuple[list[int], ChangePointDetector]:
    """A 5-fold jump of the main signal at 300, with the loss ``loss`` (None: not fed)."""
    n = len(loss) if loss is not None else 500
    signal = errors(log_noise(n, seed) + math.log(5.0) * (np.arange(n) >= 300))
    det = ChangePointDetector(warmup=20, cooldown=0, confirm={"loss": 0.9}, spike=spike)
    hits = []
    for i in range(n):
        obs = {"error": signal[i]} if loss is None else {"error": signal[i], "loss": loss[i]}
        if det.update(**obs):
            hits.append(i)
    return hits, det


def test_with_confirm_a_switch_during_a_falling_loss_is_held_back() -> None:
    steps = np.arange(500)
    falling = 2.0 * np.exp(-steps / 50)  # the loss keeps falling 2 % a step: learning
    assert confirm_run(falling)[0] == []
    flat = np.full(500, 2.0) * np.exp(log_noise(500, seed=3))
    [hit], det = confirm_run(flat)
    assert 300 <= hit <= 300 + MAX_DELAY and det.last_onset > 0


def test_with_confirm_a_held_back_switch_is_declared_once_the_loss_confirms() -> None:
    steps = np.arange(500)
    loss = 2.0 * np.exp(-steps / 50)
    loss[320:] = 1.5 * loss[320]  # the loss stops falling and jumps at 320
    [hit], _ = confirm_run(loss)
    assert 320 < hit <= 320 + MAX_DELAY


def test_with_confirm_an_unfed_signal_does_not_hold_a_switch_back() -> None:
    [hit], det = confirm_run(None)
    assert 300 <= hit <= 300 + MAX_DELAY
    assert det.accepted == ["error", "loss"]


def test_with_spike_a_switch_in_a_loss_spikes_aftermath_is_held_back() -> None:
    # Two batches of garbage (the loss 20-fold) as the signal rises; with Adam the gradients
    # move for a while after such a spike. Exceedances count again 2 * max_onset observations
    # after the loss is back (304); a switch then needs its full run.
    loss = np.full(500, 2.0) * np.exp(log_noise(500, seed=3))
    loss[302:304] *= 20
    [plain], _ = confirm_run(loss)
    [hit], det = confirm_run(loss, spike=5.0)
    quiet_until = 304 + 2 * det.max_onset
    assert plain < quiet_until < hit <= quiet_until + det.patience


def test_with_spike_a_lasting_loss_jump_holds_nothing_back() -> None:
    loss = np.full(500, 2.0) * np.exp(log_noise(500, seed=3))
    loss[298:] *= 20  # a new task's loss: it stays
    assert confirm_run(loss, spike=5.0)[0] == confirm_run(loss)[0]


def test_with_spike_a_switch_whose_loss_stays_up_ends_the_quiet() -> None:
    # With Adam a low training loss has single batches 5 times its median: such a "spike"
    # just before a switch would mute the switch for 2 * max_onset observations (with Adam on
    # digits it was missed). A loss back at 5 times its level for 5 observations is a new
    # level, so the quiet ends there and the switch is declared as without it.
    loss = np.full(500, 2.0) * np.exp(log_noise(500, seed=3))
    loss[296] *= 8  # one batch, then back: a spike by the rule
    loss[300:] *= 20  # a new task's loss, 4 observations later
    [plain], _ = confirm_run(loss)
    [hit], det = confirm_run(loss, spike=5.0)
    assert hit == plain and det.last_onset > 0
    assert hit < 297 + 2 * det.max_onset  # the quiet would have lasted until there


def test_spike_needs_confirm() -> None:
    with pytest.raises(ValueError, match="`spike` needs `confirm`"):
        ChangePointDetector(spike=5.0)
    with pytest.raises(ValueError, match="spike"):
        ChangePointDetector(confirm={"loss": 0.9}, spike=1.0)


# ------------------------------------------------------------------ warm-up and cooldown


def test_warmup_only_learns_and_the_first_test_comes_after_it() -> None:
    warmup, patience = 50, 5
    # The error is 10x from observation 20 on, inside the warm-up: nothing is tested (nor
    # declared) during the warm-up; the rise, still far above the warm-up's average, is
    # declared at the first moment the test allows.
    signal = errors(log_noise(1000, seed=1) + math.log(10.0) * (np.arange(1000) >= 20))
    det = ChangePointDetector(warmup=warmup, patience=patience)
    for value in signal[:warmup]:
        assert det.update(error=value) is False
        assert det.last_statistic == 0.0 and det.last_relative_jump == 0.0
    hits = [warmup + i for i in simulate_detection(signal[warmup:], det)]
    assert hits == [warmup + patience - 1]
    # A level reached at the very start of the warm-up is simply the level: no switch.
    signal = errors(log_noise(1000, seed=1) + math.log(10.0) * (np.arange(1000) >= 3))
    assert simulate_detection(signal, ChangePointDetector(warmup=warmup)) == []
    # The same rise right after the warm-up is detected as usual.
    signal = errors(log_noise(1000, seed=1) + 1.0 * (np.arange(1000) >= warmup))
    hits = simulate_detection(signal, ChangePointDetector(warmup=warmup))
    assert len(hits) == 1 and warmup <= hits[0] <= warmup + MAX_DELAY


def test_cooldown_defers_a_second_switch() -> None:
    warmup, cooldown = 20, 100
    t = np.arange(1200)
    first = (t >= 500) * 1.0  # a first new task at 500 (flat, to make the timing exact)...
    second = (t >= 560) * 1.0  # ...and the error rises again, for good, at 560
    signal = errors(log_noise(1200, seed=5) + first + second)
    det = ChangePointDetector(warmup=warmup, cooldown=cooldown)
    hits = simulate_detection(signal, det)
    assert len(hits) == 2 and 0 <= hits[0] - 500 <= MAX_DELAY
    # The second rise is seen during the cooldown and declared at its first allowed step.
    assert hits[1] == hits[0] + cooldown + 1


def test_rise_that_ends_within_the_cooldown_is_not_declared() -> None:
    t = np.arange(1200)
    bump = (t >= 500) * 1.0 + ((t >= 560) & (t < 590)) * 1.0  # second rise lasts 30 steps
    det = ChangePointDetector(warmup=20, cooldown=100)
    hits = simulate_detection(errors(log_noise(1200, seed=5) + bump), det)
    assert len(hits) == 1 and 0 <= hits[0] - 500 <= MAX_DELAY


def test_restart_applies_warmup_and_cooldown_without_counting_a_switch() -> None:
    det = ChangePointDetector(warmup=20, cooldown=100)
    simulate_detection(errors(log_noise(300, seed=2)), det)
    det.restart()  # e.g. a task started by hand
    t = np.arange(400)
    # A rise at 40 (after the new warm-up) is held back for the 100 observations of the
    # cooldown and declared at the first one after it.
    hits = simulate_detection(errors(log_noise(400, seed=3) + (t >= 40) * 1.0), det)
    assert hits == [100]
    assert det.num_switches == 1 and det.switch_steps == [300 + 100]


def test_adaptive_warmup_learns_a_start_up_that_is_still_moving() -> None:
    # The signal rises 4-fold over the first 40 observations (a network leaving its random
    # initialisation), then stays: a fixed warm-up tests the rise against the level it
    # learned on the way up; an adaptive one starts over while the signal moves.
    n = 1000
    ramp = np.log(4.0) * np.clip(np.arange(n) / 40, 0.0, 1.0)
    signal = errors(log_noise(n, seed=4) + ramp)
    assert simulate_detection(signal, ChangePointDetector(warmup=20, cooldown=0)) != []
    det = ChangePointDetector(warmup=20, max_warmup=200, cooldown=0)
    assert simulate_detection(signal, det) == []
    # A falling start (the loss of a network that learns) is learned just the same, and a
    # switch after it is found as usual.
    fall = errors(log_noise(n, seed=5) - ramp + 1.0 * (np.arange(n) >= 600))
    hits = simulate_detection(fall, ChangePointDetector(warmup=20, max_warmup=200, cooldown=0))
    assert len(hits) == 1 and 0 <= hits[0] - 600 <= MAX_DELAY


def test_adaptive_warmup_ends_by_max_warmup() -> None:
    # A signal that never settles still gets tested from max_warmup on.
    n = 400
    signal = errors(log_noise(n, seed=6) + np.log(3.0) * (np.arange(n) >= 250))
    det = ChangePointDetector(warmup=20, max_warmup=60, cooldown=0)
    hits = simulate_detection(signal, det)
    assert len(hits) == 1 and 0 <= hits[0] - 250 <= MAX_DELAY
    with pytest.raises(ValueError, match="max_warmup"):
        ChangePointDetector(warmup=20, max_warmup=10)


@pytest.mark.parametrize("seed", range(3))
def test_fast_rule_declares_a_several_fold_jump_about_twice_as_early(seed: int) -> None:
    start, n = 500, 1000
    signal = errors(log_noise(n, seed) + np.log(10.0) * (np.arange(n) >= start))
    slow = simulate_detection(signal, ChangePointDetector(window=15, patience=8))
    fast = simulate_detection(signal, ChangePointDetector(window=15, patience=8, fast_jump=3.0))
    assert len(slow) == len(fast) == 1
    assert fast[0] - start <= 15 // 3 // 2 + 8 // 2 + 1 < slow[0] - start
    # A doubling is below the fast rule's jump: it waits for the usual test.
    signal = errors(log_noise(n, seed) + np.log(2.2) * (np.arange(n) >= start))
    det = ChangePointDetector(window=15, patience=8, min_relative_jump=1.0, fast_jump=3.0)
    assert simulate_detection(signal, det) == simulate_detection(
        signal, ChangePointDetector(window=15, patience=8, min_relative_jump=1.0)
    )


@pytest.mark.parametrize("length", [2, 3])
def test_fast_rule_ignores_short_spikes(length: int) -> None:
    # The fast rule needs a jump to last patience // 2 = 4 observations (the main rule
    # window // 2 + 1 = 8).
    n = 5000
    t = np.arange(n)
    spikes = (t >= 200) & (t % 500 < length)  # observations of 30x, every 500
    signal = errors(log_noise(n, seed=9) + np.log(30.0) * spikes)
    det = ChangePointDetector(window=15, patience=8, fast_jump=3.0)
    assert simulate_detection(signal, det) == []


# ------------------------------------------------------------------ auxiliary signals


def test_auxiliary_signals_combine_by_stouffers_weighted_z() -> None:
    n, w = 600, 0.7
    err = errors(log_noise(n, seed=1))
    loss = errors(log_noise(n, seed=2, sd=0.1), base=2.0)
    main, aux = ChangePointDetector(), ChangePointDetector(signal="loss")
    both = ChangePointDetector(weights={"loss": w})
    for e, l_ in zip(err, loss):
        main.update(error=e)
        aux.update(loss=l_)
        both.update(error=e, loss=l_)
        expected = (main.last_statistic + w * aux.last_statistic) / math.sqrt(1 + w * w)
        assert both.last_statistic == pytest.approx(expected, abs=1e-9)
    assert both.last_relative_jump == main.last_relative_jump


def test_auxiliary_signal_alone_cannot_declare_a_switch() -> None:
    # The main loss jumps 10x and stays (a harder phase of the same task): the meta-network's
    # error does not move, so no switch, however large the auxiliary weight.
    n = 3000
    loss = errors(log_noise(n, seed=1, sd=0.1) + 2.3 * (np.arange(n) >= 1000), base=2.0)
    err = errors(log_noise(n, seed=2))
    obs = [{"error": e, "loss": l_} for e, l_ in zip(err, loss)]
    det = ChangePointDetector(weights={"loss": 5.0})
    statistics = []
    for o in obs:
        assert det.update(**o) is False
        statistics.append(det.last_statistic)
    assert max(statistics) > 4.0 * det.threshold  # the loss did raise the combined statistic


@pytest.mark.parametrize("seed", range(5))
def test_auxiliary_signal_confirms_a_noisy_main_signal(seed: int) -> None:
    # A very noisy error (std 0.5) rises 1.8x and decays back: z ~ 3 alone, not enough; the
    # loss rises at the same moment and the combination declares the switch.
    n, start = 2000, 1000
    err = errors(log_noise(n, 10 + seed, sd=0.5) + new_task_bump(n, start, height=0.6))
    loss = errors(log_noise(n, 20 + seed, sd=0.1) + new_task_bump(n, start), base=2.0)
    assert simulate_detection(err, ChangePointDetector()) == []
    obs = [{"error": e, "loss": l_} for e, l_ in zip(err, loss)]
    hits = simulate_detection(obs, ChangePointDetector(weights={"loss": 1.0}))
    assert len(hits) == 1 and 0 <= hits[0] - start <= 3 * MAX_DELAY


# ------------------------------------------------------------------ robustness and state


def _plain(value: Any) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_plain(v) for v in value)
    return type(value) in (int, float, bool, str)


def test_state_dict_round_trip_continues_identically() -> None:
    n = 3000
    err = errors(log_noise(n, seed=8) + new_task_bump(n, 700) + new_task_bump(n, 2200))
    loss = errors(log_noise(n, seed=9, sd=0.1), base=2.0)
    obs = [{"error": e, "loss": l_} for e, l_ in zip(err, loss)]
    kwargs: dict[str, Any] = {"weights": {"loss": 0.5}, "cooldown": 150}
    reference = ChangePointDetector(**kwargs)
    hits = simulate_detection(obs, reference)
    assert len(hits) == 2

    for cut in (500, 705, 1500):  # before, right after (in cooldown) and after a switch
        first = ChangePointDetector(**kwargs)
        head = simulate_detection(obs[:cut], first)
        state = first.state_dict()
        assert _plain(state)
        buffer = io.BytesIO()
        torch.save(state, buffer)
        buffer.seek(0)
        resumed = ChangePointDetector(**kwargs)
        resumed.load_state_dict(torch.load(buffer, weights_only=True))
        assert resumed.state_dict() == state
        tail = simulate_detection(obs[cut:], resumed)
        assert head + [cut + i for i in tail] == hits
        assert resumed.state_dict() == reference.state_dict()


def test_version_1_states_still_load() -> None:
    det = ChangePointDetector(weights={"loss": 1.0})
    simulate_detection([{"error": 0.3, "loss": 1.0}] * 30, det)
    state = det.state_dict()
    old = {k: v for k, v in state.items() if k not in ("segment", "recent", "fast_run")}
    other = ChangePointDetector(weights={"loss": 1.0})
    other.load_state_dict({**old, "version": 1})
    assert other.state_dict() == state


def test_load_state_dict_rejects_other_signals_or_versions() -> None:
    state = ChangePointDetector(weights={"loss": 1.0}).state_dict()
    with pytest.raises(ValueError, match="signals"):
        ChangePointDetector().load_state_dict(state)
    with pytest.raises(ValueError, match="version"):
        ChangePointDetector(weights={"loss": 1.0}).load_state_dict({**state, "version": 99})


def test_non_finite_or_negative_observations_are_ignored() -> None:
    n = 2000
    clean = errors(log_noise(n, seed=6) + new_task_bump(n, 1200))
    rng = np.random.default_rng(0)
    bad = [math.nan, math.inf, -math.inf, -1.0]
    dirty: list[float] = []
    positions = []  # where each clean value lands in the dirty sequence
    for value in clean:
        while rng.random() < 0.05:
            dirty.append(bad[int(rng.integers(len(bad)))])
        positions.append(len(dirty))
        dirty.append(value)
    ref, det = ChangePointDetector(), ChangePointDetector()
    clean_hits = simulate_detection(clean, ref)
    dirty_hits = simulate_detection(dirty, det)
    assert len(clean_hits) == 1
    assert dirty_hits == [positions[i] for i in clean_hits]
    assert det.state_dict() == ref.state_dict()  # same statistics, same counts
    assert det.num_observations == n


def test_invalid_auxiliary_value_only_drops_that_signal() -> None:
    err = errors(log_noise(300, seed=1))
    loss = errors(log_noise(300, seed=2), base=2.0)
    with_nan = ChangePointDetector(weights={"loss": 1.0})
    without = ChangePointDetector(weights={"loss": 1.0})
    for i, (e, l_) in enumerate(zip(err, loss)):
        if i % 7 == 3:
            with_nan.update(error=e, loss=math.nan)
            without.update(error=e)
        else:
            with_nan.update(error=e, loss=l_)
            without.update(error=e, loss=l_)
    assert with_nan.state_dict() == without.state_dict()
    assert with_nan.num_observations == 300


def test_tensor_values_are_accepted() -> None:
    det, ref = ChangePointDetector(warmup=5), ChangePointDetector(warmup=5)
    for value in errors(log_noise(50, seed=1)):
        det.update(error=torch.tensor(value, dtype=torch.float64))
        ref.update(error=value)
    assert det.state_dict() == ref.state_dict()


def test_reset_returns_to_a_fresh_detector() -> None:
    det = ChangePointDetector()
    simulate_detection(errors(log_noise(1500, seed=2) + new_task_bump(1500, 600)), det)
    assert det.num_switches == 1
    det.reset()
    assert det.state_dict() == ChangePointDetector().state_dict()
    assert det.switch_steps == [] and det.num_observations == 0


# ------------------------------------------------------------------ API errors


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"signal": ""}, "signal"),
        ({"threshold": 0.0}, "threshold"),
        ({"threshold": math.nan}, "threshold"),
        ({"window": 0}, "window"),
        ({"window": 2.5}, "window"),
        ({"patience": 0}, "patience"),
        ({"patience": True}, "patience"),
        ({"warmup": 1}, "warmup"),
        ({"cooldown": -1}, "cooldown"),
        ({"min_relative_jump": -0.1}, "min_relative_jump"),
        ({"min_relative_jump": math.inf}, "min_relative_jump"),
        ({"halflife": 0}, "halflife"),
        ({"min_contrast": 0}, "min_contrast"),
        ({"min_contrast": math.nan}, "min_contrast"),
        ({"trace_onset": 0}, "trace_onset"),
        ({"confirm": [("loss", 0.9)]}, "confirm"),
        ({"confirm": {"error": 0.9}}, "confirm"),
        ({"confirm": {"loss": 0.0}}, "confirm"),
        ({"weights": [("loss", 1.0)]}, "weights"),
        ({"weights": {"error": 1.0}}, "weights"),
        ({"weights": {"loss": -1.0}}, "weights"),
    ],
)
def test_invalid_constructor_arguments_raise(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        ChangePointDetector(**kwargs)


def test_update_rejects_missing_unknown_or_non_numeric_signals() -> None:
    det = ChangePointDetector(weights={"loss": 1.0})
    with pytest.raises(ValueError, match="main signal 'error'"):
        det.update(loss=1.0)
    with pytest.raises(ValueError, match="lss"):
        det.update(error=0.3, lss=1.0)
    with pytest.raises(TypeError, match="error"):
        det.update(error="high")  # type: ignore[arg-type]
    assert det.num_observations == 0


def test_simulate_detection_positions_index_the_input() -> None:
    signal: list[Any] = [0.3] * 100 + [math.nan] * 5 + [1.5] * 50
    det = ChangePointDetector(warmup=20)
    hits = simulate_detection(signal, det)
    assert len(hits) == 1
    assert hits[0] == det.switch_steps[0] + 5  # the five NaNs are not observations
    assert simulate_detection([{"error": 0.3}] * 10, ChangePointDetector()) == []
