"""The continual-learning benchmark: task streams x methods -> accuracy matrices and plots.

Run it with ``metagrad-benchmark`` or ``python -m lightning_metagrad.benchmark``.
"""

from lightning_metagrad.benchmark.models import MLPClassifier
from lightning_metagrad.benchmark.runner import BenchmarkConfig, run_benchmark, run_method

__all__ = ["BenchmarkConfig", "MLPClassifier", "run_benchmark", "run_method"]
