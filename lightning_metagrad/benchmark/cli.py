"""``metagrad-benchmark``: compare continual-learning methods on a task stream.

Defaults run every method on Permuted digits (scikit-learn's embedded set, no download) in a
few minutes on 2 CPU cores, print a table, and write ``results.json`` and PNG plots.
"""

from __future__ import annotations

import argparse
import json
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from lightning_metagrad.benchmark.methods import ALL_METHODS, METHOD_NAMES
from lightning_metagrad.benchmark.models import OPTIMIZERS
from lightning_metagrad.benchmark.plots import plot_curves, plot_matrices
from lightning_metagrad.benchmark.runner import STREAMS, BenchmarkConfig, run_benchmark


def _strength(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected METHOD=VALUE, got {text!r}")
    try:
        return name, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"strength for {name!r} is not a number: {value!r}"
        ) from None


def build_parser() -> argparse.ArgumentParser:
    """The ``metagrad-benchmark`` argument parser.

    Example:
        >>> args = build_parser().parse_args(["--tasks", "3", "--strength", "ewc=10"])
        >>> args.tasks, args.stream, args.strength
        (3, 'permuted', [('ewc', 10.0)])
    """
    p = argparse.ArgumentParser(
        prog="metagrad-benchmark",
        description="Continual-learning benchmark: accuracy matrix, ACC, BWT, FWT, forgetting.",
    )
    p.add_argument("--stream", choices=sorted(STREAMS), default="permuted")
    p.add_argument("--dataset", choices=["digits", "mnist", "fashion_mnist"], default="digits")
    p.add_argument("--root", default=None, help="data root for mnist / fashion_mnist")
    p.add_argument("--download", action="store_true", help="let torchvision download the data")
    p.add_argument("--tasks", type=int, default=5)
    p.add_argument("--iters", type=int, default=300, help="iterations per task")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd")
    p.add_argument("--lr", type=float, default=0.03)
    p.add_argument("--hidden", type=int, nargs="+", default=[256, 256, 256])
    p.add_argument("--methods", nargs="+", choices=ALL_METHODS, default=list(METHOD_NAMES))
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument(
        "--strength",
        type=_strength,
        action="append",
        default=[],
        metavar="METHOD=VALUE",
        help="regularisation strength of a baseline",
    )
    p.add_argument("--eval-every", type=int, default=50, help="iterations between curve points")
    p.add_argument("--eval-samples", type=int, default=1000, help="test samples per curve point")
    p.add_argument("--accelerator", default="cpu")
    p.add_argument(
        "--eval-split",
        choices=["test", "val"],
        default="test",
        help="evaluate on the validation split (for tuning strengths) or the test split",
    )
    p.add_argument("--output-dir", type=Path, default=Path("runs/benchmark"))
    return p


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
    args = build_parser().parse_args(argv)
    try:
        config = BenchmarkConfig(
            stream=args.stream,
            dataset=args.dataset,
            root=args.root,
            download=args.download,
            tasks=args.tasks,
            iters=args.iters,
            batch_size=args.batch_size,
            optimizer=args.optimizer,
            lr=args.lr,
            hidden_sizes=tuple(args.hidden),
            methods=tuple(dict.fromkeys(args.methods)),
            seeds=tuple(args.seeds),
            eval_every=args.eval_every,
            eval_samples=args.eval_samples,
            strengths=dict(args.strength),
            accelerator=args.accelerator,
            eval_split=args.eval_split,
        )
    except ValueError as err:
        build_parser().error(str(err))
    # Lightning's per-fit banners would drown the progress bar: this loop makes many Trainers.
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    total = len(config.methods) * len(config.seeds) * config.tasks
    with tqdm(total=total, desc="tasks trained", unit="task") as bar:
        results = run_benchmark(config, progress=lambda: bar.update(1))
    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    plots = [plot_curves(results, out / "curves.png"), plot_matrices(results, out / "matrices.png")]
    print(format_matrices(results))
    print()
    print(format_table(results))
    print(f"\nwrote {out / 'results.json'}, " + ", ".join(str(p) for p in plots))
    return 0
