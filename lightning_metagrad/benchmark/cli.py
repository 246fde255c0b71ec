"""``metagrad-benchmark``: compare continual-learning methods on a task stream.

Defaults (preset ``digits``) run every method on Permuted digits (scikit-learn's embedded set,
no download) in a few minutes on 2 CPU cores, print a table, and write ``results.json`` and
PNG plots; ``--preset fig1`` is the paper's Fig. 1 protocol.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from lightning_metagrad.benchmark.config import add_config_arguments, parse_config
from lightning_metagrad.benchmark.plots import plot_curves, plot_matrices
from lightning_metagrad.benchmark.quiet import silence_lightning
from lightning_metagrad.benchmark.runner import run_benchmark


def build_parser() -> argparse.ArgumentParser:
    """The ``metagrad-benchmark`` argument parser: the options of ``BenchmarkConfig`` (preset
    ``digits`` by default) and ``--output-dir``.

    Example:
        >>> from lightning_metagrad.benchmark.config import config_from_args
        >>> args = build_parser().parse_args(["--tasks", "3", "--strength", "ewc=10"])
        >>> config = config_from_args(args)
        >>> config.tasks, config.stream, config.strengths
        (3, 'permuted', {'ewc': 10.0})
    """
    p = argparse.ArgumentParser(
        prog="metagrad-benchmark",
        description="Continual-learning benchmark: accuracy matrix, ACC, BWT, FWT, forgetting.",
    )
    add_config_arguments(p, preset="digits")
    p.add_argument("--output-dir", type=Path, default=Path("runs/benchmark"))
    return p


def write_json(folder: Path, name: str, document: Any) -> Path:
    """Write ``document`` as ``folder/name`` (indented JSON), creating ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(json.dumps(document, indent=1))
    return path


def format_scores(entry: dict[str, Any]) -> str:
    """One method's ``results.json`` entry in a line: ``ACC mean ± std  BWT mean``.

    Example:
        >>> format_scores({"acc": 0.7123, "acc_std": 0.0171, "bwt": -0.1544})
        'ACC 0.712 ± 0.017  BWT -0.154'
    """
    return f"ACC {entry['acc']:.3f} ± {entry['acc_std']:.3f}  BWT {entry['bwt']:+.3f}"


def format_table(results: dict[str, Any]) -> str:
    """One line per method of a ``results.json`` document: ACC ± std, BWT, FWT, forgetting,
    the median training-step time, and the seeds whose weights diverged (non-finite) or
    whose training collapsed to chance.

    Example:
        >>> from lightning_metagrad.benchmark import BenchmarkConfig, run_benchmark
        >>> config = BenchmarkConfig(tasks=2, iters=2, methods=("naive",), hidden_sizes=(8,))
        >>> table = format_table(run_benchmark(config))
        >>> print(table.splitlines()[0])
        method            ACC      BWT      FWT   forget  step ms  failed seeds
        >>> table.splitlines()[1].split()[0]
        'naive'
    """
    width = max([len("method"), *map(len, results["methods"])])
    lines = [
        f"{'method':<{width}} {'ACC':>14} {'BWT':>8} {'FWT':>8} {'forget':>8} {'step ms':>8}"
        "  failed seeds",
    ]
    for name, e in results["methods"].items():
        fwt = "n/a" if e["fwt"] is None else f"{e['fwt']:+.3f}"
        failed = [f"{s} diverged" for s in e.get("diverged_seeds", [])]
        failed += [f"{s} collapsed" for s in e.get("collapsed_seeds", [])]
        lines.append(
            f"{name:<{width}} {e['acc']:>7.3f} ± {e['acc_std']:.3f} {e['bwt']:>+8.3f} {fwt:>8} "
            f"{e['forgetting']:>8.3f} {e['train_step_ms']:>8.2f}  {', '.join(failed) or '-'}"
        )
    return "\n".join(lines)


def format_matrices(results: dict[str, Any]) -> str:
    """The mean accuracy matrix ``R`` of each method of a ``results.json`` document.

    Example:
        >>> from lightning_metagrad.benchmark import BenchmarkConfig, run_benchmark
        >>> config = BenchmarkConfig(tasks=2, iters=2, methods=("naive",), hidden_sizes=(8,))
        >>> lines = format_matrices(run_benchmark(config)).splitlines()
        >>> print(lines[0])
        naive: R[i][j] = accuracy on task j after training task i
        >>> len(lines)
        3
    """
    out = []
    for name, e in results["methods"].items():
        out.append(f"{name}: R[i][j] = accuracy on task j after training task i")
        out += ["  " + " ".join(f"{v:.3f}" for v in row) for row in e["acc_matrix"]]
    return "\n".join(out)


def report(results: dict[str, Any], folder: Path) -> list[Path]:
    """Write ``results.json`` and the plots of ``results`` to ``folder``, print the accuracy
    matrices and the table; return the plots' paths."""
    path = write_json(folder, "results.json", results)
    plots = [
        plot_curves(results, folder / "curves.png"),
        plot_matrices(results, folder / "matrices.png"),
    ]
    print(format_matrices(results))
    print()
    print(format_table(results))
    print(f"\nwrote {path}, " + ", ".join(str(p) for p in plots))
    return plots


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``metagrad-benchmark``: run, print the table, write results and plots.

    Example:
        >>> import contextlib, io, tempfile
        >>> argv = ["--tasks", "2", "--iters", "2", "--methods", "naive", "--hidden", "8"]
        >>> argv += ["--eval-every", "1"]
        >>> with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        ...     code = main([*argv, "--output-dir", tmp])
        ...     written = sorted(p.name for p in Path(tmp).iterdir())
        >>> code, written
        (0, ['curves.png', 'matrices.png', 'results.json'])
    """
    config, args = parse_config(build_parser(), argv)
    silence_lightning()  # this loop makes many Trainers: their banners would drown the bar
    total = len(config.methods) * len(config.seeds) * config.tasks
    with tqdm(total=total, desc="tasks trained", unit="task") as bar:
        results = run_benchmark(config, progress=lambda: bar.update(1))
    report(results, args.output_dir)
    return 0
