"""Step-time and memory overhead of ``MetaGradCallback`` (issue #6), with plain Lightning,
EWC and SI side by side.

Three parts, all in one process:

* ``trainer``: median training-step time with a real Lightning ``Trainer`` on synthetic data,
  for the paper's MLP (784-256-256-256-10), a small CNN and ``lightning.pytorch.demos``'
  Transformer (>= 10M parameters). Configurations are interleaved in rounds (each a short
  ``fit``) so machine noise hits all of them alike; the first ``--warmup`` steps of every fit
  are discarded. MetaGrad is timed in task 1 (predictor training only) and in task 2
  (prediction + rule + training); EWC and SI in task 2 (penalty active).
* ``scaling``: the callback's per-step hot path alone (flatten, observe, predict, eq. 5, write
  back) on flat parameter sets of 1e5 .. 1e8 coordinates, against a plain SGD step, with the
  callback's memory in floats per parameter.
* ``quality`` (``--quality``): MetaNetPredictor at its defaults against a paper-like setting
  (update every step) on permuted digits: held-out reconstruction error, ACC, BWT, step time.

Example::

    OMP_NUM_THREADS=1 python experiments/overhead.py            # trainer + scaling
    OMP_NUM_THREADS=1 python experiments/overhead.py --quick    # a few seconds, for tests
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_metagrad import MetaGrad, MetaGradCallback, SubspacePredictor
from lightning_metagrad.baselines import (
    AGEMCallback,
    ERCallback,
    EWCCallback,
    GPMCallback,
    MASCallback,
    SICallback,
)
from lightning_metagrad.benchmark.models import MLPClassifier
from lightning_metagrad.benchmark.quiet import quiet_trainer_kwargs, silence_lightning
from lightning_metagrad.callback import build_predictor
from lightning_metagrad.diagnostics import Diagnostics
from lightning_metagrad.predictors import MetaNetPredictor

# ---------------------------------------------------------------------------- models


class SmallCNN(pl.LightningModule):
    """conv(32)-pool-conv(64)-pool-fc(128)-fc(10) on 28x28 images (~225k parameters)."""

    def __init__(self, lr: float = 0.01) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(
            nn.Conv2d(1, 32, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 5 * 5, 128),
            nn.ReLU(),
            nn.Linear(128, 10),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class TransformerLM(pl.LightningModule):
    """``lightning.pytorch.demos.Transformer`` at its defaults (WikiText-2 vocabulary, ~14.6M
    parameters) as a language model, trained like the demo: plain SGD."""

    def __init__(self, lr: float = 0.1) -> None:
        super().__init__()
        from lightning.pytorch.demos import Transformer

        self.lr = lr
        self.model = Transformer()

    def forward(self, inputs: Tensor, target: Tensor | None = None) -> Tensor:
        # MAS evaluates ``pl_module(x)``: with no target, the inputs are fed as the decoder's
        return self.model(inputs, inputs if target is None else target)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        inputs, target = batch
        output = self.model(inputs, target)
        loss = nn.functional.nll_loss(output, target.view(-1))
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def make_model(name: str, seed: int = 0) -> pl.LightningModule:
    torch.manual_seed(seed)
    if name == "mlp":
        return MLPClassifier()  # the paper's 784-256-256-256-10, plain SGD (lr 0.003)
    if name == "cnn":
        return SmallCNN()
    if name == "transformer":
        return TransformerLM()
    raise ValueError(name)


def make_loader(name: str, batch_size: int, steps: int, seq_len: int = 35) -> DataLoader:
    """Synthetic data of the right shape (enough for ``steps`` batches)."""
    g = torch.Generator().manual_seed(0)
    n = batch_size * steps
    if name == "mlp":
        ds = TensorDataset(
            torch.randn(n, 784, generator=g), torch.randint(0, 10, (n,), generator=g)
        )
    elif name == "cnn":
        ds = TensorDataset(
            torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)
        )
    else:
        tokens = torch.randint(0, 33278, (n, seq_len + 1), generator=g)
        ds = TensorDataset(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())
    return DataLoader(ds, batch_size=batch_size, shuffle=False)


# ---------------------------------------------------------------------------- memory


def _tensors(obj: Any, seen: set[int], out: list[Tensor], depth: int = 0) -> None:
    """Every tensor reachable from ``obj`` through attributes, containers and modules."""
    if depth > 8 or id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, Tensor):
        out.append(obj)
    elif isinstance(obj, (pl.Trainer, pl.LightningModule)):
        return
    elif isinstance(obj, dict):
        for v in obj.values():
            _tensors(v, seen, out, depth + 1)
    elif isinstance(obj, (list, tuple, set)):
        for v in obj:
            _tensors(v, seen, out, depth + 1)
    elif isinstance(obj, torch.optim.Optimizer):
        _tensors(obj.state, seen, out, depth + 1)
    elif isinstance(obj, nn.Module):
        _tensors(list(obj.parameters()) + list(obj.buffers()), seen, out, depth + 1)
    elif hasattr(obj, "__dict__") and type(obj).__module__.startswith(("lightning_metagrad",)):
        _tensors(vars(obj), seen, out, depth + 1)
    elif hasattr(obj, "__slots__"):
        for slot in obj.__slots__:
            _tensors(getattr(obj, slot, None), seen, out, depth + 1)


def held_bytes(obj: Any, exclude: list[Tensor]) -> int:
    """Bytes of the distinct storages ``obj`` holds, not counting those of ``exclude``."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    found: list[Tensor] = []
    _tensors(obj, set(), found)
    storages: dict[int, int] = {}
    for t in found:
        s = t.untyped_storage()
        if s.data_ptr() not in skip and s.nbytes() > 0:
            storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values())


# Predictor state that lives only during a task (running sums), not between tasks.
_WORKSPACE_KEYS = ("cov", "sq_sum")


def projection_bound(cb: Any, reps: int = 20) -> dict[str, float] | None:
    """The subspace projection's own limit: its FLOPs per step and the time of exactly its
    matrix products (``G - (G M) M^T`` per protected matrix, on the stored side) run alone."""
    pred = getattr(cb, "predictor", None)
    if not isinstance(pred, SubspacePredictor) or pred.num_old_tasks == 0:
        return None
    stored = pred.state_dict()["basis"]
    shapes = pred.state_dict()["shapes"]
    flops = 0.0
    work = []
    for name, m in stored.items():
        rows = int(shapes[name][0])
        g = torch.randn(rows, m.shape[0])
        work.append((g, m))
        flops += 4.0 * rows * m.shape[0] * m.shape[1]
    for g, m in work:  # warm-up
        g - (g @ m) @ m.T
    t0 = _clock()
    for _ in range(reps):
        for g, m in work:
            g - (g @ m) @ m.T
    ms = 1e3 * (_clock() - t0) / reps
    return {"gflop_per_step": flops / 1e9, "alone_ms": ms}


def callback_floats_per_param(cb: Any, module: nn.Module) -> dict[str, float]:
    """Floats the callback (or a bare MetaGrad engine) holds per model parameter: in total,
    in per-task running sums (workspace), and the rest (state kept between tasks)."""
    params = list(module.parameters())
    exclude = params + [p.grad for p in params if p.grad is not None]
    num = sum(p.numel() for p in params)
    total = held_bytes(cb, exclude) / (4 * num)
    workspace = 0.0
    engine = getattr(cb, "engine", cb)
    if isinstance(engine, MetaGrad):
        state = engine.predictor.state_dict()
        sums = [state[k] for k in _WORKSPACE_KEYS if k in state]
        workspace = sum(t.numel() for d in sums for t in d.values()) / num
    return {"total": total, "workspace": workspace, "state": total - workspace}


# ---------------------------------------------------------------------------- trainer timing


#: What a step's time is read from: ``"thread"``, the CPU time of the main thread (with one
#: torch thread and no loader workers every step's work runs there, and time the process
#: spends preempted by other jobs on shared cores does not count), or ``"wall"``.
CLOCKS: dict[str, Callable[[], float]] = {"thread": time.thread_time, "wall": time.perf_counter}
_clock = CLOCKS["thread"]


class StepClock(Callback):
    """Time between consecutive ``on_train_batch_start`` calls: one whole training step
    (data, forward, backward, every callback's hooks, optimizer). Put it first."""

    def __init__(self, probe: Callable[[pl.Trainer, pl.LightningModule], None] | None = None):
        self.starts: list[float] = []
        self.probe = probe

    def on_train_batch_start(self, *args: Any) -> None:
        self.starts.append(_clock())

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.starts.append(_clock())
        if self.probe is not None:  # before on_fit_end releases the callbacks' workspaces
            self.probe(trainer, pl_module)

    def step_times(self, warmup: int) -> list[float]:
        return [b - a for a, b in zip(self.starts, self.starts[1:])][warmup:]


def _fit(model: pl.LightningModule, callbacks: list[Callback], loader: DataLoader, steps: int):
    trainer = pl.Trainer(
        max_steps=steps,
        callbacks=callbacks,
        **quiet_trainer_kwargs(accelerator="cpu", devices=1, num_sanity_val_steps=0),
    )
    trainer.fit(model, train_dataloaders=loader)


# Each baseline at the settings the benchmark uses; the memory-based ones store 8 batches.
_BASELINES: dict[str, Callable[[], Callback]] = {
    "ewc": lambda: EWCCallback(fisher_batches=4),
    "si": SICallback,
    "mas": lambda: MASCallback(importance_batches=4),
    "gpm": GPMCallback,
    "agem": AGEMCallback,
    "er": ERCallback,
}


def _no_consolidation(cb: Callback) -> None:
    """Keep a baseline at 'task 2': later fits continue the task instead of ending one."""
    cb.on_train_end = lambda *a, **k: None  # type: ignore[method-assign]


def _predictor_of(config: str) -> str:
    """``metagrad/task2`` -> the default predictor, ``metagrad-anchored/task1`` -> anchored."""
    base = config.split("/")[0]
    return "subspace" if base == "metagrad" else base.removeprefix("metagrad-")


def _timed_boundary(cb: Callback, boundaries: dict[str, float], name: str) -> None:
    """Time a baseline's consolidation at the end of its task-1 fit (``on_train_end``)."""
    inner = cb.on_train_end

    def timed(*args: Any, **kwargs: Any) -> None:
        t0 = _clock()
        inner(*args, **kwargs)
        boundaries[name] = _clock() - t0

    cb.on_train_end = timed  # type: ignore[method-assign]


def build_configs(
    names: list[str],
    model_name: str,
    loader: DataLoader,
    setup_steps: int,
    boundaries: dict[str, float] | None = None,
):
    """Per configuration: (model, callbacks-per-fit factory). Task-2 configurations are
    trained through task 1 here, once; ``boundaries`` receives the seconds each one's task
    boundary took (MetaGrad's ``start_new_task``, a baseline's consolidation)."""
    boundaries = {} if boundaries is None else boundaries
    configs: dict[str, tuple[pl.LightningModule, Callable[[], list[Callback]]]] = {}
    for name in names:
        model = make_model(model_name)
        if name == "plain":
            configs[name] = (model, lambda: [])
        elif name.endswith("/task1"):
            predictor = _predictor_of(name)

            def fresh(predictor: str = predictor) -> list[Callback]:
                return [MetaGradCallback(predictor=predictor)]

            configs[name] = (model, fresh)
        else:
            if name.startswith("metagrad"):
                predictor = _predictor_of(name)
                cb: Callback = MetaGradCallback(predictor=predictor, task_boundaries="manual")
                _fit(model, [cb], loader, setup_steps)
                t0 = _clock()
                cb.start_new_task(model)  # type: ignore[attr-defined]
                boundaries[name] = _clock() - t0
            else:
                cb = _BASELINES[name.split("/")[0]]()
                _timed_boundary(cb, boundaries, name)
                _fit(model, [cb], loader, setup_steps)  # consolidates task 1 at the end
                _no_consolidation(cb)
            configs[name] = (model, lambda cb=cb: [cb])
    return configs


def time_trainer(
    model_name: str,
    names: list[str],
    batch_size: int,
    rounds: int,
    steps: int,
    warmup: int,
    setup_steps: int,
) -> dict[str, Any]:
    loader = make_loader(model_name, batch_size, steps + 1)
    setup_loader = make_loader(model_name, batch_size, setup_steps + 1)
    boundaries: dict[str, float] = {}
    configs = build_configs(names, model_name, setup_loader, setup_steps, boundaries)
    num_params = sum(p.numel() for p in next(iter(configs.values()))[0].parameters())
    times: dict[str, list[list[float]]] = {n: [] for n in names}
    memory: dict[str, dict[str, float]] = {}
    bounds: dict[str, dict[str, float]] = {}
    for r in range(rounds):
        # Rotate the order every round so no configuration always runs first or last.
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            model, callbacks = configs[name]
            cbs = callbacks()

            def probe(trainer: pl.Trainer, module: pl.LightningModule, cbs=cbs, name=name):
                if cbs:
                    memory[name] = callback_floats_per_param(cbs[0], module)
                    bound = projection_bound(cbs[0])
                    if bound is not None:
                        bounds[name] = bound

            clock = StepClock(probe)
            _fit(model, [clock, *cbs], loader, steps)
            times[name].append(clock.step_times(warmup))
    plain = [statistics.median(t) for t in times["plain"]] if "plain" in times else None
    out: dict[str, Any] = {"params": num_params, "batch_size": batch_size, "configs": {}}
    base_all = [x for t in times.get("plain", []) for x in t]
    for name in names:
        pooled = [x for t in times[name] for x in t]
        entry: dict[str, Any] = {
            "median_ms": 1e3 * statistics.median(pooled),
            "mean_ms": 1e3 * statistics.fmean(pooled),
            "steps_timed": len(pooled),
            "memory_floats_per_param": memory.get(
                name, {"total": 0.0, "workspace": 0.0, "state": 0.0}
            ),
        }
        if name in bounds:
            entry["projection_bound"] = bounds[name]
        if name in boundaries:
            entry["boundary_ms_per_million_params"] = 1e3 * boundaries[name] / (num_params / 1e6)
        if plain is not None:
            per_round = [statistics.median(t) / p for t, p in zip(times[name], plain)]
            entry["ratio_median"] = statistics.median(pooled) / statistics.median(base_all)
            entry["ratio_mean"] = statistics.fmean(pooled) / statistics.fmean(base_all)
            entry["ratio_per_round"] = per_round
        out["configs"][name] = entry
    return out


def profile_config(
    model_name: str, names: list[str], batch_size: int, steps: int, setup_steps: int
) -> dict[str, str]:
    """``torch.profiler`` tables (CPU ops by self time) of one ``steps``-step fit per config,
    after the same set-up as the timing: what bounds its step."""
    from torch.profiler import ProfilerActivity, profile

    loader = make_loader(model_name, batch_size, steps + 1)
    setup_loader = make_loader(model_name, batch_size, setup_steps + 1)
    configs = build_configs(names, model_name, setup_loader, setup_steps)
    tables = {}
    for name, (model, callbacks) in configs.items():
        _fit(model, callbacks(), loader, 3)  # warm-up outside the profile
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            _fit(model, callbacks(), loader, steps)
        tables[name] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
        print(f"\n#### profile: {model_name}@{batch_size} {name}, {steps} steps\n")
        print(tables[name])
    return tables


# ---------------------------------------------------------------------------- hot-path scaling


def _hot_path_setup(num: int, predictor: str, task: int, chunks: int = 8, cols: int = 512):
    """The engine alone (the callback's per-step work without a Trainer) on ``chunks`` weight
    matrices of ``cols`` columns holding ``num`` parameters in all."""
    torch.manual_seed(0)
    rows = max(1, num // (chunks * cols))
    params = [nn.Parameter(torch.randn(rows, cols) * 0.05) for _ in range(chunks)]
    module = nn.ParameterList(params)
    core = MetaGrad(build_predictor(predictor))
    core.bind(module.named_parameters())
    diagnostics = Diagnostics(warn=False)

    def refill() -> None:
        for p in params:  # a fresh gradient (the rule rewrites it in place); not timed
            p.grad = torch.randn_like(p) * 1e-3

    def step() -> None:
        core.step()
        diagnostics.step(params, task - 1)

    boundary = 0.0
    if task == 2:
        for _ in range(8):
            refill()
            step()
        t0 = _clock()
        core.end_task()
        boundary = _clock() - t0
    return core, module, refill, step, boundary


def time_scaling(sizes: list[int], rounds: int, steps: int) -> list[dict[str, Any]]:
    """Per size and method, rounds of ``steps`` plain SGD steps interleaved with ``steps`` hot
    paths on the same parameters (one method alive at a time, to bound memory at 1e8)."""
    rows = []
    methods = [(name, task) for name in ("subspace", "anchored", "paper") for task in (1, 2)]
    for num in sizes:
        row: dict[str, Any] = {"params": num, "methods": {}}
        sgd_times: list[float] = []
        for predictor, task in methods:
            name = f"metagrad-{predictor}/task{task}"
            cb, module, refill, step, boundary = _hot_path_setup(num, predictor, task)
            sgd = torch.optim.SGD(module.parameters(), lr=1e-3)
            refill()
            step()  # warm-up (the first task-1 observation sets scales, buffers are allocated)
            values: list[float] = []
            for _ in range(rounds):
                for _ in range(steps):
                    t0 = _clock()
                    sgd.step()
                    sgd_times.append(_clock() - t0)
                for _ in range(steps):
                    refill()
                    t0 = _clock()
                    step()
                    values.append(_clock() - t0)
            row["methods"][name] = _scaling_entry(values, num)
            row["methods"][name]["memory_floats_per_param"] = callback_floats_per_param(cb, module)
            if task == 2:
                row["methods"][name]["boundary_ms_per_million_params"] = (
                    1e3 * boundary / (num / 1e6)
                )
            del cb, module, refill, step, sgd
        row["methods"]["sgd-step"] = _scaling_entry(sgd_times, num)
        rows.append(row)
    return rows


def _scaling_entry(values: list[float], num: int) -> dict[str, Any]:
    med = statistics.median(values)
    return {
        "median_ms": 1e3 * med,
        "mean_ms": 1e3 * statistics.fmean(values),
        "us_per_million_params": 1e6 * med / (num / 1e6),
    }


# ---------------------------------------------------------------------------- quality


def run_quality(tasks: int, iters: int, lr: float, hidden: int) -> dict[str, Any]:
    """MetaNetPredictor at its defaults vs paper-like (update every step) on permuted digits."""
    from lightning_metagrad.data.streams import PermutedStream

    settings = {
        "default (update_every=8, 256x3)": dict(update_every=8),
        "paper-like (update_every=1, 256x3)": dict(update_every=1),
    }
    results: dict[str, Any] = {}
    for label, kwargs in settings.items():
        torch.manual_seed(0)
        stream = PermutedStream(dataset="digits", num_tasks=tasks, batch_size=64, seed=0)
        stream.prepare_data()
        stream.setup("fit")
        model = MLPClassifier(input_dim=64, hidden_sizes=(hidden,) * 3, lr=lr)
        predictor = MetaNetPredictor(**kwargs)  # type: ignore[arg-type]
        errors: list[list[float]] = []
        observe = predictor.observe

        def recording(
            theta: Tensor, target: Tensor, observe=observe, errors=errors
        ) -> dict[str, Tensor]:
            logged = observe(theta, target)
            if "metagrad/meta_rel_error" in logged:
                errors[-1].append(float(logged["metagrad/meta_rel_error"]))
            return logged

        predictor.observe = recording  # type: ignore[method-assign]
        cb = MetaGradCallback(predictor=predictor)
        acc = [[0.0] * tasks for _ in range(tasks)]
        step_times: list[float] = []
        for task in range(tasks):
            errors.append([])
            stream.set_task(task)
            clock = StepClock()
            trainer = pl.Trainer(
                max_steps=iters,
                callbacks=[clock, cb],
                **quiet_trainer_kwargs(
                    accelerator="cpu", num_sanity_val_steps=0, limit_val_batches=0
                ),
            )
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                trainer.fit(model, datamodule=stream)
            step_times += clock.step_times(5)
            stream.setup("test")
            for j, test_loader in enumerate(stream.test_dataloader()):
                acc[task][j] = model.accuracy(test_loader)
        final = acc[-1]
        bwt = statistics.fmean(final[j] - acc[j][j] for j in range(tasks - 1))
        # Held-out error over the second half of each task (after the meta-network settled).
        settled = [statistics.fmean(e[len(e) // 2 :]) for e in errors if e]
        results[label] = {
            "meta_rel_error_per_task": settled,
            "meta_rel_error": statistics.fmean(settled),
            "meta_updates_per_task": [len(e) for e in errors],
            "ACC": statistics.fmean(final),
            "BWT": bwt,
            "acc_matrix": acc,
            "median_step_ms": 1e3 * statistics.median(step_times),
            "mean_step_ms": 1e3 * statistics.fmean(step_times),
        }
    return results


# ---------------------------------------------------------------------------- output


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def print_tables(result: dict[str, Any]) -> None:
    for model, data in result.get("trainer", {}).items():
        print(f"\n### {model}: {data['params']:,} parameters, batch {data['batch_size']}\n")
        rows = []
        for name, e in data["configs"].items():
            mem = e["memory_floats_per_param"]
            rows.append(
                [
                    name,
                    e["median_ms"],
                    e.get("ratio_median", 1.0),
                    e["mean_ms"],
                    e.get("ratio_mean", 1.0),
                    mem["state"],
                    mem["workspace"],
                    e.get("boundary_ms_per_million_params", "-"),
                    e["steps_timed"],
                ]
            )
        headers = ["config", "median ms", "ratio (median)", "mean ms", "ratio (mean)"]
        headers += ["state floats/param", "workspace floats/param", "boundary ms/1M params"]
        headers += ["steps"]
        print(_table(headers, rows))
        plain = data["configs"].get("plain")
        bounded = [(n, e) for n, e in data["configs"].items() if "projection_bound" in e]
        if plain is not None and bounded:
            print("\nsubspace projection: its own FLOP bound next to the measured overhead\n")
            rows = [
                [
                    n,
                    e["projection_bound"]["gflop_per_step"],
                    e["projection_bound"]["alone_ms"],
                    e["median_ms"] - plain["median_ms"],
                ]
                for n, e in bounded
            ]
            print(_table(["config", "GFLOP/step", "products alone ms", "overhead ms"], rows))
    if result.get("scaling"):
        print("\n### hot path alone (no Trainer), per optimizer step\n")
        rows = []
        for row in result["scaling"]:
            for name, e in row["methods"].items():
                mem = e.get("memory_floats_per_param", {"state": 0.0, "workspace": 0.0})
                rows.append(
                    [
                        f"{row['params']:.0e}",
                        name,
                        e["median_ms"],
                        e["us_per_million_params"],
                        mem["state"],
                        mem["workspace"],
                        e.get("boundary_ms_per_million_params", "-"),
                    ]
                )
        headers = ["params", "method", "median ms", "µs per 1M params", "state fl/p", "work fl/p"]
        headers += ["boundary ms/1M"]
        print(_table(headers, rows))
    if result.get("quality"):
        print("\n### MetaNetPredictor: defaults vs paper-like (permuted digits)\n")
        rows = [
            [k, v["meta_rel_error"], v["ACC"], v["BWT"], v["median_step_ms"], v["mean_step_ms"]]
            for k, v in result["quality"].items()
        ]
        print(
            _table(["setting", "held-out rel. error", "ACC", "BWT", "median ms", "mean ms"], rows)
        )


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "lightning": pl.__version__,
        "python": platform.python_version(),
        "cuda_available": torch.cuda.is_available(),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", default="runs/performance/overhead.json")
    p.add_argument("--models", nargs="*", default=["mlp", "cnn", "transformer"])
    p.add_argument(
        "--configs",
        nargs="+",
        default=[
            "plain",
            "metagrad-subspace/task1",
            "metagrad-subspace/task2",
            "metagrad-anchored/task1",
            "metagrad-anchored/task2",
            "metagrad-paper/task1",
            "metagrad-paper/task2",
            "metagrad-replay/task1",
            "metagrad-replay/task2",
            "ewc/task2",
            "si/task2",
            "mas/task2",
            "gpm/task2",
            "agem/task2",
            "er/task2",
        ],
    )
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds per model")
    p.add_argument("--steps", type=int, default=40, help="steps per fit (small models)")
    p.add_argument("--transformer-steps", type=int, default=8)
    p.add_argument("--transformer-rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=3, help="steps discarded at each fit's start")
    p.add_argument("--batch-size", type=int, default=64, help="MLP / CNN batch")
    p.add_argument("--transformer-batch", type=int, default=20, help="sequences of 35 tokens")
    p.add_argument("--setup-steps", type=int, default=20, help="task-1 steps before task 2")
    p.add_argument("--sizes", nargs="*", type=float, default=[1e5, 1e6, 1e7, 1e8])
    p.add_argument("--scaling-rounds", type=int, default=3)
    p.add_argument("--scaling-steps", type=int, default=3)
    p.add_argument("--quality", action="store_true", help="also run the quality comparison")
    p.add_argument("--quality-iters", type=int, default=300)
    p.add_argument("--quality-tasks", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument(
        "--clock",
        choices=list(CLOCKS),
        default="thread",
        help="step time: the main thread's CPU time (robust to other jobs; needs --threads 1) "
        "or wall time",
    )
    p.add_argument(
        "--profile", nargs="*", default=[], help="configs to profile with torch.profiler per model"
    )
    p.add_argument("--profile-steps", type=int, default=30, help="steps of a profiled fit")
    p.add_argument("--quick", action="store_true", help="tiny settings (a smoke test)")
    args = p.parse_args(argv)
    if args.quick:
        args.models = ["mlp"]
        args.configs = ["plain", "metagrad/task1", "metagrad/task2", "metagrad-anchored/task2"]
        args.configs += ["si/task2"]
        args.rounds, args.steps, args.warmup, args.setup_steps = 2, 6, 1, 3
        args.sizes, args.scaling_rounds, args.scaling_steps = [1e4], 1, 2
        args.quality_iters, args.quality_tasks = 12, 2
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    global _clock
    if args.clock == "thread" and args.threads != 1:
        raise SystemExit("--clock thread needs --threads 1 (other threads' work is not counted)")
    _clock = CLOCKS[args.clock]
    silence_lightning()  # per-fit banners and known harmless warnings
    result: dict[str, Any] = {"machine": machine(), "args": vars(args), "trainer": {}}
    for entry in args.models:
        # "mlp@256": the MLP at batch 256 (default batch: --batch-size, --transformer-batch)
        model_name, _, batch = entry.partition("@")
        big = model_name == "transformer"
        default_batch = args.transformer_batch if big else args.batch_size
        result["trainer"][entry] = time_trainer(
            model_name,
            list(args.configs),
            batch_size=int(batch) if batch else default_batch,
            rounds=args.transformer_rounds if big else args.rounds,
            steps=args.transformer_steps if big else args.steps,
            warmup=min(args.warmup, 2) if big else args.warmup,
            setup_steps=min(args.setup_steps, 4) if big else args.setup_steps,
        )
        print_tables({"trainer": {entry: result["trainer"][entry]}})
        if args.profile:
            result.setdefault("profiles", {})[entry] = profile_config(
                model_name, args.profile, int(batch) if batch else default_batch,
                steps=args.profile_steps, setup_steps=min(args.setup_steps, 4) if big else
                args.setup_steps,
            )  # fmt: skip
    sizes = [int(s) for s in args.sizes]
    result["scaling"] = time_scaling(sizes, args.scaling_rounds, args.scaling_steps)
    if args.quality:
        result["quality"] = run_quality(args.quality_tasks, args.quality_iters, 0.03, 256)
    print_tables({"scaling": result["scaling"], "quality": result.get("quality")})
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out}")
    return result


if __name__ == "__main__":
    main()
