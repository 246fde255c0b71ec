"""lightning-metagrad: continual learning for any LightningModule in one line.

Example:
    >>> from lightning_metagrad import MetaGradCallback
    >>> callback = MetaGradCallback()
"""

from lightning_metagrad.boundaries import (
    AutoBoundaries,
    BatchTaskIdBoundaries,
    CombinedBoundaries,
    NewFitBoundaries,
    TaskBoundarySource,
)
from lightning_metagrad.callback import MetaGradCallback
from lightning_metagrad.combination import joint_average, sign_agreement
from lightning_metagrad.detection import ChangePointDetector
from lightning_metagrad.diagnostics import Diagnostics
from lightning_metagrad.distillation import RunningMeanDistiller
from lightning_metagrad.engine import MetaGrad
from lightning_metagrad.meta_network import CoordinateMLP, MetaNetwork
from lightning_metagrad.predictors import (
    AnchoredPredictor,
    MetaNetPredictor,
    OldGradientPredictor,
    ReplayPredictor,
)
from lightning_metagrad.subspace import SubspacePredictor
from lightning_metagrad.tabulation import TabulatedFunction

__version__ = "0.1.0"

__all__ = [
    "AnchoredPredictor",
    "AutoBoundaries",
    "BatchTaskIdBoundaries",
    "ChangePointDetector",
    "CombinedBoundaries",
    "CoordinateMLP",
    "Diagnostics",
    "MetaGrad",
    "MetaGradCallback",
    "MetaNetPredictor",
    "MetaNetwork",
    "NewFitBoundaries",
    "OldGradientPredictor",
    "ReplayPredictor",
    "RunningMeanDistiller",
    "SubspacePredictor",
    "TabulatedFunction",
    "TaskBoundarySource",
    "joint_average",
    "sign_agreement",
]
