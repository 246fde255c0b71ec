r"""The default predictor: each weight matrix's old-task gradient subspace, learned from the
gradients the callback already sees (the paper's section 2.2 suggestion to "process a small set
of related parameters simultaneously").

For every weight matrix ``W`` (out x fan-in; a conv kernel as out x in·kh·kw; its bias, when
the module has one, as an extra column) the predictor accumulates, during a task, the
second moment of the task's gradients on the input side, ``C = sum_t G_t^T G_t / |G_t|^2``
with ``G = [dW, db]``, every ``every``-th optimizer step. Each step enters with unit energy
(``normalize_steps``), so the late, small gradients of a task, which still show the directions
its loss depends on, count as much as its first, large ones. No extra forward or backward
pass, no stored data. With optimizers other than plain SGD, ``G`` is the optimizer's update
vector; the update vectors of adaptive optimizers (Adam and the like, already scaled per
coordinate) enter as they are by default.

At a task boundary ``C`` is folded into an orthonormal basis ``M`` of the old tasks'
gradient subspace by the energy rule of Gradient Projection Memory (Saha et al., 2021),
applied to gradient second moments: just enough new directions from the part of ``C`` outside
``M`` are added that ``M`` explains a fraction ``threshold`` of the finished task's gradient
energy. From the second task on, every step's gradient loses its component in that subspace,
``G <- G - (G M) M^T``: eq. 5's hard limit (a direction the old tasks' gradients use is never
moved against them) applied in the learned basis instead of coordinate by coordinate.

Memory between tasks: ``M`` per weight matrix, at most fan-in x fan-in, constant in the number
of tasks; during a task also ``C`` (fan-in x fan-in). One-dimensional parameters that are not a
bias of a matrix (norm layers' scales and shifts, a lone scalar) are left free: they are few,
and a 1-D "subspace" of a norm scale would freeze it outright.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from lightning_metagrad._validation import (
    check_choice,
    check_fraction,
    check_int,
    check_state_version,
)
from lightning_metagrad.matrices import MatrixGroup, matrix_groups
from lightning_metagrad.predictors.base import (
    NothingToFold,
    OldGradientPredictor,
    Prediction,
    rename_keys,
)
from lightning_metagrad.predictors.basis import complement_of, grow_basis


class SubspacePredictor(OldGradientPredictor):
    r"""Per weight matrix, the old tasks' gradient subspace; later gradients are projected out
    of it (module docstring).

    Args:
        threshold: energy fraction of each finished task's gradients the basis must explain
            (GPM's rule); higher protects more and leaves less room for new tasks.
        input_threshold: the threshold of the first weight matrix (the layer reading the raw
            input, whose gradients spread over many input directions); None: ``threshold``.
        layer_thresholds: per-parameter overrides, ``{"net.4.weight": 0.9}`` (weight names).
        every: accumulate the second moment every ``every``-th optimizer step (its cost,
            O(out·fan-in²), is amortised over the steps between).
        sample_rows: an int m for an unbiased estimate of ``G^T G`` from m random rows of
            ``G`` (m·fan-in² instead of out·fan-in²; a matrix with at most m rows is used
            whole); None for the exact ``G^T G``.
        full_rank_warning: warn once for a layer whose basis holds this fraction of its
            fan-in: nothing much is left to learn with there.
        seed: seeds the row sampling (identical on every rank under DDP).
        normalize_steps: True scales each observed step's ``G`` to unit energy (per matrix)
            before it enters the second moment; False keeps the raw ``G``, so the first, largest
            steps of a task dominate its basis. ``"auto"`` (default): True for gradients and for
            the update vectors of ``torch.optim.SGD`` (with momentum), False for the update
            vectors of other optimizers (Adam and the like). Chosen on the validation splits
            (docs/science.md); without a Trainer (:meth:`learn_from` not called) "auto" is
            True, as the core learns from gradients.
        in_basis: ``"project"`` removes the whole component in the protected subspace;
            ``"sign"`` applies eq. 5 in the basis instead, with a Taylor model of the mean
            old-task gradient there (each task's ``(W - W*_i) C_i / rows`` around its end
            point ``W*_i``): a basis coordinate of the current gradient is kept where it
            agrees in sign with the old tasks' (moving along it helps them too), removed
            elsewhere. It stores two more matrices per layer (fan-in x k and rows x k).

    Example:
        >>> pred = SubspacePredictor(every=1)
        >>> w = torch.zeros(3, 4)
        >>> g = torch.tensor([[1.0, 0, 0, 0], [2.0, 0, 0, 0], [0, 0, 0, 0]])  # one direction
        >>> pred.bind({"w": w})
        >>> _ = pred.observe(["w"], [w], [g])
        >>> pred.end_task(["w"], [w])
        >>> pred.subspace_dims()
        {'w': 1}
        >>> new = torch.tensor([[1.0, 1.0, 0, 0]] * 3)
        >>> _ = pred.rewrite_(["w"], [w], [new])
        >>> new[0]  # the component along the old direction is gone
        tensor([0., 1., 0., 0.])
    """

    rule: ClassVar[Literal["elementwise", "projection"]] = "projection"
    masks_non_finite: ClassVar[bool] = True
    # 2 adds "energy" (normalize_steps); a version-1 state (raw second moments) still loads.
    _state_version: ClassVar[int] = 2

    def __init__(
        self,
        threshold: float = 0.97,
        input_threshold: float | None = None,
        layer_thresholds: Mapping[str, float] | None = None,
        every: int = 4,
        sample_rows: int | None = 32,
        full_rank_warning: float = 0.9,
        seed: int = 0,
        in_basis: Literal["project", "sign"] = "project",
        normalize_steps: bool | Literal["auto"] = "auto",
    ) -> None:
        self.in_basis = check_choice("in_basis", in_basis, ("project", "sign"))
        if not isinstance(normalize_steps, bool) and normalize_steps != "auto":
            raise ValueError(
                f"`normalize_steps` must be True, False or 'auto', got {normalize_steps!r}"
            )
        self.normalize_steps: bool | Literal["auto"] = normalize_steps
        self._normalize = normalize_steps is not False  # "auto" until learn_from says more
        self.threshold = check_fraction("threshold", threshold)
        self.input_threshold = check_fraction("input_threshold", input_threshold, optional=True)
        if layer_thresholds is not None and not isinstance(layer_thresholds, Mapping):
            raise ValueError(
                "`layer_thresholds` must map weight names to fractions, got "
                f"{type(layer_thresholds).__name__}"
            )
        self.layer_thresholds = {
            str(k): check_fraction(f"layer_thresholds[{k!r}]", v)
            for k, v in (layer_thresholds or {}).items()
        }
        self.every = check_int("every", every, minimum=1)
        self.sample_rows = check_int("sample_rows", sample_rows, minimum=1, optional=True)
        self.full_rank_warning = check_fraction("full_rank_warning", full_rank_warning)
        self.generator = torch.Generator().manual_seed(check_int("seed", seed))
        self._old_tasks = 0
        self._groups: dict[str, MatrixGroup] = {}
        self._first: str | None = None
        # By weight name: the orthonormal basis (cols x k), the task's second moment (cols x
        # cols) and how many gradients it holds.
        self._basis: dict[str, Tensor] = {}
        # Weights whose stored matrix is the orthogonal complement N of the protected basis
        # (kept when that is smaller: k > fan-in / 2); then G <- G N N^T.
        self._complement: set[str] = set()
        self._cov: dict[str, Tensor] = {}
        self._count: dict[str, int] = {}
        # With normalize_steps and in_basis="sign": the summed raw energy of the observed
        # steps (the Taylor model needs the gradients' real scale).
        self._energy: dict[str, Tensor] = {}
        # With keep_history(n): per observation step of the last n steps, the rows it added.
        self._history_steps = 0
        self._recent: list[tuple[int, dict[str, Tensor]]] = []
        self._shapes: dict[str, tuple[int, int]] = {}  # (rows, cols) each basis was built for
        self._steps = 0
        self._warned: set[str] = set()
        self._warned_history = False  # keep_history without sample_rows: said once
        # in_basis="sign": the old tasks' Taylor model in the basis, grad ~ theta K - D.
        self._k: dict[str, Tensor] = {}
        self._d: dict[str, Tensor] = {}

    # ------------------------------------------------------------------ binding

    def bind(
        self,
        params: Mapping[str, Tensor],
        groups: Sequence[MatrixGroup] | None = None,
        modules: Mapping[str, nn.Module] | None = None,
    ) -> None:
        groups = list(groups) if groups is not None else matrix_groups(params)
        self._groups = {g.weight: g for g in groups}
        self._first = groups[0].weight if groups else None
        for name in list(self._basis):
            group = self._groups.get(name)
            if group is not None and self._shapes.get(name) != (group.rows, group.cols):
                # The matrix changed shape (e.g. a head grew): a parameter the old tasks never
                # saw in this form, so it is free.
                del self._basis[name]
                self._complement.discard(name)
                for store in (self._cov, self._k, self._d, self._energy):
                    store.pop(name, None)
                self._count.pop(name, None)
        device = next(iter(params.values())).device if params else torch.device("cpu")
        for store in (self._basis, self._cov, self._k, self._d, self._energy):
            for name, value in store.items():
                store[name] = value.to(device)

    def learn_from(
        self, target: Literal["gradient", "update"], optimizer: torch.optim.Optimizer | None
    ) -> None:
        """Resolve ``normalize_steps="auto"``: unit-energy steps except for the update vectors
        of optimizers other than SGD (measured: Adam on digits, docs/science.md)."""
        if self.normalize_steps == "auto":
            adaptive = target == "update" and not isinstance(optimizer, torch.optim.SGD)
            self._normalize = not adaptive

    @property
    def normalizes_steps(self) -> bool:
        """Whether observed steps enter the second moment with unit energy (``"auto"``
        resolved by the last :meth:`learn_from`)."""
        return self._normalize

    def threshold_of(self, weight: str) -> float:
        """The energy threshold used for a weight matrix."""
        if weight in self.layer_thresholds:
            return self.layer_thresholds[weight]
        if weight == self._first and self.input_threshold is not None:
            return self.input_threshold
        return self.threshold

    def subspace_dims(self) -> dict[str, int]:
        """Directions protected per weight matrix."""
        return {name: self._dim(name) for name in self._basis}

    def rename(self, renamed: Mapping[str, str]) -> None:
        for attr in ("_basis", "_cov", "_k", "_d", "_energy", "_count", "_shapes"):
            setattr(self, attr, rename_keys(getattr(self, attr), renamed))
        self._complement = set(rename_keys(dict.fromkeys(self._complement), renamed))
        self._warned = set(rename_keys(dict.fromkeys(self._warned), renamed))
        self._recent = [(s, rename_keys(a, renamed)) for s, a in self._recent]

    def task_figures(self) -> dict[str, float]:
        return {f"metagrad/subspace_dim/{n}": float(k) for n, k in self.subspace_dims().items()}

    def _dim(self, name: str) -> int:
        cols, stored = self._basis[name].shape
        return cols - stored if name in self._complement else stored

    def basis(self, weight: str) -> Tensor:
        """The orthonormal basis (fan-in x k) of a weight matrix's protected subspace."""
        stored = self._basis[weight]
        return complement_of(stored) if weight in self._complement else stored

    def state_floats(self) -> int:
        """Floats held between tasks: per matrix the smaller of the basis and its complement."""
        return sum(m.numel() for m in self._basis.values())

    # ------------------------------------------------------------------ learning

    def _matrices(
        self, names: Sequence[str], tensors: Sequence[Tensor]
    ) -> list[tuple[MatrixGroup, Tensor, Tensor | None]]:
        """Per group present on this step: (group, weight as rows x fan-in, bias or None)."""
        by_name = dict(zip(names, tensors))
        out = []
        for group in self._groups.values():
            w = by_name.get(group.weight)
            if w is None:
                continue
            b = by_name.get(group.bias) if group.bias is not None else None
            # A per-row tensor as a column (a bias, or a rows x 1 scale), a view of it.
            out.append((group, w.reshape(group.rows, -1), None if b is None else b.view(-1)))
        return out

    def observe(
        self,
        names: Sequence[str],
        thetas: Sequence[Tensor],
        targets: Sequence[Tensor],
        finite: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Add the step's (sampled) gradient rows to each matrix's second moment, every
        ``every`` steps; ``finite`` (a 0-dim bool tensor) False leaves the step out."""
        step = self._steps
        self._steps += 1
        if step % self.every != 0:
            return {}
        added: dict[str, Tensor] = {}
        for group, g in self._matrix_views(names, targets):  # a missing bias grad counts as 0
            if self._normalize:  # unit energy; a non-finite step stays non-finite
                energy = _sq_norm(g)
                g = g * energy.clamp_min(1e-30).rsqrt()
                if self.in_basis == "sign":  # only its Taylor model needs the raw scale
                    self._add_energy(group.weight, energy, finite)
            if self.sample_rows is not None and self.sample_rows < group.rows:
                rows = torch.randint(group.rows, (self.sample_rows,), generator=self.generator)
                g = g[_to_device(rows, g.device)]
            if finite is not None:  # where, not a product: a NaN times 0 is still NaN
                g = torch.where(finite, g, torch.zeros((), dtype=g.dtype, device=g.device))
            if self._history_steps:
                added[group.weight] = g
            cov = self._cov.get(group.weight)
            if cov is None:
                cov = self._cov[group.weight] = g.new_zeros(group.cols, group.cols)
            cov.addmm_(g.T, g)
            self._count[group.weight] = self._count.get(group.weight, 0) + 1
        if self._history_steps:
            self._recent.append((step, added))
            while self._recent and self._recent[0][0] <= step - self._history_steps:
                self._recent.pop(0)
        return {}

    def _add_energy(self, name: str, energy: Tensor, finite: Tensor | None) -> None:
        if finite is not None:  # a skipped step adds nothing
            energy = torch.where(finite, energy, torch.zeros_like(energy))
        total = self._energy.get(name)
        self._energy[name] = energy if total is None else total + energy

    def keep_history(self, steps: int) -> None:
        """Keep the sampled rows of the observations of the last ``steps`` steps (without
        ``sample_rows`` whole gradients would be kept: nothing is kept then)."""
        if steps and self.sample_rows is None and not self._warned_history:
            self._warned_history = True
            self.runtime.warn(
                "SubspacePredictor(sample_rows=None) keeps no history of recent steps, so the "
                "steps between a task switch and its detection are folded into the old task. "
                "Set `sample_rows` (e.g. 32) to have them taken back."
            )
        self._history_steps = steps if self.sample_rows is not None else 0
        if not self._history_steps:
            self._recent = []

    def forget_recent(self, steps: int) -> bool:
        """Subtract the observations of the last ``steps`` steps from the second moments."""
        if steps <= 0 or not self._recent:
            return False
        first = self._steps - steps  # steps numbered from 0; the last one is _steps - 1
        taken = False
        for step, added in self._recent:
            if step < first:
                continue
            for name, g in added.items():
                if self._count.get(name, 0) > 1:  # never empty a moment entirely
                    self._cov[name].addmm_(g.T, g, alpha=-1.0)
                    self._count[name] -= 1
                    taken = True
        self._recent = [(s, a) for s, a in self._recent if s < first]
        return taken

    @torch.no_grad()
    def end_task(self, names: Sequence[str], thetas: Sequence[Tensor]) -> None:
        if not self._count:
            self._steps = 0
            raise NothingToFold(
                "the task ended before any gradient was observed (it needs at least one step "
                f"with a weight-matrix gradient; observed every {self.every} steps)"
            )
        ends = {g.weight: theta for g, theta in self._matrix_views(names, thetas)}
        for name, cov in self._cov.items():
            if not self._count.get(name):
                continue
            group = self._groups.get(name)
            rows = group.rows if group is not None else self._shapes.get(name, (0, 0))[0]
            basis = self.basis(name) if name in self._basis else None
            grown = grow_basis(basis, cov, self.threshold_of(name))
            if grown is None:  # nothing to add and nothing stored yet
                grown = cov.new_zeros(cov.shape[0], 0)
            self._complement.discard(name)
            if self.in_basis == "project" and grown.shape[1] > grown.shape[0] / 2:
                self._complement.add(name)  # store (and multiply by) the smaller side
                grown = complement_of(grown)
            self._basis[name] = grown.to(cov.dtype)
            self._shapes[name] = (rows, cov.shape[0])
            if self.in_basis == "sign" and name in ends:
                curvature = cov / (self._count[name] * max(rows, 1))
                if name in self._energy:  # back to the raw scale: times the mean step energy
                    curvature = curvature * (self._energy[name] / self._count[name])
                self._fold_taylor(name, curvature, ends[name])
        self._cov, self._count, self._recent, self._energy = {}, {}, [], {}
        self._steps = 0  # every task's first step is observed, however short the task
        self._old_tasks += 1
        self._warn_full_rank()

    def _fold_taylor(self, name: str, curvature: Tensor, end: Tensor) -> None:
        """Eq. 6 for the Taylor model in the basis: running means of ``C_i M`` and
        ``W*_i C_i M`` (old tasks count as 0 along directions added after them)."""
        m = self._basis[name]
        t = float(self._old_tasks)
        cm = curvature @ m
        k, d = self._k.get(name), self._d.get(name)
        pad = m.shape[1] - (0 if k is None else k.shape[1])
        k = cm.new_zeros(cm.shape[0], 0) if k is None else k
        d = cm.new_zeros(end.shape[0], 0) if d is None else d
        k = torch.nn.functional.pad(k, (0, pad))
        d = torch.nn.functional.pad(d, (0, pad))
        self._k[name] = (t * k + cm) / (t + 1)
        self._d[name] = (t * d + end.float() @ cm) / (t + 1)

    def _matrix_views(
        self, names: Sequence[str], tensors: Sequence[Tensor]
    ) -> list[tuple[MatrixGroup, Tensor]]:
        """Per group present: the matrix [W, b] (rows x cols), as a float copy."""
        out = []
        for group, w, b in self._matrices(names, tensors):
            if group.bias is not None:
                column = b.float()[:, None] if b is not None else w.new_zeros(group.rows, 1)
                out.append((group, torch.cat([w.float(), column.float()], dim=1)))
            else:
                out.append((group, w.float()))
        return out

    def _warn_full_rank(self) -> None:
        for name, m in self._basis.items():
            cols, k = m.shape[0], self._dim(name)
            if k >= self.full_rank_warning * cols and name not in self._warned:
                self._warned.add(name)
                self.runtime.warn(
                    f"MetaGrad: the protected subspace of {name!r} holds {k} of its {cols} input "
                    "directions, so new tasks have little left to learn with there. Lower its "
                    f"energy threshold, e.g. SubspacePredictor(layer_thresholds={{{name!r}: "
                    "0.9}), or widen the layer."
                )

    # ------------------------------------------------------------------ the rule

    def predict(self, names: Sequence[str], thetas: Sequence[Tensor]) -> list[Prediction]:
        raise TypeError("SubspacePredictor rewrites by projection (rule='projection')")

    @torch.no_grad()
    def rewrite_(
        self, names: Sequence[str], thetas: Sequence[Tensor], targets: Sequence[Tensor]
    ) -> Tensor | None:
        removed: list[Tensor] = []
        total: list[Tensor] = []
        anchors = (
            {g.weight: theta for g, theta in self._matrix_views(names, thetas)}
            if self.in_basis == "sign"
            else {}
        )
        for group, w, b in self._matrices(names, targets):
            m = self._basis.get(group.weight)
            if m is None or self._dim(group.weight) == 0:
                total.append(w.float().pow(2).sum() + (0 if b is None else b.float().pow(2).sum()))
                continue
            if group.weight in self._complement:
                removed_here, total_here = _keep_complement_(m, w, b if group.bias else None)
                removed.append(removed_here)
                total.append(total_here)
                continue
            mw = m[: w.shape[1]]
            wf = w.float()
            gm = wf @ mw  # rows x k: the gradient's coordinates in the protected basis
            if group.bias is not None and b is not None:
                gm.addr_(b.float(), m[w.shape[1]])
            if self.in_basis == "sign" and group.weight in self._k:
                # Eq. 5 in the basis: remove a coordinate only where it disagrees in sign
                # with the modelled mean old-task gradient there.
                old = anchors[group.weight] @ self._k[group.weight] - self._d[group.weight]
                gm.mul_(torch.mul(gm, old).le_(0).to(gm.dtype))
            # Energies by norms: a reduction, no squared temporary of G.
            if group.bias is not None and b is not None:
                mb = m[w.shape[1]]
                total.append(_sq_norm(wf) + _sq_norm(b.float()))
                b.sub_((gm @ mb).to(b.dtype))
            else:
                total.append(_sq_norm(wf))
            removed.append(_sq_norm(gm))  # |G M M^T|^2 = |G M|^2 (M orthonormal)
            if w.dtype == torch.float32:
                w.sub_(gm @ mw.T)  # G <- G - (G M) M^T, in place in .grad
            else:
                w.copy_(wf - gm @ mw.T)
        if not removed:
            return None
        return torch.stack(removed).sum() / torch.stack(total).sum().clamp_min(1e-30)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        return {
            "version": self._state_version,
            "num_old_tasks": self._old_tasks,
            "basis": {k: v.detach().clone() for k, v in self._basis.items()},
            "cov": {k: v.detach().clone() for k, v in self._cov.items()},
            "count": dict(self._count),
            "energy": {k: v.detach().clone() for k, v in self._energy.items()},
            "shapes": {k: list(v) for k, v in self._shapes.items()},
            "steps": self._steps,
            "generator": self.generator.get_state(),
            "warned": sorted(self._warned),
            "complement": sorted(self._complement),
            "taylor_k": {k: v.detach().clone() for k, v in self._k.items()},
            "taylor_d": {k: v.detach().clone() for k, v in self._d.items()},
            "history_steps": self._history_steps,
            "recent": [
                [step, {k: v.detach().clone() for k, v in added.items()}]
                for step, added in self._recent
            ],
        }

    def load_state_dict(self, state: dict) -> None:
        check_state_version(type(self).__name__, state, (1, 2), unversioned=1)
        self._old_tasks = int(state["num_old_tasks"])
        self._basis = {k: v.clone() for k, v in state["basis"].items()}
        self._cov = {k: v.clone() for k, v in state["cov"].items()}
        self._count = {k: int(v) for k, v in state["count"].items()}
        energy = state["energy"] if state.get("version", 1) >= 2 else {}
        self._energy = {k: v.clone() for k, v in energy.items()}
        self._shapes = {k: (int(v[0]), int(v[1])) for k, v in state["shapes"].items()}
        self._steps = int(state["steps"])
        self.generator.set_state(state["generator"])
        self._warned = set(state["warned"])
        self._complement = set(state["complement"])
        self._k = {k: v.clone() for k, v in state["taylor_k"].items()}
        self._d = {k: v.clone() for k, v in state["taylor_d"].items()}
        self._history_steps = int(state["history_steps"])
        self._recent = [
            (int(step), {k: v.clone() for k, v in added.items()}) for step, added in state["recent"]
        ]


@torch.no_grad()
def _keep_complement_(n: Tensor, w: Tensor, b: Tensor | None) -> tuple[Tensor, Tensor]:
    """``G <- G N N^T`` in place for ``G = [w, b]`` (``N``: the complement of the protected
    basis); returns (removed energy, total energy)."""
    nw = n[: w.shape[1]]
    wf = w.float()
    gn = wf @ nw  # rows x (fan-in - k): the coordinates outside the protected subspace
    total = wf.pow(2).sum()
    if b is not None:
        nb = n[w.shape[1]]
        gn.addr_(b.float(), nb)
        total = total + b.float().pow(2).sum()
        b.copy_(gn @ nb)
    w.copy_(gn @ nw.T)
    return total - gn.pow(2).sum(), total


def _to_device(index: Tensor, device: torch.device) -> Tensor:
    """A CPU index tensor on ``device``; to a GPU through pinned memory without blocking, so
    the copy does not wait for the work queued before it (no host sync)."""
    if device.type == "cpu":
        return index
    return index.pin_memory().to(device, non_blocking=True)


def _sq_norm(t: Tensor) -> Tensor:
    return torch.linalg.vector_norm(t).square()
