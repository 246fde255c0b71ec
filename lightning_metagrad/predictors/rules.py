"""Rules that combine the current gradient with the predicted mean old-task gradient.

The flat forms return the new direction; the ``_``-suffixed ones rewrite a list of tensors
in place (what the engine uses). Plain PyTorch.
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


def sign_agreement_(
    currents: list[Tensor], predictions: list[tuple[Tensor, Tensor | None]]
) -> tuple[Tensor, int]:
    """Eq. 5 in place, tensor by tensor; a trusted mask (0/1 or bool) of 0 keeps the gradient.

    ``currents`` must be finite (the engine skips the rule on non-finite steps). Returns the
    number of kept coordinates (a tensor: no host sync) and the number of coordinates.

    Example:
        >>> g = torch.tensor([1.0, 2.0, 3.0])
        >>> kept, n = sign_agreement_([g], [(torch.tensor([1.0, -1.0, 1.0]), None)])
        >>> g, int(kept), n
        (tensor([1., 0., 3.]), 2, 3)
    """
    kept = torch.zeros((), dtype=torch.float32, device=currents[0].device if currents else "cpu")
    total = 0
    for cur, (predicted, trusted) in zip(currents, predictions):
        # 0/1 floats, not booleans: branch-free and several times faster on CPU.
        keep = torch.mul(cur, predicted).gt_(0).to(cur.dtype)  # a NaN prediction: 0 (zeroed)
        if trusted is not None:  # magnitude-aware: keep the gradient where not trusted
            keep.sub_(1).mul_(trusted.to(cur.dtype)).add_(1)
        cur.mul_(keep)
        kept += keep.sum()
        total += cur.numel()
    return kept, total


def joint_average_(
    currents: list[Tensor], predictions: list[tuple[Tensor, Tensor | None]], num_old_tasks: int
) -> None:
    """Eq. 2 in place, tensor by tensor (:func:`joint_average`); a non-finite prediction
    leaves that coordinate's gradient as it was.

    Example:
        >>> g = torch.tensor([3.0])
        >>> joint_average_([g], [(torch.tensor([1.0]), None)], num_old_tasks=2)
        >>> g
        tensor([1.6667])
    """
    for cur, (predicted, _) in zip(currents, predictions):
        combined = joint_average(cur, predicted.to(cur.dtype), num_old_tasks)
        cur.copy_(torch.where(torch.isfinite(combined), combined, cur))
