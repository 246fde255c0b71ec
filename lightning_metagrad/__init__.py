"""lightning-metagrad: continual learning for any LightningModule in one line.

The top level holds what a user imports: :class:`MetaGradCallback`, the engine
:class:`MetaGrad` (the whole method in plain PyTorch, for any training loop), the predictors
and task boundary sources (the two plug-in packages :mod:`~lightning_metagrad.predictors` and
:mod:`~lightning_metagrad.boundaries`), the baselines, and the namespaces
:mod:`~lightning_metagrad.baselines`, :mod:`~lightning_metagrad.data` (task streams) and
:mod:`~lightning_metagrad.metrics`.

The core (the engine, the predictors, the boundaries) does not import Lightning; the names
that need it (the callbacks, the data streams, the metrics) are imported on first use.

Example:
    >>> from lightning_metagrad import MetaGradCallback
    >>> callback = MetaGradCallback()
"""

from __future__ import annotations

import importlib
import warnings
from typing import TYPE_CHECKING, Any

from lightning_metagrad import _moved
from lightning_metagrad.boundaries import (
    AutoBoundaries,
    BatchTaskIdBoundaries,
    CombinedBoundaries,
    ManualBoundaries,
    NewFitBoundaries,
    TaskBoundarySource,
)
from lightning_metagrad.engine import MetaGrad, StepReport
from lightning_metagrad.predictors import (
    AnchoredPredictor,
    GradientSubspacePredictor,
    MetaNetPredictor,
    OldGradientPredictor,
    RelaxedSubspacePredictor,
    ReplayPredictor,
    SubspacePredictor,
)
from lightning_metagrad.runtime import Runtime

if TYPE_CHECKING:
    from lightning_metagrad import baselines, data, metrics
    from lightning_metagrad.baselines import (
        AGEMCallback,
        ERCallback,
        EWCCallback,
        GPMCallback,
        MASCallback,
        OnlineEWCCallback,
        SGPCallback,
        SICallback,
    )
    from lightning_metagrad.callback import MetaGradCallback

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
    "GradientSubspacePredictor",
    "MASCallback",
    "ManualBoundaries",
    "MetaGrad",
    "MetaGradCallback",
    "MetaNetPredictor",
    "NewFitBoundaries",
    "OldGradientPredictor",
    "OnlineEWCCallback",
    "RelaxedSubspacePredictor",
    "ReplayPredictor",
    "Runtime",
    "SGPCallback",
    "SICallback",
    "StepReport",
    "SubspacePredictor",
    "TaskBoundarySource",
    "baselines",
    "data",
    "metrics",
]

#: Names that need Lightning (or torchmetrics), imported on first use.
_LAZY = {
    "MetaGradCallback": "lightning_metagrad.callback",
    **{
        name: "lightning_metagrad.baselines"
        for name in (
            "AGEMCallback",
            "ERCallback",
            "EWCCallback",
            "GPMCallback",
            "MASCallback",
            "OnlineEWCCallback",
            "SGPCallback",
            "SICallback",
        )
    },
}
_NAMESPACES = ("baselines", "data", "metrics")

#: Names the top level held in 0.1.0 and until the public surface was narrowed, and the
#: module each lives in now. ``from lightning_metagrad import X`` still works for them, with
#: a DeprecationWarning naming the module to import from.
_MOVED = {
    "ChangePointDetector": "lightning_metagrad.boundaries.changepoint",
    "CoordinateMLP": "lightning_metagrad.predictors.paper.meta_network",
    "Diagnostics": "lightning_metagrad.diagnostics",
    "MetaNetwork": "lightning_metagrad.predictors.paper.meta_network",
    "RunningMeanDistiller": "lightning_metagrad.predictors.paper.distillation",
    "TabulatedFunction": "lightning_metagrad.predictors.paper.tabulation",
    "joint_average": "lightning_metagrad.predictors.rules",
    "sign_agreement": "lightning_metagrad.predictors.rules",
}

# `lightning_metagrad.subspace`, `.detection`, ... still import, with a DeprecationWarning.
_moved.install()


def __getattr__(name: str) -> Any:
    if name in _NAMESPACES:
        return importlib.import_module(f"lightning_metagrad.{name}")
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
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


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
