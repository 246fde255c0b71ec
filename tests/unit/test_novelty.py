"""The gradient-subspace novelty signal (lightning_metagrad/novelty.py), without a Trainer.

Gradients are synthetic but shaped like a layer's: each row a random combination of a few
input directions (the task's subspace) plus a little isotropic noise.
"""

from __future__ import annotations

import io
import statistics

import pytest
import torch

from lightning_metagrad.boundaries import AutoBoundaries
from lightning_metagrad.boundaries.novelty import SubspaceNovelty

ROWS, FAN_IN, RANK = 32, 40, 4


def subspace(seed: int, dim: int = FAN_IN, rank: int = RANK) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(dim, rank, generator=gen))[0]


def gradient(basis: torch.Tensor, gen: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    rows = torch.randn(ROWS, basis.shape[1], generator=gen) @ basis.T
    return scale * (rows + 0.02 * torch.randn(ROWS, basis.shape[0], generator=gen))


def blend(a: torch.Tensor, b: torch.Tensor, share: float, gen: torch.Generator) -> torch.Tensor:
    """A batch gradient with ``share`` of its rows from the task of ``b``."""
    take = torch.rand(ROWS, 1, generator=gen) < share
    return torch.where(take, gradient(b, gen), gradient(a, gen))


def feed(nov: SubspaceNovelty, grads: list[torch.Tensor]) -> list[float | None]:
    return [nov.observe(["w"], [g]) for g in grads]


def test_novelty_jumps_at_a_subspace_change_and_stays_up_for_the_lag() -> None:
    gen = torch.Generator().manual_seed(0)
    old, new = subspace(1), subspace(2)
    nov = SubspaceNovelty(refresh=8, lag=2)
    before = feed(nov, [gradient(old, gen) for _ in range(200)])
    after = feed(nov, [gradient(new, gen) for _ in range(16)])
    assert before[0] is None  # no basis before the first observation
    assert max(before[-100:]) < 0.05  # the task's gradients lie in its subspace
    # A new task's gradients lie (mostly) outside it, and no refresh absorbs them for at
    # least lag * refresh = 16 observations.
    assert min(after) > 0.5  # type: ignore[type-var]


def test_novelty_is_flat_within_a_task_whatever_the_gradient_scale() -> None:
    # Learning-rate changes, a warm-up or a loss spike scale the gradient; the novelty does
    # not see it (each step enters the moment with unit energy).
    gen = torch.Generator().manual_seed(3)
    old = subspace(1)
    scales = (
        [1.0] * 100 + [0.01] * 100 + [50.0, 80.0] + [1.0] * 98 + [0.1 * i for i in range(1, 101)]
    )
    nov = SubspaceNovelty(refresh=8, lag=2)
    values = feed(nov, [gradient(old, gen, s) for s in scales])[50:]
    assert max(values) < 0.05  # type: ignore[type-var]
    # Exactly scale free: the same gradients, 1000-fold, give the same values.
    gen_a, gen_b = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    a, b = SubspaceNovelty(seed=1), SubspaceNovelty(seed=1)
    va = feed(a, [gradient(old, gen_a) for _ in range(60)])
    vb = feed(b, [gradient(old, gen_b, 1000.0) for _ in range(60)])
    assert va[1:] == pytest.approx(vb[1:], rel=1e-3, abs=1e-5)  # float32 round-off


def test_novelty_sees_a_blend_as_it_goes_on() -> None:
    # A gradual switch over 96 observations: the share of the new task's rows rises
    # linearly. The basis stays that of the task before the blend for the lag, so the
    # novelty rises with the share instead of being absorbed.
    gen = torch.Generator().manual_seed(5)
    old, new = subspace(1), subspace(2)
    nov = SubspaceNovelty(refresh=16, lag=2)
    base = feed(nov, [gradient(old, gen) for _ in range(200)])[-50:]
    mix = feed(nov, [blend(old, new, (i + 1) / 96, gen) for i in range(48)])
    level = statistics.median(base)  # type: ignore[type-var]
    early, late = statistics.median(mix[8:24]), statistics.median(mix[32:48])  # type: ignore[type-var]
    assert early > 3 * level  # 8-25 % of the rows from the new task
    assert late > early  # and more as the blend goes on


def test_layers_combine_energy_weighted() -> None:
    gen = torch.Generator().manual_seed(6)
    old, new = subspace(1), subspace(2)
    small = subspace(3, dim=10, rank=2)
    nov = SubspaceNovelty(refresh=4, lag=1, sample_rows=None)
    for _ in range(80):
        g_small = torch.randn(ROWS, 2, generator=gen) @ small.T
        nov.observe(["a.weight", "b.weight"], [gradient(old, gen), g_small])
    g_a, g_b = gradient(new, gen), 3.0 * torch.randn(ROWS, 10, generator=gen)
    value = nov.observe(["a.weight", "b.weight"], [g_a, g_b])
    layers = nov.last_layers
    e_a, e_b = float(g_a.pow(2).sum()), float(g_b.pow(2).sum())
    expected = (layers["a.weight"] * e_a + layers["b.weight"] * e_b) / (e_a + e_b)
    assert value == pytest.approx(expected, rel=1e-4)
    assert set(nov.dims()) == {"a.weight", "b.weight"}


def test_bias_joins_its_matrix_and_other_vectors_are_left_out() -> None:
    nov = SubspaceNovelty()
    w, b, scale = torch.ones(4, 3), torch.ones(4), torch.ones(7)
    for _ in range(3):
        nov.observe(["l.weight", "l.bias", "norm.weight"], [w, b, scale])
    assert nov.dims() == {"l.weight": 1}  # one direction: [1, 1, 1, 1] over weight and bias
    assert nov.last_layers["l.weight"] == pytest.approx(0.0, abs=1e-6)


def test_start_task_forgets_and_state_round_trips() -> None:
    gen = torch.Generator().manual_seed(7)
    old = subspace(1)
    nov = SubspaceNovelty(refresh=8, lag=2)
    feed(nov, [gradient(old, gen) for _ in range(45)])
    buffer = io.BytesIO()
    torch.save(nov.state_dict(), buffer)
    buffer.seek(0)
    clone = SubspaceNovelty(refresh=8, lag=2)
    clone.load_state_dict(torch.load(buffer, weights_only=True))
    grads = [gradient(subspace(2), gen) for _ in range(20)]
    assert feed(nov, grads) == feed(clone, grads)
    nov.start_task()
    assert nov.observations == 0 and nov.dims() == {}
    assert nov.observe(["w"], [grads[0]]) is None


def test_invalid_arguments_are_refused() -> None:
    for kwargs in ({"energy": 1.0}, {"halflife": 0}, {"refresh": 0}, {"lag": -1},
                   {"sample_rows": 0}, {"every": 0}):  # fmt: skip
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            SubspaceNovelty(**kwargs)  # type: ignore[arg-type]


# ------------------------------------------------------------------ as a detector signal


def run_source(grads: list[torch.Tensor], src: AutoBoundaries) -> list[int]:
    hits = []
    for i, g in enumerate(grads):
        if src.on_gradients(["w"], [torch.zeros_like(g)], [g]):
            hits.append(i)
            src.on_task_start()  # what the callback does at the next batch
    return hits


def test_novelty_source_finds_short_tasks_and_ignores_within_task_events() -> None:
    gen = torch.Generator().manual_seed(8)
    tasks = [subspace(10 + t) for t in range(4)]
    grads = []
    for t, basis in enumerate(tasks):  # 4 tasks of 150 observations
        for i in range(150):
            scale = 1.0
            if t == 1:  # a learning-rate drop half-way
                scale = 1.0 if i < 75 else 0.1
            if t == 2 and i in (60, 61):  # a 2-step spike of 100-fold gradients
                scale = 100.0
            g = gradient(basis, gen, scale)
            if t == 3 and i >= 75:  # a smaller batch: the rows vary more, in the same subspace
                g = g * (1.0 + 2.0 * torch.randn(ROWS, 1, generator=gen))
            grads.append(g)
    src = AutoBoundaries(signal="novelty")
    assert src.uses_gradients and not src.uses_pairs
    assert src.uses_loss  # it confirms a switch; not fed here, so it holds none back
    hits = run_source(grads, src)
    assert len(hits) == 3, hits
    assert all(0 <= h - s <= 30 for h, s in zip(hits, (150, 300, 450))), hits
