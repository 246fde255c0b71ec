"""How stale is ReplayPredictor's cached old gradient? (docs/science.md, section 3)

Permuted Fashion-MNIST, 2 tasks x 2000 steps, lr 0.03, seed 1 (``--preset replay-staleness``;
the experiment options are those of ``metagrad-benchmark``), ``predictor="replay"`` with
``refresh_every`` steps between refreshes (default 10). Every 250 steps of task 2 it prints the
cosine of the gradient on 2000 task-1 training images ("true") with (a) the cached old gradient
the rule is using, (b) a fresh gradient on the same stored batches, and (c) the cosine of (a)
with (b). Run: ``python experiments/replay_staleness.py [--refresh-every N]``
"""

from __future__ import annotations

import argparse
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_metagrad import MetaGradCallback, ReplayPredictor
from lightning_metagrad.benchmark.config import BenchmarkConfig, add_config_arguments, parse_config
from lightning_metagrad.benchmark.quiet import quiet_trainer_kwargs, silence_lightning
from lightning_metagrad.benchmark.runner import first_samples, make_model, make_stream

PROBE_EVERY, PROBE_SAMPLES = 250, 2000


def flat_grad(loss: torch.Tensor, params: list[torch.nn.Parameter]) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_arguments(
        parser,
        preset="replay-staleness",
        exclude=("methods", "strengths", "eval_every", "eval_samples", "eval_split"),
    )
    parser.add_argument("--refresh-every", type=int, default=10)
    return parser


def staleness(config: BenchmarkConfig, seed: int, refresh_every: int) -> None:
    """Train ``config``'s tasks with replay, printing the cosines every ``PROBE_EVERY`` steps."""
    pl.seed_everything(seed, verbose=False)
    stream = make_stream(config, seed)
    model = make_model(config, stream)
    replay = ReplayPredictor(refresh_every=refresh_every)
    cb = MetaGradCallback(predictor=replay)
    x_old, y_old = first_samples(stream, 0, PROBE_SAMPLES, split="train")
    cos = nn.functional.cosine_similarity

    class Probe(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, m: Any, *rest: Any) -> None:
            if cb.task_index == 0 or trainer.global_step % PROBE_EVERY or replay._cached is None:
                return
            params = list(m.parameters())
            true = flat_grad(nn.functional.cross_entropy(m(x_old), y_old), params)
            stored = replay.memory[0]
            losses = [nn.functional.cross_entropy(m(b["x"]), b["y"]) for b in stored]
            fresh = flat_grad(torch.stack(losses).mean(), params)
            # The cached old gradient is kept per parameter name; flatten it like `true`.
            by_name = replay._cached
            cached = torch.cat(
                [by_name.get(n, torch.zeros_like(p)).reshape(-1) for n, p in m.named_parameters()]
            )
            print(
                f"step {trainer.global_step}: cos(cached, true) {float(cos(cached, true, 0)):+.3f}"
                f"  cos(fresh, true) {float(cos(fresh, true, 0)):+.3f}"
                f"  cos(cached, fresh) {float(cos(cached, fresh, 0)):+.3f}"
            )

    for task in range(config.tasks):
        stream.set_task(task)
        pl.Trainer(
            max_steps=config.iters,
            accelerator=config.accelerator,
            devices=1,
            callbacks=[cb, Probe()],
            **quiet_trainer_kwargs(),
        ).fit(model, datamodule=stream)


def main(argv: list[str] | None = None) -> None:
    config, args = parse_config(build_parser(), argv)
    silence_lightning()
    for seed in config.seeds:
        if len(config.seeds) > 1:
            print(f"seed {seed}")
        staleness(config, seed, args.refresh_every)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
