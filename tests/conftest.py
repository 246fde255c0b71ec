"""Fixtures for every lane (``tests/unit``, ``tests/integration``); what the tests share as
code (models, data, the Trainer, spies) is in ``helpers.py``."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest


@pytest.fixture(autouse=True)
def _seed() -> None:
    pl.seed_everything(0, verbose=False)
