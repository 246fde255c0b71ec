"""Fixtures and settings for every lane (``tests/unit``, ``tests/integration``); what the tests
share as code (models, data, the Trainer, spies) is in ``helpers.py``."""

from __future__ import annotations

import os

import lightning.pytorch as pl
import pytest
import torch

# The tests' tensors are tiny: one intra-op thread is faster than several, and many times
# faster on a machine whose cores are busy (OpenMP threads spin waiting for each other).
# Subprocesses (DDP ranks, the killed training run, the examples) inherit the setting.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(autouse=True)
def _seed() -> None:
    pl.seed_everything(0, verbose=False)
