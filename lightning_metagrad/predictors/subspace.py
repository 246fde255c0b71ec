r"""The default predictor: per weight matrix, the subspace the old tasks used, learned during
each task from what the training forward and backward passes already compute (the paper's
section 2.2 suggestion to "process a small set of related parameters simultaneously").

For every weight matrix ``W`` (out x fan-in; a conv kernel as out x in·kh·kw; its bias, when
the module has one, as an extra column) the predictor accumulates, during a task, a second
moment ``C`` on the input side, every ``every``-th optimizer step. By default
(``statistic="inputs"``) it is the uncentred second moment of the rows ``[x, 1]`` the matrix
multiplies in the training forward passes, read by forward hooks (the statistic of GPM and
Adam-NSCL, with no extra pass); a matrix no hook sees (an embedding, an attention projection
called functionally) uses its gradients, ``sum_t G_t^T G_t / |G_t|^2`` with ``G = [dW, db]``
(``statistic="gradient"``, the earlier default). Each observed step enters with unit energy
(``normalize_steps``) and ``late_weight`` < 1 discounts the earlier steps, so the basis leans
towards the representation the task ended with. No stored data. With optimizers other than
plain SGD the rewritten ``G`` is the optimizer's update vector.

At a task boundary ``C`` is folded into an orthonormal basis ``M`` by the energy rule of
Gradient Projection Memory (Saha et al., 2021): just enough new directions from the part of
``C`` outside ``M`` are added that ``M`` explains a fraction ``threshold`` of the finished
task's energy. From the second task on, every step loses its component in that subspace,
``G <- G - (G M) M^T``: eq. 5's hard limit (a direction the old tasks use is never moved
against them) applied in the learned basis instead of coordinate by coordinate.

Memory between tasks: ``M`` per weight matrix, at most fan-in x fan-in, constant in the number
of tasks; during a task also ``C`` (fan-in x fan-in), or with ``sketch=ell`` a Frequent
Directions sketch within ``memory_budget`` floats per parameter. One-dimensional parameters
that are not a bias of a matrix (norm layers' scales and shifts, a lone scalar) are left free:
they are few, and a 1-D "subspace" of a norm scale would freeze it outright.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from lightning_metagrad._validation import (
    check_choice,
    check_float,
    check_fraction,
    check_int,
    check_state_version,
)
from lightning_metagrad.matrices import MatrixGroup, matrix_groups, owner_of
from lightning_metagrad.predictors.base import (
    NothingToFold,
    OldGradientPredictor,
    Prediction,
    rename_keys,
)
from lightning_metagrad.predictors.basis import complement_of, grow_basis
from lightning_metagrad.predictors.sketch import FrequentDirections, new_directions

#: What a matrix's statistic is made of (see ``SubspacePredictor(statistic=...)``).
Statistic = Literal["gradient", "inputs", "both"]


class SubspacePredictor(OldGradientPredictor):
    r"""Per weight matrix, the subspace the old tasks used (by default learnt from the layer's
    inputs); later gradients are projected out of it (module docstring).

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
            Dense statistic only (``sketch=None``).
        statistic: what each matrix's subspace is learned from. ``"gradient"``: the
            (sampled) rows of its gradients, as above. ``"inputs"``: the rows ``[x, 1]`` its
            ``[W, b]`` multiplies in the training forward passes, read by forward hooks on the
            owner ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` (``groups=1``) with no extra
            pass and nothing stored past the step: the uncentred input second moment of GPM and
            Adam-NSCL (Wang et al., CVPR 2021), which keeps the inputs' common component that a
            batch gradient ``sum_n delta_n x_n^T`` cancels. A matrix whose inputs no hook sees
            (embeddings, recurrent and attention projections called functionally) falls back
            to its gradient. ``"both"``: per observed step the gradient rows and the input
            rows, each with the step's energy (times ``input_weight`` for the inputs), in one
            statistic (their normalised sum). Hooks need :meth:`bind` with ``modules`` (the
            engine passes them).
        input_weight: the inputs' share relative to the gradient's per step (``"both"``).
        sketch: None keeps the dense fan-in x fan-in second moment per matrix; an int ``ell``
            keeps a Frequent Directions sketch of ``ell`` rows instead (streaming, ``2·ell``
            rows of memory; Liberty 2013, as CoSO does for gradients), with the basis grown
            from it by GPM's rule at O(fan-in·ell²) (:mod:`.sketch`). The stored basis is then
            a list of per-task blocks (no complement: converting to it needs fan-in² floats).
            ``"auto"`` (default): the dense moment where it fits the matrix's share of
            ``memory_budget`` or is small (under 4 MiB), a sketch of 32 rows within the budget
            for the others (a wide fan-in: ``Linear(4096, 16)``, resnet18's last convolutions);
            under several processes those sketches read the gradients (each process's layer
            inputs differ).
        memory_budget: with a sketch, floats per parameter a matrix's predictor state and
            workspace may hold (``ell`` is lowered to fit and the basis stops growing at the
            budget, with a warning); None: unbounded. With ``sketch=None`` a given budget only
            warns for matrices whose dense second moment exceeds it.
        late_weight: late-task weighting: before each observation the task's statistic so far
            is multiplied by this factor (1: every observed step counts the same; 0.9, the
            default: a step observed 7 observations before the task's end counts half), so the
            basis leans towards the representation the task ended with, as GPM's end-of-task
            activations do.
        threshold_step: added to every threshold per task already folded in, a schedule for
            long streams (GPM uses +0.003 on CIFAR-100: later tasks protected more; a negative
            step leaves later tasks more room); the result is kept within (0, 1].

    The defaults (``statistic="inputs"``, ``late_weight=0.9``) were chosen on the validation
    splits (docs/science.md, section 6b). The gradient-only statistic every observed step
    weighted the same, the earlier default, is
    ``SubspacePredictor(statistic="gradient", late_weight=1.0)``, or the named mode
    ``predictor="gradient-subspace"`` (:class:`GradientSubspacePredictor`). With a wide
    fan-in the default's ``sketch="auto"`` keeps the statistic within ``memory_budget``.

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
    # 2 adds "energy" (normalize_steps); 3 the sketch state ("blocks", "sketch", "total"); 4
    # the statistic it was built from ("statistic", "late_weight"). Versions 1-3 still load.
    _state_version: ClassVar[int] = 4

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
        statistic: Statistic = "inputs",
        input_weight: float = 1.0,
        sketch: int | Literal["auto"] | None = "auto",
        memory_budget: float | None = 1.0,
        late_weight: float = 0.9,
        threshold_step: float = 0.0,
    ) -> None:
        self.late_weight = check_fraction("late_weight", late_weight)
        self.threshold_step = check_float(
            "threshold_step", threshold_step, minimum=-1.0, maximum=1.0
        )
        self.in_basis = check_choice("in_basis", in_basis, ("project", "sign"))
        self.statistic: Statistic = check_choice(
            "statistic", statistic, ("gradient", "inputs", "both")
        )
        self.input_weight = check_float("input_weight", input_weight, minimum=0, low_open=True)
        count = isinstance(sketch, int) and not isinstance(sketch, bool) and sketch >= 1
        if not (sketch == "auto" or sketch is None or count):
            raise ValueError(f"`sketch` must be 'auto', None or an int >= 1, got {sketch!r}")
        self.sketch: int | Literal["auto"] | None = sketch
        self._budget_given = memory_budget != 1.0
        self.memory_budget = check_float(
            "memory_budget", memory_budget, minimum=0, low_open=True, optional=True
        )
        if isinstance(self.sketch, int) and self.in_basis == "sign":
            raise ValueError(
                "`in_basis='sign'` needs the dense second moment (its Taylor model): "
                "use sketch=None"
            )
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
        # With a sketch: per weight the stored basis as orthonormal blocks (one per task that
        # added directions, mutually orthogonal), the task's sketch of the rows outside it, and
        # the task's whole energy (the sketch holds the residual's).
        self._blocks: dict[str, list[Tensor]] = {}
        self._sketches: dict[str, FrequentDirections] = {}
        self._total: dict[str, Tensor] = {}
        # Input rows read by the forward hooks for the step the next observe() sees.
        self._pending: dict[str, Tensor] = {}
        self._hooks: list[Any] = []
        self._hooked: set[str] = set()
        self._warned_budget: set[str] = set()
        self._plans: dict[str, tuple[int, int]] = {}  # per weight: (ell, most basis columns)
        # The weights whose statistic is a sketch (all with sketch=ell; with "auto" the wide).
        self._sketched: set[str] = set()
        self._summed_state = False  # loaded a task statistic summed over row shards
        # Embedding weights: the ids the training forwards looked up since the last rewrite
        # (gradient mode only: their gradient is zero outside those rows).
        self._lookups: dict[str, list[Tensor]] = {}
        self._target: Literal["gradient", "update"] = "gradient"

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
        for name in list(self._basis) + list(self._blocks):
            group = self._groups.get(name)
            if group is not None and self._shapes.get(name) != (group.rows, group.cols):
                # The matrix changed shape (e.g. a head grew): a parameter the old tasks never
                # saw in this form, so it is free.
                self._basis.pop(name, None)
                self._blocks.pop(name, None)
                self._complement.discard(name)
                for store in (self._cov, self._k, self._d, self._energy, self._total):
                    store.pop(name, None)
                self._sketches.pop(name, None)
                self._count.pop(name, None)
        device = next(iter(params.values())).device if params else torch.device("cpu")
        for store in (self._basis, self._cov, self._k, self._d, self._energy, self._total):
            for name, value in store.items():
                store[name] = value.to(device)
        self._blocks = {n: [b.to(device) for b in bs] for n, bs in self._blocks.items()}
        for fd in self._sketches.values():
            fd.to(device)
        if (
            isinstance(self.sketch, int)
            and self.statistic != "gradient"
            and self.runtime.mean_over_ranks is not None
        ):
            raise ValueError(
                f"SubspacePredictor(statistic={self.statistic!r}, sketch={self.sketch}) under "
                "several data-parallel processes would need every process's input rows at each "
                "step; use the dense statistic (sketch=None) or statistic='gradient'"
            )
        self._split_summed_state()
        self._sketched = self._choose_sketched()
        self._hook_inputs(params, modules)
        self._hook_lookups(modules)
        self._allocate()
        self._check_budget()

    # ------------------------------------------------------------------ layer inputs

    def remove_hooks(self) -> None:
        """Remove the forward hooks (:meth:`bind` calls it before hooking again)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks, self._hooked, self._pending, self._lookups = [], set(), {}, {}

    def _hook_lookups(self, modules: Mapping[str, nn.Module] | None) -> None:
        """A forward hook on each embedding (dense gradient) that keeps the ids a training
        forward looked up: its weight's gradient is zero on every other row."""
        for group in self._groups.values():
            module = (modules or {}).get(owner_of(group.weight))
            if not isinstance(module, nn.Embedding) or module.sparse or group.bias is not None:
                continue
            if group.weight != f"{owner_of(group.weight)}.weight".lstrip("."):
                continue
            hook = partial(self._read_lookups, group.weight)
            self._hooks.append(module.register_forward_hook(hook))

    def _read_lookups(
        self, name: str, module: nn.Module, args: tuple[Any, ...], output: Any
    ) -> None:
        if not module.training or not torch.is_grad_enabled():
            return
        if self._target != "gradient" or not args or not isinstance(args[0], Tensor):
            return
        held = self._lookups.setdefault(name, [])
        held.append(args[0].detach().reshape(-1))
        if sum(t.numel() for t in held) > self._groups[name].rows:  # no saving left: dense
            held[:] = [torch.arange(self._groups[name].rows, device=args[0].device)]

    def _sample_rows(self, group: MatrixGroup, m: int, device: torch.device) -> Tensor:
        """``m`` global row indices for the statistic: drawn among the rows the step's forwards
        looked up where the matrix is an embedding in gradient mode (its gradient is zero on
        the others), else among all rows. No host sync."""
        ids = self._lookups.get(group.weight) if self._target == "gradient" else None
        if not ids:
            return _to_device(torch.randint(group.rows, (m,), generator=self.generator), device)
        looked = torch.cat(ids) if len(ids) > 1 else ids[0]
        pick = torch.randint(looked.numel(), (m,), generator=self.generator)
        return looked.to(device)[_to_device(pick, device)]

    def _forget_lookups(self) -> None:
        """The step is over: the next forwards look up rows of the next step."""
        self._lookups = {}

    def _looked_up_rows(self, group: MatrixGroup, w: Tensor) -> Tensor | None:
        """The distinct rows of an embedding's gradient ``w`` that its training forwards
        looked up since the last rewrite, if the gradient is zero on every other row (checked:
        a weight also used elsewhere, e.g. tied to an output layer, fails it); else None.

        The check reads one value on the host, so it runs on the CPU only: on an accelerator
        the whole matrix is projected, without a sync."""
        ids = self._lookups.pop(group.weight, None)
        if (
            not ids
            or self._target != "gradient"
            or self.in_basis != "project"
            or w.device.type != "cpu"
            or self.shards.sharded(group.weight)
        ):
            return None
        used = torch.cat(ids).unique()
        if used.numel() * 2 > w.shape[0]:  # too many rows for a gather/scatter to pay
            return None
        seen = torch.zeros(w.shape[0], dtype=torch.bool, device=w.device)
        seen[used] = True
        outside = torch.linalg.vector_norm(w, dim=1).masked_fill_(seen, 0.0).sum()
        return used if float(outside) == 0.0 else None

    def _hook_inputs(
        self, params: Mapping[str, Tensor], modules: Mapping[str, nn.Module] | None
    ) -> None:
        self.remove_hooks()
        if self.statistic == "gradient" or modules is None:
            return
        for group in self._groups.values():
            module = modules.get(owner_of(group.weight))
            if module is None or not _reads_inputs(module, group, params):
                continue
            if group.weight in self._sketched and self._several_processes():
                continue  # a sketch of each process's own inputs would differ: its gradients
            hook = partial(self._read_inputs, group.weight, group.bias is not None)
            self._hooks.append(module.register_forward_hook(hook))
            self._hooked.add(group.weight)

    def _read_inputs(
        self, name: str, bias: bool, module: nn.Module, args: tuple[Any, ...], output: Any
    ) -> None:
        """Forward hook: keep a few rows ``[x, 1]`` of a training step that will be observed
        (train mode, autograd on); nothing else: no graph, no data past the step."""
        if not module.training or not torch.is_grad_enabled() or self._steps % self.every:
            return
        if not args or not isinstance(args[0], Tensor):
            return
        group = self._groups.get(name)
        if group is None:
            return
        limit = self._rows_per_step(group)
        with torch.no_grad():  # (checked above: a training forward pass with autograd on)
            self._keep_rows(
                name, _input_rows(module, args[0].detach(), bias, limit, self.generator), limit
            )

    def _keep_rows(self, name: str, rows: Tensor, limit: int) -> None:
        held = self._pending.get(name)
        if held is not None:  # a second forward before the step (accumulation, tied weights)
            rows = torch.cat([held, rows])
        if rows.shape[0] > limit:
            pick = torch.randperm(rows.shape[0], generator=self.generator)[:limit]
            rows = rows[_to_device(pick, rows.device)]
        self._pending[name] = rows

    # ------------------------------------------------------------------ memory budget

    @property
    def _ell(self) -> int:
        """Sketch rows per matrix (``sketch`` given, or "auto"'s 32)."""
        return self.sketch if isinstance(self.sketch, int) else _AUTO_ELL

    def _several_processes(self) -> bool:
        return self.runtime.mean_over_ranks is not None or self.shards.active

    def _choose_sketched(self) -> set[str]:
        """The weights whose statistic is a sketch: every one with ``sketch=ell``; with
        ``"auto"`` those whose dense moment exceeds both the matrix's share of the budget and
        4 MiB (never with ``in_basis="sign"``, which needs the dense moment)."""
        if self.sketch is None or self.in_basis == "sign":
            return set()
        if isinstance(self.sketch, int):
            return set(self._groups)
        if self.memory_budget is None:
            return set()
        budget = self.memory_budget
        return {
            g.weight
            for g in self._groups.values()
            # a matrix keeps the kind of state it already holds (e.g. a loaded dense basis)
            if g.weight in self._blocks
            or (
                g.weight not in self._basis
                and g.weight not in self._cov
                and g.cols**2 > budget * g.rows * g.cols
                and g.cols**2 >= _LARGE_DENSE
            )
        }

    def _plan(self, group: MatrixGroup) -> tuple[int, int]:
        """(sketch rows ``ell``, most basis columns) of a matrix (:meth:`_allocate`)."""
        plan = self._plans.get(group.weight)
        if plan is None:
            plan = self._plans[group.weight] = _fair_plan(group, self._ell, self.memory_budget)
        return plan

    def _allocate(self) -> None:
        """Share the memory budget among the matrices. A matrix of ``rows x cols`` holds
        ``k`` basis columns and a workspace of ``_WORKSPACE·ell`` rows (the sketch's
        ``2·ell``, the pending input rows and the step's sampled rows, ``ell / 2`` each, and a
        shrink's ``ell``), all of ``cols`` floats. Each matrix first gets its own parameters'
        worth (``budget·rows·cols``) but a tenth, pooled with what the matrices that need less
        leave over; the pool goes to the others, the thinnest first (a classifier head)."""
        self._plans = {}
        groups = [g for g in self._groups.values() if g.weight in self._sketched]
        if not groups:
            return
        ell = self._ell
        if self.memory_budget is None:
            self._plans = {g.weight: (min(ell, g.cols), g.cols) for g in groups}
            return
        pool = self.memory_budget * sum(g.rows * g.cols for g in groups)
        # A tenth of every share is pooled for the matrices that need more than their own
        # (a thin classifier head needs a few directions of its full fan-in).
        share = _SHARED * self.memory_budget
        plans = {g.weight: _fair_plan(g, ell, share) for g in groups}
        spare = pool - sum(
            (k + _WORKSPACE * e) * g.cols for g in groups for e, k in [plans[g.weight]]
        )

        def shortfall(g: MatrixGroup) -> int:
            e, k = plans[g.weight]
            return (g.cols + _WORKSPACE * _widest(ell, g) - k - _WORKSPACE * e) * g.cols

        for g in sorted(groups, key=lambda g: (g.rows, shortfall(g))):  # thin matrices first
            want = shortfall(g)
            if want <= 0 or spare <= 0:
                continue
            e, k = plans[g.weight]
            if want <= spare:
                plans[g.weight] = (_widest(ell, g), g.cols)
                spare -= want
                continue
            vectors = int(spare // g.cols)  # part of it: a wider sketch first, then the basis
            e2 = min(_widest(ell, g), e + vectors // (2 * _WORKSPACE))
            k2 = min(g.cols, k + vectors - _WORKSPACE * (e2 - e))
            plans[g.weight] = (e2, k2)
            spare -= ((k2 - k) + _WORKSPACE * (e2 - e)) * g.cols
        self._plans = plans

    def _rows_per_step(self, group: MatrixGroup) -> int:
        rows = self.sample_rows or 32
        if group.weight not in self._sketched:
            return rows
        return min(rows, max(1, self._plan(group)[0] // 2))

    def _check_budget(self) -> None:
        """Warn once per matrix where a user setting exceeds the memory budget."""
        if self.memory_budget is None:
            return
        for group in self._groups.values():
            name = group.weight
            if name in self._warned_budget:
                continue
            allowed = self.memory_budget * group.rows * group.cols
            # Without a budget of their own, only moments that are large in absolute terms too
            # (a wide fan-in: Linear(4096, 16) holds 256 floats per parameter) are reported.
            large = self._budget_given or group.cols**2 >= _LARGE_DENSE
            sketched = name in self._sketched
            if not sketched and large and group.cols**2 > allowed:
                self._warned_budget.add(name)
                self.runtime.warn(
                    f"SubspacePredictor: the dense second moment of {name!r} holds "
                    f"{group.cols**2} floats ({group.cols / group.rows:.0f} per parameter of "
                    f"that matrix), more than memory_budget={self.memory_budget} per parameter "
                    f"({int(allowed)}). Set `sketch` (e.g. SubspacePredictor(sketch=32)) to "
                    "bound it."
                )
            elif sketched and self._plan(group)[0] < _widest(self._ell, group):
                self._warned_budget.add(name)
                self.runtime.warn(
                    f"SubspacePredictor: sketch={self._ell} rows do not fit {name!r} "
                    f"({group.rows} x {group.cols}) within memory_budget={self.memory_budget} "
                    f"floats per parameter; it uses {self._plan(group)[0]} rows."
                )

    def memory_floats(self) -> int:
        """Floats the predictor holds now: bases, second moments or sketches, pending input
        rows, the sign rule's model and the kept history."""
        tensors: list[Tensor] = [
            *self._basis.values(),
            *self._cov.values(),
            *self._k.values(),
            *self._d.values(),
            *self._pending.values(),
            *(b for bs in self._blocks.values() for b in bs),
            *(fd.buffer for fd in self._sketches.values()),
            *(g for _, added in self._recent for g in added.values()),
        ]
        return sum(t.numel() for t in tensors)

    def learn_from(
        self, target: Literal["gradient", "update"], optimizer: torch.optim.Optimizer | None
    ) -> None:
        """Resolve ``normalize_steps="auto"``: unit-energy steps except for the update vectors
        of optimizers other than SGD (measured: Adam on digits, docs/science.md)."""
        self._target = target
        if self.normalize_steps == "auto":
            adaptive = target == "update" and not isinstance(optimizer, torch.optim.SGD)
            self._normalize = not adaptive

    def sharding_unsupported(self) -> str | None:
        """Row-sharded parameters (FSDP2) are supported with the projection rule (see
        :mod:`~lightning_metagrad.sharding`); the layer inputs' sketch is not."""
        if self.statistic != "gradient" and isinstance(self.sketch, int):
            return (
                f"statistic={self.statistic!r} with sketch= would need every process's input "
                "rows at each step; use the dense statistic (sketch=None) or "
                "statistic='gradient'"
            )
        if self.in_basis != "project":
            return "in_basis='sign' keeps a per-row Taylor model; use in_basis='project'"
        return None

    @property
    def normalizes_steps(self) -> bool:
        """Whether observed steps enter the second moment with unit energy (``"auto"``
        resolved by the last :meth:`learn_from`)."""
        return self._normalize

    def threshold_of(self, weight: str) -> float:
        """The energy threshold of a weight matrix for the task being folded in: its base
        (``layer_thresholds``, ``input_threshold`` or ``threshold``) plus ``threshold_step``
        per task already folded in (GPM's CIFAR schedule is 0.97 + 0.003·t), within (0, 1]."""
        if weight in self.layer_thresholds:
            base = self.layer_thresholds[weight]
        elif weight == self._first and self.input_threshold is not None:
            base = self.input_threshold
        else:
            base = self.threshold
        return min(1.0, max(1e-3, base + self.threshold_step * self._old_tasks))

    def subspace_dims(self) -> dict[str, int]:
        """Directions protected per weight matrix."""
        dims = {name: self._dim(name) for name in self._basis}
        dims.update({n: sum(b.shape[1] for b in bs) for n, bs in self._blocks.items()})
        return dims

    def rename(self, renamed: Mapping[str, str]) -> None:
        for attr in (
            "_basis",
            "_cov",
            "_k",
            "_d",
            "_energy",
            "_count",
            "_shapes",
            "_blocks",
            "_sketches",
            "_total",
            "_pending",
        ):
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
        if weight in self._blocks:
            blocks = self._blocks[weight]
            cols = self._shapes[weight][1]
            return torch.cat(blocks, 1) if blocks else torch.zeros(cols, 0)
        stored = self._basis[weight]
        return complement_of(stored) if weight in self._complement else stored

    def state_floats(self) -> int:
        """Floats held between tasks: per matrix the smaller of the basis and its complement."""
        blocks = sum(b.numel() for bs in self._blocks.values() for b in bs)
        return sum(m.numel() for m in self._basis.values()) + blocks

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
            # A per-row tensor as a column (a bias, or a rows x 1 scale), a view of it. ``w``
            # holds this process's rows of a sharded parameter (all of them otherwise).
            fan_in = group.cols - (group.bias is not None)
            out.append((group, w.reshape(w.shape[0], fan_in), None if b is None else b.view(-1)))
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
        figures = self._observe(names, targets, finite)
        if not self._old_tasks:  # no rewrite follows in the first task
            self._forget_lookups()
        return figures

    def _observe(
        self, names: Sequence[str], targets: Sequence[Tensor], finite: Tensor | None
    ) -> dict[str, Tensor]:
        step = self._steps
        self._steps += 1
        if step % self.every != 0:
            self._pending = {}
            return {}
        present = self._matrices(names, targets)
        sketched = [m for m in present if m[0].weight in self._sketched]
        if sketched:
            energies = self._step_energies(sketched, reduce=self._normalize)
            for group, w, b in sketched:
                self._observe_sketch(group, w, b, energies[group.weight], finite)
        added: dict[str, Tensor] = {}
        # No copy of a whole matrix: energies from the gradient in place, then only the sampled
        # rows (or the layer inputs) are gathered.
        matrices = [m for m in present if m[0].weight not in self._sketched]
        needs_energy = self._normalize or (self.statistic != "gradient" and bool(self._pending))
        energies = self._step_energies(matrices, reduce=True) if needs_energy else {}
        for group, w, b in matrices:
            inputs = self._pending.pop(group.weight, None)
            if inputs is not None and self.statistic != "gradient":
                # The layer's input rows, with the step's energy (times input_weight); for
                # "inputs" they replace the gradient rows.
                scale = self.input_weight * (1.0 if self._normalize else energies[group.weight])
                # Each process reads its own data's inputs; their moments are summed over
                # row-sharded processes, so each carries its share of the step's energy.
                scale = scale / self.shards.world if self.shards.sharded(group.weight) else scale
                inputs = inputs * (scale / _sq_norm(inputs).clamp_min(1e-30)).sqrt()
                if finite is not None:
                    inputs = torch.where(finite, inputs, torch.zeros((), device=w.device))
            rows = None  # drawn even where the inputs replace them: the same random stream
            if self.sample_rows is not None and self.sample_rows < group.rows:
                rows = self._sample_rows(group, self.sample_rows, w.device)
            if inputs is not None and self.statistic == "inputs":
                g = inputs
            else:
                g = self._gradient_rows(group, w, b, rows)
                if self._normalize:  # unit energy; a non-finite step stays non-finite
                    g = g * energies[group.weight].clamp_min(1e-30).rsqrt()
                if finite is not None:  # where, not a product: a NaN times 0 is still NaN
                    g = torch.where(finite, g, torch.zeros((), dtype=g.dtype, device=g.device))
                if inputs is not None:  # "both"
                    g = torch.cat([g, inputs])
            if self._normalize and self.in_basis == "sign":  # its Taylor model: the raw scale
                self._add_energy(group.weight, energies[group.weight], finite)
            if self._history_steps:
                added[group.weight] = g
            cov = self._cov.get(group.weight)
            if cov is None:
                cov = self._cov[group.weight] = g.new_zeros(group.cols, group.cols)
            cov.addmm_(g.T, g, beta=self.late_weight)
            self._count[group.weight] = self._count.get(group.weight, 0) + 1
        self._pending = {}
        if self._history_steps:
            self._recent.append((step, added))
            while self._recent and self._recent[0][0] <= step - self._history_steps:
                self._recent.pop(0)
        return {}

    def _observe_sketch(
        self,
        group: MatrixGroup,
        w: Tensor,
        b: Tensor | None,
        energy: Tensor,
        finite: Tensor | None,
    ) -> None:
        """One observed step into the matrix's sketch: ``m`` sampled gradient rows (scaled
        by ``sqrt(rows/m)``, so their expected energy is the step's) and the hooks' input rows,
        each without its part in the stored basis. No copy of the whole gradient is made."""
        name = group.weight
        ell, _ = self._plan(group)
        sketch = self._sketches.get(name)
        if sketch is None:
            sketch = self._sketches[name] = FrequentDirections(group.cols, ell, device=w.device)
            self._total[name] = torch.zeros((), dtype=torch.float64, device=w.device)
        if self.late_weight < 1.0:  # the Gram matrix B^T B times late_weight, exactly
            sketch.buffer.mul_(self.late_weight**0.5)
            sketch.energy.mul_(self.late_weight)
            self._total[name].mul_(self.late_weight)
        step_energy = 1.0 if self._normalize else energy
        inputs = self._pending.pop(name, None) if self.statistic != "gradient" else None
        if self.statistic != "inputs" or inputs is None:  # "inputs" falls back to gradients
            m = min(self._rows_per_step(group), group.rows)
            rows = None
            if m < group.rows:
                rows = self._sample_rows(group, m, w.device)
            # A copy: the rows are scaled and projected in place below, not the gradient.
            g = self._gradient_rows(group, w, b, rows)
            # Every process sketches the whole matrix's rows (the same sketch everywhere).
            g = self.shards.gather(name, g, rows)
            scale = (group.rows / m) ** 0.5
            if self._normalize:
                g.mul_(energy.clamp_min(1e-30).rsqrt() * scale)
            elif scale != 1.0:
                g.mul_(scale)
            self._add_rows(name, g, finite)
        if inputs is not None:
            scale = self.input_weight * step_energy
            inputs.mul_((scale / _sq_norm(inputs).clamp_min(1e-30)).sqrt())  # in place
            self._add_rows(name, inputs, finite)
        self._count[name] = self._count.get(name, 0) + 1

    def _gradient_rows(
        self, group: MatrixGroup, w: Tensor, b: Tensor | None, rows: Tensor | None
    ) -> Tensor:
        """The rows ``rows`` (global indices; None: all) of ``[w, b]`` as a float32 copy (a
        missing bias gradient counts as 0)."""
        name, pick = group.weight, self.shards.pick
        g = w.float() if rows is None else pick(name, rows, w).float()
        if group.bias is None:
            return g.clone() if g is w else g
        column = b if b is not None else w.new_zeros(w.shape[0])
        column = (column if rows is None else pick(name, rows, column)).float()
        return torch.cat([g, column[:, None]], 1)

    def _step_energies(
        self, matrices: Sequence[tuple[MatrixGroup, Tensor, Tensor | None]], reduce: bool = True
    ) -> dict[str, Tensor]:
        """Each matrix's step energy ``|[G, b]|^2`` (where steps are normalized), summed over
        the processes that hold its rows: one all-reduce for all matrices."""
        if not matrices:
            return {}
        energies = [
            _sq_norm(w) + (_sq_norm(b) if b is not None and group.bias else 0.0)
            for group, w, b in matrices
        ]
        if reduce and self.shards.active:
            stacked = torch.stack([e.float() for e in energies])
            sharded = [self.shards.sharded(group.weight) for group, _, _ in matrices]
            mask = torch.tensor(sharded, device=stacked.device)
            summed = self.shards.sum_(torch.where(mask, stacked, torch.zeros_like(stacked)))
            energies = list(torch.where(mask, summed, stacked).unbind())
        return {group.weight: e for (group, _, _), e in zip(matrices, energies)}

    def _add_rows(self, name: str, rows: Tensor, finite: Tensor | None) -> None:
        if finite is not None:  # a fill, not a product (a NaN times 0 is still NaN); in place
            rows.masked_fill_(~finite, 0.0)
        self._total[name] += _sq_norm(rows).double()
        for block in self._blocks.get(name, []):  # only the part outside the stored basis
            rows = rows.addmm_(rows @ block, block.T, alpha=-1.0)
        self._sketches[name].add(rows)

    def _add_energy(self, name: str, energy: Tensor, finite: Tensor | None) -> None:
        if finite is not None:  # a skipped step adds nothing
            energy = torch.where(finite, energy, torch.zeros_like(energy))
        total = self._energy.get(name)
        self._energy[name] = energy if total is None else total + energy

    def keep_history(self, steps: int) -> None:
        """Keep the sampled rows of the observations of the last ``steps`` steps (without
        ``sample_rows`` whole gradients would be kept: nothing is kept then)."""
        if steps and isinstance(self.sketch, int):
            if not self._warned_history:
                self._warned_history = True
                self.runtime.warn(
                    "SubspacePredictor(sketch=...) cannot take steps back out of its sketch, so "
                    "the steps between a task switch and its detection are folded into the old "
                    "task. Use sketch=None to have them taken back."
                )
            self._history_steps, self._recent = 0, []
            return
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
        if steps > 0 and self._sketched and not self._warned_history:
            self._warned_history = True
            self.runtime.warn(
                f"SubspacePredictor: {len(self._sketched)} matrices keep a sketch (a wide "
                "fan-in, sketch='auto'), which cannot take steps back: there the steps between a "
                "task switch and its detection are folded into the old task. sketch=None keeps "
                "every matrix dense (fan-in² floats each)."
            )
        if steps <= 0 or not self._recent:
            return False
        first = self._steps - steps  # steps numbered from 0; the last one is _steps - 1
        taken = False
        later = len(self._recent)  # the history holds every observation of its window
        removed: dict[str, int] = {}
        for step, added in self._recent:
            later -= 1
            if step < first:
                continue
            # With late_weight < 1 the observation has been scaled once per later one.
            weight = self.late_weight**later
            for name, g in added.items():
                if self._count.get(name, 0) > 1:  # never empty a moment entirely
                    self._cov[name].addmm_(g.T, g, alpha=-weight)
                    self._count[name] -= 1
                    removed[name] = removed.get(name, 0) + 1
                    taken = True
        if self.late_weight < 1.0:  # undo the scaling the removed observations applied
            for name, count in removed.items():
                self._cov[name].div_(self.late_weight**count)
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
        self._pending = {}
        self._fold_sketches()
        ends = (  # the sign rule's Taylor model needs the task's end point
            {g.weight: theta for g, theta in self._matrix_views(names, thetas)}
            if self.in_basis == "sign"
            else {}
        )
        for name, cov in self._cov.items():
            if not self._count.get(name):
                continue
            group = self._groups.get(name)
            rows = group.rows if group is not None else self._shapes.get(name, (0, 0))[0]
            cov = self._whole_moment(name, cov)
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
        self._sketches, self._total = {}, {}
        self._steps = 0  # every task's first step is observed, however short the task
        self._old_tasks += 1
        self._warn_full_rank()

    def _fold_sketches(self) -> None:
        """GPM's rule on each sketched matrix's sketch (O(fan-in·ell²)); the new directions
        become one more block of the basis."""
        for name, sketch in self._sketches.items():
            if not self._count.get(name):
                continue
            group = self._groups.get(name)
            rows, cols = (
                (group.rows, group.cols) if group is not None else self._shapes.get(name, (0, 0))
            )
            limit = self._plan(group)[1] if group is not None else cols
            blocks = self._blocks.setdefault(name, [])
            block, capped = new_directions(
                blocks,
                sketch.rows(),
                float(self._total[name]),
                float(sketch.energy),
                self.threshold_of(name),
                limit,
            )
            if block is not None:
                blocks.append(block)
            self._shapes[name] = (rows, sketch.cols)
            if capped and f"{name}:full" not in self._warned_budget:
                self._warned_budget.add(f"{name}:full")
                self.runtime.warn(
                    f"SubspacePredictor: the basis of {name!r} reached the memory budget "
                    f"({limit} directions at memory_budget={self.memory_budget} floats per "
                    "parameter) before explaining the task's energy threshold; later tasks "
                    "add nothing there. Raise `memory_budget` or lower the threshold."
                )

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
        dims = self.subspace_dims()
        for name in dims:
            cols, k = self._shapes[name][1], dims[name]
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
        removed: list[Tensor] = []  # energies the rule removed, 0-dim
        coordinates: list[Tensor] = []  # or the removed parts' coordinates (G M), measured below
        anchors = (
            {g.weight: theta for g, theta in self._matrix_views(names, thetas)}
            if self.in_basis == "sign"
            else {}
        )
        matrices = self._matrices(names, targets)
        if not matrices:
            self._forget_lookups()
            return None
        # The energies before the rule, in one multi-tensor reduction (a few launches on a
        # GPU, not three per matrix).
        parts = [w for _, w, _ in matrices]
        parts += [b for group, _, b in matrices if b is not None and group.bias is not None]
        total = _sq_norms(parts)
        for group, w, b in matrices:
            used = self._looked_up_rows(group, w)
            if used is None:
                self._rewrite_matrix(group, w, b, anchors, removed, coordinates)
                continue
            # A row-sparse gradient (an embedding's): only the rows the step looked up.
            rows = w.index_select(0, used)
            self._rewrite_matrix(group, rows, None, anchors, removed, coordinates)
            w.index_copy_(0, used, rows)
        self._forget_lookups()
        if coordinates:
            removed.append(_sq_norms(coordinates))
        if not removed:
            return None
        return torch.stack(removed).sum() / total.clamp_min(1e-30)

    def _rewrite_matrix(
        self,
        group: MatrixGroup,
        w: Tensor,
        b: Tensor | None,
        anchors: Mapping[str, Tensor],
        removed: list[Tensor],
        coordinates: list[Tensor],
    ) -> None:
        """The rule on one matrix ``[w, b]`` in place; appends the energy it removed (or the
        removed part's coordinates in the orthonormal basis, whose energy is the same)."""
        blocks = self._blocks.get(group.weight)
        if blocks:
            ell, _ = self._plan(group)
            k = sum(m.shape[1] for m in blocks)
            chunk = max(1, _WORKSPACE * ell * group.cols // (2 * k))  # within the workspace
            removed.append(_project_blocks_(blocks, w, b if group.bias else None, chunk)[0])
            return
        m = self._basis.get(group.weight)
        if m is None or self._dim(group.weight) == 0:
            return
        if group.weight in self._complement:
            removed.append(_keep_complement_(m, w, b if group.bias else None)[0])
            return
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
        if group.bias is not None and b is not None:
            b.sub_((gm @ m[w.shape[1]]).to(b.dtype))
        coordinates.append(gm)  # |G M M^T|^2 = |G M|^2 (M orthonormal)
        if w.dtype == torch.float32:
            w.addmm_(gm, mw.T, alpha=-1.0)  # G <- G - (G M) M^T, in place in .grad
        else:
            w.copy_(wf - gm @ mw.T)

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
            "blocks": {k: [b.detach().clone() for b in bs] for k, bs in self._blocks.items()},
            "sketch": {k: fd.state_dict() for k, fd in self._sketches.items()},
            "total": {k: v.detach().clone() for k, v in self._total.items()},
            "statistic": self.statistic,
            "late_weight": self.late_weight,
            **self._task_state_over_shards(),
        }

    def _whole_moment(self, name: str, cov: Tensor) -> Tensor:
        """The task's second moment of matrix ``name`` over all processes: summed over row
        shards (FSDP2: ``sum_r G_r^T G_r``, and each process's inputs); averaged over
        data-parallel processes for the layer inputs (DDP: each reads its own data, while the
        gradients are already the same everywhere). A collective: every process calls it."""
        if self.shards.sharded(name):
            return self.shards.sum_(cov)
        if self.statistic != "gradient" and name in self._hooked:
            return self.runtime.mean(cov)
        return cov

    def _task_state_over_shards(self) -> dict[str, Any]:
        """Under row sharding the running task's second moment is split over the processes:
        the state holds it summed (every process saves the same; a collective, so every
        process must call :meth:`state_dict`), and on loading only the first process keeps it.
        (A sketch is the same on every process already.)"""
        if not self._cov:
            return {}
        if not self.shards.active:
            if self.statistic == "gradient" or self.runtime.mean_over_ranks is None:
                return {}
            # DDP: the layer inputs' moments averaged, so a resumed run counts every
            # process's part once (each process loads this same state).
            cov = {k: self._whole_moment(k, v.detach().clone()) for k, v in self._cov.items()}
            return {"cov": cov}
        cov = {k: v.detach().clone() for k, v in self._cov.items()}
        for name in cov:
            if self.shards.sharded(name):
                self.shards.sum_(cov[name])
        return {"cov": cov, "summed_over_shards": True}

    def load_state_dict(self, state: dict) -> None:
        check_state_version(type(self).__name__, state, (1, 2, 3, 4), unversioned=1)
        self._check_saved_statistic(state)
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
        new = state.get("version", 1) >= 3  # version 3 added the sketch state
        blocks, sketches, total = (
            (state["blocks"], state["sketch"], state["total"]) if new else ({}, {}, {})
        )
        self._blocks = {k: [b.clone() for b in bs] for k, bs in blocks.items()}
        self._sketches = {k: FrequentDirections.from_state(v) for k, v in sketches.items()}
        self._total = {k: v.clone() for k, v in total.items()}
        self._pending = {}
        self._summed_state = bool(state.get("summed_over_shards", False))

    def _check_saved_statistic(self, state: dict) -> None:
        """Warn when the state was built from another statistic than this predictor's (e.g. a
        checkpoint of the earlier, gradient-statistic default): the old tasks'
        bases are kept, and the next tasks are learnt from this predictor's statistic."""
        if state.get("version", 1) >= 4:
            saved = (str(state["statistic"]), float(state["late_weight"]))
        else:  # written before the inputs statistic existed
            saved = ("gradient", 1.0)
        if not state["num_old_tasks"] and not state["count"]:
            return  # nothing learnt yet: nothing to mix
        if saved != (self.statistic, self.late_weight):
            self.runtime.warn(
                f"SubspacePredictor: the loaded state was learnt with statistic={saved[0]!r}, "
                f"late_weight={saved[1]}, this predictor uses statistic={self.statistic!r}, "
                f"late_weight={self.late_weight}; the old bases are kept and the next tasks "
                f"use the new statistic. To continue as before, pass "
                f"SubspacePredictor(statistic={saved[0]!r}, late_weight={saved[1]})"
            )

    def _split_summed_state(self) -> None:
        """After loading a state saved under row sharding (its task's second moment summed over
        the processes), at bind: the first process keeps the sum, the others start from zero, so
        the next reduction counts it once."""
        if not self._summed_state:
            return
        self._summed_state = False
        if not self.shards.active or self.shards.rank == 0:
            return
        for name in self._cov:
            if self.shards.sharded(name):
                self._cov[name].zero_()


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


@torch.no_grad()
def _project_blocks_(
    blocks: Sequence[Tensor], w: Tensor, b: Tensor | None, chunk: int
) -> tuple[Tensor, Tensor]:
    """``G <- G - sum_i (G M_i) M_i^T`` in place for ``G = [w, b]`` and mutually orthogonal
    blocks ``M_i`` (the same as projecting out their union), ``chunk`` rows at a time (the
    coordinates ``G M_i`` of a tall matrix would otherwise be as large as ``G``); returns
    (removed, total) energy."""
    fan_in = w.shape[1]
    removed = w.new_zeros((), dtype=torch.float32)
    total = w.new_zeros((), dtype=torch.float32)
    for start in range(0, w.shape[0], max(1, chunk)):
        wc = w[start : start + chunk]
        bc = None if b is None else b[start : start + chunk]
        wf = wc if wc.dtype == torch.float32 else wc.float()
        bf = None if bc is None else (bc if bc.dtype == torch.float32 else bc.float())
        total += _sq_norm(wf) + (0.0 if bf is None else _sq_norm(bf))
        for m in blocks:
            gm = wf @ m[:fan_in]
            if bf is not None:
                gm.addr_(bf, m[fan_in])
                bf.sub_(gm @ m[fan_in])
            removed += _sq_norm(gm)
            wf.addmm_(gm, m[:fan_in].T, alpha=-1.0)  # in place: no gradient-sized temporary
        if wf is not wc:
            wc.copy_(wf)
        if bc is not None and bf is not None and bf is not bc:
            bc.copy_(bf)
    return removed, total


_CONVS = (nn.Conv1d, nn.Conv2d)


def _reads_inputs(module: nn.Module, group: MatrixGroup, params: Mapping[str, Tensor]) -> bool:
    """Whether a forward hook on ``module`` sees the rows its matrix ``group`` multiplies:
    an ``nn.Linear`` or a ``groups=1`` convolution that owns the weight (and the bias) as they
    are, not through a parametrization."""
    if not isinstance(module, (nn.Linear, *_CONVS)):
        return False
    if isinstance(module, _CONVS) and module.groups != 1:
        return False
    if module.weight is not params.get(group.weight):
        return False
    if group.bias is not None and module.bias is not params.get(group.bias):
        return False
    return module.weight[0].numel() + (group.bias is not None) == group.cols


def _input_rows(
    module: nn.Module, x: Tensor, bias: bool, limit: int, generator: torch.Generator
) -> Tensor:
    """At most ``limit`` random rows ``[x, 1]`` (``[x]`` without ``bias``) that the layer's
    matrix multiplies: input vectors of a Linear, unfolded patches of a convolution (GPM's
    ``layer_inputs``; the images are subsampled before unfolding, to bound the workspace)."""
    if isinstance(module, nn.Linear):
        rows = x.reshape(-1, module.in_features)
    else:
        conv: Any = module
        if x.dim() == conv.weight.dim() - 1:  # unbatched
            x = x.unsqueeze(0)
        if x.shape[0] > limit:
            pick = torch.randperm(x.shape[0], generator=generator)[:limit]
            x = x[_to_device(pick, x.device)]
        pad = conv._reversed_padding_repeated_twice
        if any(pad):
            mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
            x = nn.functional.pad(x, pad, mode=mode)
        if isinstance(module, nn.Conv1d):
            x = x.unsqueeze(2)
            size, dil, stride = (1, conv.kernel_size[0]), (1, conv.dilation[0]), (1, conv.stride[0])
        else:
            size, dil, stride = conv.kernel_size, conv.dilation, conv.stride
        patches = nn.functional.unfold(x, size, dilation=dil, stride=stride)
        rows = patches.transpose(1, 2).reshape(-1, patches.shape[1])
    if rows.shape[0] > limit:
        pick = torch.randperm(rows.shape[0], generator=generator)[:limit]
        rows = rows[_to_device(pick, rows.device)]
    rows = rows.float()
    if bias:
        rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], 1)
    return rows


#: Floats (4 MiB) from which a dense second moment over the memory budget is sketched by
#: ``sketch="auto"`` (and warns with ``sketch=None``): its boundary's float64 eigensolver
#: needs about 16 times as much for a moment.
_LARGE_DENSE = 1 << 20
#: Sketch rows per matrix with ``sketch="auto"``.
_AUTO_ELL = 32

#: Workspace rows per sketch row: the sketch's 2, a shrink's 2 (its new rows, and its Gram
#: matrix and eigenvectors, 8·ell² floats with ell <= cols / 8), the pending input rows and the
#: step's sampled rows (ell / 2 each, with a copy while they are scaled and joined).
_WORKSPACE = 6


#: The part of each matrix's budget it keeps for itself; the rest goes to a common pool.
_SHARED = 0.9


def _widest(ell: int, group: MatrixGroup) -> int:
    """The widest sketch a matrix may use: ``ell``, at most ``cols / 8`` (its Gram workspace)."""
    return max(1, min(ell, group.cols // 8))


def _fair_plan(group: MatrixGroup, ell: int, budget: float | None) -> tuple[int, int]:
    """(ell, most basis columns) of a matrix within its own parameters' worth of floats."""
    if budget is None:
        return min(ell, group.cols), group.cols
    vectors = budget * group.rows
    e = max(1, min(ell, group.cols // 8, int(vectors // (2 * _WORKSPACE))))
    return e, max(0, min(group.cols, int(vectors) - _WORKSPACE * e))


def _to_device(index: Tensor, device: torch.device) -> Tensor:
    """A CPU index tensor on ``device``; to a GPU through pinned memory without blocking, so
    the copy does not wait for the work queued before it (no host sync)."""
    if device.type == "cpu":
        return index
    return index.pin_memory().to(device, non_blocking=True)


def _sq_norm(t: Tensor) -> Tensor:
    return torch.linalg.vector_norm(t, dtype=torch.float32).square()


def _sq_norms(tensors: list[Tensor]) -> Tensor:
    """``sum |t|^2`` over ``tensors`` (float32), in one multi-tensor reduction."""
    norms = torch._foreach_norm(tensors, 2, dtype=torch.float32)
    return torch.stack(norms).square().sum()


class GradientSubspacePredictor(SubspacePredictor):
    """The gradient-only subspace (``predictor="gradient-subspace"``): each matrix's basis
    from its (sampled, unit-energy) gradient rows, every observed step weighted the same; the
    earlier default. Same arguments as :class:`SubspacePredictor`, with
    ``statistic="gradient"`` and ``late_weight=1.0`` by default.

    Example:
        >>> GradientSubspacePredictor().statistic
        'gradient'
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("statistic", "gradient")
        kwargs.setdefault("late_weight", 1.0)
        super().__init__(**kwargs)
