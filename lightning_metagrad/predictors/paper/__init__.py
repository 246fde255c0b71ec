"""The paper's predictor exactly: a coordinate-wise meta-network h per task
(:mod:`~lightning_metagrad.predictors.paper.meta_network`), distilled at each boundary into
one g of the mean old-task gradient (eq. 7,
:mod:`~lightning_metagrad.predictors.paper.distillation`), tabulated for O(P) prediction
(:mod:`~lightning_metagrad.predictors.paper.tabulation`)."""

from __future__ import annotations

from lightning_metagrad.predictors.paper.predictor import MetaNetPredictor

__all__ = ["MetaNetPredictor"]
