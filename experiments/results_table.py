"""Markdown table rows from benchmark ``results.json`` files (docs/results.md, docs/science.md).

Usage::

    python experiments/results_table.py runs/fig1-lr0.03/final-strong/results.json \
        runs/fig1-lr0.03/final-weak/results.json

Each row: method (with its strength), ACC mean ± std over seeds, BWT mean ± std, the per-seed
ACC, how many seeds collapsed to chance (``lightning_metagrad.metrics.collapsed_in_task``: a
task learned before, yet the task just trained at chance), and the step time. The scores are
recomputed from each seed's accuracy matrix with the benchmark's own summary
(``lightning_metagrad.benchmark.runner.summarise``), so older files read the same way.

``--pool`` merges the seeds of one method found in several files (e.g. seed 0 from one run,
seeds 1 and 2 from a later one) into one row; a seed found twice is an error.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lightning_metagrad.benchmark.runner import summarise
from lightning_metagrad.metrics import average_accuracy


def entries(paths: list[Path], pool: bool) -> list[tuple[str, list[dict]]]:
    """(label, per-seed runs) per method of each file in order; with ``pool``, one entry per
    label holding the seeds of every file."""
    out: list[tuple[str, list[dict]]] = []
    pooled: dict[str, list[dict]] = {}
    for path in paths:
        result = json.loads(path.read_text())
        strengths = result.get("config", {}).get("strengths", {})
        for name, entry in result["methods"].items():
            label = f"{name} ({strengths[name]:g})" if name in strengths else name
            if not pool:
                out.append((label, list(entry["per_seed"])))
                continue
            if label not in pooled:
                pooled[label] = []
                out.append((label, pooled[label]))
            seen = {run["seed"] for run in pooled[label]}
            twice = seen & {run["seed"] for run in entry["per_seed"]}
            if twice:
                raise SystemExit(f"--pool: {label} has seed(s) {sorted(twice)} twice ({path})")
            pooled[label].extend(entry["per_seed"])
    return out


def rows(paths: list[Path], pool: bool = False) -> list[str]:
    out = []
    for label, runs in entries(paths, pool):
        runs = sorted(runs, key=lambda run: run["seed"])
        summary = summarise(runs)
        accs = [average_accuracy(s["acc_matrix"]) for s in runs]
        out.append(
            f"| {label} | {summary['acc']:.3f} ± {summary['acc_std']:.3f} "
            f"| {summary['bwt']:+.3f} ± {summary['bwt_std']:.3f} "
            f"| {' / '.join(f'{a:.3f}' for a in accs)} "
            f"| {len(summary['collapsed_seeds'])}/{len(accs)} "
            f"| {summary['train_step_ms']:.1f} |"
        )
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, nargs="+")
    parser.add_argument(
        "--pool", action="store_true", help="one row per method, its seeds from every file"
    )
    args = parser.parse_args(argv)
    print("| method (strength) | ACC | BWT | ACC per seed | collapsed | step ms |")
    print("|---|---|---|---|---|---|")
    for row in rows(args.results, args.pool):
        print(row)


if __name__ == "__main__":
    main()
