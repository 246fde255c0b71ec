"""Markdown table rows from benchmark ``results.json`` files (docs/results.md, docs/science.md).

Usage::

    python experiments/results_table.py runs/fig1-lr0.03/final-strong/results.json \
        runs/fig1-lr0.03/final-weak/results.json

Each row: method (with its strength), ACC mean ± std over seeds, BWT mean ± std, the per-seed
ACC, how many seeds collapsed to chance (``lightning_metagrad.metrics.collapsed_in_task``: a
task learned before, yet the task just trained at chance), and the step time. The scores are
recomputed from each seed's accuracy matrix with the benchmark's own summary
(``lightning_metagrad.benchmark.runner.summarise``), so older files read the same way.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lightning_metagrad.benchmark.runner import summarise
from lightning_metagrad.metrics import average_accuracy


def rows(path: Path) -> list[str]:
    result = json.loads(path.read_text())
    strengths = result.get("config", {}).get("strengths", {})
    out = []
    for name, entry in result["methods"].items():
        summary = summarise(entry["per_seed"])
        accs = [average_accuracy(s["acc_matrix"]) for s in entry["per_seed"]]
        label = f"{name} ({strengths[name]:g})" if name in strengths else name
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
    args = parser.parse_args(argv)
    print("| method (strength) | ACC | BWT | ACC per seed | collapsed | step ms |")
    print("|---|---|---|---|---|---|")
    for path in args.results:
        for row in rows(path):
            print(row)


if __name__ == "__main__":
    main()
