"""Rules that combine the current gradient with the predicted mean old-task gradient.

Both act on flat tensors and return the new update direction; plain PyTorch.
"""

from __future__ import annotations

import torch
from torch import Tensor


def sign_agreement(current: Tensor, predicted: Tensor) -> tuple[Tensor, Tensor]:
    """The paper's rule, eq. 5: keep ``current_j`` where ``current_j * predicted_j > 0``, else 0.

    Applied to the pair ``(grad^(t+1), mean old-task grad)`` as in section 2.3. Non-finite
    entries of ``current`` are passed through untouched, so the rule never hides a NaN/inf from
    the optimizer or a grad scaler. Returns ``(combined, zeroed_mask)``.

    Example:
        >>> g = torch.tensor([1.0, -2.0, 3.0, 0.5])
        >>> p = torch.tensor([0.1, 0.4, 0.0, 2.0])
        >>> sign_agreement(g, p)[0]
        tensor([1.0000, 0.0000, 0.0000, 0.5000])
    """
    keep = (current * predicted > 0) | ~torch.isfinite(current)
    return torch.where(keep, current, torch.zeros_like(current)), ~keep


def joint_average(current: Tensor, predicted_mean: Tensor, num_old_tasks: int) -> Tensor:
    """Eq. 2 with predicted old gradients: the mean over all ``t + 1`` tasks' gradients.

    ``(grad^(t+1) + t * mean_old) / (t + 1)``, where ``predicted_mean`` is the mean of the ``t``
    old tasks' predicted gradients.

    Example:
        >>> joint_average(torch.tensor([3.0]), torch.tensor([1.0]), num_old_tasks=2)
        tensor([1.6667])
    """
    if num_old_tasks < 1:
        raise ValueError(f"`num_old_tasks` must be >= 1, got {num_old_tasks}")
    t = float(num_old_tasks)
    return (current + t * predicted_mean) / (t + 1.0)
