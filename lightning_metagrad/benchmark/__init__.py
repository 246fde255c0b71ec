"""The continual-learning benchmark: task streams x methods -> accuracy matrices and plots.

Run it with ``metagrad-benchmark`` or ``python -m lightning_metagrad.benchmark``, or from
Python:

Example:
    >>> from lightning_metagrad.benchmark import BenchmarkConfig, run_benchmark
    >>> config = BenchmarkConfig(tasks=2, iters=2, methods=("naive",), hidden_sizes=(8,))
    >>> results = run_benchmark(config)
    >>> len(results["methods"]["naive"]["acc_matrix"])
    2
"""

from lightning_metagrad.benchmark.models import MLPClassifier
from lightning_metagrad.benchmark.runner import BenchmarkConfig, run_benchmark, run_method

__all__ = ["BenchmarkConfig", "MLPClassifier", "run_benchmark", "run_method"]
