"""Which parameters form the weight matrices the default predictor protects, grouped by the
module that owns them.

A weight matrix is a parameter of fan-in > 1 (``out x fan-in``; a conv kernel as
``out x in·kh·kw``); a parameter of one value per row of a matrix of the same module (its
bias) joins it as an extra column, so ``G = [dW, db]``. Grouping goes by owner module, not by
name suffix:

* an LSTM/GRU pairs ``bias_ih_l0`` with ``weight_ih_l0`` and ``bias_hh_l0`` with
  ``weight_hh_l0``;
* a parametrized module (``torch.nn.utils.parametrize``: weight norm, spectral norm, an
  orthogonal map) owns its ``parametrizations.weight.original*`` tensors, so its bias pairs
  with the original matrix; a per-row scale of fan-in 1 (weight norm's ``original0`` /
  ``weight_g``) is not a matrix and stays free, like a norm layer's scale;
* a pruned module (``torch.nn.utils.prune``) owns ``weight_orig``;
* a transposed convolution's rows are its *input* channels while its bias follows the output
  channels, so its bias is not paired (it stays free).

Everything else 1-D (norm layers' scales and shifts, a lone scalar) is free. Plain PyTorch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import Tensor, nn

__all__ = ["MatrixGroup", "matrix_groups", "owner_of"]

_PARAMETRIZED = ".parametrizations."


@dataclass(frozen=True)
class MatrixGroup:
    """A weight matrix and the per-row tensor that shares its rows (an extra column).

    Example:
        >>> groups = matrix_groups(dict(nn.Linear(3, 2).named_parameters()))
        >>> groups
        [MatrixGroup(weight='weight', bias='bias', rows=2, cols=4)]
    """

    weight: str
    bias: str | None
    rows: int
    cols: int  # fan-in of the weight, plus one with a bias


def owner_of(name: str) -> str:
    """The path of the module that owns parameter ``name`` (a parametrized module owns its
    ``parametrizations.<tensor>.original*``).

    Example:
        >>> owner_of("encoder.0.parametrizations.weight.original1"), owner_of("fc.bias")
        ('encoder.0', 'fc')
    """
    if _PARAMETRIZED in f".{name}":
        return f".{name}".split(_PARAMETRIZED, 1)[0][1:]
    return name.rsplit(".", 1)[0] if "." in name else ""


def _per_row(p: Tensor) -> bool:
    """One value per row: a 1-D tensor, or ``rows x 1 x ... x 1``."""
    return p.ndim >= 1 and p.numel() == p.shape[0]


def matrix_groups(
    params: Mapping[str, Tensor], modules: Mapping[str, nn.Module] | None = None
) -> list[MatrixGroup]:
    """The weight matrices among ``params`` (by name), each with the per-row tensor of the
    same module that pairs with it, in the order of ``params``. ``modules`` (the model's
    ``named_modules()``) lets transposed convolutions be recognised; without it the grouping
    goes by names alone.

    Example:
        >>> lstm = nn.LSTM(4, 3)
        >>> [(g.weight, g.bias) for g in matrix_groups(dict(lstm.named_parameters()))]
        [('weight_ih_l0', 'bias_ih_l0'), ('weight_hh_l0', 'bias_hh_l0')]
    """
    by_owner: dict[str, list[str]] = {}
    for name in params:
        by_owner.setdefault(owner_of(name), []).append(name)
    pairs: dict[str, str] = {}
    for owner, names in by_owner.items():
        module = modules.get(owner) if modules is not None else None
        if isinstance(module, nn.modules.conv._ConvTransposeNd):
            continue  # rows are input channels; the bias follows the output channels
        matrices = [n for n in names if _is_matrix(params[n])]
        taken: set[str] = set()
        for name in names:
            p = params[name]
            if name in matrices or not _per_row(p):
                continue
            rows = [m for m in matrices if params[m].shape[0] == p.numel() and m not in taken]
            # Prefer the matrix named like the bias (bias_hh_l0 -> weight_hh_l0).
            twin = _twin(name)
            chosen = next((m for m in rows if twin is not None and _leaf(m) == twin), None)
            if chosen is None and len(rows) == 1:
                chosen = rows[0]
            if chosen is not None:
                pairs[chosen] = name
                taken.add(chosen)
    groups = []
    for name, p in params.items():
        if not _is_matrix(p):
            continue
        bias = pairs.get(name)
        fan_in = p[0].numel()
        groups.append(MatrixGroup(name, bias, p.shape[0], fan_in + (bias is not None)))
    return groups


def _is_matrix(p: Tensor) -> bool:
    return p.ndim >= 2 and p[0].numel() > 1


def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _twin(bias_name: str) -> str | None:
    """The weight's leaf name a bias of this name pairs with (``bias_ih_l0`` ->
    ``weight_ih_l0``, ``bias`` -> ``weight``)."""
    leaf = _leaf(bias_name)
    return "weight" + leaf[len("bias") :] if leaf.startswith("bias") else None
