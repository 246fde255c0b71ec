"""The default's engine alone on the paper's MLP, task 2: where a step's time goes (issue 16).

Trains ``MetaGrad(SubspacePredictor())`` on random batches for one task (40 steps), folds it
in, then times (thread CPU time, median of 200 calls) each part of a task-2 step on that
step's gradients: the whole ``MetaGrad.step_``, the predictor's ``rewrite_`` (the
projection), ``observe``, the device-side finiteness flag, the projection's matrix products
alone on the same shapes (its FLOP bound), and one working ``observe`` with and without the
unit-energy step weighting (``normalize_steps``). docs/performance.md quotes the figures.

    OMP_NUM_THREADS=1 python experiments/engine_breakdown.py
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from lightning_metagrad import MetaGrad, SubspacePredictor
from lightning_metagrad.benchmark.models import MLPClassifier
from lightning_metagrad.engine import _finite_flag


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = MLPClassifier()
    params = dict(model.named_parameters())
    core = MetaGrad(SubspacePredictor())
    core.bind(model.named_parameters())
    x, y = torch.randn(64, 784), torch.randint(0, 10, (64,))

    def backward() -> None:
        model.zero_grad(set_to_none=False)
        nn.functional.cross_entropy(model(x), y).backward()

    for _ in range(40):
        backward()
        core.step()
    core.end_task()
    predictor = core.predictor
    assert isinstance(predictor, SubspacePredictor)
    names = list(params)
    thetas = [params[n].detach() for n in names]
    grads = [params[n].grad for n in names]
    saved = [g.clone() for g in grads]  # type: ignore[union-attr]

    def timed(fn: Callable[[], object], reps: int = 200) -> float:
        values = []
        for _ in range(reps):
            for g, s in zip(grads, saved):
                g.copy_(s)  # type: ignore[union-attr]
            t0 = time.thread_time()
            fn()
            values.append(time.thread_time() - t0)
        return 1e3 * statistics.median(values)

    state = predictor.state_dict()
    work = [
        (torch.randn(int(state["shapes"][n][0]), m.shape[0]), m) for n, m in state["basis"].items()
    ]

    def products() -> None:
        for g, m in work:
            g - (g @ m) @ m.T

    gs: list = grads  # every parameter has a gradient here
    # One working observation (every=1), with and without the unit-energy step weighting.
    weighted = {}
    for normalize in (True, False):
        fresh = SubspacePredictor(every=1, normalize_steps=normalize)
        fresh.bind(params)
        weighted[normalize] = fresh
    rows = [
        ("backward (plain step's own)", timed(backward, 100)),
        ("MetaGrad.step_ (observe+rewrite)", timed(lambda: core.step_(names, thetas, gs))),
        ("  rewrite_ (the projection)", timed(lambda: predictor.rewrite_(names, thetas, gs))),
        ("  observe (works 1 step in 4)", timed(lambda: predictor.observe(names, thetas, gs))),
        ("  finiteness flag (on device)", timed(lambda: _finite_flag(gs))),
        (
            "observe, a working step, unit energy",
            timed(lambda: weighted[True].observe(names, thetas, gs)),
        ),
        ("observe, a working step, raw", timed(lambda: weighted[False].observe(names, thetas, gs))),
        ("products alone (the FLOP bound)", timed(products)),
    ]
    for label, ms in rows:
        print(f"{label:<40}{ms:7.3f} ms")
    for name, m in state["basis"].items():
        side = "complement" if name in state["complement"] else "protected"
        print(f"  {name}: {tuple(state['shapes'][name])}, stored {side} basis {tuple(m.shape)}")


if __name__ == "__main__":
    main()
