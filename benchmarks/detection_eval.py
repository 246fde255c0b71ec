"""Evaluate automatic task-switch detection on task-free streams (docs/detection.md).

A permuted stream is flattened into one long ``fit`` whose batches carry no task id; the task
changes at known iterations, abruptly or gradually (a linear mix of old and new task over
``--blur`` iterations). Reports detection delay, false switches per 10k iterations and missed
switches, and the final ACC/BWT of MetaGrad with detected vs given boundaries.

    python benchmarks/detection_eval.py --datasets digits fashion_mnist --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from lightning_metagrad import AutoBoundaries, MetaGradCallback
from lightning_metagrad.benchmark import MLPClassifier
from lightning_metagrad.data import PermutedStream
from lightning_metagrad.metrics import average_accuracy, backward_transfer


def task_batches(stream: PermutedStream, task: int, count: int) -> list[dict[str, Any]]:
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


def build_stream(
    stream: PermutedStream, tasks: int, per_task: int, blur: int, seed: int
) -> list[dict[str, Any]]:
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


def accuracy_row(model: MLPClassifier, stream: PermutedStream, tasks: int) -> list[float]:
    return [model.accuracy(stream.task_dataloader(j, split="test")) for j in range(tasks)]


def run(
    dataset: str,
    root: str,
    seed: int,
    tasks: int,
    per_task: int,
    blur: int,
    given: bool,
    lr: float,
    signal: str = "error",
) -> dict[str, Any]:
    pl.seed_everything(seed, verbose=False)
    stream = PermutedStream(dataset=dataset, root=root, num_tasks=tasks, seed=seed)
    stream.setup("fit")
    model = MLPClassifier(input_dim=stream.input_dim, num_classes=stream.num_classes, lr=lr)
    matrix: list[list[float]] = []
    trainer_kw: dict[str, Any] = dict(
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    if given:
        cb = MetaGradCallback(predictor="anchored")
        for t in range(tasks):
            loader = DataLoader(task_batches(stream, t, per_task), batch_size=None)
            pl.Trainer(max_steps=per_task, callbacks=[cb], **trainer_kw).fit(model, loader)
            matrix.append(accuracy_row(model, stream, tasks))
        switches: list[int] = []
    else:
        cb = MetaGradCallback(predictor="anchored", task_boundaries=AutoBoundaries(signal=signal))
        batches = build_stream(stream, tasks, per_task, blur, seed)

        class AtTaskEnds(pl.Callback):  # the accuracy matrix, at the true task ends
            def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
                if trainer.global_step % per_task == 0:
                    matrix.append(accuracy_row(model, stream, tasks))

        pl.Trainer(max_steps=len(batches), callbacks=[cb, AtTaskEnds()], **trainer_kw).fit(
            model, DataLoader(batches, batch_size=None)
        )
        switches = cb.detected_switches
    return {"switches": switches, "tasks_found": cb.task_index + 1, "matrix": matrix}


def score(switches: list[int], true: list[int], total: int, tolerance: int) -> dict[str, Any]:
    """Match each true switch to the first detection within ``tolerance`` after it."""
    delays, used = [], set()
    for t in true:
        hits = [s for s in switches if t - tolerance // 4 <= s <= t + tolerance and s not in used]
        if hits:
            used.add(hits[0])
            delays.append(hits[0] - t)
    false = len([s for s in switches if s not in used])
    return {
        "delays": delays,
        "missed": len(true) - len(delays),
        "false": false,
        "false_per_10k": 1e4 * false / total,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["digits", "fashion_mnist"])
    parser.add_argument("--root", default="../shared/data")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--tasks", type=int, default=5)
    parser.add_argument("--per-task", type=int, default=1000)
    parser.add_argument("--blur", type=int, default=200)
    parser.add_argument("--lr", type=float, default=0.03)
    parser.add_argument("--signal", choices=["error", "loss"], default="error")
    parser.add_argument("--skip-given", action="store_true", help="no given-boundary runs")
    parser.add_argument("--output", type=Path, default=Path("runs/detection"))
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    true = [args.per_task * i for i in range(1, args.tasks)]
    total = args.per_task * args.tasks
    results: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "runs": []}
    rows = []
    for dataset in args.datasets:
        for kind, blur in (("abrupt", 0), ("blurry", args.blur)):
            scores, accs, bwts = [], [], []
            for seed in args.seeds:
                r = run(
                    dataset, args.root, seed, args.tasks, args.per_task, blur, False, args.lr,
                    args.signal,
                )  # fmt: skip
                s = score(r["switches"], true, total, tolerance=args.per_task // 2)
                r.update(dataset=dataset, kind=kind, seed=seed, score=s)
                results["runs"].append(r)
                scores.append(s)
                accs.append(average_accuracy(torch.tensor(r["matrix"])))
                bwts.append(backward_transfer(torch.tensor(r["matrix"])))
            delays = [d for s in scores for d in s["delays"]]
            rows.append(
                {
                    "dataset": dataset,
                    "kind": kind,
                    "median_delay": statistics.median(delays) if delays else None,
                    "max_delay": max(delays) if delays else None,
                    "missed": sum(s["missed"] for s in scores),
                    "false_per_10k": statistics.fmean(s["false_per_10k"] for s in scores),
                    "acc_detected": statistics.fmean(accs),
                    "bwt_detected": statistics.fmean(bwts),
                }
            )
            print(rows[-1], flush=True)
        if args.skip_given:
            continue
        accs, bwts = [], []
        for seed in args.seeds:
            r = run(dataset, args.root, seed, args.tasks, args.per_task, 0, True, args.lr)
            m = torch.tensor(r["matrix"])
            accs.append(average_accuracy(m))
            bwts.append(backward_transfer(m))
            r.update(dataset=dataset, kind="given", seed=seed)
            results["runs"].append(r)
        rows.append(
            {
                "dataset": dataset,
                "kind": "given boundaries",
                "acc_given": statistics.fmean(accs),
                "bwt_given": statistics.fmean(bwts),
            }
        )
        print(rows[-1], flush=True)
    results["table"] = rows
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "detection.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
