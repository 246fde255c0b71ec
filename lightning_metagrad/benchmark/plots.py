"""PNG plots of a ``results.json`` document: Fig. 1-style curves and accuracy-matrix heatmaps.

Both figures are a grid of ``COLUMNS`` panels a row, ``COLUMNS * PANEL_SIZE[0] * DPI`` pixels
wide (1600: one screen), whatever the number of methods. The first panel compares every method
at a glance (the curves: each method's mean accuracy over all tasks; the matrices: ACC ± std as
bars), then one panel per method in ``method_order``: the default (``metagrad``, framed) first,
the other methods that store no data, those that store data, then the references ``joint`` and
``naive``, each group by ACC, best first, so the default's nearest competitors sit next to it.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure

DEFAULT_METHOD = "metagrad"
REFERENCES = ("joint", "naive")  # bounds, not continual methods
STORES_DATA = ("metagrad-replay", "agem", "er")  # keep batches of earlier tasks
COLUMNS = 4
PANEL_SIZE = (4.0, 3.1)  # inches a panel: 4 columns x 4 in x 100 dpi = 1600 px
DPI = 100
MATRICES_PANEL_HEIGHT = 3.7  # inches: square heatmaps about MATRIX_SIDE points a side
MATRIX_SIDE = 190.0
MAX_NUMBERED_TASKS = 16
HIGHLIGHT = "#d62728"  # the default method, in every panel
# Colours of the other methods (tab10 without its red and grey, kept for the default and
# the references).
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf")
REFERENCE_COLOURS = {"joint": "#333333", "naive": "#7f7f7f"}


def method_group(name: str) -> str:
    """``"default"``, ``"reference"``, ``"stored data"`` or ``"no stored data"``.

    Example:
        >>> [method_group(m) for m in ("metagrad", "naive", "er", "gpm")]
        ['default', 'reference', 'stored data', 'no stored data']
    """
    if name == DEFAULT_METHOD:
        return "default"
    if name in REFERENCES:
        return "reference"
    return "stored data" if name in STORES_DATA else "no stored data"


def method_order(methods: dict[str, Any]) -> list[str]:
    """The panels' order: the default first, then the methods that store no data, those that
    store data and the references, each group by ACC (best first).

    Example:
        >>> acc = {"naive": 0.5, "er": 0.8, "gpm": 0.7, "metagrad": 0.6, "ewc": 0.65}
        >>> method_order({name: {"acc": value} for name, value in acc.items()})
        ['metagrad', 'gpm', 'ewc', 'er', 'naive']
    """
    groups = ("default", "no stored data", "stored data", "reference")

    def key(name: str) -> tuple[int, float]:
        acc = methods[name]["acc"]
        return groups.index(method_group(name)), -(acc if math.isfinite(acc) else -1.0)

    return sorted(methods, key=key)


def method_colours(order: Sequence[str]) -> dict[str, str]:
    """A colour a method, the same in every panel: the default red, the references grey."""
    others = [m for m in order if method_group(m) not in ("default", "reference")]
    colours = {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(others)}
    colours.update({m: REFERENCE_COLOURS.get(m, "#7f7f7f") for m in REFERENCES})
    colours[DEFAULT_METHOD] = HIGHLIGHT
    return colours


def grid_shape(panels: int, columns: int = COLUMNS) -> tuple[int, int]:
    """``(rows, columns)`` of a grid of ``panels`` panels, at most ``columns`` a row.

    Example:
        >>> grid_shape(12), grid_shape(3), grid_shape(1)
        ((3, 4), (1, 3), (1, 1))
    """
    cols = max(1, min(columns, panels))
    return -(-panels // cols), cols


def _grid(panels: int, height: float = PANEL_SIZE[1], **kwargs: Any) -> tuple[Figure, list[Axes]]:
    """A figure of ``panels`` axes in a grid (``height`` inches a row), the unused cells of
    its last row removed."""
    rows, cols = grid_shape(panels)
    fig, axes = plt.subplots(
        rows,
        cols,
        figsize=(PANEL_SIZE[0] * cols, height * rows + 0.5),
        squeeze=False,
        **kwargs,
    )
    flat = [ax for row in axes for ax in row]
    for ax in flat[panels:]:
        ax.remove()
    if kwargs.get("sharex"):  # the panels above a removed cell get the iteration ticks back
        for ax in flat[max(0, panels - cols) : panels]:
            ax.xaxis.set_tick_params(labelbottom=True)
            ax.set_xlabel("iteration")
    return fig, flat[:panels]


def _title(ax: Axes, name: str, entry: dict[str, Any], colour: str, extra: str = "") -> None:
    """The panel's title: the method in its colour, its group and ACC; the default framed."""
    group = method_group(name)
    tag = "default" if group == "default" else group
    ax.set_title(
        f"{name}  ({tag})\nACC {entry['acc']:.3f} ± {entry['acc_std']:.3f}{extra}",
        color=colour,
        fontsize=10,
        fontweight="bold" if group == "default" else "normal",
    )
    if group == "default":
        for spine in ax.spines.values():
            spine.set_edgecolor(HIGHLIGHT)
            spine.set_linewidth(2.5)


def _mean_curves(entry: dict[str, Any]) -> dict[int, list[tuple[int, float]]]:
    """Per task, ``(iteration, accuracy)`` averaged over the seeds that recorded the point."""
    points: dict[tuple[int, int], list[float]] = defaultdict(list)
    for run in entry["per_seed"]:
        for r in run["curves"]:
            points[(r["task"], r["iteration"])].append(r["accuracy"])
    curves: dict[int, list[tuple[int, float]]] = defaultdict(list)
    for (task, iteration), values in sorted(points.items()):
        curves[task].append((iteration, sum(values) / len(values)))
    return dict(curves)


def _all_task_mean(curves: dict[int, list[tuple[int, float]]]) -> list[tuple[int, float]]:
    """Mean accuracy over every task at each iteration where all were evaluated."""
    by_iteration: dict[int, list[float]] = defaultdict(list)
    for pts in curves.values():
        for iteration, accuracy in pts:
            by_iteration[iteration].append(accuracy)
    return [(i, sum(v) / len(v)) for i, v in sorted(by_iteration.items()) if len(v) == len(curves)]


def _task_colours(tasks: int) -> list[Any]:
    cmap = plt.get_cmap("tab10" if tasks <= 10 else "viridis")
    return [cmap(t if tasks <= 10 else t / max(1, tasks - 1)) for t in range(tasks)]


def plot_curves(results: dict[str, Any], path: Path) -> Path:
    """Per-task test accuracy against iteration, mean over seeds: a grid of one panel per
    method (see ``method_order``) after a panel overlaying every method's mean accuracy over
    all tasks, the default drawn thick.

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
    config = results["config"]
    order = method_order(methods)
    colours = method_colours(order)
    summary = len(order) > 1
    fig, axes = _grid(len(order) + summary, sharex=True, sharey=True)
    curves = {name: _mean_curves(methods[name]) for name in order}
    tasks = int(config["tasks"])
    task_colours = _task_colours(tasks)
    iters = int(config["iters"])
    boundaries = range(iters, tasks * iters, iters) if not config.get("epochs") else range(0)
    if summary:
        ax = axes[0]
        for name in reversed(order):  # the default drawn last, on top
            pts = _all_task_mean(curves[name])
            default = name == DEFAULT_METHOD
            style = ":" if method_group(name) == "reference" else "-"
            style = "--" if method_group(name) == "stored data" else style
            ax.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                style,
                color=colours[name],
                lw=3.0 if default else 1.3,
                label=name,
                zorder=3 if default else 2,
            )
        ax.set_title(
            f"all methods: mean accuracy over\nall {tasks} tasks (ends near ACC)", fontsize=10
        )
        handles, labels = ax.get_legend_handles_labels()
        if handles:
            ax.legend(handles[::-1], labels[::-1], fontsize=7, loc="upper left", ncol=2)
    for ax, name in zip(axes[summary:], order):
        for task, pts in sorted(curves[name].items()):
            ax.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                color=task_colours[task % len(task_colours)],
                lw=1.3,
                label=f"task {task + 1}",
            )
        _title(ax, name, methods[name], colours[name])
    for ax in axes:
        for boundary in boundaries:
            ax.axvline(boundary, color="grey", lw=0.6, ls=":")
        ax.set_ylim(0.0, 1.02)
        ax.grid(True, axis="y", lw=0.3, alpha=0.6)
        ax.tick_params(labelsize=8)
    cols = grid_shape(len(axes))[1]
    for i, ax in enumerate(axes):
        if i % cols == 0:
            ax.set_ylabel("test accuracy")
        if i >= len(axes) - cols:
            ax.set_xlabel("iteration")
    seeds = len(next(iter(methods.values()))["per_seed"]) if methods else 0
    seeds_text = f"mean of {seeds} seeds" if seeds > 1 else "one seed"
    fig.suptitle(
        f"Test accuracy per task during training ({tasks} tasks, {seeds_text}); "
        "default first, then no stored data, stored data, references, each by ACC",
        fontsize=11,
    )
    handles, labels = axes[summary].get_legend_handles_labels() if axes else ([], [])
    if handles:
        fig.legend(
            handles,
            labels,
            loc="upper center",
            ncol=min(len(labels), 10),
            fontsize=8,
            bbox_to_anchor=(0.5, 1.0 - 0.45 / fig.get_figheight()),
            frameon=False,
        )
    fig.tight_layout(rect=(0.0, 0.0, 1.0, 1.0 - 0.6 / fig.get_figheight()))
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def cell_fontsize(tasks: int) -> float:
    """Font size (points) of a heatmap cell's number: the largest that fits a cell of a
    matrix panel (about ``MATRIX_SIDE`` points a side), with 4 characters ("0.93") up to 6
    tasks and 3 (".93") above; 0 (no numbers) above ``MAX_NUMBERED_TASKS``.

    Example:
        >>> [cell_fontsize(n) for n in (2, 5, 6, 10, 16, 20)]
        [12.0, 12.0, 10.5, 8.5, 5.5, 0.0]
    """
    if tasks > MAX_NUMBERED_TASKS:
        return 0.0
    per_char = 2.4 if tasks <= 6 else 1.8  # text width ~0.6 em a character, 80 % of a cell
    return float(min(12.0, max(5.0, round(2 * 0.8 * MATRIX_SIDE / tasks / per_char) / 2)))


def plot_matrices(results: dict[str, Any], path: Path) -> Path:
    """Heatmaps of ``R[i][j]`` (accuracy on task j after training task i), mean over seeds: a
    grid of one panel per method (see ``method_order``) after a panel of every method's ACC.

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
    order = method_order(methods)
    colours = method_colours(order)
    summary = len(order) > 1
    fig, axes = _grid(len(order) + summary, MATRICES_PANEL_HEIGHT)
    if summary:
        _acc_bars(axes[0], methods, order, colours)
    for ax, name in zip(axes[summary:], order):
        matrix = methods[name]["acc_matrix"]
        n = len(matrix)
        cmap = plt.get_cmap("viridis")
        ax.imshow(matrix, vmin=0, vmax=1, cmap=cmap)
        size = cell_fontsize(n)
        for i, row in enumerate(matrix if size else []):
            for j, value in enumerate(row):
                text = f"{value:.2f}"
                ax.text(
                    j,
                    i,
                    text if n <= 6 else text.removeprefix("0"),
                    ha="center",
                    va="center",
                    fontsize=size,
                    color="black" if _luminance(cmap(value)) > 0.45 else "white",
                )
        ticks = range(n) if n <= 10 else range(0, n, max(1, n // 5))
        ax.set_xticks(list(ticks), [str(t + 1) for t in ticks], fontsize=8)
        ax.set_yticks(list(ticks), [str(t + 1) for t in ticks], fontsize=8)
        ax.set_xlabel("evaluated task j", fontsize=8)
        ax.set_ylabel("after task i", fontsize=8)
        _title(ax, name, methods[name], colours[name], f"  BWT {methods[name]['bwt']:+.3f}")
    fig.suptitle(
        "Accuracy matrices R[i][j] = accuracy on task j after training task i (mean over "
        "seeds); default first, then no stored data, stored data, references, each by ACC",
        fontsize=11,
    )
    fig.tight_layout(rect=(0.0, 0.0, 1.0, 1.0 - 0.4 / fig.get_figheight()))
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _luminance(rgba: Sequence[float]) -> float:
    """Relative luminance of a colour (0 black, 1 white): black text above about 0.45."""
    r, g, b = rgba[:3]
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def _acc_bars(ax: Axes, methods: dict[str, Any], order: list[str], colours: dict[str, str]) -> None:
    """Horizontal ACC ± std bars, in panel order (top to bottom), the default's ACC marked."""
    y = list(range(len(order)))
    accs = [methods[m]["acc"] for m in order]
    stds = [methods[m]["acc_std"] for m in order]
    ax.barh(
        y,
        accs,
        xerr=stds,
        color=[colours[m] for m in order],
        alpha=0.85,
        error_kw={"lw": 1, "capsize": 2},
    )
    for i, (acc, std) in enumerate(zip(accs, stds)):
        end = (acc if math.isfinite(acc) else 0.0) + (std if math.isfinite(std) else 0.0)
        ax.text(end + 0.02, i, f"{acc:.3f}", va="center", fontsize=8)
    for i in range(1, len(order)):  # a rule between two groups
        if method_group(order[i]) != method_group(order[i - 1]):
            ax.axhline(i - 0.5, color="grey", lw=0.6)
    if DEFAULT_METHOD in methods:
        ax.axvline(methods[DEFAULT_METHOD]["acc"], color=HIGHLIGHT, lw=1, ls="--")
    ax.set_yticks(y, order, fontsize=8)
    for label, name in zip(ax.get_yticklabels(), order):
        label.set_color(colours[name])
        if name == DEFAULT_METHOD:
            label.set_fontweight("bold")
    ax.invert_yaxis()
    ax.set_xlim(0.0, 1.15)  # room for the labels
    ax.set_xticks([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.set_xlabel("ACC (mean of the last row), ± std over seeds", fontsize=8)
    ax.tick_params(axis="x", labelsize=8)
    ax.set_title("all methods: ACC", fontsize=10)
