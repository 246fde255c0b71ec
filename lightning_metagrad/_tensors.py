"""Tensor checks shared by the engine and the baselines (private): finiteness without a host
sync, and detached copies of batches."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor


def finite_flag(tensors: Sequence[Tensor]) -> Tensor:
    """Whether every entry is finite, as a 0-dim bool tensor on the tensors' device."""
    norms = torch._foreach_norm([t.float() if t.dtype != torch.float32 else t for t in tensors])
    # One reduction per tensor; a norm that overflows float32 (entries near 1e19 and above)
    # counts as non-finite too: such a step is not learned from either.
    return torch.isfinite(torch.stack(norms)).all()


def all_finite(tensors: Sequence[Tensor]) -> bool:
    """:func:`finite_flag` read on the host; where a norm overflowed, the exact check over the
    entries decides."""
    if not tensors:
        return True
    if bool(finite_flag(tensors)):
        return True
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def first_non_finite(named: Mapping[str, Tensor]) -> str | None:
    """The name of the first tensor with a NaN/inf entry, or None (one sync when all are)."""
    if all_finite(list(named.values())):
        return None
    return next(n for n, t in named.items() if not bool(torch.isfinite(t).all()))


def detached_copy(batch: Any) -> Any:
    """``batch`` with every tensor detached and cloned (lists, tuples, dicts kept)."""
    if isinstance(batch, Tensor):
        return batch.detach().clone()
    if isinstance(batch, Mapping):
        return type(batch)({k: detached_copy(v) for k, v in batch.items()})  # type: ignore[call-arg]
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple
        return type(batch)(*(detached_copy(v) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(detached_copy(v) for v in batch)
    return batch
