"""Tensor checks shared by the engine and the baselines (private): finiteness without a host
sync, the "free by shape" rule, copies of batches and their sizes."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
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


def same_shape(stored: Tensor | Sequence[int] | None, live: Tensor) -> bool:
    """Whether ``live`` has the shape stored for it by the old tasks (a tensor, or its shape);
    False when nothing is stored.

    The one "free by shape" rule: a parameter that fails it (new, or re-created in another
    shape since) owes the old tasks nothing, and its gradient is left alone.

    Example:
        >>> same_shape((2, 3), torch.zeros(2, 3)), same_shape(torch.zeros(3), torch.zeros(2))
        (True, False)
        >>> same_shape(None, torch.zeros(2))
        False
    """
    if stored is None:
        return False
    shape = stored.shape if isinstance(stored, Tensor) else stored
    return tuple(shape) == tuple(live.shape)


def map_tensors(batch: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """``batch`` with ``fn`` applied to every tensor in it; dicts, lists, tuples, namedtuples
    and dataclass instances are rebuilt around the results, anything else is kept as it is.

    Example:
        >>> map_tensors({"x": torch.ones(2), "ids": [torch.zeros(1), "a"]}, lambda t: t + 1)
        {'x': tensor([2., 2.]), 'ids': [tensor([1.]), 'a']}
    """
    if isinstance(batch, Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        return type(batch)({k: map_tensors(v, fn) for k, v in batch.items()})  # type: ignore[call-arg]
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple
        return type(batch)(*(map_tensors(v, fn) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(map_tensors(v, fn) for v in batch)
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        out = copy.copy(batch)
        for field in dataclasses.fields(batch):
            # object.__setattr__: frozen dataclasses too.
            object.__setattr__(out, field.name, map_tensors(getattr(batch, field.name), fn))
        return out
    return batch


def detached_copy(batch: Any) -> Any:
    """``batch`` with every tensor detached and cloned (see :func:`map_tensors`)."""
    return map_tensors(batch, lambda t: t.detach().clone())


def batch_size_of(batch: Any) -> int:
    """Examples in a batch: dim 0 of its first tensor with one (1 if it holds none)."""
    if isinstance(batch, Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    items: Iterable[Any] = ()
    if isinstance(batch, Mapping):
        items = batch.values()
    elif isinstance(batch, (list, tuple)):
        items = batch
    for item in items:
        if isinstance(item, (Tensor, Mapping, list, tuple)):
            return batch_size_of(item)
    return 1
