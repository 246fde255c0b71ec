"""``RelaxedSubspacePredictor`` through real Trainers (two tasks): it trains, and every applied
update of the second task leaves each block of the protected basis either untouched (the block
disagreed with the old task: projected out, as the default does) or moved by exactly the step's
own gradient there (it agreed: kept); with the defaults, no row of an applied step disagrees
with the reference outside the basis. Without a Trainer: ``tests/unit/test_relaxed.py``."""

from __future__ import annotations

import pytest
import torch
from helpers import LR, TinyClassifier, bias_of, loader, train_then_watch

from lightning_metagrad import MetaGradCallback
from lightning_metagrad.predictors.relaxed import RelaxedSubspacePredictor


@pytest.mark.filterwarnings("ignore:MetaGrad. the protected subspace")
def test_relaxed_predictor_trains_and_protects_block_by_block() -> None:
    torch.manual_seed(0)
    pred = RelaxedSubspacePredictor(
        every=1, proximal=0.0, keep="component", granularity="block", outside="none"
    )
    cb, model = MetaGradCallback(predictor=pred), TinyClassifier(lr=LR)
    spy = train_then_watch(cb, model, loader(0), loader(1), steps=(8, 8))
    assert pred.num_old_tasks == 1 and all(torch.isfinite(p).all() for p in model.parameters())
    kept = removed = 0
    for step in spy.steps:
        for name, m in ((n, pred.basis(n)) for n in pred.subspace_dims()):
            applied = spy.matrix(step, name, bias_of(name), m.shape[0]) @ m / LR
            received = spy.matrix(step, name, bias_of(name), m.shape[0], received=True) @ m
            scale = float(received.norm()) + 1e-8
            if float(applied.norm()) <= 1e-4 * scale:
                removed += 1  # projected out, as the default does
            else:
                assert torch.allclose(applied, received, atol=1e-4 * scale), name
                kept += 1
    assert kept + removed == 8 * 2 and kept > 0 and removed > 0, (kept, removed)
    # agree=1 is the default: every update orthogonal to the protected bases.
    never = RelaxedSubspacePredictor(every=1, agree=1.0, proximal=0.0)
    spy = train_then_watch(
        MetaGradCallback(predictor=never), TinyClassifier(lr=LR), loader(0), loader(1)
    )
    for step in spy.steps:
        for name in never.subspace_dims():
            m = never.basis(name)
            update = spy.matrix(step, name, bias_of(name), m.shape[0])
            assert float((update @ m).norm()) <= 1e-5 + 1e-4 * float(update.norm()), name


@pytest.mark.filterwarnings("ignore:MetaGrad. the protected subspace")
def test_the_defaults_guard_every_row_outside_the_basis() -> None:
    torch.manual_seed(0)
    pred = RelaxedSubspacePredictor(every=1)  # rows, along the reference, outside="row"
    cb, model = MetaGradCallback(predictor=pred), TinyClassifier(lr=LR)
    spy = train_then_watch(cb, model, loader(0), loader(1), steps=(8, 8))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    guarded = 0
    for step in spy.steps:
        for name in pred.subspace_dims():
            r = pred._ref_out[name]  # the reference's part outside the basis, rows x cols
            applied = spy.matrix(step, name, bias_of(name), r.shape[1]) / LR
            received = spy.matrix(step, name, bias_of(name), r.shape[1], received=True)
            scale = float(received.norm()) * float(r.norm()) + 1e-12
            # After the rule no row's step disagrees with the reference outside the basis.
            assert float((applied * r).sum(1).min()) >= -1e-4 * scale, name
            guarded += int(((received * r).sum(1) < 0).sum())
    assert guarded > 0  # some rows disagreed before the rule
