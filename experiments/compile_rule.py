"""Does ``torch.compile`` of an elementwise rule pay on this machine? (issue 16)

Times, side by side in one process, the anchored predictor's per-step work on one tensor of
``--sizes`` coordinates: observe (the running squared gradient), predict (``B theta - C``
and the trust-region mask) and eq. 5 (sign agreement, in place), first as the engine runs it
today (eager, one kernel per operation), then as one ``torch.compile``-d function (inductor
fuses it into one loop over the coordinates). Rounds alternate the two so that machine noise
hits both; the printed ratio is compiled / eager (median per step, the thread's CPU time).
Both give the same gradient bit for bit or the script fails.

    OMP_NUM_THREADS=1 python experiments/compile_rule.py --sizes 1e5 1e6 1e7
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch import Tensor

from lightning_metagrad.predictors.rules import sign_agreement_


def eager(g: Tensor, theta: Tensor, b: Tensor, c: Tensor, sq: Tensor, thr: float) -> None:
    sq.addcmul_(g, g)  # observe: the running squared gradient
    predicted = torch.mul(b, theta).sub_(c)  # predict (AnchoredPredictor.predict)
    trusted = torch.mul(predicted, predicted).sub_(b, alpha=thr).gt_(0).to(g.dtype)
    sign_agreement_([g], [(predicted, trusted)])  # eq. 5 in place


def fused(g: Tensor, theta: Tensor, b: Tensor, c: Tensor, sq: Tensor, thr: float) -> None:
    sq.addcmul_(g, g)
    predicted = b * theta - c
    trusted = (predicted * predicted - thr * b) > 0
    agree = (g * predicted) > 0
    g.mul_(torch.where(trusted, agree.to(g.dtype), torch.ones_like(g)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", type=float, default=[1e5, 1e6, 1e7])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--output", default="runs/performance/compile-rule.json")
    args = p.parse_args()
    compiled = torch.compile(fused, dynamic=False)
    rows = []
    for size in args.sizes:
        n = int(size)
        gen = torch.Generator().manual_seed(0)
        theta, b, c = (torch.randn(n, generator=gen) for _ in range(3))
        b = b.abs()
        grad = torch.randn(n, generator=gen)
        sq_e, sq_c = torch.zeros(n), torch.zeros(n)
        g_e, g_c = grad.clone(), grad.clone()
        eager(g_e, theta, b, c, sq_e, 0.5)
        t0 = time.thread_time()
        compiled(g_c, theta, b, c, sq_c, 0.5)  # compiles
        compile_s = time.thread_time() - t0  # CPU time of this thread (inductor's own)
        if not (torch.equal(g_e, g_c) and torch.allclose(sq_e, sq_c)):
            raise SystemExit(f"compiled rule differs from the eager one at {n} coordinates")
        times: dict[str, list[float]] = {"eager": [], "compiled": []}
        for _ in range(args.rounds):
            for name, fn, sq in (("eager", eager, sq_e), ("compiled", compiled, sq_c)):
                for _ in range(args.steps):
                    g = grad.clone()
                    t0 = time.thread_time()
                    fn(g, theta, b, c, sq, 0.5)
                    times[name].append(time.thread_time() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append(
            {
                "coordinates": n,
                "eager_ms": 1e3 * med["eager"],
                "compiled_ms": 1e3 * med["compiled"],
                "ratio": med["compiled"] / med["eager"],
                "compile_s": compile_s,
            }
        )
        print(
            f"{n:>11,} coords: eager {1e3 * med['eager']:.3f} ms, compiled "
            f"{1e3 * med['compiled']:.3f} ms, ratio {med['compiled'] / med['eager']:.2f} "
            f"(first call {compile_s:.1f} s)",
            flush=True,
        )
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"torch": torch.__version__, "threads": 1, "rows": rows}, indent=1))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
