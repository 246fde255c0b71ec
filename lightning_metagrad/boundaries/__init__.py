"""Where a new task starts: the engine's second plug-in point.

The simple sources (:mod:`~lightning_metagrad.boundaries.sources`: a new ``fit``, a task id
in the batch, by hand, several at once), task-free detection
(:mod:`~lightning_metagrad.boundaries.auto`, section 5.1) with its change-point test
(:mod:`~lightning_metagrad.boundaries.changepoint`) and its gradient-subspace novelty signal
(:mod:`~lightning_metagrad.boundaries.novelty`). Plain Python and PyTorch: importing this
package does not import Lightning.
"""

from __future__ import annotations

from lightning_metagrad.boundaries.auto import AutoBoundaries, default_detector
from lightning_metagrad.boundaries.changepoint import ChangePointDetector
from lightning_metagrad.boundaries.novelty import SubspaceNovelty
from lightning_metagrad.boundaries.sources import (
    BatchTaskIdBoundaries,
    CombinedBoundaries,
    ManualBoundaries,
    NewFitBoundaries,
    TaskBoundarySource,
    build_boundaries,
)

__all__ = [
    "AutoBoundaries",
    "BatchTaskIdBoundaries",
    "ChangePointDetector",
    "CombinedBoundaries",
    "ManualBoundaries",
    "NewFitBoundaries",
    "SubspaceNovelty",
    "TaskBoundarySource",
    "build_boundaries",
    "default_detector",
]
