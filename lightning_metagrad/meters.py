r"""Meters for the experiments and tests: what a block of PyTorch code allocates, and how often it
reads a tensor's value on the host. Both are ``TorchDispatchMode``\ s: every op run inside
``with`` passes through them, on CPU or GPU. Plain PyTorch."""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["HostReads", "PeakTensorMemory"]


class PeakTensorMemory(TorchDispatchMode):
    """Counts the bytes of the tensors the ops run inside it allocate, while they live, and
    their peak (a storage counted once; views and in-place results add nothing). CPU or GPU.

    Example:
        >>> with PeakTensorMemory() as mem:
        ...     a = torch.ones(1000)
        ...     b = a * 2
        ...     del a, b
        ...     c = torch.ones(500)
        >>> mem.peak, mem.live
        (8000, 2000)
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()

    def reset_peak(self) -> None:
        self.peak = self.live

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr()
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, Tensor)
        }
        for t in tree_flatten(out)[0]:
            if not isinstance(t, Tensor):
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key in self._seen or key in inputs or storage.nbytes() == 0:
                continue  # counted already, or a view / in-place result of an input
            self._seen.add(key)
            size = storage.nbytes()
            self.live += size
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, key, size)
        return out

    def _free(self, key: int, size: int) -> None:
        if key in self._seen:
            self._seen.discard(key)
            self.live -= size


#: The ops that copy a tensor's value to the host (``.item()``, ``float(t)``, ``bool(t)``).
_HOST_READS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default)


class HostReads(TorchDispatchMode):
    """Counts reads of a tensor's value on the host (each one a sync on a GPU).

    Example:
        >>> with HostReads() as reads:
        ...     t = torch.ones(3) * 2
        ...     _ = float(t.sum())
        >>> reads.count
        1
    """

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func in _HOST_READS:
            self.count += 1
        return func(*args, **(kwargs or {}))
