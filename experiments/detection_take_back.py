"""How far back a detected switch's steps are taken back (docs/detection.md, "Where the
take-back begins").

At a detected switch the steps since its estimated start are taken back from the old task's
statistic and their updates undone (``AutoBoundaries.onset_steps``). The library takes back
the detector's estimate plus 5 steps; here ``--take-back`` compares that with the estimate
alone and with the whole ``max_onset_steps`` window, on abrupt streams (the accuracy matrix
at the true task ends, to pair with ``detection_eval.py given``).

    python experiments/detection_take_back.py --take-back estimate --optimizer adam --lr 0.001 \\
        --streams rotated --lengths 500 --seeds 5 6 9 --output runs/detection/take-back
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
import detection_eval as de

from lightning_metagrad import AutoBoundaries


class EstimateOnly(AutoBoundaries):
    """The detector's estimate of where the switch began, with no margin."""

    def onset_steps(self) -> int:
        return self._onset * self.every


class WholeWindow(AutoBoundaries):
    """Every detected switch taken back over the whole ``max_onset_steps``."""

    def onset_steps(self) -> int:
        return self.max_onset_steps if self._onset else 0


SOURCES = {"library": AutoBoundaries, "estimate": EstimateOnly, "window": WholeWindow}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--take-back", choices=list(SOURCES), default="library")
    parser.add_argument("--streams", nargs="+", choices=de.STREAMS, default=["rotated"])
    parser.add_argument("--lengths", type=int, nargs="+", default=[500])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    de.add_training_options(parser, "runs/detection/take-back")
    args = parser.parse_args()
    de.OPTIMIZER = args.optimizer
    runs: list[dict[str, Any]] = []
    for name in args.streams:
        for per_task in args.lengths:
            for seed in args.seeds:
                stream, batches, _ = de.silent_run(name, "abrupt", per_task, seed, args.root)
                source = SOURCES[args.take_back]()
                run = de.detect(stream, batches, "auto", args.lr, per_task, 4, source=source)
                acc = sum(run["matrix"][-1]) / len(run["matrix"][-1])
                print(args.take_back, name, per_task, seed, run["switches"], round(acc, 4))
                runs.append(
                    {"stream": name, "kind": "abrupt", "per_task": per_task, "seed": seed, **run}
                )
    args.output.mkdir(parents=True, exist_ok=True)
    out = {"runs": runs, "args": {k: str(v) for k, v in vars(args).items()}}
    (args.output / f"take-back-{args.take_back}.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
