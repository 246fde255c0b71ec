"""PNG plots of a ``results.json`` document: Fig. 1-style curves and accuracy-matrix heatmaps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def plot_curves(results: dict[str, Any], path: Path) -> Path:
    """Per-task test accuracy against iteration, one panel per method (first seed).

    Example:
        >>> import tempfile
        >>> from lightning_metagrad.benchmark import BenchmarkConfig, run_benchmark
        >>> config = BenchmarkConfig(
        ...     tasks=2, iters=2, methods=("naive",), hidden_sizes=(8,), eval_every=1
        ... )
        >>> results = run_benchmark(config)
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     plot_curves(results, Path(tmp) / "curves.png").stat().st_size > 0
        True
    """
    methods = results["methods"]
    iters = results["config"]["iters"]
    fig, axes = plt.subplots(
        1, len(methods), figsize=(3.2 * len(methods), 3.0), sharey=True, squeeze=False
    )
    for ax, (name, entry) in zip(axes[0], methods.items()):
        rows = entry["per_seed"][0]["curves"]
        for task in sorted({r["task"] for r in rows}):
            pts = [(r["iteration"], r["accuracy"]) for r in rows if r["task"] == task]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=f"task {task + 1}")
        for boundary in range(iters, results["config"]["tasks"] * iters, iters):
            ax.axvline(boundary, color="grey", lw=0.5, ls=":")
        ax.set_title(name)
        ax.set_xlabel("iteration")
    axes[0][0].set_ylabel("test accuracy")
    if axes[0][-1].get_legend_handles_labels()[0]:  # no curve points: no legend
        axes[0][-1].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_matrices(results: dict[str, Any], path: Path) -> Path:
    """Heatmaps of ``R[i][j]`` (accuracy on task j after training task i), mean over seeds.

    Example:
        >>> import tempfile
        >>> from lightning_metagrad.benchmark import BenchmarkConfig, run_benchmark
        >>> config = BenchmarkConfig(tasks=2, iters=2, methods=("naive",), hidden_sizes=(8,))
        >>> results = run_benchmark(config)
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     plot_matrices(results, Path(tmp) / "matrices.png").name
        'matrices.png'
    """
    methods = results["methods"]
    fig, axes = plt.subplots(1, len(methods), figsize=(2.8 * len(methods), 2.9), squeeze=False)
    for ax, (name, entry) in zip(axes[0], methods.items()):
        matrix = entry["acc_matrix"]
        ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
        for i, row in enumerate(matrix):
            for j, value in enumerate(row):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6, color="w")
        ax.set_title(f"{name}\nACC {entry['acc']:.3f}", fontsize=9)
        ax.set_xlabel("evaluated task j")
        ax.set_ylabel("after task i")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
