"""Writes ``tests/data/metagrad-0.1.0.ckpt``: a checkpoint of release 0.1.0 (the first commit).

A tiny model (``tests/helpers.py``'s ``TinyClassifier``: 10-16-3) trained for one task of 4
SGD steps with 0.1.0's ``MetaGradCallback`` (a small meta-network, so the file stays small),
saved with ``trainer.save_checkpoint`` at the end of the fit. ``tests/test_state.py`` checks
that today's callback refuses it with a message that says what to do.

Made with (from the repository root, with the project's venv; Lightning 2.6.6, torch 2.14)::

    rm -rf /tmp/v010 && mkdir /tmp/v010
    git archive "$(git rev-list --max-parents=0 HEAD)" | tar -x -C /tmp/v010
    PYTHONPATH=/tmp/v010 .venv/bin/python tests/data/make_0.1.0_checkpoint.py \\
        tests/data/metagrad-0.1.0.ckpt
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_metagrad
from lightning_metagrad import MetaGradCallback


class TinyClassifier(pl.LightningModule):
    """``tests/helpers.py``'s model (same parameter names and shapes)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def main(out: Path) -> None:
    here = Path(__file__).resolve().parents[2]  # this repository: today's code, not 0.1.0
    if here in Path(lightning_metagrad.__file__).resolve().parents or not hasattr(
        MetaGradCallback(), "meta_update_every"
    ):
        raise SystemExit("run with PYTHONPATH pointing at the export of release 0.1.0")
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1000)
    x = torch.randn(64, 10, generator=g)
    y = (x @ torch.randn(10, 3, generator=g)).argmax(1)
    callback = MetaGradCallback(
        hidden_sizes=(8,),
        coords_per_step=64,
        meta_update_every=1,
        distill_steps=2,
        distill_samples=64,
        table_points=16,
    )
    trainer = pl.Trainer(
        callbacks=[callback],
        max_steps=4,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(TinyClassifier(), DataLoader(TensorDataset(x, y), batch_size=16))
    trainer.save_checkpoint(out)
    print(f"{out}: {out.stat().st_size} bytes, callback state {callback.state_key}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
