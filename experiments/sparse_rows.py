"""The default's rule on a row-sparse embedding gradient: the whole matrix against the looked-up
rows only (with the check that every other row is zero), on the demo Transformer's 33,278 x 200
embedding with 1,400 looked-up rows, for stored bases of 8 to 64 columns.

    OMP_NUM_THREADS=1 python experiments/sparse_rows.py

Prints the median thread CPU time of 15 calls per path, in ms. docs/performance.md quotes it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import Tensor

ROWS, COLS, LOOKED_UP = 33278, 200, 1400


def median_ms(fn: Callable[[Tensor], None], make: Callable[[], Tensor], calls: int = 15) -> float:
    times = []
    for _ in range(calls):
        g = make()
        start = time.thread_time()
        fn(g)
        times.append(time.thread_time() - start)
    return sorted(times)[calls // 2] * 1000


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    ids = torch.randint(0, ROWS, (LOOKED_UP,))

    def gradient() -> Tensor:
        g = torch.zeros(ROWS, COLS)
        g[ids] = torch.randn(LOOKED_UP, COLS)
        return g

    print("| basis columns | whole matrix, ms | looked-up rows + check, ms |")
    print("|---|---|---|")
    for k in (8, 16, 32, 64):
        basis, _ = torch.linalg.qr(torch.randn(COLS, k))

        def whole(g: Tensor, m: Tensor = basis) -> None:
            g.addmm_(g @ m, m.T, alpha=-1.0)

        def looked_up(g: Tensor, m: Tensor = basis) -> None:
            used = ids.unique()
            seen = torch.zeros(ROWS, dtype=torch.bool)
            seen[used] = True
            outside = torch.linalg.vector_norm(g, dim=1).masked_fill_(seen, 0.0).sum()
            assert float(outside) == 0.0
            rows = g.index_select(0, used)
            rows.addmm_(rows @ m, m.T, alpha=-1.0)
            g.index_copy_(0, used, rows)

        print(f"| {k} | {median_ms(whole, gradient):.1f} | {median_ms(looked_up, gradient):.1f} |")


if __name__ == "__main__":
    main()
