"""Continual-learning baselines with the same one-line use as ``MetaGradCallback``.

Each is a quadratic penalty towards old-task parameters, weighted by a per-parameter
importance, applied by adding its gradient to ``p.grad`` before every optimizer step; each
``trainer.fit`` with the same callback instance is one task.

Example:
    >>> from lightning.pytorch import Trainer
    >>> from lightning_metagrad.baselines import EWCCallback
    >>> trainer = Trainer(callbacks=[EWCCallback(strength=100.0)], max_steps=1, logger=False)
"""

from lightning_metagrad.baselines.ewc import EWCCallback, OnlineEWCCallback
from lightning_metagrad.baselines.mas import MASCallback
from lightning_metagrad.baselines.si import SICallback

__all__ = ["EWCCallback", "MASCallback", "OnlineEWCCallback", "SICallback"]
