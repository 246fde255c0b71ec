"""Runs methods over a task stream and collects accuracy matrices, curves and step times."""

from __future__ import annotations

import math
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from lightning_metagrad import metrics
from lightning_metagrad.benchmark.config import (
    STREAMS,
    BenchmarkConfig,
    config_dict,
    steps_per_task,
)
from lightning_metagrad.benchmark.methods import make_callbacks
from lightning_metagrad.benchmark.models import MLPClassifier
from lightning_metagrad.benchmark.quiet import quiet_trainer_kwargs
from lightning_metagrad.metrics import AccuracyMatrix, TaskAccuracyCurve, collapsed_in_task

__all__ = [
    "STREAMS",
    "BenchmarkConfig",
    "CallbackFactory",
    "PeriodicEvaluator",
    "StepTimer",
    "first_batches",
    "first_samples",
    "make_model",
    "make_stream",
    "run_benchmark",
    "run_method",
    "summarise",
    "task_steps",
]

CallbackFactory = Callable[[], list[Callback]]
"""Makes a fresh list of callbacks: one method, for one run (callbacks hold a run's state)."""
ProbeFactory = Callable[[Any, MLPClassifier, list[Callback]], list[Callback]]


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
        standardize=config.standardize,
    )


def task_steps(config: BenchmarkConfig, stream: Any, task: int) -> int:
    """Optimizer steps on ``task`` of ``stream``: ``config.iters``, or ``config.epochs`` passes
    over the task's training split (the ``joint`` reference takes as many).

    Example:
        >>> config = BenchmarkConfig(epochs=2, batch_size=100)
        >>> task_steps(config, make_stream(config, seed=0), task=0)  # 1077 digits: 11 batches
        22
    """
    if not config.epochs:
        return int(config.iters)
    return steps_per_task(config, len(stream.task_dataset(task, split="train")))


def make_model(config: BenchmarkConfig, stream: Any) -> MLPClassifier:
    """The benchmark's MLP for ``stream``, with the widths, biases, optimizer and learning rate
    of ``config``.

    Example:
        >>> config = BenchmarkConfig(hidden_sizes=(8,))
        >>> make_model(config, make_stream(config, seed=0)).net
        Sequential(
          (0): Linear(in_features=64, out_features=8, bias=True)
          (1): ReLU()
          (2): Linear(in_features=8, out_features=10, bias=True)
        )
    """
    task_classes = None
    if config.heads == "task":  # one head per task: the task's own classes (Split)
        task_classes = [stream.task_classes(t) for t in range(stream.num_tasks)]
    return MLPClassifier(
        input_dim=stream.input_dim,
        num_classes=stream.num_classes,
        hidden_sizes=tuple(config.hidden_sizes),
        optimizer=config.optimizer,
        lr=config.lr,
        task_classes=task_classes,
        bias=config.bias,
    )


def _warn_unprotected_layers(method: str, callbacks: list[Callback], model: Any) -> None:
    """GPM with a per-layer ``threshold`` leaves the layers it does not name unprotected: say
    so when that is one of the MLP's layers (e.g. a preset's thresholds with other --hidden)."""
    from lightning_metagrad.baselines import GPMCallback

    layers = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    for callback in callbacks:
        named = getattr(callback, "threshold", None)
        if isinstance(callback, GPMCallback) and isinstance(named, dict):
            missing = [n for n in layers if n not in named]
            if missing:
                warnings.warn(
                    f"{method}: GPM's per-layer `threshold` names {sorted(named)}, so the "
                    f"MLP's layers {missing} stay unprotected; name every layer of {layers} "
                    f"(--method-kwargs {method}=JSON) or give one float",
                    stacklevel=3,
                )


def first_batches(stream: Any, task: int, samples: int, split: str = "test") -> list[Any]:
    """The first batches of task ``task``'s ``split`` holding at least ``samples`` samples
    (all of them if the split is smaller), in the stream's order.

    Example:
        >>> stream = make_stream(BenchmarkConfig(), seed=0)
        >>> stream.setup("fit")
        >>> [len(b["y"]) for b in first_batches(stream, 1, samples=150)]
        [64, 64, 64]
    """
    batches, seen = [], 0
    for batch in stream.task_dataloader(task, split=split):
        batches.append(batch)
        seen += len(batch["y"])
        if seen >= samples:
            break
    return batches


def first_samples(
    stream: Any, task: int, samples: int, split: str = "train"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)``: the first ``samples`` samples of task ``task``'s ``split``, stacked (for a
    diagnostic that needs old tasks' data).

    Example:
        >>> stream = make_stream(BenchmarkConfig(), seed=0)
        >>> stream.setup("fit")
        >>> x, y = first_samples(stream, 0, samples=100)
        >>> tuple(x.shape), tuple(y.shape)
        ((100, 64), (100,))
    """
    batches = first_batches(stream, task, samples, split)
    x = torch.cat([b["x"] for b in batches])[:samples]
    y = torch.cat([b["y"] for b in batches])[:samples]
    return x, y


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

    Records into ``curve`` at the iteration offset by ``offset`` (the steps of earlier tasks);
    the module needs an ``accuracy(loader)`` method.

    Example:
        >>> from types import SimpleNamespace
        >>> curve = TaskAccuracyCurve()
        >>> evaluator = PeriodicEvaluator(["loader 0", "loader 1"], 10, offset=100, curve=curve)
        >>> module = SimpleNamespace(accuracy=lambda loader: 0.5)
        >>> evaluator.on_train_batch_end(SimpleNamespace(global_step=20), module)
        >>> curve.rows[1]
        {'iteration': 120, 'task': 1, 'accuracy': 0.5}
    """

    def __init__(
        self, loaders: Sequence[Any], every: int, offset: int, curve: TaskAccuracyCurve
    ) -> None:
        self.loaders, self.every, self.offset, self.curve = loaders, every, offset, curve

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *a: Any
    ) -> None:
        step = trainer.global_step
        if step % self.every == 0:
            accuracies = [pl_module.accuracy(loader) for loader in self.loaders]  # type: ignore[operator]
            self.curve.record_all(self.offset + step, accuracies)


def run_method(
    config: BenchmarkConfig,
    method: str,
    seed: int,
    on_task_end: Callable[[], None] | None = None,
    probes: ProbeFactory | None = None,
    callbacks: CallbackFactory | None = None,
) -> dict[str, Any]:
    """Train one method on one seed's stream; return its accuracy matrix, curves and timing.

    ``callbacks()`` makes the method's callbacks (called once, before the first task); without
    it they come from the registry by ``method``'s name, at ``config.strengths[method]``.
    ``method`` names the run either way; ``"joint"`` trains each task on all tasks so far.
    A task takes :func:`task_steps` steps (``iters``, or ``epochs`` passes over its data).
    ``probes(stream, model, method_callbacks)`` may add diagnostic callbacks (placed last).

    Example:
        >>> config = BenchmarkConfig(tasks=2, iters=2, hidden_sizes=(8,))
        >>> run = run_method(config, "metagrad", seed=0)
        >>> len(run["acc_matrix"]), len(run["acc_matrix"][0]), run["diverged_in_task"]
        (2, 2, None)
        >>> from lightning_metagrad import MetaGradCallback
        >>> mine = lambda: [MetaGradCallback(predictor="replay")]
        >>> len(run_method(config, "my-replay", seed=0, callbacks=mine)["acc_matrix"])
        2
    """
    stream = make_stream(config, seed)
    stream.setup("fit")
    pl.seed_everything(seed, verbose=False)
    model = make_model(config, stream)
    split = config.eval_split
    test_loaders = [stream.task_dataloader(j, split=split) for j in range(config.tasks)]
    curve_loaders = [
        first_batches(stream, j, config.eval_samples, split) for j in range(config.tasks)
    ]
    random_init = [model.accuracy(loader) for loader in test_loaders]
    if callbacks is None:
        method_callbacks = make_callbacks(
            method, config.strengths.get(method), config.method_kwargs.get(method)
        )
    else:
        method_callbacks = list(callbacks())
    _warn_unprotected_layers(method, method_callbacks, model)
    extra = probes(stream, model, method_callbacks) if probes is not None else []
    accuracy = AccuracyMatrix(num_tasks=config.tasks)
    accuracy.set_dtype(torch.float64)
    curve = TaskAccuracyCurve()
    diverged: int | None = None
    step_times: list[float] = []
    offset = 0  # steps of the earlier tasks
    for task in range(config.tasks):
        stream.set_task(task)
        steps = task_steps(config, stream, task)
        timer = StepTimer()
        evaluator = PeriodicEvaluator(curve_loaders, config.eval_every, offset, curve)
        offset += steps
        trainer = pl.Trainer(
            max_steps=steps,
            accelerator=config.accelerator,
            devices=1,
            callbacks=[timer, *method_callbacks, evaluator, *extra],
            num_sanity_val_steps=0,
            limit_val_batches=0,
            **quiet_trainer_kwargs(),
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
        for j, loader in enumerate(test_loaders):
            model.score(loader, accuracy, trained_upto=task, eval_task=j)
        if on_task_end is not None:
            on_task_end()
    matrix = accuracy.compute().tolist()
    return {
        "seed": seed,
        "acc_matrix": matrix,
        "random_init": random_init,
        "num_classes": stream.num_classes,
        "diverged_in_task": diverged,
        "collapsed_in_task": collapsed_in_task(matrix, stream.num_classes),
        "curves": curve.rows,
        "train_step_ms": 1000 * statistics.median(step_times) if step_times else float("nan"),
    }


def _weights_finite(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not all(math.isfinite(v) for v in values):
        return float("nan"), float("nan")  # statistics' exact arithmetic takes finite values
    mean = statistics.mean(values)  # exactly rounded (fmean may differ in the last bit)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Aggregate one method's per-seed runs into the ``results.json`` entry.

    The scores come from :mod:`lightning_metagrad.metrics` on each seed's matrix (so a stored
    ``per_seed`` list can be summarised again); a run without ``num_classes`` (files written
    before it was recorded) had 10 classes.

    Example:
        >>> run = {"seed": 0, "acc_matrix": [[0.9, 0.1], [0.5, 0.8]], "random_init": [0.1, 0.1],
        ...        "curves": [], "train_step_ms": 1.0}
        >>> entry = summarise([run])
        >>> round(entry["acc"], 3), round(entry["bwt"], 3), entry["diverged_seeds"]
        (0.65, -0.4, [])
    """
    matrices = [torch.tensor(r["acc_matrix"], dtype=torch.float64) for r in runs]
    mean_matrix = torch.stack(matrices).mean(0)
    accs = [metrics.average_accuracy(m) for m in matrices]
    bwts = [metrics.backward_transfer(m) for m in matrices]
    fwts = [metrics.forward_transfer(m, r["random_init"]) for m, r in zip(matrices, runs)]
    forgetting = [metrics.average_forgetting(m) for m in matrices]
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
        "collapsed_seeds": [
            r["seed"]
            for r in runs
            if collapsed_in_task(r["acc_matrix"], r.get("num_classes", 10)) is not None
        ],
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
    config.check_callbacks()  # a rejected keyword argument fails before any training
    methods: dict[str, Any] = {}
    for method in config.methods:
        runs = [run_method(config, method, seed, progress) for seed in config.seeds]
        methods[method] = summarise(runs)
    return {"config": config_dict(config), "methods": methods}
