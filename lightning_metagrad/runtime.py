"""What the training loop around the engine provides: how to warn, a loss on a stored batch, a
mean over processes. :class:`~lightning_metagrad.callback.MetaGradCallback` fills it from the
Trainer (rank-zero warnings, the module's own ``training_step`` in eval mode, the strategy's
all-reduce); a plain loop keeps the defaults or passes its own."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor


def warn_user(message: str) -> None:
    """The default warning: :func:`warnings.warn` with a UserWarning."""
    warnings.warn(message, UserWarning, stacklevel=3)


@dataclass
class Runtime:
    """The services the engine, its predictor and its boundary source may call.

    Attributes:
        warn: called with a message when something needs the user's attention.
        batch_loss: the training loss on a stored batch, differentiable in the bound
            parameters, or None to skip the batch; only predictors that replay stored batches
            (:class:`~lightning_metagrad.predictors.replay.ReplayPredictor`) call it.
        mean_over_ranks: the mean of a tensor over data-parallel processes, so that every
            process takes the same decision; None in a single process.

    Example:
        >>> import torch
        >>> Runtime().mean(torch.ones(2))
        tensor([1., 1.])
    """

    warn: Callable[[str], None] = warn_user
    batch_loss: Callable[[Any], Tensor | None] | None = None
    mean_over_ranks: Callable[[Tensor], Tensor] | None = None

    def mean(self, tensor: Tensor) -> Tensor:
        """``tensor`` averaged over processes (itself in a single process)."""
        return tensor if self.mean_over_ranks is None else self.mean_over_ranks(tensor)
