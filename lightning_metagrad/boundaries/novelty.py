r"""Gradient-subspace novelty: how much of a step's gradient lies outside the current task's
gradient subspace (the paper's section 5.1 premise, "different tasks must have different
gradient patterns", tested directly).

Per weight matrix ``W`` (out x fan-in, a conv kernel as out x in·kh·kw, its bias as an extra column,
as in :mod:`~lightning_metagrad.predictors.subspace`) :class:`SubspaceNovelty` keeps a running
input-side second moment of the current task's gradients ``G = [dW, db]``, each step counted with
unit energy, ``G^T G / |G|^2`` (so a learning-rate change, a warm-up or a loss spike
cannot tilt it), and its top-energy basis ``U`` (GPM's energy rule: the fewest leading
eigenvectors that explain a fraction ``energy`` of the moment's trace). A step's novelty is
the share of its gradient energy outside the basis,
``|G - G U U^T|^2 / |G|^2 = 1 - |G U|^2 / |G|^2``, combined over the matrices
energy-weighted: ``sum_l |G_l - G_l U_l U_l^T|^2 / sum_l |G_l|^2``. It needs no labels and
no loss scale, and lies in [0, 1]: low within a task (about ``1 - energy``), high for the
gradient of a task the basis never saw.

The basis is a **reference frozen behind the stream**: the moment is collected in blocks of
``refresh`` observations, and the basis is rebuilt at each block end from the blocks that
are more than ``lag`` blocks old (exponentially weighted, half-life ``halflife``
observations). So the newest ``lag`` blocks never shape the basis a step is measured
against: after an abrupt switch the new task's gradients stay outside the basis for at least
``lag * refresh`` observations, and during a gradual (blurry) switch the basis stays that of
the task before the blend, while slow drift within a task (the network learning) is still
followed, ``lag * refresh`` observations behind. :meth:`start_task` forgets everything for a
new task; until its first blocks are old enough, the basis comes from all of the new task's
gradients so far (rebuilt after 1, 2, 4 and 8 observations, then at each block end).

Cost per observation and matrix: the novelty itself, ``G U`` (rows x fan-in x k), and a
``sample_rows`` x fan-in sketch of ``G`` kept for the moment (unbiased for ``G^T G``). At
each block end: the oldest pending block's moment (``refresh * sample_rows`` x fan-in²) and
one step of subspace iteration warm-started from the previous basis (fan-in² x k; an exact
eigendecomposition for fan-ins up to 256 and at a task's start). Memory per weight matrix:
one fan-in x fan-in moment, the basis and the sampled rows of the newest ``lag + 1`` blocks.
Plain PyTorch; no Trainer needed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_metagrad._validation import (
    check_float,
    check_fraction,
    check_int,
    check_state_version,
)
from lightning_metagrad.matrices import MatrixGroup, matrix_groups

__all__ = ["SubspaceNovelty"]

_EXACT_DIM = 256  # fan-ins up to this always get an exact eigendecomposition
_EARLY = (1, 2, 4, 8)  # observations of a task after which its first bases are built
_STATE_VERSION = 1


def _energy_cut(values: Tensor, total: float, energy: float) -> int:
    """How many of the descending ``values`` explain ``energy`` of ``total`` (all if none)."""
    reached = values.cumsum(0) >= energy * total
    return int(reached.to(torch.int64).argmax()) + 1 if bool(reached.any()) else values.numel()


def _top_energy_basis(
    cov: Tensor, energy: float, previous: Tensor | None, generator: torch.Generator
) -> Tensor:
    """The leading eigenvectors of the PSD ``cov`` that explain ``energy`` of its trace.

    Exact for small matrices or without a ``previous`` basis; otherwise one step of subspace
    iteration from ``previous`` plus a few random directions (the moment changes little
    between two refreshes, so this tracks it at a fraction of an eigendecomposition's cost).
    """
    d = cov.shape[0]
    total = float(torch.trace(cov))
    if not total > 0 or not math.isfinite(total):
        return cov.new_zeros(d, 0)
    sym = (cov + cov.T) / 2
    if d <= _EXACT_DIM or previous is None or previous.shape[1] == 0:
        values, vectors = torch.linalg.eigh(sym)
        values, vectors = values.flip(0).clamp_min(0), vectors.flip(1)
        return vectors[:, : _energy_cut(values, total, energy)].contiguous()
    k = previous.shape[1]
    q = min(d, k + max(16, k // 4))
    extra = torch.randn(d, q - k, generator=generator).to(device=cov.device, dtype=cov.dtype)
    start, _ = torch.linalg.qr(torch.cat([previous, extra], dim=1))
    basis, _ = torch.linalg.qr(sym @ start)
    values, rotation = torch.linalg.eigh(basis.T @ sym @ basis)  # Rayleigh-Ritz
    values, rotation = values.flip(0).clamp_min(0), rotation.flip(1)
    vectors = basis @ rotation
    return vectors[:, : _energy_cut(values, total, energy)].contiguous()


class _Layer:
    """One weight matrix's moment of the blocks older than the lag, the newer blocks' sampled
    rows, and its basis."""

    __slots__ = ("basis", "block", "committed", "count", "folded", "pending")

    def __init__(self) -> None:
        self.committed: Tensor | None = None  # EMA of the blocks' moments older than the lag
        self.folded = 0  # blocks in ``committed``
        # Rows scaled to unit energy per observation: the complete blocks not yet committed
        # (one matrix each) and the current block (one matrix per observation).
        self.pending: list[Tensor] = []
        self.block: list[Tensor] = []
        self.count = 0  # observations of the task
        self.basis: Tensor | None = None

    def everything(self) -> Tensor | None:
        """The mean moment of all of the task's observations (before any is committed)."""
        if not self.pending and not self.block:
            return None
        rows = torch.cat([*self.pending, *self.block])
        return rows.T @ rows / self.count


class SubspaceNovelty:
    r"""Per weight matrix, the current task's gradient subspace, frozen ``lag`` blocks behind
    the stream; :meth:`observe` returns the share of a step's gradient energy outside it
    (module docstring).

    Args:
        energy: fraction of the moment's trace the basis explains (GPM's rule). A tighter
            basis makes a weak input shift stand out more, but from 0.97 it lost abrupt
            switches or fired without one (docs/detection.md, "Blurry switches").
        halflife: half-life, in observations, of the moment the basis is built from.
        refresh: observations per block; the basis is rebuilt at each block end.
        lag: whole blocks left out of the basis (0: the basis uses every complete block).
            A longer lag sees more of a slow or weak shift (a blend of rotations), but
            from 3 blocks the network leaving its start-up under a learning-rate warm-up
            fired (docs/detection.md, "Blurry switches").
        sample_rows: an int m: the moment uses m random rows of each ``G`` (a matrix with
            at most m rows whole); None for all rows. The novelty uses the whole ``G``.
        every: observe every ``every``-th call of :meth:`observe` (the others return None).
        seed: seeds the row sampling and the subspace iteration.

    Attributes: ``last_value`` (the latest novelty; None before a basis exists) and
    ``observations`` (of the current task).

    Example:
        >>> nov = SubspaceNovelty(refresh=4, lag=1, sample_rows=None)
        >>> gen = torch.Generator().manual_seed(0)
        >>> old = torch.linalg.qr(torch.randn(20, 3, generator=gen))[0]  # a 3-D subspace
        >>> def grad(basis):  # 8 x 20: every row in the span of ``basis``
        ...     return torch.randn(8, basis.shape[1], generator=gen) @ basis.T
        >>> values = [nov.observe(["w"], [grad(old)]) for _ in range(40)]
        >>> values[-1] < 0.01  # the task's gradients lie in the learned subspace
        True
        >>> new = torch.linalg.qr(torch.randn(20, 3, generator=gen))[0]
        >>> nov.observe(["w"], [grad(new)]) > 0.5  # a new task's gradient does not
        True
    """

    def __init__(
        self,
        energy: float = 0.95,
        halflife: float = 100.0,
        refresh: int = 16,
        lag: int = 2,
        sample_rows: int | None = 8,
        every: int = 1,
        seed: int = 0,
    ) -> None:
        self.energy = check_fraction("energy", energy, include_one=False)
        self.halflife = check_float("halflife", halflife, minimum=0, low_open=True)
        self.refresh = check_int("refresh", refresh, minimum=1)
        self.lag = check_int("lag", lag, minimum=0)
        self.sample_rows = check_int("sample_rows", sample_rows, minimum=1, optional=True)
        self.every = check_int("every", every, minimum=1)
        self.generator = torch.Generator().manual_seed(check_int("seed", seed, minimum=0))
        self._alpha = 1.0 - 0.5 ** (self.refresh / self.halflife)  # per block
        self._groups: dict[str, MatrixGroup] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._layers: dict[str, _Layer] = {}
        self.calls = 0
        self.observations = 0
        self.last_value: float | None = None
        self._last_layers: tuple[list[str], list[Tensor], list[Tensor]] = ([], [], [])
        self._pool_outside = self._pool_energy = 0.0

    # ------------------------------------------------------------------ tasks

    def start_task(self) -> None:
        """A new task starts: forget every moment and basis."""
        self._layers = {}
        self.observations = 0
        self.last_value = None
        self._last_layers = ([], [], [])
        self._pool_outside = self._pool_energy = 0.0

    @property
    def last_layers(self) -> dict[str, float]:
        """Per weight matrix: the latest observation's share outside its basis."""
        names, outside, energies = self._last_layers
        return {n: float(o / e.clamp_min(1e-30)) for n, o, e in zip(names, outside, energies)}

    def dims(self) -> dict[str, int]:
        """Directions of the basis per weight matrix."""
        return {
            name: int(layer.basis.shape[1])
            for name, layer in self._layers.items()
            if layer.basis is not None
        }

    # ------------------------------------------------------------------ observing

    def _bind(self, names: Sequence[str], targets: Sequence[Tensor]) -> None:
        shapes = {n: tuple(t.shape) for n, t in zip(names, targets)}
        if all(self._shapes.get(n) == s for n, s in shapes.items()):
            return
        self._shapes.update(shapes)
        groups = matrix_groups({n: torch.empty(s, device="meta") for n, s in self._shapes.items()})
        for group in groups:
            old = self._groups.get(group.weight)
            if old is not None and (old.rows, old.cols) != (group.rows, group.cols):
                self._layers.pop(group.weight, None)  # the matrix changed shape: start afresh
        self._groups = {g.weight: g for g in groups}

    @torch.no_grad()
    def observe(self, names: Sequence[str], targets: Sequence[Tensor]) -> float | None:
        """Feed one step's per-tensor gradients by name; the step's novelty (None: not an
        observation step, or no basis yet, e.g. at the first observation of a task)."""
        call, self.calls = self.calls, self.calls + 1
        if call % self.every:
            return None
        self._bind(names, targets)
        by_name = dict(zip(names, targets))
        energies: list[Tensor] = []
        outside: list[Tensor] = []
        measured: list[str] = []
        for name, group in self._groups.items():
            w = by_name.get(name)
            if w is None:
                continue
            g = w.detach().reshape(group.rows, -1).float()
            if group.bias is not None:
                b = by_name.get(group.bias)
                column = (
                    b.detach().float()[:, None] if b is not None else g.new_zeros(group.rows, 1)
                )
                g = torch.cat([g, column], dim=1)
            layer = self._layers.get(name)
            if layer is None:
                layer = self._layers[name] = _Layer()
            if layer.basis is not None:  # measured before the step is learned
                e = g.pow(2).sum()
                energies.append(e)
                outside.append((e - (g @ layer.basis).pow(2).sum()).clamp_min(0.0))
                measured.append(name)
            if self.sample_rows is not None and self.sample_rows < group.rows:
                rows = torch.randint(group.rows, (self.sample_rows,), generator=self.generator)
                g = g[rows.to(g.device)]
            self._learn(layer, g)
        self.observations += 1
        self._last_layers = (measured, outside, energies)
        sums = _sums(outside, energies)
        self.last_value = None
        if sums is not None:
            out, total = sums
            self._pool_outside += out
            self._pool_energy += total
            self.last_value = out / total
        return self.last_value

    def pooled(self) -> float | None:
        """The novelty of the steps observed since the previous call, pooled (their summed
        outside energy over their summed energy), and restart the pool; None if none."""
        out, total = self._pool_outside, self._pool_energy
        self._pool_outside = self._pool_energy = 0.0
        return out / total if total > 0 else None

    def _learn(self, layer: _Layer, g: Tensor) -> None:
        layer.count += 1
        layer.block.append(g / g.pow(2).sum().sqrt().clamp_min(1e-30))  # unit energy
        if len(layer.block) == self.refresh:  # a block is complete
            layer.pending.append(torch.cat(layer.block))
            layer.block = []
            while len(layer.pending) > self.lag:
                self._commit(layer, layer.pending.pop(0))
            self._rebuild(layer)
        elif layer.count in _EARLY and layer.committed is None:
            self._rebuild(layer)

    def _commit(self, layer: _Layer, rows: Tensor) -> None:
        moment = rows.T @ rows / self.refresh
        layer.folded += 1
        if layer.committed is None:
            layer.committed = moment
        else:
            a = max(1.0 / layer.folded, self._alpha)
            layer.committed.mul_(1.0 - a).add_(moment, alpha=a)

    def _rebuild(self, layer: _Layer) -> None:
        # The lagged moment takes over once it holds most of the task's observations; until
        # then (a task's first few blocks) the basis comes from all of them.
        lagged = layer.committed is not None and 3 * layer.folded * self.refresh >= 2 * layer.count
        source = layer.committed if lagged else layer.everything()
        if source is not None:
            layer.basis = _top_energy_basis(source, self.energy, layer.basis, self.generator)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        def copy(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.detach().clone()

        return {
            "version": _STATE_VERSION,
            "calls": self.calls,
            "observations": self.observations,
            "generator": self.generator.get_state(),
            "shapes": {n: list(s) for n, s in self._shapes.items()},
            "layers": {
                name: {
                    "committed": copy(layer.committed),
                    "folded": layer.folded,
                    "pending": [p.detach().clone() for p in layer.pending],
                    "block": [r.detach().clone() for r in layer.block],
                    "count": layer.count,
                    "basis": copy(layer.basis),
                }
                for name, layer in self._layers.items()
            },
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        check_state_version("SubspaceNovelty", state, _STATE_VERSION, unversioned=1)
        self.calls = int(state["calls"])
        self.observations = int(state["observations"])
        self.generator.set_state(state["generator"])
        shapes = {n: tuple(int(v) for v in s) for n, s in state["shapes"].items()}
        self._shapes, self._groups = {}, {}
        if shapes:
            self._bind(list(shapes), [torch.empty(s, device="meta") for s in shapes.values()])
        self._layers = {}
        for name, entry in state["layers"].items():
            layer = _Layer()
            layer.committed = entry["committed"]
            layer.folded = int(entry["folded"])
            layer.pending = list(entry["pending"])
            layer.block = list(entry["block"])
            layer.count = int(entry["count"])
            layer.basis = entry["basis"]
            self._layers[name] = layer


def _sums(outside: list[Tensor], energies: list[Tensor]) -> tuple[float, float] | None:
    """Outside and total energy over the matrices (one device sync); None if none or not
    finite and positive."""
    if not energies:
        return None
    total, out = torch.stack([torch.stack(energies).sum(), torch.stack(outside).sum()]).tolist()
    ok = math.isfinite(total) and math.isfinite(out) and total > 0
    return (min(out, total), total) if ok else None
