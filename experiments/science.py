"""Why the paper's rule fails or works: prediction quality next to ACC/BWT (docs/science.md).

For each MetaGrad predictor and seed, trains the benchmark's stream and, every
``--probe-every`` iterations of tasks >= 2, compares the predicted mean old-task gradient with
the *true* mean old-task gradient at the current parameters -- computed from old training data
for this diagnostic only -- and records the fraction of coordinates the rule zeroed, the
predictor's held-out reconstruction error and the largest |theta|.

The experiment options are those of ``metagrad-benchmark`` (``--preset fig1``, the paper's
Fig. 1 protocol on Permuted Fashion-MNIST, by default; ``--methods`` is replaced by
``--predictors``)::

    python experiments/science.py --dataset fashion_mnist --root ../shared/data \
        --predictors paper anchored replay --seeds 0 1 2 --output runs/science
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_metagrad import MetaGradCallback
from lightning_metagrad.benchmark.cli import format_scores, write_json
from lightning_metagrad.benchmark.config import add_config_arguments, config_dict, parse_config
from lightning_metagrad.benchmark.quiet import silence_lightning
from lightning_metagrad.benchmark.runner import first_samples, run_method, summarise

PREDICTORS = ("paper", "anchored", "replay")


class OldGradientProbe(Callback):
    """Compares the callback's prediction with the true mean old-task gradient."""

    def __init__(self, stream: Any, metagrad: MetaGradCallback, every: int, samples: int):
        self.stream, self.metagrad, self.every, self.samples = stream, metagrad, every, samples
        self.rows: list[dict[str, Any]] = []
        self.iteration = 0
        self._old: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _old_data(self, task: int) -> tuple[torch.Tensor, torch.Tensor]:
        if task not in self._old:
            self._old[task] = first_samples(self.stream, task, self.samples, split="train")
        return self._old[task]

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
        self.iteration += 1
        task = self.metagrad.task_index
        if task == 0 or trainer.global_step % self.every != 0:
            return
        params = [p for p in pl_module.parameters() if p.requires_grad]
        theta = torch.cat([p.detach().reshape(-1) for p in params])
        true = torch.zeros_like(theta)
        for old in range(task):
            x, y = self._old_data(old)
            loss = nn.functional.cross_entropy(pl_module(x.to(theta.device)), y.to(theta.device))
            grads = torch.autograd.grad(loss, params)
            true += torch.cat([g.reshape(-1) for g in grads]) / task
        predicted = self.metagrad.predict_old_gradient(theta)
        agree = (true * predicted > 0).float()
        nonzero = true != 0
        metrics = trainer.callback_metrics
        self.rows.append(
            {
                "iteration": self.iteration,
                "task": task,
                "sign_agreement": float(agree[nonzero].mean()),
                "weighted_sign_agreement": float((agree * true.abs()).sum() / true.abs().sum()),
                "cosine": float(nn.functional.cosine_similarity(true, predicted, 0)),
                "zeroed_fraction": float(metrics.get("metagrad/zeroed_fraction", float("nan"))),
                "meta_rel_error": float(metrics.get("metagrad/meta_rel_error", float("nan"))),
                "max_abs_theta": float(theta.abs().max()),
            }
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_config_arguments(parser, preset="fig1", exclude=("methods", "strengths"))
    parser.add_argument("--predictors", nargs="+", default=list(PREDICTORS), choices=PREDICTORS)
    parser.add_argument("--probe-every", type=int, default=250)
    parser.add_argument("--probe-samples", type=int, default=2000)
    parser.add_argument("--output", type=Path, default=Path("runs/science"))
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    config, args = parse_config(build_parser(), argv)
    silence_lightning()
    script_args = {k: v for k, v in vars(args).items() if k != "output"}  # preset, probes
    out: dict[str, Any] = {"config": config_dict(config), "args": script_args, "predictors": {}}
    for name in args.predictors:
        method = f"metagrad-{name}"
        runs, probes = [], []
        for seed in config.seeds:
            holder: list[OldGradientProbe] = []

            def make_probe(
                stream: Any, model: Any, callbacks: list, holder: list = holder
            ) -> list[Callback]:
                probe = OldGradientProbe(stream, callbacks[0], args.probe_every, args.probe_samples)
                holder.append(probe)
                return [probe]

            runs.append(run_method(config, method, seed, probes=make_probe))
            probes.append(holder[0].rows)
            last = [round(v, 3) for v in runs[-1]["acc_matrix"][-1]]
            print(f"{method} seed {seed}: R[-1] = {last}")
        summary = summarise(runs)
        flat = [row for rows in probes for row in rows]

        def mean(key: str, rows: list = flat) -> float:
            values = [r[key] for r in rows if r[key] == r[key]]
            return statistics.fmean(values) if values else float("nan")

        summary["probe"] = {
            key: mean(key)
            for key in (
                "sign_agreement",
                "weighted_sign_agreement",
                "cosine",
                "zeroed_fraction",
                "meta_rel_error",
            )
        }
        summary["probe"]["max_abs_theta"] = max((r["max_abs_theta"] for r in flat), default=None)
        summary["probe_rows"] = probes
        del summary["per_seed"]
        out["predictors"][name] = summary
        p = summary["probe"]
        print(
            f"{name:<9} {format_scores(summary)}  sign agreement {p['sign_agreement']:.3f} "
            f"(weighted {p['weighted_sign_agreement']:.3f})  cosine {p['cosine']:+.3f}  zeroed "
            f"{p['zeroed_fraction']:.3f}  rel. error {p['meta_rel_error']:.3f}  "
            f"max|θ| {p['max_abs_theta']}"
        )
    write_json(args.output, "science.json", out)
    return out


if __name__ == "__main__":
    main()
