"""Runs methods over a task stream and collects accuracy matrices, curves and step times."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from lightning_metagrad.benchmark.methods import ALL_METHODS, METHOD_NAMES, make_callbacks
from lightning_metagrad.benchmark.models import OPTIMIZERS, MLPClassifier
from lightning_metagrad.data import PermutedStream, RotatedStream, SplitStream
from lightning_metagrad.metrics import (
    average_accuracy,
    average_forgetting,
    backward_transfer,
    forward_transfer,
)

STREAMS = {"permuted": PermutedStream, "split": SplitStream, "rotated": RotatedStream}


@dataclass
class BenchmarkConfig:
    """Everything a benchmark run depends on (stored in ``results.json``).

    The fields mirror the options of ``metagrad-benchmark``; they are checked at construction.

    Example:
        >>> config = BenchmarkConfig(tasks=3, iters=100, methods=("naive", "metagrad"))
        >>> config.stream, config.dataset, config.optimizer
        ('permuted', 'digits', 'sgd')
        >>> BenchmarkConfig(tasks=1)
        Traceback (most recent call last):
            ...
        ValueError: `tasks` must be >= 2 for continual learning, got 1
    """

    stream: str = "permuted"
    dataset: str = "digits"
    root: str | None = None
    download: bool = False
    tasks: int = 5
    iters: int = 300
    batch_size: int = 64
    optimizer: str = "sgd"
    lr: float = 0.03
    hidden_sizes: Sequence[int] = (256, 256, 256)
    methods: Sequence[str] = METHOD_NAMES
    seeds: Sequence[int] = (0,)
    eval_every: int = 50
    eval_samples: int = 1000
    strengths: dict[str, float] = field(default_factory=dict)
    accelerator: str = "cpu"
    eval_split: str = "test"

    def __post_init__(self) -> None:
        if self.stream not in STREAMS:
            raise ValueError(f"`stream` must be one of {sorted(STREAMS)}, got {self.stream!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"`optimizer` must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        for name in ("tasks", "iters", "batch_size", "eval_every", "eval_samples"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)}")
        if self.tasks < 2:
            raise ValueError(f"`tasks` must be >= 2 for continual learning, got {self.tasks}")
        unknown = [m for m in self.methods if m not in ALL_METHODS]
        if unknown:
            raise ValueError(f"unknown `methods` {unknown}; choose from {list(ALL_METHODS)}")
        if self.eval_split not in ("test", "val"):
            raise ValueError(f"`eval_split` must be 'test' or 'val', got {self.eval_split!r}")
        if not self.seeds:
            raise ValueError("`seeds` must name at least one seed")


def make_stream(config: BenchmarkConfig, seed: int) -> Any:
    """The task stream ``config`` describes, seeded with ``seed``.

    Example:
        >>> stream = make_stream(BenchmarkConfig(stream="split", tasks=5), seed=0)
        >>> type(stream).__name__, stream.num_tasks
        ('SplitStream', 5)
    """
    return STREAMS[config.stream](
        dataset=config.dataset,
        num_tasks=config.tasks,
        root=config.root,
        download=config.download,
        batch_size=config.batch_size,
        seed=seed,
    )


class StepTimer(Callback):
    """Wall time of each training step, from batch start to batch end (put it first).

    Example:
        >>> timer = StepTimer()
        >>> timer.on_train_batch_start()
        >>> timer.on_train_batch_end()
        >>> len(timer.times)
        1
    """

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, *args: Any) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, *args: Any) -> None:
        self.times.append(time.perf_counter() - self._start)


class PeriodicEvaluator(Callback):
    """Test accuracy on every task every ``every`` steps: the curves of the paper's Fig. 1.

    ``rows`` collects ``{"iteration", "task", "accuracy"}`` dicts, the iteration offset by
    ``offset`` (the steps of earlier tasks); the module needs an ``accuracy(loader)`` method.

    Example:
        >>> from types import SimpleNamespace
        >>> rows = []
        >>> evaluator = PeriodicEvaluator(["loader 0", "loader 1"], every=10, offset=100, rows=rows)
        >>> module = SimpleNamespace(accuracy=lambda loader: 0.5)
        >>> evaluator.on_train_batch_end(SimpleNamespace(global_step=20), module)
        >>> rows[1]
        {'iteration': 120, 'task': 1, 'accuracy': 0.5}
    """

    def __init__(self, loaders: Sequence[Any], every: int, offset: int, rows: list) -> None:
        self.loaders, self.every, self.offset, self.rows = loaders, every, offset, rows

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *a: Any
    ) -> None:
        step = trainer.global_step
        if step % self.every == 0:
            for task, loader in enumerate(self.loaders):
                acc = pl_module.accuracy(loader)  # type: ignore[operator]
                self.rows.append({"iteration": self.offset + step, "task": task, "accuracy": acc})


def _subset_loader(stream: Any, task: int, samples: int, split: str) -> list:
    batches, seen = [], 0
    for batch in stream.task_dataloader(task, split=split):
        batches.append(batch)
        seen += len(batch["y"])
        if seen >= samples:
            break
    return batches


ProbeFactory = Callable[[Any, MLPClassifier, list[Callback]], list[Callback]]


def run_method(
    config: BenchmarkConfig,
    method: str,
    seed: int,
    on_task_end: Callable[[], None] | None = None,
    probes: ProbeFactory | None = None,
) -> dict[str, Any]:
    """Train one method on one seed's stream; return its accuracy matrix, curves and timing.

    ``probes(stream, model, method_callbacks)`` may add diagnostic callbacks (placed last).

    Example:
        >>> config = BenchmarkConfig(tasks=2, iters=2, hidden_sizes=(8,))
        >>> run = run_method(config, "metagrad", seed=0)
        >>> len(run["acc_matrix"]), len(run["acc_matrix"][0]), run["diverged_in_task"]
        (2, 2, None)
    """
    stream = make_stream(config, seed)
    stream.setup("fit")
    pl.seed_everything(seed, verbose=False)
    model = MLPClassifier(
        input_dim=stream.input_dim,
        num_classes=stream.num_classes,
        hidden_sizes=tuple(config.hidden_sizes),
        optimizer=config.optimizer,
        lr=config.lr,
    )
    split = config.eval_split
    test_loaders = [stream.task_dataloader(j, split=split) for j in range(config.tasks)]
    curve_loaders = [
        _subset_loader(stream, j, config.eval_samples, split) for j in range(config.tasks)
    ]
    random_init = [model.accuracy(loader) for loader in test_loaders]
    callbacks = make_callbacks(method, config.strengths.get(method))
    extra = probes(stream, model, callbacks) if probes is not None else []
    matrix: list[list[float]] = []
    diverged: int | None = None
    collapsed: int | None = None
    curves: list[dict[str, Any]] = []
    step_times: list[float] = []
    for task in range(config.tasks):
        stream.set_task(task)
        timer = StepTimer()
        evaluator = PeriodicEvaluator(curve_loaders, config.eval_every, task * config.iters, curves)
        trainer = pl.Trainer(
            max_steps=config.iters,
            accelerator=config.accelerator,
            devices=1,
            callbacks=[timer, *callbacks, evaluator, *extra],
            logger=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=False,
            num_sanity_val_steps=0,
            limit_val_batches=0,
        )
        train_loader = (
            stream.joint_train_dataloader(task) if method == "joint" else stream.train_dataloader()
        )
        try:
            trainer.fit(model, train_dataloaders=train_loader)
        except Exception:
            if _weights_finite(model):
                raise
            # The method drove the weights to NaN/inf: record the divergence, keep evaluating
            # (a NaN model scores at chance) so the run still yields a full matrix.
            diverged = task if diverged is None else diverged
        if diverged is None and not _weights_finite(model):
            diverged = task  # non-finite weights without an error (NaN losses are trained on)
        step_times += timer.times[5:]  # skip warm-up steps of each task
        matrix.append([model.accuracy(loader) for loader in test_loaders])
        chance = 1.5 / stream.num_classes
        learned_before = any(matrix[i][i] > chance for i in range(task))
        if collapsed is None and learned_before and matrix[-1][task] <= chance:
            # Earlier tasks were learned, yet the task just trained scores at chance: training
            # collapsed (e.g. a penalty's curvature above SGD's stability limit).
            collapsed = task
        if on_task_end is not None:
            on_task_end()
    return {
        "seed": seed,
        "acc_matrix": matrix,
        "random_init": random_init,
        "diverged_in_task": diverged,
        "collapsed_in_task": collapsed,
        "curves": curves,
        "train_step_ms": 1000 * statistics.median(step_times) if step_times else float("nan"),
    }


def _weights_finite(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Aggregate one method's per-seed runs into the ``results.json`` entry.

    Example:
        >>> run = {"seed": 0, "acc_matrix": [[0.9, 0.1], [0.5, 0.8]], "random_init": [0.1, 0.1],
        ...        "curves": [], "train_step_ms": 1.0}
        >>> entry = summarise([run])
        >>> round(entry["acc"], 3), round(entry["bwt"], 3), entry["diverged_seeds"]
        (0.65, -0.4, [])
    """
    matrices = [torch.tensor(r["acc_matrix"]) for r in runs]
    mean_matrix = torch.stack(matrices).mean(0)
    accs = [float(average_accuracy(m)) for m in matrices]
    bwts = [float(backward_transfer(m)) for m in matrices]
    fwts = [
        float(forward_transfer(m, torch.tensor(r["random_init"]))) for m, r in zip(matrices, runs)
    ]
    forgetting = [float(average_forgetting(m)) for m in matrices]
    acc, acc_std = _mean_std(accs)
    return {
        "seeds": [r["seed"] for r in runs],
        "acc_matrix": mean_matrix.tolist(),
        "acc": acc,
        "acc_std": acc_std,
        "bwt": _mean_std(bwts)[0],
        "bwt_std": _mean_std(bwts)[1],
        "fwt": _mean_std(fwts)[0],
        "forgetting": _mean_std(forgetting)[0],
        "train_step_ms": statistics.fmean(r["train_step_ms"] for r in runs),
        "diverged_seeds": [r["seed"] for r in runs if r.get("diverged_in_task") is not None],
        "collapsed_seeds": [r["seed"] for r in runs if r.get("collapsed_in_task") is not None],
        "per_seed": runs,
    }


def run_benchmark(
    config: BenchmarkConfig, progress: Callable[[], None] | None = None
) -> dict[str, Any]:
    """Every method x seed of ``config``; the ``results.json`` document.

    ``progress`` is called after each task trained (the CLI's progress bar).

    Example:
        >>> config = BenchmarkConfig(tasks=2, iters=2, methods=("naive", "ewc"), hidden_sizes=(8,))
        >>> results = run_benchmark(config)
        >>> sorted(results), list(results["methods"])
        (['config', 'methods'], ['naive', 'ewc'])
        >>> sorted(results["methods"]["ewc"])[:4]
        ['acc', 'acc_matrix', 'acc_std', 'bwt']
    """
    methods: dict[str, Any] = {}
    for method in config.methods:
        runs = [run_method(config, method, seed, progress) for seed in config.seeds]
        methods[method] = summarise(runs)
    cfg = asdict(config)
    cfg["hidden_sizes"], cfg["methods"], cfg["seeds"] = (
        list(config.hidden_sizes),
        list(config.methods),
        list(config.seeds),
    )
    return {"config": cfg, "methods": methods}
