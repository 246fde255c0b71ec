"""Continual fine-tuning of a small byte-level GPT on text every Python install holds.

Three domains, one ``trainer.fit`` each, with AdamW under ``precision="bf16-mixed"``: the
standard library's Python source, the English help texts of ``pydoc_data`` and CPython's
license text (:mod:`lightning_metagrad.data.text`; nothing is downloaded). The same model
trains once without a callback and once with ``MetaGradCallback()``; after each domain the
test loss (nats per byte) on every domain is printed, then how much each earlier domain's
loss rose by the end (forgetting).

Run (tiny settings, well under a minute on one CPU core)::

    python examples/text_domains.py

The benchmark behind it, with every baseline and 3 seeds, is
``python -m lightning_metagrad.benchmark.text`` (docs/text-benchmark.md).
"""

from __future__ import annotations

import argparse
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_metagrad import MetaGradCallback
from lightning_metagrad.benchmark.quiet import quiet_trainer_kwargs, silence_lightning
from lightning_metagrad.benchmark.text import ByteGPT
from lightning_metagrad.data.text import DOMAINS, eval_loader, load_domains, train_loader


def train_stream(use_metagrad: bool, steps: int, seed: int = 0) -> list[list[float]]:
    """The loss matrix: row i holds every domain's test loss after training domain i."""
    domains = load_domains(DOMAINS, max_train_bytes=1 << 16, max_test_bytes=1 << 13)
    pl.seed_everything(seed, verbose=False)
    model = ByteGPT(d_model=32, layers=1, heads=2, context=32)
    tests = [eval_loader(d, context=32, max_windows=64) for d in domains]
    callbacks = [MetaGradCallback()] if use_metagrad else []  # one instance for all domains
    matrix = []
    for i, domain in enumerate(domains):
        trainer = pl.Trainer(
            max_steps=steps,
            accelerator="cpu",
            precision="bf16-mixed",
            callbacks=callbacks,
            **quiet_trainer_kwargs(),
        )
        loader = train_loader(domain, context=32, batch_size=16, steps=steps, seed=seed + i)
        trainer.fit(model, train_dataloaders=loader)
        matrix.append([model.test_loss(t) for t in tests])
    return matrix


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per domain")
    args = parser.parse_args(argv)
    silence_lightning()
    torch.set_num_threads(1)
    results: dict[str, Any] = {}
    for name, use in (("plain", False), ("MetaGrad", True)):
        matrix = train_stream(use, args.steps)
        print(f"{name}: test loss (nats/byte) on {', '.join(DOMAINS)}")
        for i, row in enumerate(matrix):
            print(f"  after {DOMAINS[i]:<8}: " + "  ".join(f"{x:.3f}" for x in row))
        rises = {d: matrix[-1][j] - matrix[j][j] for j, d in enumerate(DOMAINS[:-1])}
        print("  forgetting: " + ", ".join(f"{d} {v:+.3f}" for d, v in rises.items()))
        results[name] = {"loss_matrix": matrix, "forgetting": rises}
    return results


if __name__ == "__main__":
    main()
