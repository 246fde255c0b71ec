r"""A CUBER-style relaxation of the default predictor (issue 23, part 3): backward transfer
without data, eq. 5 applied at the level of the subspace.

:class:`~lightning_metagrad.predictors.subspace.SubspacePredictor` removes every step's
component in the old tasks' gradient subspace, ``G <- G - (G M) M^T``: nothing the old tasks
use ever moves, so backward transfer is at most zero. CUBER (Lin et al., NeurIPS 2022,
"Beyond Not-Forgetting") relaxes that projection per layer and old task: where the new task's
gradient *agrees* with an old task's gradient inside that task's subspace (positive cosine),
the weights may move there (a step that lowers the new loss then lowers the old one too, to
first order), under a proximal pull that keeps them near where the task started; the cosine
is re-checked every step, and the projection comes back once it is not positive.

This predictor does that in the default's own basis, with no stored data and no extra pass:

* **Blocks.** Each weight matrix's basis ``M`` (fan-in x k) is kept as blocks of columns
  ``M = [B_1, B_2, ...]``, ``B_i`` the directions task ``i`` added (GPM's energy rule adds
  only what the basis does not explain yet; the columns are kept in that order).
* **Reference.** During a task the predictor sums the gradients it sees (``[dW, db]``, every
  step; with ``reference="late"`` an exponential average over about the last ``horizon``
  steps instead, an estimate of the gradient where the task ended). At the task's end their
  mean, ``Gbar``, is taken to the grown basis, ``Gbar M``
  (rows x k), scaled to unit norm (every task counts the same) and folded into one running
  reference per matrix, ``R <- (n R + Gbar M / |Gbar M|) / (n + 1)`` (eq. 6's running mean;
  older tasks count as 0 along directions added after them). Memory is constant in the number
  of tasks: ``R`` and the anchor below are rows x k each (at most one float per parameter
  each), plus the task's gradient sum (rows x fan-in) during a task.
* **The rule**, every step, per matrix, with ``g = G M`` the gradient's coordinates in the
  basis and, per block ``i`` (and, with ``granularity="row"``, per row of the matrix),
  ``cos_i = <g_i, R_i> / (|g_i| |R_i|)``: where ``cos_i > agree`` the step keeps its
  component along the reference, ``max(0, <g_i, R_i>) / |R_i|^2 · R_i``
  (``keep="reference"``), or the block's whole component (``keep="component"``, CUBER); the
  rest of the block is removed exactly as the default removes it. Then the proximal pull
  ``proximal · (W M - A) M^T`` is added, with ``A`` the weights' coordinates at the start of
  the task (on the whole subspace, so a block that stops agreeing is drawn back; where
  nothing ever moved it is zero): ``G <- G - (g - kept(g)) M^T + proximal · (W M - A) M^T``.
  ``granularity="block"`` / ``"layer"`` test per block / once per matrix (CUBER's layer-wise
  test); ``smoothing`` in [0, 1) tests a running average of the recent steps' ``g``.
* **Outside the basis** (``outside="row"`` / ``"matrix"``), where the default lets the old
  tasks' loss leak: the running reference's part outside the basis, ``r`` (rows x fan-in),
  guards the rest of the step: where ``<G, r> < 0`` (per row, or over the matrix) the step
  loses ``<G, r> / |r|^2 · r`` (A-GEM's test with a stored reference instead of replayed
  data). Another rows x fan-in per matrix, constant in the number of tasks.

With ``agree=1`` (nothing passes), ``proximal=0`` and ``outside="none"`` the rule is the
default's projection.

Measured (docs/science.md, section 7; ``gpm-pmnist`` on the digits, 3 seeds, chosen on the
validation split): the defaults here (``keep="reference"``, ``reference="late"``,
``granularity="row"``, ``proximal=3``, ``outside="row"``) reach ACC 0.521 ± 0.049 / BWT
+0.006 ± 0.040 on the test split, against GPM's 0.474 / -0.059 and the default's 0.459 /
-0.047 (one seed of three still forgets: -0.040). CUBER as worded (``keep="component"``,
``reference="mean"``, ``granularity="block"``, ``proximal=1``, ``outside="none"``) frees the
most capacity but forgets the most (0.534 / -0.202): the reference goes stale as the weights
drift, and the batch noise a whole kept component lets in costs the old tasks at second order.
Dense statistic only (``sketch=None``); projection in the basis only (``in_basis="project"``);
not under row sharding.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from lightning_metagrad._validation import (
    check_choice,
    check_float,
    check_int,
    check_state_version,
)
from lightning_metagrad.matrices import MatrixGroup
from lightning_metagrad.predictors.base import rename_keys
from lightning_metagrad.predictors.subspace import SubspacePredictor

Granularity = Literal["block", "layer", "row"]
#: How a task's reference gradient weighs its steps (see ``RelaxedSubspacePredictor``).
Reference = Literal["mean", "late"]
#: What of an agreeing block's component is kept.
Keep = Literal["component", "reference"]
#: How the part of a step outside the basis is guarded (``"none"``: as the default, free).
Outside = Literal["none", "matrix", "row"]


class RelaxedSubspacePredictor(SubspacePredictor):
    r"""The default subspace predictor with CUBER's relaxation (module docstring): a block of
    the protected basis stays movable on a step where the gradient agrees there with the old
    tasks' running reference gradient, under a proximal pull.

    Args:
        agree: the cosine a block's component must exceed to be kept (0: any agreement;
            1: never, the default's projection).
        proximal: the pull's strength, in gradient units per unit of drift (the step adds
            ``lr · proximal`` of the drift back); 0: no pull.
        granularity: ``"block"``: one test per block of directions (per old task that added
            them); ``"layer"``: one test per weight matrix over its whole basis; ``"row"``: one
            per block and row of the matrix (each output unit apart).
        smoothing: the test reads ``s · previous + (1 - s) · g`` (0: the step's own ``g``).
        reference: ``"mean"``: a task's reference is the mean of all its steps' gradients;
            ``"late"``: an exponential average over its last ``horizon`` steps or so, an
            estimate of the old task's gradient where it ended (what is left to descend
            there), which is what CUBER's first-order argument needs.
        horizon: the steps the ``"late"`` average spans.
        keep: ``"component"``: an agreeing block keeps its whole component (CUBER);
            ``"reference"``: only its component along the reference (the one direction the
            first-order argument vouches for; the rest of the block is projected out).
        outside: ``"matrix"`` / ``"row"`` also guard the part of the step outside the basis
            (where the default lets the old tasks' loss leak): the running reference's part
            outside the basis is kept (rows x fan-in per matrix), and where the step disagrees
            with it (negative inner product, per matrix or per row) the step's component
            along it is removed: A-GEM's test with a stored reference instead of replayed
            data. ``"none"``: the part outside the basis is free, as in the default.
        **kwargs: :class:`SubspacePredictor`'s arguments (``sketch`` must stay None,
            ``in_basis`` ``"project"``); ``statistic="gradient"`` and ``late_weight=1.0`` by
            default, the setting its defaults were chosen with.

    Example:
        >>> pred = RelaxedSubspacePredictor(every=1, proximal=0.0)
        >>> w = torch.zeros(2, 3)
        >>> pred.bind({"w": w})
        >>> g = torch.tensor([[1.0, 0, 0], [1.0, 0, 0]])  # task 1 moves along x only
        >>> _ = pred.observe(["w"], [w], [g])
        >>> pred.end_task(["w"], [w])
        >>> same = torch.tensor([[2.0, 1.0, 0], [2.0, 0, 1.0]])
        >>> _ = pred.rewrite_(["w"], [w], [same])  # agrees with task 1 along x: kept
        >>> same[0]
        tensor([2., 1., 0.])
        >>> other = torch.tensor([[-2.0, 1.0, 0], [-2.0, 0, 1.0]])
        >>> _ = pred.rewrite_(["w"], [w], [other])  # disagrees: projected out
        >>> other[0]
        tensor([0., 1., 0.])
    """

    # The relaxation's own part of the state ("relaxed" entry); the parent's stays versioned.
    _relaxed_version: ClassVar[int] = 1

    def __init__(
        self,
        agree: float = 0.0,
        proximal: float = 3.0,
        granularity: Granularity = "row",
        smoothing: float = 0.0,
        reference: Reference = "late",
        horizon: int = 100,
        keep: Keep = "reference",
        outside: Outside = "row",
        **kwargs: Any,
    ) -> None:
        if kwargs.get("sketch") is not None:
            raise ValueError("RelaxedSubspacePredictor needs the dense statistic: use sketch=None")
        if kwargs.get("in_basis", "project") != "project":
            raise ValueError("RelaxedSubspacePredictor replaces `in_basis`: leave it 'project'")
        # Its defaults were chosen with the gradient statistic (docs/science.md, section 7).
        kwargs.setdefault("statistic", "gradient")
        kwargs.setdefault("late_weight", 1.0)
        kwargs.setdefault("sketch", None)
        super().__init__(**kwargs)
        self.agree = check_float("agree", agree, minimum=-1.0, maximum=1.0)
        self.proximal = check_float("proximal", proximal, minimum=0.0)
        self.granularity: Granularity = check_choice(
            "granularity", granularity, ("block", "layer", "row")
        )
        self.smoothing = check_float(
            "smoothing", smoothing, minimum=0.0, maximum=1.0, high_open=True
        )
        self.reference: Reference = check_choice("reference", reference, ("mean", "late"))
        self.horizon = check_int("horizon", horizon, minimum=1)
        self.keep: Keep = check_choice("keep", keep, ("component", "reference"))
        self.outside: Outside = check_choice("outside", outside, ("none", "matrix", "row"))
        # outside=True: per matrix the running reference's part outside the basis (rows x
        # cols, orthogonal to M) and the tasks folded into it.
        self._ref_out: dict[str, Tensor] = {}
        self._out_tasks: dict[str, int] = {}
        # Per weight name: the task's summed gradient [dW, db] (rows x cols) and its count.
        self._gsum: dict[str, Tensor] = {}
        self._gcount: dict[str, int] = {}
        # The running reference in basis coordinates (rows x k), the tasks folded into it, the
        # weights' coordinates at the task's start (rows x k), and the block edges (cumulative
        # column counts, one per task that added directions).
        self._ref: dict[str, Tensor] = {}
        self._ref_tasks: dict[str, int] = {}
        self._anchor: dict[str, Tensor] = {}
        self._edges: dict[str, list[int]] = {}
        self._ema: dict[str, Tensor] = {}
        # Diagnostics: per matrix the summed in-basis energy of the task's steps and the part
        # kept (0-dim tensors, no host sync), and the last finished task's kept shares.
        self._inside: dict[str, Tensor] = {}
        self._kept_energy: dict[str, Tensor] = {}
        self.kept_shares: dict[str, float] = {}
        self.kept_history: list[dict[str, float]] = []
        self._block_ids: dict[str, Tensor] = {}

    # ------------------------------------------------------------------ binding

    def bind(
        self,
        params: Mapping[str, Tensor],
        groups: Sequence[MatrixGroup] | None = None,
        modules: Mapping[str, nn.Module] | None = None,
    ) -> None:
        super().bind(params, groups, modules)
        device = next(iter(params.values())).device if params else torch.device("cpu")
        for name in [n for n in self._edges if n not in self._basis]:
            # The matrix changed shape: the parent dropped its basis, so its reference goes.
            stores: tuple[dict, ...] = (self._ref, self._anchor, self._ema, self._edges)
            for store in (*stores, self._ref_tasks, self._ref_out, self._out_tasks):
                store.pop(name, None)
        for group in self._groups.values():
            total = self._gsum.get(group.weight)
            if total is not None and total.shape != (group.rows, group.cols):
                self._gsum.pop(group.weight)
                self._gcount.pop(group.weight, None)
        for tensors in (self._ref, self._anchor, self._gsum, self._ema, self._ref_out):
            for name, value in tensors.items():
                tensors[name] = value.to(device)
        for name in list(self._basis):
            self._explicit(name)
        self._block_ids = {}

    def sharding_unsupported(self) -> str | None:
        return "RelaxedSubspacePredictor keeps whole-matrix references; use 'subspace'"

    def rename(self, renamed: Mapping[str, str]) -> None:
        super().rename(renamed)
        for attr in (
            "_gsum",
            "_gcount",
            "_ref",
            "_ref_tasks",
            "_anchor",
            "_edges",
            "_ema",
            "_ref_out",
            "_out_tasks",
        ):
            setattr(self, attr, rename_keys(getattr(self, attr), renamed))
        self._inside, self._kept_energy, self._block_ids = {}, {}, {}

    def memory_floats(self) -> int:
        extra = [*self._gsum.values(), *self._ref.values(), *self._anchor.values()]
        extra += list(self._ref_out.values())
        return super().memory_floats() + sum(t.numel() for t in [*extra, *self._ema.values()])

    def task_figures(self) -> dict[str, float]:
        figures = super().task_figures()
        figures.update({f"metagrad/relaxed_kept/{n}": v for n, v in self.kept_shares.items()})
        return figures

    # ------------------------------------------------------------------ learning

    def observe(
        self,
        names: Sequence[str],
        thetas: Sequence[Tensor],
        targets: Sequence[Tensor],
        finite: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """The parent's statistic, and every step's ``[dW, db]`` into the task's sum."""
        figures = super().observe(names, thetas, targets, finite)
        with torch.no_grad():
            for group, w, b in self._matrices(names, targets):
                name = group.weight
                total = self._gsum.get(name)
                if total is None:
                    total = self._gsum[name] = w.new_zeros(
                        group.rows, group.cols, dtype=torch.float32
                    )
                fan_in = w.shape[1]
                step_w, step_b = w.float(), None if b is None else b.float()
                if finite is not None:  # where, not a product: a NaN times 0 is still NaN
                    zero = torch.zeros((), device=w.device)
                    step_w = torch.where(finite, step_w, zero)
                    step_b = None if step_b is None else torch.where(finite, step_b, zero)
                if self.reference == "late":  # an average over the last ~horizon steps
                    total.mul_(1.0 - 1.0 / self.horizon)
                total[:, :fan_in].add_(step_w)
                if step_b is not None and group.bias is not None:
                    total[:, fan_in].add_(step_b)
                self._gcount[name] = self._gcount.get(name, 0) + 1
        return figures

    @torch.no_grad()
    def end_task(self, names: Sequence[str], thetas: Sequence[Tensor]) -> None:
        before = {name: self.basis(name) for name in self._basis}
        super().end_task(names, thetas)  # grows each basis by GPM's rule
        ends = {g.weight: theta for g, theta in self._matrix_views(names, thetas)}
        for name in list(self._basis):
            old = before.get(name)
            m = self._aligned(old, self.basis(name))
            self._basis[name] = m
            self._complement.discard(name)
            k = m.shape[1]
            edges = self._edges.setdefault(name, [])
            if k > (edges[-1] if edges else 0):
                edges.append(k)
            ref = self._ref.get(name)
            rows = m.new_zeros(self._shapes[name][0], 0) if ref is None else ref
            ref = nn.functional.pad(rows, (0, k - rows.shape[1]))
            total, count = self._gsum.get(name), self._gcount.get(name, 0)
            if total is not None and count and k:
                coords = (total / count) @ m
                norm = torch.linalg.vector_norm(coords)
                if float(norm) > 0:
                    n = self._ref_tasks.get(name, 0)
                    ref = (n * ref + coords / norm) / (n + 1)
                    self._ref_tasks[name] = n + 1
            self._ref[name] = ref
            if self.outside != "none":
                self._fold_outside(name, m, total, count)
            if name in ends:
                self._anchor[name] = ends[name] @ m
        self.kept_shares = {
            name: float(self._kept_energy[name] / self._inside[name].clamp_min(1e-30))
            for name in self._inside
        }
        self.kept_history.append(dict(self.kept_shares))
        self._gsum, self._gcount, self._ema, self._inside, self._kept_energy = {}, {}, {}, {}, {}
        self._block_ids = {}

    def _fold_outside(self, name: str, m: Tensor, total: Tensor | None, count: int) -> None:
        """The running reference's part outside the (grown) basis: the old part without the
        new directions, and the finished task's mean gradient outside the basis, scaled by
        that mean's whole norm."""
        rows, cols = self._shapes[name]
        prev = self._ref_out.get(name)
        if prev is None or prev.shape != (rows, cols):
            prev = m.new_zeros(rows, cols)
        else:
            prev = prev - (prev @ m) @ m.T
        if total is not None and count:
            mean = total / count
            norm = torch.linalg.vector_norm(mean)
            if float(norm) > 0:
                n = self._out_tasks.get(name, 0)
                part = (mean - (mean @ m) @ m.T) / norm
                prev = (n * prev + part) / (n + 1)
                self._out_tasks[name] = n + 1
        self._ref_out[name] = prev

    def _guard_outside_(
        self, name: str, w: Tensor, b: Tensor | None, removed: list[Tensor]
    ) -> None:
        """``G <- G - min(0, <G, r>) / |r|^2 · r`` with ``r`` the reference outside the basis
        (orthogonal to it, so the in-basis rule is untouched), over the whole matrix or per
        row; no host sync."""
        r = self._ref_out.get(name)
        if self.outside == "none" or r is None or self._out_tasks.get(name, 0) == 0:
            return
        fan_in = w.shape[1]
        rw = r[:, :fan_in]
        rb = r[:, fan_in] if b is not None and r.shape[1] > fan_in else None
        dot = (w.float() * rw).sum(1)
        size = rw.square().sum(1)
        if rb is not None and b is not None:
            dot = dot + b.float() * rb
            size = size + rb.square()
        if self.outside == "matrix":
            dot, size = dot.sum(), size.sum()
        coef = dot.clamp(max=0.0) / size.clamp_min(1e-30)
        column = coef[:, None] if coef.dim() else coef
        w.sub_((column * rw).to(w.dtype))
        if rb is not None and b is not None:
            b.sub_((coef * rb).to(b.dtype))
        removed.append((coef.square() * size).sum())

    def _explicit(self, name: str) -> None:
        """Hold a basis stored as its complement as the basis itself (one block)."""
        if name in self._complement:
            self._basis[name] = self.basis(name)
            self._complement.discard(name)
            k = self._basis[name].shape[1]
            self._edges[name] = [k] if k else []
            ref = self._ref.get(name)
            if ref is not None and ref.shape[1] != k:  # its columns no longer match
                self._ref.pop(name)
                self._anchor.pop(name, None)

    @staticmethod
    def _aligned(old: Tensor | None, grown: Tensor) -> Tensor:
        """``grown``'s span as ``[old, new]``: the old columns exactly as they were (the
        parent's QR may flip their signs, and its complement reorders them), the new ones an
        orthonormal basis of the part of ``grown`` outside ``old``."""
        if old is None or old.shape[1] == 0:
            return grown.contiguous()
        if grown.shape[1] <= old.shape[1]:
            return old
        rest = grown.double() - old.double() @ (old.double().T @ grown.double())
        left, _, _ = torch.linalg.svd(rest, full_matrices=False)
        new = left[:, : grown.shape[1] - old.shape[1]].to(old.dtype)
        return torch.cat([old, new], 1).contiguous()

    # ------------------------------------------------------------------ the rule

    def _block_index(self, name: str, k: int, device: torch.device) -> tuple[Tensor, int]:
        ids = self._block_ids.get(name)
        if ids is None or ids.numel() != k:
            edges = self._edges.get(name) or [k]
            if self.granularity == "layer" or edges[-1] != k:
                ids = torch.zeros(k, dtype=torch.long, device=device)
            else:
                bounds = torch.tensor(edges[:-1], dtype=torch.long, device=device)
                ids = torch.bucketize(torch.arange(k, device=device), bounds, right=True)
            self._block_ids[name] = ids
        return ids, int(ids.max()) + 1 if ids.numel() else 0

    @torch.no_grad()
    def rewrite_(
        self, names: Sequence[str], thetas: Sequence[Tensor], targets: Sequence[Tensor]
    ) -> Tensor | None:
        removed: list[Tensor] = []
        total: list[Tensor] = []
        weights = {g.weight: (w, b) for g, w, b in self._matrices(names, thetas)}
        for group, w, b in self._matrices(names, targets):
            name = group.weight
            wf = w.float()
            bf = None if b is None or group.bias is None else b.float()
            energy = _sq_norm(wf) + (0.0 if bf is None else _sq_norm(bf))
            m = self._basis.get(name)
            if m is None or m.shape[1] == 0:
                total.append(energy)
                self._guard_outside_(name, w, b if group.bias is not None else None, removed)
                continue
            self._explicit(name)
            m = self._basis[name]
            fan_in = w.shape[1]
            mw = m[:fan_in]
            gm = wf @ mw  # rows x k: the gradient's coordinates in the protected basis
            if bf is not None:
                gm.addr_(bf, m[fan_in])
            kept = self._kept(name, gm)
            drop = gm - kept
            delta = -drop
            if self.proximal > 0 and name in self._anchor and name in weights:
                tw, tb = weights[name]
                coords = tw.float() @ mw
                if group.bias is not None and tb is not None:
                    coords.addr_(tb.float(), m[fan_in])
                delta = delta + self.proximal * (coords - self._anchor[name])
            removed.append(_sq_norm(drop))
            total.append(energy)
            inside = self._inside.get(name)
            kept_energy = _sq_norm(kept)
            self._inside[name] = _sq_norm(gm) if inside is None else inside + _sq_norm(gm)
            self._kept_energy[name] = kept_energy + self._kept_energy.get(name, 0.0)
            if bf is not None and b is not None:
                b.add_((delta @ m[fan_in]).to(b.dtype))
            if w.dtype == torch.float32:
                w.addmm_(delta, mw.T)  # in place in .grad
            else:
                w.copy_(wf + delta @ mw.T)
            self._guard_outside_(name, w, b if group.bias is not None else None, removed)
        if not removed:
            return None
        return torch.stack(removed).sum() / torch.stack(total).sum().clamp_min(1e-30)

    def _kept(self, name: str, gm: Tensor) -> Tensor:
        """The part of the coordinates ``gm`` (rows x k) the rule keeps: per block whose test
        passes (cosine with the reference above ``agree``) its whole component
        (``keep="component"``) or its component along the reference, if positive
        (``keep="reference"``); zero elsewhere. No host sync."""
        ref = self._ref.get(name)
        k = gm.shape[1]
        if ref is None or ref.shape[1] != k or self._ref_tasks.get(name, 0) == 0:
            return torch.zeros_like(gm)
        test = gm
        if self.smoothing > 0:
            ema = self._ema.get(name)
            ema = (
                gm.clone()
                if ema is None
                else ema.mul_(self.smoothing).add_(gm, alpha=1 - self.smoothing)
            )
            self._ema[name] = test = ema
        ids, blocks = self._block_index(name, k, gm.device)
        # Sums over each block's columns: per row (rows x blocks) or over the whole matrix.
        rows = self.granularity == "row"

        def summed(t: Tensor) -> Tensor:
            if rows:
                return t.new_zeros(t.shape[0], blocks).index_add_(1, ids, t)
            return t.new_zeros(blocks).index_add_(0, ids, t.sum(0))

        dot, tn, rn = summed(test * ref), summed(test.pow(2)), summed(ref.pow(2))
        # Clamped: a one-column block's cosine is +-1 up to rounding, and agree=1 means never.
        cos = (dot / (tn * rn).sqrt().clamp_min(1e-30)).clamp(-1.0, 1.0)
        passed = ((cos > self.agree) & (rn > 0)).to(gm.dtype)
        if self.keep == "component":
            return gm * (passed[:, ids] if rows else passed[ids])
        own = dot if test is gm else summed(gm * ref)
        scale = passed * own.clamp_min(0) / rn.clamp_min(1e-30)  # <g_i, R_i> / |R_i|^2
        return ref * (scale[:, ids] if rows else scale[ids])

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["relaxed"] = {
            "version": self._relaxed_version,
            "gsum": {k: v.detach().clone() for k, v in self._gsum.items()},
            "gcount": dict(self._gcount),
            "ref": {k: v.detach().clone() for k, v in self._ref.items()},
            "ref_tasks": dict(self._ref_tasks),
            "anchor": {k: v.detach().clone() for k, v in self._anchor.items()},
            "edges": {k: list(v) for k, v in self._edges.items()},
            "ema": {k: v.detach().clone() for k, v in self._ema.items()},
            "kept_history": [dict(h) for h in self.kept_history],
            "ref_out": {k: v.detach().clone() for k, v in self._ref_out.items()},
            "out_tasks": dict(self._out_tasks),
        }
        return state

    def load_state_dict(self, state: dict) -> None:
        relaxed = state.get("relaxed")
        check_state_version(type(self).__name__, relaxed, self._relaxed_version)
        assert relaxed is not None  # (checked above)
        super().load_state_dict(state)
        self._gsum = {k: v.clone() for k, v in relaxed["gsum"].items()}
        self._gcount = {k: int(v) for k, v in relaxed["gcount"].items()}
        self._ref = {k: v.clone() for k, v in relaxed["ref"].items()}
        self._ref_tasks = {k: int(v) for k, v in relaxed["ref_tasks"].items()}
        self._anchor = {k: v.clone() for k, v in relaxed["anchor"].items()}
        self._edges = {k: [int(e) for e in v] for k, v in relaxed["edges"].items()}
        self._ema = {k: v.clone() for k, v in relaxed["ema"].items()}
        self.kept_history = [dict(h) for h in relaxed["kept_history"]]
        self._ref_out = {k: v.clone() for k, v in relaxed.get("ref_out", {}).items()}
        self._out_tasks = {k: int(v) for k, v in relaxed.get("out_tasks", {}).items()}
        self.kept_shares = dict(self.kept_history[-1]) if self.kept_history else {}
        self._inside, self._kept_energy, self._block_ids = {}, {}, {}


def _sq_norm(t: Tensor) -> Tensor:
    return torch.linalg.vector_norm(t).square()
