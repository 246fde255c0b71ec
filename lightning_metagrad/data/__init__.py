"""Continual-learning task streams (``LightningDataModule`` subclasses) over small image sets.

Example:
    >>> from lightning_metagrad.data import PermutedStream
    >>> stream = PermutedStream(dataset="digits", num_tasks=3)
    >>> stream.set_task(1)
    >>> int(next(iter(stream.train_dataloader()))["task_id"][0])
    1
"""

from lightning_metagrad.data.datasets import DATASETS, DatasetSplits, Split, load_splits
from lightning_metagrad.data.streams import (
    JointDataset,
    PermutedStream,
    RotatedStream,
    SplitStream,
    TaskDataset,
    TaskStream,
    collate_task_batch,
    permute_pixels,
)

__all__ = [
    "DATASETS",
    "DatasetSplits",
    "JointDataset",
    "PermutedStream",
    "RotatedStream",
    "Split",
    "SplitStream",
    "TaskDataset",
    "TaskStream",
    "collate_task_batch",
    "load_splits",
    "permute_pixels",
]
