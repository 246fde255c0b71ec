"""Predictors of the old tasks' gradients: the engine's first plug-in point.

One protocol (:class:`~lightning_metagrad.predictors.base.OldGradientPredictor`), the rules
that combine a prediction with the current gradient (:mod:`~lightning_metagrad.predictors.rules`),
and one predictor per module: the default
:class:`~lightning_metagrad.predictors.subspace.SubspacePredictor`,
:class:`~lightning_metagrad.predictors.anchored.AnchoredPredictor`,
:class:`~lightning_metagrad.predictors.replay.ReplayPredictor`, and the paper's meta-network
predictor under :mod:`~lightning_metagrad.predictors.paper`. :data:`PREDICTORS` maps the names
``MetaGrad(predictor=...)`` and ``MetaGradCallback(predictor=...)`` accept to their classes.
Plain PyTorch: importing this package does not import Lightning.
"""

from __future__ import annotations

from typing import Literal

from lightning_metagrad.predictors.anchored import AnchoredPredictor
from lightning_metagrad.predictors.base import OldGradientPredictor, Prediction
from lightning_metagrad.predictors.paper import MetaNetPredictor
from lightning_metagrad.predictors.relaxed import RelaxedSubspacePredictor
from lightning_metagrad.predictors.replay import ReplayPredictor
from lightning_metagrad.predictors.subspace import GradientSubspacePredictor, SubspacePredictor

__all__ = [
    "PREDICTORS",
    "AnchoredPredictor",
    "GradientSubspacePredictor",
    "MetaNetPredictor",
    "OldGradientPredictor",
    "Prediction",
    "PredictorName",
    "RelaxedSubspacePredictor",
    "ReplayPredictor",
    "SubspacePredictor",
    "build_predictor",
]

#: The predictors built by name.
PredictorName = Literal["subspace", "gradient-subspace", "paper", "anchored", "replay", "relaxed"]
PREDICTORS: dict[str, type[OldGradientPredictor]] = {
    "subspace": SubspacePredictor,
    "gradient-subspace": GradientSubspacePredictor,
    "paper": MetaNetPredictor,
    "anchored": AnchoredPredictor,
    "replay": ReplayPredictor,
    "relaxed": RelaxedSubspacePredictor,
}


def build_predictor(spec: PredictorName | OldGradientPredictor) -> OldGradientPredictor:
    """A predictor from its name (``"subspace"``, ``"gradient-subspace"``, ``"paper"``,
    ``"anchored"``, ``"replay"``, ``"relaxed"``) or an instance, returned as it is.

    Example:
        >>> type(build_predictor("subspace")).__name__
        'SubspacePredictor'
    """
    if isinstance(spec, OldGradientPredictor):
        return spec
    if not isinstance(spec, str) or spec not in PREDICTORS:
        raise ValueError(
            f"`predictor` must be one of {sorted(PREDICTORS)} or an OldGradientPredictor, "
            f"got {spec!r}"
        )
    return PREDICTORS[spec]()
