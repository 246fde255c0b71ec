"""The benchmark's figures (issue 22 item 11): each a grid one screen wide (at most 1600 px at
the saved DPI), the default method first and framed, its nearest competitors next to it, and
numbers in the heatmap cells large enough to read. Made from a synthetic ``results.json``
document: no Trainer."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import pytest
from matplotlib.figure import Figure
from PIL import Image

from lightning_metagrad.benchmark import plots
from lightning_metagrad.benchmark.methods import METHOD_NAMES

SCREEN_WIDTH = 1600


def fake_results(
    methods: Sequence[str], tasks: int = 5, iters: int = 20, seeds: Sequence[int] = (0, 1)
) -> dict[str, Any]:
    """A ``results.json`` document: method k keeps ``0.9 - 0.05 k`` of each older task."""
    out: dict[str, Any] = {
        "config": {"tasks": tasks, "iters": iters, "epochs": 0, "seeds": list(seeds)},
        "methods": {},
    }
    for k, name in enumerate(methods):
        keep = 0.9 - 0.05 * k
        R = [[0.9 * keep ** (i - j) if j <= i else 0.1 for j in range(tasks)] for i in range(tasks)]
        curves = [
            {"iteration": it, "task": t, "accuracy": R[(it - 1) // iters][t]}
            for it in range(10, tasks * iters + 1, 10)
            for t in range(tasks)
        ]
        acc = sum(R[-1]) / tasks
        out["methods"][name] = {
            "acc_matrix": R,
            "acc": acc,
            "acc_std": 0.01,
            "bwt": -0.1,
            "fwt": None,
            "forgetting": 0.1,
            "train_step_ms": 1.0,
            "per_seed": [{"seed": s, "acc_matrix": R, "curves": curves} for s in seeds],
        }
    return out


@pytest.fixture
def figures(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Figure]]:
    """The figures the plot functions make, kept open past their ``plt.close``."""
    kept: list[Figure] = []
    close = plt.close
    monkeypatch.setattr(plots.plt, "close", kept.append)
    yield kept
    for fig in kept:
        close(fig)


def grid(fig: Figure) -> tuple[int, int]:
    """``(rows, columns)`` of the figure's panels, from their cells in its grid."""
    specs = [ax.get_subplotspec() for ax in fig.axes]
    assert all(spec is not None for spec in specs)
    return len({s.rowspan.start for s in specs if s}), len({s.colspan.start for s in specs if s})


PLOTS: list[Callable[[dict[str, Any], Path], Path]] = [plots.plot_curves, plots.plot_matrices]


@pytest.mark.parametrize("plot", PLOTS, ids=["curves", "matrices"])
def test_the_default_methods_figure_is_a_grid_a_screen_wide(
    plot: Callable[[dict[str, Any], Path], Path], tmp_path: Path, figures: list[Figure]
) -> None:
    results = fake_results(METHOD_NAMES)
    assert len(results["methods"]) == 11
    path = plot(results, tmp_path / "figure.png")
    width, height = Image.open(path).size
    (fig,) = figures
    # The saved PNG is the figure at plots.DPI: at most a screen wide, and not a strip.
    assert (width, height) == (
        round(fig.get_figwidth() * plots.DPI),
        round(fig.get_figheight() * plots.DPI),
    )
    assert width <= SCREEN_WIDTH and height <= 1200
    assert height > width / 2
    # 11 methods and the all-methods panel: 3 rows of 4.
    assert len(fig.axes) == 12 and grid(fig) == (3, 4)
    titles = [ax.get_title() for ax in fig.axes[1:]]
    order = plots.method_order(results["methods"])
    assert [t.split()[0] for t in titles] == order
    assert order[0] == "metagrad"
    assert max(s.get_linewidth() for s in fig.axes[1].spines.values()) > 2  # framed


def test_the_order_puts_the_defaults_competitors_next_to_it() -> None:
    acc = {"naive": 0.5, "joint": 0.9, "metagrad": 0.6, "ewc": 0.55, "gpm": 0.65}
    acc |= {"er": 0.8, "agem": 0.7, "metagrad-replay": 0.75, "si": 0.58}
    order = plots.method_order({name: {"acc": value} for name, value in acc.items()})
    # The default, the methods without stored data by ACC, those with, the references.
    assert order == [
        "metagrad", "gpm", "si", "ewc", "er", "metagrad-replay", "agem", "joint", "naive"
    ]  # fmt: skip


@pytest.mark.parametrize(("tasks", "smallest"), [(5, 10.0), (10, 8.0)])
def test_every_cell_of_a_matrix_shows_a_readable_number(
    tasks: int, smallest: float, tmp_path: Path, figures: list[Figure]
) -> None:
    results = fake_results(METHOD_NAMES, tasks=tasks)
    plots.plot_matrices(results, tmp_path / "matrices.png")
    (fig,) = figures
    heatmap = fig.axes[1]
    cells = [t for t in heatmap.texts if t.get_text().lstrip("0").startswith(".")]
    assert len(cells) == tasks * tasks
    assert min(float(t.get_fontsize()) for t in cells) >= smallest
    assert Image.open(tmp_path / "matrices.png").size[0] <= SCREEN_WIDTH


def test_one_method_is_one_panel(tmp_path: Path, figures: list[Figure]) -> None:
    results = fake_results(["naive"])
    for plot in PLOTS:
        path = plot(results, tmp_path / "figure.png")
        assert Image.open(path).size[0] == round(plots.PANEL_SIZE[0] * plots.DPI)
    assert [len(fig.axes) for fig in figures] == [1, 1]
