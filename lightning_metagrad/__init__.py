"""lightning-metagrad: continual learning for any LightningModule in one line.

The top level holds what a user imports: the callback, the predictors it can use, the task
boundary sources, the baselines, and :class:`MetaGrad` (the method in plain PyTorch, without
a Trainer); plus the namespaces :mod:`~lightning_metagrad.baselines`,
:mod:`~lightning_metagrad.data` (task streams) and :mod:`~lightning_metagrad.metrics`. The
parts of the predictors (the paper's meta-network, its distillation and lookup table, the
change-point detector, the combination rules, the diagnostics) are imported from their
modules.

Example:
    >>> from lightning_metagrad import MetaGradCallback
    >>> callback = MetaGradCallback()
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

from lightning_metagrad import baselines, data, metrics
from lightning_metagrad.baselines import (
    AGEMCallback,
    ERCallback,
    EWCCallback,
    GPMCallback,
    MASCallback,
    OnlineEWCCallback,
    SICallback,
)
from lightning_metagrad.boundaries import (
    AutoBoundaries,
    BatchTaskIdBoundaries,
    CombinedBoundaries,
    NewFitBoundaries,
    TaskBoundarySource,
)
from lightning_metagrad.callback import MetaGradCallback
from lightning_metagrad.engine import MetaGrad
from lightning_metagrad.predictors import (
    AnchoredPredictor,
    MetaNetPredictor,
    OldGradientPredictor,
    ReplayPredictor,
)
from lightning_metagrad.subspace import SubspacePredictor

__version__ = "0.1.0"

__all__ = [
    "AGEMCallback",
    "AnchoredPredictor",
    "AutoBoundaries",
    "BatchTaskIdBoundaries",
    "CombinedBoundaries",
    "ERCallback",
    "EWCCallback",
    "GPMCallback",
    "MASCallback",
    "MetaGrad",
    "MetaGradCallback",
    "MetaNetPredictor",
    "NewFitBoundaries",
    "OldGradientPredictor",
    "OnlineEWCCallback",
    "ReplayPredictor",
    "SICallback",
    "SubspacePredictor",
    "TaskBoundarySource",
    "baselines",
    "data",
    "metrics",
]

#: Names the top level held in 0.1.0 and until the public surface was narrowed, and the
#: module each lives in now. ``from lightning_metagrad import X`` still works for them, with
#: a DeprecationWarning naming the module to import from.
_MOVED = {
    "ChangePointDetector": "lightning_metagrad.detection",
    "CoordinateMLP": "lightning_metagrad.meta_network",
    "Diagnostics": "lightning_metagrad.diagnostics",
    "MetaNetwork": "lightning_metagrad.meta_network",
    "RunningMeanDistiller": "lightning_metagrad.distillation",
    "TabulatedFunction": "lightning_metagrad.tabulation",
    "joint_average": "lightning_metagrad.combination",
    "sign_agreement": "lightning_metagrad.combination",
}


def __getattr__(name: str) -> Any:
    module = _MOVED.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_metagrad' has no attribute {name!r}")
    warnings.warn(
        f"`lightning_metagrad.{name}` moved off the top level: import it from {module} "
        f"(`from {module} import {name}`).",
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(importlib.import_module(module), name)
