"""How stale is ReplayPredictor's cached old gradient? (docs/science.md, section 3)

Permuted Fashion-MNIST, 2 tasks x 2000 steps, lr 0.03, seed 1, ``predictor="replay"`` with
``refresh_every`` steps between refreshes (default 10). Every 250 steps of task 2 it prints the
cosine of the gradient on 2000 task-1 training images ("true") with (a) the cached old gradient
the rule is using, (b) a fresh gradient on the same stored batches, and (c) the cosine of (a)
with (b). Run: ``python benchmarks/replay_staleness.py [--refresh-every N]``
"""

from __future__ import annotations

import argparse
import logging
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_metagrad import MetaGradCallback, ReplayPredictor
from lightning_metagrad.benchmark.models import MLPClassifier
from lightning_metagrad.data import PermutedStream


def flat_grad(loss: torch.Tensor, params: list[torch.nn.Parameter]) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="../shared/data")
    parser.add_argument("--refresh-every", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    pl.seed_everything(args.seed, verbose=False)
    stream = PermutedStream(dataset="fashion_mnist", root=args.root, num_tasks=2, seed=args.seed)
    model = MLPClassifier(input_dim=784, lr=0.03)
    replay = ReplayPredictor(refresh_every=args.refresh_every)
    cb = MetaGradCallback(predictor=replay)
    xs, ys = [], []
    for batch in stream.task_dataloader(0, "train"):
        xs.append(batch["x"])
        ys.append(batch["y"])
        if sum(len(y) for y in ys) >= 2000:
            break
    x_old, y_old = torch.cat(xs)[:2000], torch.cat(ys)[:2000]
    cos = nn.functional.cosine_similarity

    class Probe(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, m: Any, *rest: Any) -> None:
            if cb.task_index == 0 or trainer.global_step % 250 or replay._cached is None:
                return
            params = list(m.parameters())
            true = flat_grad(nn.functional.cross_entropy(m(x_old), y_old), params)
            stored = replay.memory[0]
            losses = [nn.functional.cross_entropy(m(b["x"]), b["y"]) for b in stored]
            fresh = flat_grad(torch.stack(losses).mean(), params)
            cached = replay._cached
            print(
                f"step {trainer.global_step}: cos(cached, true) {float(cos(cached, true, 0)):+.3f}"
                f"  cos(fresh, true) {float(cos(fresh, true, 0)):+.3f}"
                f"  cos(cached, fresh) {float(cos(cached, fresh, 0)):+.3f}"
            )

    for task in range(2):
        stream.set_task(task)
        pl.Trainer(
            max_steps=2000,
            callbacks=[cb, Probe()],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        ).fit(model, datamodule=stream)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
