"""Compare MetaGrad with plain training and the regularisation baselines, with plots.

Every method trains the same MLP on the same task stream, one ``fit`` per task; each is a list
of callbacks added to an unchanged ``LightningModule``:

* ``naive``: no callback (plain fine-tuning, forgets);
* ``ewc`` / ``online-ewc``: ``EWCCallback`` / ``OnlineEWCCallback`` (Fisher-weighted anchors);
* ``si``: ``SICallback`` (synaptic intelligence);
* ``mas``: ``MASCallback`` (memory-aware synapses);
* ``metagrad``: ``MetaGradCallback()``;
* ``metagrad-replay``: ``MetaGradCallback(predictor="replay")`` (8 stored batches);
* ``joint`` (optional, ``--methods ... joint``): trains on all tasks so far, an upper bound.

The runs come from ``lightning_metagrad.benchmark`` (what ``metagrad-benchmark`` runs): the
example prints the accuracy matrices and the ACC / BWT / FWT / forgetting table, and writes
``results.json``, ``curves.png`` (per-task test accuracy during training, the paper's Fig. 1)
and ``matrices.png`` (accuracy-matrix heatmaps) to ``--out``.

Run (no download; Permuted 8x8 digits, under half a minute on CPU)::

    python examples/compare_baselines.py --out runs/compare

On Permuted Fashion-MNIST, as in the paper (784-256-256-256-10, 5 tasks; torchvision layout
under ``--root``; about 10 minutes on 2 CPU cores)::

    python examples/compare_baselines.py --dataset fashion_mnist --root ../shared/data \
        --tasks 5 --iters 2000 --hidden 256 256 256 --out runs/compare-fmnist

Baseline strengths can be changed with ``--strength ewc=1000`` (repeatable). With the default
strengths, ``si`` and ``mas`` fell to chance accuracy on every task early in task 5 of that
Fashion-MNIST run (seed 0; ACC: naive 0.707, ewc 0.770, metagrad 0.756); try lower strengths
there.
"""

from __future__ import annotations

import argparse
import json
import logging
import warnings
from pathlib import Path
from typing import Any

from lightning_metagrad.benchmark import BenchmarkConfig, run_benchmark
from lightning_metagrad.benchmark.cli import format_matrices, format_table
from lightning_metagrad.benchmark.methods import ALL_METHODS
from lightning_metagrad.benchmark.plots import plot_curves, plot_matrices
from lightning_metagrad.benchmark.runner import STREAMS

METHODS = ("naive", "ewc", "online-ewc", "si", "mas", "metagrad", "metagrad-replay")


def _strength(text: str) -> tuple[str, float]:
    name, _, value = text.partition("=")
    return name, float(value)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stream", default="permuted", choices=sorted(STREAMS))
    parser.add_argument("--dataset", default="digits", choices=["digits", "mnist", "fashion_mnist"])
    parser.add_argument("--root", default=None, help="torchvision data folder (MNIST-like sets)")
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--iters", type=int, default=300, help="optimizer steps per task")
    parser.add_argument("--lr", type=float, default=0.03)
    parser.add_argument("--hidden", type=int, nargs="+", default=[256, 256, 256])
    parser.add_argument("--methods", nargs="+", choices=ALL_METHODS, default=list(METHODS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument(
        "--strength",
        type=_strength,
        action="append",
        default=[],
        metavar="METHOD=VALUE",
        help="a baseline's regularisation strength",
    )
    parser.add_argument("--eval-every", type=int, default=25, help="steps between curve points")
    parser.add_argument("--out", type=Path, default=Path("runs/compare"))
    args = parser.parse_args(argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # quiet per-fit banners
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")  # Lightning vs newer torch

    config = BenchmarkConfig(
        stream=args.stream,
        dataset=args.dataset,
        root=args.root,
        tasks=args.tasks,
        iters=args.iters,
        lr=args.lr,
        hidden_sizes=tuple(args.hidden),
        methods=tuple(dict.fromkeys(args.methods)),
        seeds=tuple(args.seeds),
        eval_every=args.eval_every,
        strengths=dict(args.strength),
    )
    done = [0]
    total = len(config.methods) * len(config.seeds) * config.tasks

    def progress() -> None:
        done[0] += 1
        print(f"\rtasks trained: {done[0]}/{total}", end="", flush=True)

    results = run_benchmark(config, progress=progress)
    print("\n")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    plots = [
        plot_curves(results, args.out / "curves.png"),
        plot_matrices(results, args.out / "matrices.png"),
    ]
    print(format_matrices(results))
    print()
    print(format_table(results))
    print(f"\nwrote {args.out / 'results.json'}, " + ", ".join(str(p) for p in plots))
    return {"results": results, "plots": plots}


if __name__ == "__main__":
    main()
