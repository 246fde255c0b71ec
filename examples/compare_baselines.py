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

The runs come from ``lightning_metagrad.benchmark`` (what ``metagrad-benchmark`` runs, with
the same options; the defaults are its preset ``compare``): the example prints the accuracy
matrices and the ACC / BWT / FWT / forgetting table, and writes ``results.json``,
``curves.png`` (per-task test accuracy during training, the paper's Fig. 1) and
``matrices.png`` (accuracy-matrix heatmaps) to ``--out``.

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
from pathlib import Path
from typing import Any

from lightning_metagrad.benchmark import run_benchmark
from lightning_metagrad.benchmark.cli import report
from lightning_metagrad.benchmark.config import add_config_arguments, parse_config
from lightning_metagrad.benchmark.quiet import silence_lightning


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_arguments(parser, preset="compare")  # --tasks, --iters, --methods, --strength, ...
    parser.add_argument("--out", type=Path, default=Path("runs/compare"))
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    config, args = parse_config(build_parser(), argv)
    silence_lightning()  # one Trainer per task and method: no per-fit banners

    done = [0]
    total = len(config.methods) * len(config.seeds) * config.tasks

    def progress() -> None:
        done[0] += 1
        print(f"\rtasks trained: {done[0]}/{total}", end="", flush=True)

    results = run_benchmark(config, progress=progress)
    print("\n")
    plots = report(results, args.out)  # results.json, curves.png, matrices.png; the tables
    return {"results": results, "plots": plots}


if __name__ == "__main__":
    main()
