"""Issue 22 item 4, run by tests: the demo Transformer under bf16-mixed, accumulation 2 and
clipping; task 2 checkpointed at the end of its first epoch and resumed in a new process
(new model and callback objects) must end with the uninterrupted run's weights.

    python resume_transformer.py straight PREDICTOR DIR   # task 1, then task 2 for 2 epochs
    python resume_transformer.py resume PREDICTOR DIR     # task 2 resumed from epoch 1
"""

from __future__ import annotations

import sys

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.demos import Transformer
from torch.utils.data import DataLoader, TensorDataset

from lightning_metagrad import MetaGradCallback


class LanguageModel(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        # No dropout: Lightning does not restore the global RNG, so dropout masks would differ.
        self.model = Transformer(vocab_size=64, ninp=32, nhead=2, nhid=32, nlayers=1, dropout=0.0)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], i: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.nll_loss(self.model(x, y), y.view(-1))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def task(seed: int) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 64, (36, 16), generator=g)  # 9 batches: an odd accumulation tail
    return DataLoader(TensorDataset(x, (x + seed) % 64), batch_size=4)


def trainer(callbacks: list[Callback], epochs: int) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        precision="bf16-mixed",
        accumulate_grad_batches=2,
        gradient_clip_val=1.0,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
    )


def main(mode: str, predictor: str, out: str) -> None:
    torch.manual_seed(0)
    model = LanguageModel()
    cb: Callback = Callback() if predictor == "none" else MetaGradCallback(predictor=predictor)
    if mode == "straight":
        trainer([cb], 1).fit(model, task(0))
        every_epoch = ModelCheckpoint(dirpath=out, filename="ep{epoch}", save_top_k=-1)
        trainer([cb, every_epoch], 2).fit(model, task(1))
        torch.save(model.state_dict(), f"{out}/straight.pt")
    else:
        trainer([cb], 2).fit(model, task(1), ckpt_path=f"{out}/epepoch=0.ckpt")
        torch.save(model.state_dict(), f"{out}/resumed.pt")


if __name__ == "__main__":
    main(*sys.argv[1:4])
