"""Task switches that come with a new batch size (docs/detection.md, "A batch-size change").

``AutoBoundaries`` restarts its detector after a batch-size change (a within-task event of
issue 25) once the new size has been trained on for ``max_onset_steps`` with no switch. Here
the stream's switches themselves change the size: 4 tasks of 200 steps, the second and the
fourth at 32 samples a batch, the others at 64, so each switch comes with a new size. With
``--keep`` the detector keeps its levels (``on_batch_size_change`` does nothing), the
comparison without the restart.

    python experiments/detection_batch_size.py --streams digits rotated labels concept \\
        --output runs/detection/batch-size
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

PER_TASK, TASKS, SMALL = 200, 4, 32


class KeepLevels(AutoBoundaries):
    """The default, but a new batch size leaves the detector's levels as they are."""

    def on_batch_size_change(self, old: int, new: int) -> None:
        pass


def sized(batches: list[dict]) -> list[dict]:
    """The odd tasks' batches cut to ``SMALL`` samples."""
    return [
        {k: v[:SMALL] for k, v in b.items()} if (i // PER_TASK) % 2 else b
        for i, b in enumerate(batches)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", nargs="+", choices=de.STREAMS, default=list(de.STREAMS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--keep", action="store_true", help="no restart at a new batch size")
    de.add_training_options(parser, "runs/detection/batch-size")
    args = parser.parse_args()
    de.OPTIMIZER = args.optimizer
    true = [PER_TASK * t for t in range(1, TASKS)]
    runs: list[dict[str, Any]] = []
    for name in args.streams:
        for seed in range(args.seeds):
            stream, batches, _ = de.silent_run(name, "abrupt", PER_TASK, seed, args.root, TASKS)
            source = KeepLevels() if args.keep else None
            run = de.detect(stream, sized(batches), "auto", args.lr, PER_TASK, TASKS, source=source)
            score = de.score(run["switches"], true, 0, PER_TASK)
            runs.append({"stream": name, "seed": seed, **run, "score": score})
            print(name, seed, run["switches"], run.get("fired_by"), score, flush=True)
    table = []
    for name in args.streams:
        mine = [r["score"] for r in runs if r["stream"] == name]
        found = sum(len(s["delays"]) for s in mine)
        table.append(
            {
                "stream": name,
                "found": f"{found}/{len(true) * len(mine)}",
                "false": sum(s["false"] for s in mine),
                "delays": sorted(d for s in mine for d in s["delays"]),
            }
        )
        print(table[-1])
    args.output.mkdir(parents=True, exist_ok=True)
    out = {"runs": runs, "table": table, "args": {k: str(v) for k, v in vars(args).items()}}
    (args.output / "batch_size.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
