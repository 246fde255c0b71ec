"""What ``lightning_metagrad._lightning`` relies on from Lightning's strategy classes, pinned
without a Trainer (the rest, through real Trainers:
``tests/integration/test_lightning_internals.py``)."""

from __future__ import annotations

from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy

from lightning_metagrad._lightning import shards_parameters


def test_sharded_strategies_are_told_by_isinstance() -> None:
    assert shards_parameters(FSDPStrategy())
    assert shards_parameters(DeepSpeedStrategy.__new__(DeepSpeedStrategy))  # needs no deepspeed
    assert not shards_parameters(DDPStrategy())
