"""Which layers read the data: :class:`InputLayerProbe`.

A layer whose inputs carry no autograd history reads the data itself (the first linear or
convolution, an embedding's token ids, the first trainable layer after a frozen backbone):
training does not change what it sees, so a change in its gradients' subspace is a change of
the data, not the network's own drift (``docs/detection.md``, "The layers that read the
data"). The probe hooks the forward of every module that owns a bound parameter and, on the
training forwards with gradients enabled, records whether any of the module's tensor inputs
requires a gradient. Plain PyTorch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["InputLayerProbe"]


class InputLayerProbe:
    """Forward pre-hooks that find the parameters of the modules that read the data.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> probe = InputLayerProbe(model, dict(model.named_parameters()))
        >>> probe.names() is None  # no training forward yet
        True
        >>> _ = model(torch.randn(5, 4))
        >>> probe.names()
        ['0.weight', '0.bias']
        >>> probe.remove()
    """

    def __init__(self, model: nn.Module, params: dict[str, Tensor]) -> None:
        self._reads: dict[str, bool] = {}  # module name -> no tensor input had grad history
        self._owned: dict[str, list[str]] = {}  # module name -> its bound parameter names
        self._handles: list[Any] = []
        for prefix, module in model.named_modules():
            names = [
                f"{prefix}.{n}" if prefix else n for n, _ in module.named_parameters(recurse=False)
            ]
            names = [n for n in names if n in params]
            if not names:
                continue
            self._owned[prefix] = names
            self._handles.append(
                module.register_forward_pre_hook(self._hook(prefix), with_kwargs=True)
            )

    def _hook(self, prefix: str) -> Any:
        def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if not (module.training and torch.is_grad_enabled()):
                return  # an evaluation or no-grad forward says nothing about the graph
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)]
            if not tensors:
                return
            reads = not any(t.requires_grad for t in tensors)
            self._reads[prefix] = self._reads.get(prefix, True) and reads

        return record

    def names(self) -> list[str] | None:
        """The bound parameters of the modules seen reading the data (None before any
        training forward with gradients enabled)."""
        if not self._reads:
            return None
        return [n for prefix, reads in self._reads.items() if reads for n in self._owned[prefix]]

    def remove(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
