"""Continual-learning baselines with the same one-line use as ``MetaGradCallback``.

Each ``trainer.fit`` with the same callback instance is one task. EWC, online EWC, SI and MAS
add the gradient of a quadratic penalty towards old-task parameters (weighted by a
per-parameter importance) before every optimizer step; GPM projects each layer's gradient out
of the subspace of old tasks' inputs, and SGP removes only an importance-scaled share of it
along each of that subspace's directions; A-GEM and ER replay a stored old-task batch every step
and project onto / average with its gradient.

Example:
    >>> from lightning.pytorch import Trainer
    >>> from lightning_metagrad.baselines import EWCCallback, GPMCallback
    >>> trainer = Trainer(callbacks=[EWCCallback(strength=100.0)], max_steps=1, logger=False)
    >>> trainer = Trainer(callbacks=[GPMCallback(threshold=0.97)], max_steps=1, logger=False)
"""

from lightning_metagrad.baselines.agem import AGEMCallback
from lightning_metagrad.baselines.er import ERCallback
from lightning_metagrad.baselines.ewc import EWCCallback, OnlineEWCCallback
from lightning_metagrad.baselines.gpm import GPMCallback
from lightning_metagrad.baselines.mas import MASCallback
from lightning_metagrad.baselines.memory import EpisodicMemory
from lightning_metagrad.baselines.sgp import SGPCallback
from lightning_metagrad.baselines.si import SICallback

__all__ = [
    "AGEMCallback",
    "ERCallback",
    "EWCCallback",
    "EpisodicMemory",
    "GPMCallback",
    "MASCallback",
    "OnlineEWCCallback",
    "SGPCallback",
    "SICallback",
]
