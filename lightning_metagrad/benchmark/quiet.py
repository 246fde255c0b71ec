"""Quiet Trainers for loops that make many of them (one ``fit`` per task, per method, per seed).

Example:
    >>> import lightning.pytorch as pl
    >>> silence_lightning()
    >>> trainer = pl.Trainer(max_steps=1, accelerator="cpu", **quiet_trainer_kwargs())
    >>> trainer.logger is None, trainer.checkpoint_callback is None
    (True, True)
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

# Lightning's warnings that a benchmark loop triggers on purpose, or cannot act on.
_HARMLESS_WARNINGS = (
    ".*does not have many workers.*",  # in-memory datasets: workers would only add overhead
    ".*GPU available but not used.*",  # the benchmarks choose their accelerator
    ".*LeafSpec.*",  # a deprecation inside Lightning, raised by newer torch
    ".*but have no `validation_step`.*",  # a task stream is a datamodule with val splits
)


def quiet_trainer_kwargs(**overrides: Any) -> dict[str, Any]:
    """``Trainer`` keywords for a fit that writes and shows nothing: no logger, no checkpoints,
    no progress bar, no model summary. ``overrides`` add or replace keywords.

    Example:
        >>> quiet_trainer_kwargs(enable_progress_bar=True)["enable_progress_bar"]
        True
        >>> sorted(quiet_trainer_kwargs())
        ['enable_checkpointing', 'enable_model_summary', 'enable_progress_bar', 'logger']
    """
    return {
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        **overrides,
    }


def silence_lightning(level: int = logging.WARNING) -> None:
    """Drop Lightning's per-fit banners (``GPU available``, ``max_steps reached``, ...) below
    ``level`` and the warnings a benchmark loop triggers on purpose; other warnings still show.

    For scripts: it changes the process's logging and warning filters.
    """
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(level)
    for message in _HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
