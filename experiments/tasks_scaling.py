"""Accuracy and memory of the default predictor as the number of tasks grows (docs/results.md).

Runs ``metagrad`` (``MetaGradCallback()``, the subspace predictor) through the benchmark runner
on a long stream and records, after every task, the protected subspace of each weight matrix
and the floats the predictor holds between tasks per model parameter. Other methods given with
``--methods`` run alongside (accuracy only). The experiment options are those of
``metagrad-benchmark`` (``--preset tasks-scaling`` by default: the Fig. 1 protocol over 10 tasks,
``metagrad`` and ``naive``, seed 0). Example (Permuted Fashion-MNIST, 20 tasks)::

    python experiments/tasks_scaling.py --tasks 20 --methods metagrad naive \\
        --output runs/tasks20
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback

from lightning_metagrad import MetaGradCallback, SubspacePredictor
from lightning_metagrad.benchmark.cli import format_scores, write_json
from lightning_metagrad.benchmark.config import add_config_arguments, config_dict, parse_config
from lightning_metagrad.benchmark.quiet import silence_lightning
from lightning_metagrad.benchmark.runner import run_method, summarise


class SubspaceMemory(Callback):
    """After each task's fit: the default predictor's basis sizes and state floats per
    parameter (the task just trained is folded in when the next fit starts, so the row of
    task i describes tasks 1..i-1, and a final row is added after the last task)."""

    def __init__(self, metagrad: MetaGradCallback, num_params: int) -> None:
        self.metagrad, self.num_params = metagrad, num_params
        self.rows: list[dict[str, Any]] = []

    def record(self) -> None:
        pred = self.metagrad.predictor
        if not isinstance(pred, SubspacePredictor):
            raise TypeError("SubspaceMemory needs the subspace predictor")
        self.rows.append(
            {
                "old_tasks": pred.num_old_tasks,
                "dims": pred.subspace_dims(),
                "state_floats_per_param": pred.state_floats() / self.num_params,
            }
        )

    def on_train_end(self, *args: Any) -> None:
        self.record()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_arguments(parser, preset="tasks-scaling")
    parser.add_argument("--output", type=Path, default=Path("runs/tasks_scaling"))
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    config, args = parse_config(build_parser(), argv)
    silence_lightning()
    out: dict[str, Any] = {"config": config_dict(config), "methods": {}}
    for method in config.methods:
        runs, memory = [], []
        for seed in config.seeds:
            probe: list[SubspaceMemory] = []

            def make_probe(
                stream: Any, model: Any, callbacks: list, probe: list = probe, method: str = method
            ) -> list:
                if method != "metagrad":
                    return []
                num = sum(p.numel() for p in model.parameters())
                probe.append(SubspaceMemory(callbacks[0], num))
                return probe

            runs.append(run_method(config, method, seed, probes=make_probe))
            if probe:
                # Fold the last task in too, to report the memory after all tasks.
                probe[0].metagrad.start_new_task()
                probe[0].record()
                memory.append(probe[0].rows[1:])
        summary = summarise(runs)
        summary["memory"] = memory
        out["methods"][method] = summary
        line = f"{method}: {format_scores(summary)}"
        if memory:
            last = memory[0][-1]
            line += (
                f"  state {last['state_floats_per_param']:.2f} floats/param, dims {last['dims']}"
            )
        print(line, flush=True)
    write_json(args.output, "results.json", out)
    return out


if __name__ == "__main__":
    main()
