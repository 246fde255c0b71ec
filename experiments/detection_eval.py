"""Evaluate automatic task-switch detection on task-free streams (docs/detection.md).

Each stream is flattened into one long ``fit`` whose batches carry no task id; the task
changes at known optimizer steps, abruptly or gradually (a sample-wise linear mix of the two
tasks over ``blur`` steps centred on the switch). Input shifts: Permuted digits, Permuted
Fashion-MNIST, Rotated Fashion-MNIST and a synthetic one (Gaussians in task-specific
subspaces, below). Concept shifts, the same inputs with new labels (issue 25): ``concept``
(a new random linear teacher per task on 24-D standard-normal inputs, MLP 24-128-10),
``labels`` (digits with the labels permuted per task) and ``small`` (a new random
one-hidden-layer teacher per task on 8-D inputs, MLP 8-128-10).

Three modes, each writing ``<output>/<mode>.json``:

* ``switches``: detection for every stream x switch kind x task length x seed; switches
  found, delays, false switches per 10k steps, and ACC/BWT at the true task ends.
* ``events``: one task with a within-task event (learning-rate drop, warm-up schedule,
  2-batch loss spike, batch-size change); every detection is a false switch.
* ``given``: the same streams with the boundaries given (one ``fit`` per task), for ACC/BWT.

``report FILE...`` prints the markdown tables of saved results.

    python experiments/detection_eval.py switches --signals novelty --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from lightning_metagrad import AutoBoundaries, MetaGradCallback
from lightning_metagrad.benchmark import MLPClassifier
from lightning_metagrad.benchmark.quiet import quiet_trainer_kwargs, silence_lightning
from lightning_metagrad.boundaries import ChangePointDetector, default_detector
from lightning_metagrad.boundaries.signals import DirectionSignal
from lightning_metagrad.boundaries.sources import TaskBoundarySource
from lightning_metagrad.data import PermutedStream, RotatedStream
from lightning_metagrad.metrics import average_accuracy, backward_transfer

STREAMS = ("digits", "fashion", "rotated", "synthetic", "concept", "labels", "small")
#: name -> AutoBoundaries arguments; "novelty+loss": the loss as auxiliary evidence;
#: "novelty+direction": either detector fires (not evidence)
SIGNALS: dict[str, dict[str, Any]] = {
    "novelty": {"signal": "novelty"},
    "loss": {"signal": "loss"},
    "error": {"signal": "error"},
    "novelty+loss": {"signal": "novelty", "evidence": {"loss": 0.5}},
    "novelty+loss1": {"signal": "novelty", "evidence": {"loss": 1.0}},
    "direction": {"signal": "direction"},
    "direction+loss": {"signal": "direction", "evidence": {"loss": 0.5}},
    "loss+direction": {"signal": "loss", "evidence": {"direction": 1.0}},
    # A variant: the direction of the last ~8 steps' mean (``DirectionSignal(recent=8)``),
    # tested for a 5-fold jump held 8 steps, or an 8-fold one held 2.
    "direction-r8": {
        "signal": "direction",
        "_direction": {"recent": 8.0},
        "_shape": {"min_relative_jump": 4.0, "fast_jump": 7.0},
    },
    # Either detector (issue 25): a switch when the novelty's detector or direction-r8's fires
    # (``AutoBoundaries(signal="novelty+direction")``, both restart at a switch).
    "novelty+direction": {"signal": "novelty+direction"},
    # The default with the direction's task mean forgetting with a half-life of 20 steps (not
    # 100): under the old tasks' projection the blocked part of the raw gradient turns slowly
    # as the task learns, which the longer mean took for a change (docs/detection.md).
    "novelty+direction-h20": {
        "signal": "novelty+direction",
        "_direction": {"halflife": 20.0, "recent": 8.0, "normalise": True},
    },
    # Either of three: the novelty, the direction, or the novelty of the layers that read the
    # data (``InputNoveltySignal``, ``SubspaceNovelty(lag=3)``).
    "novelty+direction+inputs": {"signal": "novelty+direction+inputs"},
    # ``AutoBoundaries()`` as it is built today: the default of ``task_boundaries="auto"``.
    "auto": {},
    # The same with the direction normalised by its value expected from gradient noise alone
    # (``DirectionSignal(recent=8, normalise=True)``; docs/detection.md, "Noise-normalised").
    "novelty+direction-n": {
        "signal": "novelty+direction",
        "_direction": {"recent": 8.0, "normalise": True},
    },
}


def boundaries(signal: str) -> AutoBoundaries:
    """The ``AutoBoundaries`` of a :data:`SIGNALS` entry (``_direction``: the direction
    signal's arguments; ``_shape``: detector arguments over :func:`default_detector`'s)."""
    spec = dict(SIGNALS[signal])
    direction, shape = spec.pop("_direction", None), spec.pop("_shape", None)
    if shape:
        base = default_detector(spec["signal"], spec.pop("evidence", None))
        keys = ("window", "patience", "min_relative_jump", "halflife", "fast_jump", "warmup")
        kwargs = {k: getattr(base, k) for k in keys}
        kwargs.update(max_warmup=base.max_warmup, cooldown=base.cooldown, **shape)
        spec["detector"] = ChangePointDetector(signal=base.signal, weights=base.weights, **kwargs)
    if direction:
        spec["direction"] = DirectionSignal(**direction)
    return AutoBoundaries(**spec)


EVENTS = ("lr_drop", "warmup", "loss_spike", "input_spike", "batch_size")


class SubspaceGaussians:
    """A synthetic stream: 10-class labels of a fixed linear teacher on a 16-D standard
    Gaussian latent ``z``; task ``t`` shows it in its own random 16-D subspace of a 64-D input,
    ``x = E_t z + 0.05 * noise`` (``E_t`` orthonormal columns, drawn per task). The same
    concept embedded differently, like a pixel permutation, but in random directions: two
    tasks' input subspaces overlap by about a quarter.

    Duck-types the parts of a :class:`~lightning_metagrad.data.TaskStream` used here.
    """

    def __init__(self, num_tasks: int, seed: int, batch_size: int = 64) -> None:
        self.num_tasks, self.batch_size, self.input_dim, self.num_classes = (
            num_tasks, batch_size, 64, 10,
        )  # fmt: skip
        gen = torch.Generator().manual_seed(10_000 + seed)
        teacher = torch.randn(10, 16, generator=gen)
        embeddings = [
            torch.linalg.qr(torch.randn(64, 16, generator=gen))[0] for _ in range(num_tasks)
        ]
        self.data: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
        for task in range(num_tasks):
            for split, n in (("train", 6400), ("test", 2000)):
                z = torch.randn(n, 16, generator=gen)
                x = z @ embeddings[task].T + 0.05 * torch.randn(n, 64, generator=gen)
                self.data[task, split] = (x, (z @ teacher.T).argmax(1))
        self.task = 0
        self.gen = torch.Generator().manual_seed(seed)

    def setup(self, stage: str | None = None) -> None:
        pass

    def set_task(self, task: int) -> None:
        self.task = task

    def train_dataloader(self) -> list[dict[str, torch.Tensor]]:
        x, y = self.data[self.task, "train"]
        order = torch.randperm(len(y), generator=self.gen)
        return [{"x": x[idx], "y": y[idx]} for idx in order.split(self.batch_size)]

    def task_dataloader(self, task: int, split: str = "test") -> list[dict[str, torch.Tensor]]:
        x, y = self.data[task, split]
        return [{"x": x[i : i + 500], "y": y[i : i + 500]} for i in range(0, len(y), 500)]


class ConceptShift(SubspaceGaussians):
    """A concept-shift stream: the same ``input_dim``-D standard-normal inputs in every task,
    10-class labels of a new random teacher per task (``teacher="linear"``: ``argmax W_t x``;
    ``"mlp"``: a random ``input_dim``-64-10 tanh network). The learner's hidden layer is
    ``hidden_sizes``. Only the mapping changes, so a layer's input distribution does not."""

    def __init__(
        self, num_tasks: int, seed: int, input_dim: int = 24, teacher: str = "linear",
        batch_size: int = 64,
    ) -> None:  # fmt: skip
        self.num_tasks, self.batch_size, self.input_dim, self.num_classes = (
            num_tasks, batch_size, input_dim, 10,
        )  # fmt: skip
        self.hidden_sizes = (128,)
        gen = torch.Generator().manual_seed(20_000 + seed)
        self.data = {}
        for task in range(num_tasks):
            if teacher == "linear":
                w = torch.randn(10, input_dim, generator=gen)
                label = lambda x, w=w: (x @ w.T).argmax(1)  # noqa: E731
            else:
                w1 = torch.randn(64, input_dim, generator=gen) / input_dim**0.5
                w2 = torch.randn(10, 64, generator=gen)
                label = lambda x, w1=w1, w2=w2: (torch.tanh(x @ w1.T * 2) @ w2.T).argmax(1)  # noqa: E731
            for split, n in (("train", 6400), ("test", 2000)):
                x = torch.randn(n, input_dim, generator=gen)
                self.data[task, split] = (x, label(x))
        self.task = 0
        self.gen = torch.Generator().manual_seed(seed)


class PermutedLabels(SubspaceGaussians):
    """The digits (8x8, flattened) with the 10 labels permuted per task (task 0: as given):
    the same inputs, a new mapping."""

    def __init__(self, num_tasks: int, seed: int, batch_size: int = 64) -> None:
        from lightning_metagrad.data import load_splits

        splits = load_splits("digits")
        self.num_tasks, self.batch_size, self.input_dim, self.num_classes = (
            num_tasks, batch_size, 64, 10,
        )  # fmt: skip
        gen = torch.Generator().manual_seed(30_000 + seed)
        perms = [torch.arange(10)] + [
            torch.randperm(10, generator=gen) for _ in range(1, num_tasks)
        ]
        self.data = {}
        for task in range(num_tasks):
            for split, part in (("train", splits.train), ("test", splits.test)):
                self.data[task, split] = (
                    part.x.reshape(len(part.y), -1).float(),
                    perms[task][part.y],
                )
        self.task = 0
        self.gen = torch.Generator().manual_seed(seed)


def make_stream(name: str, tasks: int, seed: int, root: str) -> Any:
    if name == "digits":
        stream: Any = PermutedStream(dataset="digits", num_tasks=tasks, seed=seed)
    elif name == "fashion":
        stream = PermutedStream(dataset="fashion_mnist", root=root, num_tasks=tasks, seed=seed)
    elif name == "rotated":  # 0, 60, 120, 180 degrees for 4 tasks
        stream = RotatedStream(dataset="fashion_mnist", root=root, num_tasks=tasks, seed=seed)
    elif name == "synthetic":
        stream = SubspaceGaussians(tasks, seed)
    elif name == "concept":
        stream = ConceptShift(tasks, seed, input_dim=24, teacher="linear")
    elif name == "small":
        stream = ConceptShift(tasks, seed, input_dim=8, teacher="mlp")
    elif name == "labels":
        stream = PermutedLabels(tasks, seed)
    else:
        raise ValueError(f"unknown stream {name!r}; one of {STREAMS}")
    stream.setup("fit")
    return stream


def task_batches(stream: Any, task: int, count: int) -> list[dict[str, Any]]:
    stream.set_task(task)
    out: list[dict[str, Any]] = []
    while len(out) < count:
        for batch in stream.train_dataloader():
            if len(batch["y"]) != stream.batch_size:
                continue  # equal sizes, so blurry switches can mix batches sample by sample
            out.append(batch)
            if len(out) == count:
                break
    return out


def build_stream(stream: Any, tasks: int, per_task: int, blur: int, seed: int) -> list[dict]:
    """Batches of one silent stream; with ``blur`` > 0 each switch is a linear mix."""
    per = [task_batches(stream, t, per_task) for t in range(tasks)]
    gen = torch.Generator().manual_seed(seed)
    batches: list[dict[str, Any]] = []
    for t in range(tasks):
        for i, batch in enumerate(per[t]):
            start = per_task - blur // 2
            if t + 1 < tasks and blur and i >= start:
                # Blurry: the next task's share rises linearly to 1/2 at the switch...
                share = (i - start + 1) / (blur + 1)
                take = torch.rand(len(batch["y"]), generator=gen) < share
                nxt = per[t + 1][i]
                batch = {
                    k: torch.where(take.view(-1, *[1] * (v.dim() - 1)), nxt[k], v)
                    for k, v in batch.items()
                }
            if t > 0 and blur and i < blur // 2:
                # ...and on to 1 after it.
                share = 0.5 + (i + 1) / (blur + 1)
                take = torch.rand(len(batch["y"]), generator=gen) >= share
                prev = per[t - 1][per_task - 1 - i]
                batch = {
                    k: torch.where(take.view(-1, *[1] * (v.dim() - 1)), prev[k], v)
                    for k, v in batch.items()
                }
            batches.append({"x": batch["x"], "y": batch["y"]})
    return batches


def silent_run(
    name: str, kind: str, per_task: int, seed: int, root: str, tasks: int = 4
) -> tuple[Any, list[dict], str | None]:
    """Seed, then one run's stream, its batches and the model's learning-rate schedule:
    ``kind`` ``"abrupt"`` or ``"blurry"`` (``tasks`` tasks of ``per_task`` steps), or
    ``"event:<name>"`` (one task of ``per_task`` steps with that within-task event)."""
    pl.seed_everything(seed, verbose=False)
    if kind.startswith("event:"):
        event = kind.split(":", 1)[1]
        stream = make_stream(name, 1, seed, root)
        batches = with_event(build_stream(stream, 1, per_task, 0, seed), event, seed)
        return stream, batches, event if event in ("lr_drop", "warmup") else None
    stream = make_stream(name, tasks, seed, root)
    blur = blur_of(per_task) if kind == "blurry" else 0
    return stream, build_stream(stream, tasks, per_task, blur, seed), None


class Scheduled(MLPClassifier):
    """The benchmark MLP with a within-task learning-rate schedule (``lr_drop``: /10 half-way;
    ``warmup``: linear from 0 over the first quarter)."""

    def __init__(self, *args: Any, schedule: str | None = None, steps: int = 1, **kw: Any):
        super().__init__(*args, **kw)
        self.schedule, self.steps = schedule, steps

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        opt = super().configure_optimizers()
        if self.schedule is None:
            return opt
        half, quarter = self.steps // 2, max(self.steps // 4, 1)
        if self.schedule == "lr_drop":
            rule = lambda s: 1.0 if s < half else 0.1  # noqa: E731
        else:
            rule = lambda s: min(1.0, (s + 1) / quarter)  # noqa: E731
        sched = torch.optim.lr_scheduler.LambdaLR(opt, rule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def with_event(batches: list[dict], event: str, seed: int) -> list[dict]:
    """The batches with a within-task ``event`` half-way (schedules act in the model)."""
    out = list(batches)
    mid = len(out) // 2
    gen = torch.Generator().manual_seed(seed)
    if event in ("loss_spike", "input_spike"):  # two batches of random labels
        for i in (mid, mid + 1):
            x, y = out[i]["x"], out[i]["y"]
            x = x * 5 if event == "input_spike" else x  # and, here, inputs scaled 5-fold
            out[i] = {"x": x, "y": torch.randint(0, 10, y.shape, generator=gen)}
    elif event == "batch_size":  # from 64 to 16 samples a batch
        out = out[:mid] + [{k: v[:16] for k, v in b.items()} for b in out[mid:]]
    return out


TRAINER: dict[str, Any] = quiet_trainer_kwargs(accelerator="cpu", devices=1)


def accuracy_row(model: MLPClassifier, stream: Any, tasks: int) -> list[float]:
    return [model.accuracy(stream.task_dataloader(j, split="test")) for j in range(tasks)]


#: The models' optimizer (``--optimizer``).
OPTIMIZER = "sgd"


def add_training_options(parser: argparse.ArgumentParser, output: str) -> None:
    """The options every detection script takes: ``--optimizer``, ``--lr``, ``--root`` and
    ``--output`` (default ``output``)."""
    parser.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd",
                        help="the models' optimizer (adam: pass e.g. --lr 0.001)")  # fmt: skip
    parser.add_argument("--lr", type=float, default=0.03, help="with adam, e.g. 0.001")
    parser.add_argument("--root", default="../shared/data")
    parser.add_argument("--output", type=Path, default=Path(output))


def model_for(stream: Any, lr: float, schedule: str | None = None, steps: int = 1) -> Scheduled:
    return Scheduled(
        input_dim=stream.input_dim, num_classes=stream.num_classes,
        hidden_sizes=getattr(stream, "hidden_sizes", (128, 128)),
        lr=lr, schedule=schedule, steps=steps, optimizer=OPTIMIZER,
    )  # fmt: skip


def detect(
    stream: Any, batches: list[dict], signal: str, lr: float, per_task: int | None,
    tasks: int, schedule: str | None = None, source: AutoBoundaries | None = None,
) -> dict[str, Any]:  # fmt: skip
    """One silent ``fit``; the detected switches and the accuracy matrix at true task ends.
    ``source``: a boundary source to use instead of ``boundaries(signal)``."""
    model = model_for(stream, lr, schedule, len(batches))
    matrix: list[list[float]] = []

    class AtTaskEnds(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
            if per_task and trainer.global_step % per_task == 0:
                matrix.append(accuracy_row(model, stream, tasks))

    cb = MetaGradCallback(task_boundaries=boundaries(signal) if source is None else source)
    pl.Trainer(max_steps=len(batches), callbacks=[cb, AtTaskEnds()], **TRAINER).fit(
        model, DataLoader(batches, batch_size=None)
    )
    out: dict[str, Any] = {"switches": list(cb.detected_switches), "matrix": matrix}
    detector = getattr(cb.boundaries, "detector", None)
    if hasattr(detector, "switch_signals"):  # an EitherDetector: which detector fired
        out["fired_by"] = list(detector.switch_signals)
    if getattr(cb.boundaries, "batch_size_changes", None):  # where the detector restarted
        out["batch_size_changes"] = list(cb.boundaries.batch_size_changes)
    return out


def score(switches: list[int], true: list[int], blur: int, per_task: int) -> dict[str, Any]:
    """Each true switch is matched to the first unmatched detection from half a blend (and
    10 steps) before it to ``min(per_task / 2, 250)`` steps after; the rest are false."""
    delays, used = [], set()
    for t in true:
        lo, hi = t - blur // 2 - 10, t + min(per_task // 2, 250)
        hits = [s for s in switches if lo <= s <= hi and s not in used]
        if hits:
            used.add(hits[0])
            delays.append(hits[0] - t)
    false = len([s for s in switches if s not in used])
    return {"delays": delays, "missed": len(true) - len(delays), "false": false}


def blur_of(per_task: int) -> int:
    return min(200, per_task // 2)


def save(args: argparse.Namespace, result: dict[str, Any]) -> None:
    """Write ``<output>/<mode>.json`` (after every row, so a killed run loses one row)."""
    result["args"] = {k: str(v) for k, v in vars(args).items()}
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / f"{args.mode}.json").write_text(json.dumps(result, indent=1))


def mode_switches(args: argparse.Namespace) -> dict[str, Any]:
    path = args.output / "switches.json"
    old = json.loads(path.read_text()) if args.resume and path.exists() else {}
    runs, rows = old.get("runs", []), old.get("table", [])
    done = {(r["signal"], r["stream"], r["kind"], r["per_task"]) for r in rows}
    for signal in args.signals:
        for name in args.streams:
            for kind in args.kinds:
                for per_task in args.lengths:
                    if (signal, name, kind, per_task) in done:
                        continue
                    blur = blur_of(per_task) if kind == "blurry" else 0
                    true = [per_task * i for i in range(1, args.tasks)]
                    scores, accs, bwts = [], [], []
                    for seed in args.seeds:
                        stream, batches, _ = silent_run(
                            name, kind, per_task, seed, args.root, args.tasks
                        )
                        t0 = time.time()
                        r = detect(stream, batches, signal, args.lr, per_task, args.tasks)
                        s = score(r["switches"], true, blur, per_task)
                        m = torch.tensor(r["matrix"])
                        runs.append({**r, "signal": signal, "stream": name, "kind": kind,
                                     "per_task": per_task, "seed": seed, "score": s,
                                     "seconds": time.time() - t0})  # fmt: skip
                        scores.append(s)
                        accs.append(average_accuracy(m))
                        bwts.append(backward_transfer(m))
                    delays = [d for s in scores for d in s["delays"]]
                    false = sum(s["false"] for s in scores)
                    rows.append({
                        "signal": signal, "stream": name, "kind": kind, "per_task": per_task,
                        "found": f"{len(delays)}/{len(true) * len(args.seeds)}",
                        "median_delay": statistics.median(delays) if delays else None,
                        "max_delay": max(delays) if delays else None,
                        "false_per_10k": 1e4 * false / (per_task * args.tasks * len(args.seeds)),
                        "acc": statistics.fmean(accs), "bwt": statistics.fmean(bwts),
                    })  # fmt: skip
                    print(rows[-1], flush=True)
                    save(args, {"runs": runs, "table": rows})
    return {"runs": runs, "table": rows}


def mode_events(args: argparse.Namespace) -> dict[str, Any]:
    runs, rows = [], []
    for signal in args.signals:
        for name in args.streams:
            for event in args.events:
                false = 0
                for seed in args.seeds:
                    stream, batches, schedule = silent_run(
                        name, f"event:{event}", args.steps, seed, args.root
                    )
                    r = detect(stream, batches, signal, args.lr, None, 1, schedule)
                    runs.append({**r, "signal": signal, "stream": name, "event": event,
                                 "seed": seed})  # fmt: skip
                    false += len(r["switches"])
                rows.append({"signal": signal, "stream": name, "event": event,
                             "false_switches": false, "runs": len(args.seeds)})  # fmt: skip
                print(rows[-1], flush=True)
                save(args, {"runs": runs, "table": rows})
    return {"runs": runs, "table": rows}


class AtSteps(TaskBoundarySource):
    """Given boundaries inside one fit: a new task every ``per_task`` batches."""

    name = "at-steps"

    def __init__(self, per_task: int) -> None:
        self.per_task, self.seen = per_task, 0

    def on_train_batch(self, batch: Any, batch_idx: int) -> bool:
        self.seen += 1
        return self.seen > 1 and (self.seen - 1) % self.per_task == 0


def given_in_one_fit(
    stream: Any, per_task: int, tasks: int, lr: float, blur: int = 0, seed: int = 0
) -> list[list[float]]:
    """``given --one-fit``: the tasks' batches in one fit, the boundaries at the true steps, so
    the optimizer's state (Adam's moments) carries over as with detection. With ``blur``
    (``--blurry``) the batches are the blurry stream's, the boundaries at the blends'
    middles."""
    batches = build_stream(stream, tasks, per_task, blur, seed)
    model = model_for(stream, lr)
    matrix: list[list[float]] = []

    class AtTaskEnds(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
            if trainer.global_step % per_task == 0:
                matrix.append(accuracy_row(model, stream, tasks))

    cb = MetaGradCallback(task_boundaries=AtSteps(per_task))
    pl.Trainer(max_steps=len(batches), callbacks=[cb, AtTaskEnds()], **TRAINER).fit(
        model, DataLoader(batches, batch_size=None)
    )
    assert cb.task_index == tasks - 1, cb.task_index
    return matrix


def mode_given(args: argparse.Namespace) -> dict[str, Any]:
    runs, rows = [], []
    for name in args.streams:
        for per_task in args.lengths:
            accs, bwts = [], []
            for seed in args.seeds:
                pl.seed_everything(seed, verbose=False)
                stream = make_stream(name, args.tasks, seed, args.root)
                if args.one_fit:
                    blur = blur_of(per_task) if args.blurry else 0
                    matrix = given_in_one_fit(stream, per_task, args.tasks, args.lr, blur, seed)
                    m = torch.tensor(matrix)
                    accs.append(average_accuracy(m))
                    bwts.append(backward_transfer(m))
                    runs.append({"stream": name, "per_task": per_task, "seed": seed,
                                 "matrix": matrix, "false_switches": []})  # fmt: skip
                    continue
                model = model_for(stream, args.lr)
                # task_boundaries="fit": one fit per task; --with-auto: and the signal's
                # detector inside each fit (every detection is then a false switch).
                spec = ["fit", boundaries(args.signals[0])] if args.with_auto else "fit"
                cb = MetaGradCallback(task_boundaries=spec)
                matrix, detected = [], []
                for t in range(args.tasks):
                    loader = DataLoader(task_batches(stream, t, per_task), batch_size=None)
                    pl.Trainer(max_steps=per_task, callbacks=[cb], **TRAINER).fit(model, loader)
                    matrix.append(accuracy_row(model, stream, args.tasks))
                    detected += [t * per_task + s for s in cb.detected_switches[len(detected) :]]
                m = torch.tensor(matrix)
                accs.append(average_accuracy(m))
                bwts.append(backward_transfer(m))
                runs.append({"stream": name, "per_task": per_task, "seed": seed, "matrix": matrix,
                             "false_switches": detected})  # fmt: skip
            false = sum(len(r["false_switches"]) for r in runs[-len(args.seeds) :])
            rows.append({"stream": name, "per_task": per_task, "acc": statistics.fmean(accs),
                         "bwt": statistics.fmean(bwts), "false_switches": false})  # fmt: skip
            print(rows[-1], flush=True)
    return {"runs": runs, "table": rows}


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def _paired(
    runs: list[dict[str, Any]], key: tuple, given: dict[tuple, list[list[float]]]
) -> str | None:
    """Detected minus given ACC, seed by seed (the same batches and initial weights, so only
    the detection differs): ``mean +- standard error`` over the seeds both runs have."""
    stream, per_task = key[1], key[3]
    pairs = [
        (r["matrix"], given[stream, per_task, r["seed"]])
        for r in runs
        if (r["signal"], r["stream"], r["kind"], r["per_task"]) == key
        and (stream, per_task, r["seed"]) in given
    ]  # fmt: skip
    diffs = [
        average_accuracy(torch.tensor(a)) - average_accuracy(torch.tensor(b))
        for a, b in pairs
        if len(a) == len(b)
    ]
    if not diffs:
        return None
    se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
    return f"{statistics.fmean(diffs):+.3f} ± {se:.3f}"


def report(paths: list[Path]) -> str:
    """Markdown tables of saved ``switches``/``events``/``given`` results (docs/detection.md);
    a ``switches`` row gets the ACC/BWT of the ``given`` run of the same stream and length,
    and the paired difference of the two, seed by seed ("ΔACC"; for a blurry row the given
    run has no blends, so the pairing is of the same task batches only). A row (signal,
    stream, kind, length) found in several files is taken from the first; the last column
    names the file it came from."""
    loaded = [(p, json.loads(p.read_text())) for p in paths]
    given = {
        (r["stream"], r["per_task"]): r
        for p, d in loaded if p.stem.startswith("given") for r in d["table"]
    }  # fmt: skip
    given_runs = {
        (r["stream"], r["per_task"], r["seed"]): r["matrix"]
        for p, d in loaded if p.stem.startswith("given") for r in d.get("runs", [])
    }  # fmt: skip
    runs_of = {p: d.get("runs", []) for p, d in loaded}
    out = []
    switches: dict[tuple, tuple[dict[str, Any], str, list[dict[str, Any]]]] = {}
    for p, d in loaded:
        if p.stem.startswith("switches"):
            for r in d["table"]:
                key = (r["signal"], r["stream"], r["kind"], r["per_task"])
                switches.setdefault(key, (r, f"{p.parent.name}/{p.name}", runs_of[p]))
    if switches:
        head = ["signal", "stream", "switch", "steps/task", "found", "median delay", "max delay"]
        head += ["false /10k steps", "ACC detected", "ACC given", "ΔACC paired"]
        head += ["BWT detected", "BWT given", "file"]
        out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for key, (r, source, runs) in switches.items():
            g = given.get((r["stream"], r["per_task"]), {})
            cells = [r["signal"], r["stream"], r["kind"], r["per_task"], r["found"]]
            cells += [r["median_delay"], r["max_delay"], r["false_per_10k"], r["acc"]]
            cells += [g.get("acc"), _paired(runs, key, given_runs), r["bwt"], g.get("bwt")]
            cells += [source]
            out.append("| " + " | ".join(_fmt(c) for c in cells) + " |")
    events = [r for p, d in loaded if p.stem.startswith("events") for r in d["table"]]
    if events:
        out += ["", "| signal | stream | event | false switches | runs |", "|---|---|---|---|---|"]
        for r in events:
            cells = [r["signal"], r["stream"], r["event"], r["false_switches"], r["runs"]]
            out.append("| " + " | ".join(_fmt(c) for c in cells) + " |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mode", choices=["switches", "events", "given", "report"])
    parser.add_argument("files", nargs="*", type=Path, help="report: saved <mode>.json files")
    parser.add_argument("--streams", nargs="+", choices=STREAMS, default=list(STREAMS))
    parser.add_argument("--signals", nargs="+", choices=list(SIGNALS), default=["novelty"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--lengths", type=int, nargs="+", default=[200, 500, 1000],
                        help="optimizer steps per task")  # fmt: skip
    parser.add_argument("--kinds", nargs="+", choices=["abrupt", "blurry"],
                        default=["abrupt", "blurry"])  # fmt: skip
    parser.add_argument("--events", nargs="+", choices=EVENTS, default=list(EVENTS))
    parser.add_argument("--steps", type=int, default=800, help="steps of an event run")
    parser.add_argument(
        "--one-fit",
        action="store_true",
        help="given: one fit, boundaries at the true steps (the optimizer's state carries "
        "over, as with detection)",
    )
    parser.add_argument(
        "--blurry",
        action="store_true",
        help="given --one-fit: on the blurry stream's batches, the boundaries at the blends' "
        "middles (pairs with the blurry rows of switches)",
    )
    add_training_options(parser, "runs/detection")
    parser.add_argument("--resume", action="store_true", help="switches: skip rows done")
    parser.add_argument("--with-auto", action="store_true",
                        help="given: also run the first of --signals inside each fit")  # fmt: skip
    args = parser.parse_args()
    if args.mode == "report":
        print(report(args.files))
        return
    global OPTIMIZER
    OPTIMIZER = args.optimizer
    silence_lightning()
    warnings.filterwarnings("ignore", category=UserWarning, module="lightning_metagrad")
    torch.set_num_threads(1)
    t0 = time.time()
    result = {"switches": mode_switches, "events": mode_events, "given": mode_given}[args.mode](
        args
    )
    result["seconds"] = time.time() - t0
    save(args, result)
    print(f"done in {result['seconds']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
