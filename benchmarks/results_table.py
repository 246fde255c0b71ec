"""Markdown table rows from benchmark ``results.json`` files (docs/results.md, docs/science.md).

Usage::

    python benchmarks/results_table.py runs/fig1-lr0.03/final-strong/results.json \
        runs/fig1-lr0.03/final-weak/results.json

Each row: method (with its strength), ACC mean ± std over seeds, BWT mean ± std, the per-seed
ACC, and how many seeds collapsed to chance (every task's final accuracy ≤ 0.11).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def seed_scores(matrix: list[list[float]]) -> tuple[float, float]:
    """ACC and BWT (Lopez-Paz & Ranzato) of one seed's accuracy matrix."""
    T = len(matrix)
    acc = sum(matrix[-1]) / T
    bwt = sum(matrix[-1][j] - matrix[j][j] for j in range(T - 1)) / max(T - 1, 1)
    return acc, bwt


def rows(path: Path) -> list[str]:
    result = json.loads(path.read_text())
    strengths = result["config"].get("strengths", {})
    out = []
    for name, entry in result["methods"].items():
        scores = [seed_scores(s["acc_matrix"]) for s in entry["per_seed"]]
        accs, bwts = [a for a, _ in scores], [b for _, b in scores]
        std = statistics.stdev if len(accs) > 1 else (lambda _: 0.0)
        collapsed = sum(max(s["acc_matrix"][-1]) <= 0.11 for s in entry["per_seed"])
        label = f"{name} ({strengths[name]:g})" if name in strengths else name
        out.append(
            f"| {label} | {statistics.mean(accs):.3f} ± {std(accs):.3f} "
            f"| {statistics.mean(bwts):+.3f} ± {std(bwts):.3f} "
            f"| {' / '.join(f'{a:.3f}' for a in accs)} | {collapsed}/{len(accs)} "
            f"| {entry['train_step_ms']:.1f} |"
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
