"""The continual-learning benchmark: task streams x methods -> accuracy matrices and plots.

Run it with ``metagrad-benchmark`` or ``python -m lightning_metagrad.benchmark``, or from
Python:

Example:
    >>> from lightning_metagrad.benchmark import BenchmarkConfig, run_benchmark
    >>> config = BenchmarkConfig(tasks=2, iters=2, methods=("naive",), hidden_sizes=(8,))
    >>> results = run_benchmark(config)
    >>> len(results["methods"]["naive"]["acc_matrix"])
    2

Where things are: ``config`` (:class:`BenchmarkConfig`, its presets and the command-line
options built from it), ``runner`` (one method on one stream), ``methods`` (methods by name),
``variants`` (callbacks from ``NAME=SPEC`` text), ``models`` (the paper's MLP), ``quiet``
(quiet Trainers), ``plots`` and ``cli``.
"""

from lightning_metagrad.benchmark.config import PRESETS, BenchmarkConfig, preset
from lightning_metagrad.benchmark.models import MLPClassifier
from lightning_metagrad.benchmark.runner import run_benchmark, run_method

__all__ = ["PRESETS", "BenchmarkConfig", "MLPClassifier", "preset", "run_benchmark", "run_method"]
