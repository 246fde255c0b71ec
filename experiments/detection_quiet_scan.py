"""Whether the quiet after a loss spike ever starts on a stream (docs/detection.md, "The quiet
after a loss spike ends when the loss stays up"): abrupt runs of ``detection_eval.py``'s
streams (SGD, lr 0.03, tasks of 1000 steps, seeds 0 to 2), each with its detected switches and
how many quiet spells began (any detector's or the joint rule's).

    python experiments/detection_quiet_scan.py digits synthetic fashion rotated labels small concept
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import detection_eval as de

from lightning_metagrad.boundaries.changepoint import ConfirmingSignals

STARTS: list[int] = []
_push = ConfirmingSignals.push


def counting_push(self: ConfirmingSignals, values: dict) -> None:
    before = self.quiet
    _push(self, values)
    if self.quiet > before:
        STARTS.append(1)


def main() -> None:
    ConfirmingSignals.push = counting_push  # type: ignore[method-assign]
    root = "../shared/data"
    for name in sys.argv[1:] or list(de.STREAMS):
        for seed in range(3):
            STARTS.clear()
            stream, batches, _ = de.silent_run(name, "abrupt", 1000, seed, root)
            run = de.detect(stream, batches, "auto", 0.03, 1000, 4)
            print(name, seed, run["switches"], "quiet starts:", len(STARTS), flush=True)


if __name__ == "__main__":
    main()
