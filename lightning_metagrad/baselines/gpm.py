"""Gradient Projection Memory (Saha, Garg & Roy, ICLR 2021)."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from typing_extensions import override

from lightning_metagrad._module_utils import quiet_eval
from lightning_metagrad._tensors import all_finite
from lightning_metagrad._validation import check_float, check_fraction, check_int
from lightning_metagrad.baselines._base import (
    TaskData,
    TensorDict,
    _TaskCallback,
    extra_pass_context,
    mean_over_ranks,
    training_batches,
)
from lightning_metagrad.boundaries.sources import BoundarySpec
from lightning_metagrad.predictors.basis import grow_basis

#: The layer types whose weights GPM protects.
SUPPORTED_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)


def _supported(module: nn.Module) -> bool:
    if not isinstance(module, SUPPORTED_LAYERS) or not module.weight.requires_grad:
        return False
    return isinstance(module, nn.Linear) or module.groups == 1


def _weight(module: nn.Module) -> Tensor:
    weight = module.weight
    assert isinstance(weight, Tensor)
    return weight


def _num_features(module: nn.Module) -> int:
    """Columns of the protected matrix ``[W, b]``: fan-in, plus one for a bias."""
    fan_in = module.weight[0].numel()  # type: ignore[index]
    return fan_in + (module.bias is not None)


def layer_inputs(module: nn.Module, x: Tensor) -> Tensor:
    """Rows ``[x, 1]`` that the layer's ``[W, b]`` (out x fan_in (+1)) multiplies.

    Linear: one row per input vector; Conv1d/Conv2d: one row per patch (``unfold`` with the
    layer's padding, dilation and stride), ordered like ``weight.view(out, -1)``.

    Example:
        >>> conv = nn.Conv2d(2, 3, kernel_size=3, padding=1)
        >>> x = torch.randn(4, 2, 5, 5)
        >>> rows = layer_inputs(conv, x)
        >>> rows.shape  # 4 images x 25 positions, 2·3·3 + 1 features
        torch.Size([100, 19])
        >>> w = torch.cat([conv.weight.view(3, -1), conv.bias[:, None]], 1)
        >>> out = (rows @ w.T).view(4, 25, 3).permute(0, 2, 1).reshape(4, 3, 5, 5)
        >>> torch.allclose(out, conv(x), atol=1e-5)
        True
    """
    if isinstance(module, nn.Linear):
        rows = x.reshape(-1, module.in_features)
    else:
        conv: Any = module
        pad = conv._reversed_padding_repeated_twice
        if any(pad):
            mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
            x = F.pad(x, pad, mode=mode)
        if isinstance(module, nn.Conv1d):
            patches = F.unfold(
                x.unsqueeze(2),
                (1, conv.kernel_size[0]),
                dilation=(1, conv.dilation[0]),
                stride=(1, conv.stride[0]),
            )
        else:
            patches = F.unfold(x, conv.kernel_size, dilation=conv.dilation, stride=conv.stride)
        rows = patches.transpose(1, 2).reshape(-1, patches.shape[1])
    rows = rows.float()
    if module.bias is not None:
        rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], 1)
    return rows


class _Protected:
    """The protected layers that share one weight tensor (usually a single layer), aligned with
    the live modules (rebuilt per fit).

    The gradient is projected as one matrix ``[dW, db_1, ...]``: the weight's columns, then one
    column per distinct bias of the layers. One layer's basis is used as it is; the bases of
    layers with a tied weight are embedded in that space and merged into an orthonormal basis
    of their union, so that the update is orthogonal to every layer's basis (projecting by one
    after the other would not be).

    ``importance`` (SGP; None: GPM's hard projection, every direction 1) scales each basis
    direction's share that is removed, ``G <- G - (G M) diag(importance) Mᵀ``. Tied layers with
    importances are merged as the eigenvectors of ``Σ M_i diag(importance_i) M_iᵀ``, their
    eigenvalues clipped to 1: a direction one layer holds with importance 1 is still removed.
    """

    __slots__ = ("basis", "biases", "fan_in", "importance", "names", "weight")

    def __init__(self, members: list[tuple[str, nn.Module, Tensor, Tensor | None]]) -> None:
        self.names = [name for name, _, _, _ in members]
        self.weight: Tensor = members[0][1].weight  # type: ignore[assignment]
        self.fan_in = self.weight[0].numel()
        self.biases: list[Tensor] = []
        slots: list[int | None] = []  # each member's bias column (after the fan-in)
        for _, module, _, _ in members:
            bias = module.bias
            if bias is None:
                slots.append(None)
                continue
            found = [j for j, b in enumerate(self.biases) if b is bias]
            if not found:
                self.biases.append(bias)  # type: ignore[arg-type]
            slots.append(found[0] if found else len(self.biases) - 1)
        if len(members) == 1:
            self.basis, self.importance = members[0][2], members[0][3]
            return
        features = self.fan_in + len(self.biases)
        columns = []
        for (_, _, basis, _), slot in zip(members, slots):
            embedded = basis.new_zeros(features, basis.shape[1])
            embedded[: self.fan_in] = basis[: self.fan_in]
            if slot is not None:
                embedded[self.fan_in + slot] = basis[self.fan_in]
            columns.append(embedded)
        dtype = members[0][2].dtype
        if all(importance is None for *_, importance in members):
            u, values, _ = torch.linalg.svd(torch.cat(columns, 1).double(), full_matrices=False)
            self.basis, self.importance = u[:, values > 1e-7 * len(members)].to(dtype), None
            return
        weighted = sum(
            (c.double() * (1.0 if i is None else i.double())) @ c.double().T
            for c, (*_, i) in zip(columns, members)
        )
        values, vectors = torch.linalg.eigh(weighted)  # type: ignore[arg-type]
        keep = values > 1e-7
        self.basis = vectors[:, keep].to(dtype)
        self.importance = values[keep].clamp_max(1.0).to(dtype)


class GPMCallback(_TaskCallback):
    r"""Gradient Projection Memory (Saha et al., ICLR 2021) for any ``LightningModule``.

    At the end of each task (each ``trainer.fit``), the module's own ``training_step`` is run
    without gradients in eval mode (logging silenced, RNG restored) over the first ``samples``
    examples of the task's training data, and forward hooks collect the input of every
    protected layer: the rows ``[x, 1]`` its matrix ``[W, b]`` multiplies (``nn.Linear``: input
    vectors; ``nn.Conv1d``/``nn.Conv2d``: unfolded patches, ``W`` viewed as
    ``out x in·k(·k)``; a bias adds the column of ones). Each layer's stored orthonormal basis
    ``M`` then grows by GPM's rule (:func:`grow_basis`, computed from the uncentred
    covariance ``R Rᵀ``: the same energies as an SVD of ``R``) until it explains ``threshold``
    of the task's input energy. From the second task on, before every optimizer step (after AMP
    unscaling and the accumulation window, before clipping) each protected layer's gradient is
    projected out of the stored subspace

    .. math:: G \leftarrow G - (G M) M^\top, \qquad G = [\nabla W, \nabla b],

    so that, to first order, the layer's outputs on old inputs do not change. The guarantee is
    for the gradient: plain SGD keeps it (momentum too, since each task's optimizer starts
    fresh), weight decay and Adam's per-coordinate scaling bend it (the paper uses SGD).

    Only ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d`` (``groups=1``) layers with a trainable
    weight are protected, and only those that the forward pass reaches through their
    ``forward`` (not e.g. ``nn.MultiheadAttention``'s functional projections). A weight tied
    between protected layers is projected out of the union of their subspaces. Everything else
    (norm layers, embeddings, other 1-D parameters, grouped convolutions) trains freely. A
    layer whose weight has no gradient on a step is skipped; a missing bias gradient counts as
    zero. A step whose gradients are non-finite is passed on untouched (an AMP scaler still
    sees it). Under DDP the covariances are averaged over ranks, so every rank holds the same
    bases. Memory: at most ``F x F`` floats per layer (``F`` = fan-in + 1); no data is stored.

    Args:
        threshold: ε in (0, 1], the fraction of each task's input energy the bases must
            explain: one float for every protected layer; a sequence of floats, one per
            protected layer in model order (``named_modules()``; its length is checked when
            the model is bound at the fit start, and the error names the layers found); or a
            dict ``{layer name: ε}`` that protects only the layers it names. The paper uses
            ``[0.95, 0.99, 0.99]`` on permuted MNIST (first layer 0.95), 0.97 (+0.003 per
            task) on CIFAR-100.
        samples: examples (along dim 0 of each layer's input) collected per task.
        threshold_increment: added to ε per finished task (task ``t``, 0-based, uses
            ``min(1, ε + t·increment)``).
        task_boundaries: where a task ends, as for ``MetaGradCallback``: ``"fit"`` (each
            ``trainer.fit``), ``"batch"`` (a change of the batch's task id, consolidated
            before training on the new task's first batch), ``"manual"`` (:meth:`consolidate`
            by hand), a source, or a list of these; ``"auto"`` is refused (see the module).
        task_id_key: dict-batch key holding the task id, for ``task_boundaries="batch"``.
        task_id_fn: a function ``batch -> task id``, for ``task_boundaries="batch"``.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> gpm = GPMCallback(threshold={"net.0": 0.95, "net.2": 0.99}, samples=300)
        >>> trainer = Trainer(callbacks=[gpm], max_steps=1, logger=False)
        >>> gpm.num_tasks, gpm.bases
        (0, {})
        >>> GPMCallback(threshold=[0.95, 0.99, 0.99]).threshold  # 784-100-100-10: 3 layers
        (0.95, 0.99, 0.99)
    """

    _edit = "projects gradients"
    #: What a basis that spans all of a layer's input features means (warned once a layer).
    _when_full = "its weights cannot change any more (nothing left to learn). Lower `threshold`."

    def __init__(
        self,
        *,
        threshold: float | Sequence[float] | Mapping[str, float] = 0.97,
        samples: int = 300,
        threshold_increment: float = 0.0,
        task_boundaries: BoundarySpec = "fit",
        task_id_key: str = "task_id",
        task_id_fn: Callable[[Any], Hashable] | None = None,
    ) -> None:
        super().__init__(
            task_boundaries=task_boundaries,
            task_id_key=task_id_key,
            task_id_fn=task_id_fn,
        )
        self.threshold: float | tuple[float, ...] | dict[str, float]
        if isinstance(threshold, Mapping):
            if not threshold:
                raise ValueError("`threshold` must name at least one layer, got {}")
            self.threshold = {}
            for name, value in threshold.items():
                if not isinstance(name, str):
                    raise ValueError(f"`threshold` keys must be layer names, got {name!r}")
                self.threshold[name] = check_fraction(f"threshold[{name!r}]", value)
        elif isinstance(threshold, Sequence) and not isinstance(threshold, str):
            if not threshold:
                raise ValueError(
                    "`threshold` must give one value per protected layer, got an empty sequence"
                )
            self.threshold = tuple(
                check_fraction(f"threshold[{i}]", value) for i, value in enumerate(threshold)
            )
        else:
            self.threshold = check_fraction("threshold", threshold)
        self.samples = check_int("samples", samples, minimum=1)
        self.threshold_increment = check_float(
            "threshold_increment", threshold_increment, minimum=0, maximum=1
        )
        self._bases: TensorDict = {}
        self._full: set[str] = set()  # layers already warned about
        self._layers: list[_Protected] = []
        # A sequence `threshold`: the protected layers it maps to, in order (found at binding).
        self._threshold_layers: tuple[str, ...] = ()

    # ------------------------------------------------------------------ public API

    @property
    def bases(self) -> TensorDict:
        """The stored orthonormal bases ``M`` (``F x k``), by layer name."""
        return self._bases

    def threshold_for(self, layer: str, task: int) -> float | None:
        """ε used for ``layer`` at the end of task ``task`` (0-based); None: not protected
        (with a sequence ``threshold``: not one of the layers found when the model was bound).
        """
        base: float | None
        if isinstance(self.threshold, dict):
            base = self.threshold.get(layer)
        elif isinstance(self.threshold, tuple):
            thresholds = dict(zip(self._threshold_layers, self.threshold))
            base = thresholds.get(layer)
        else:
            base = self.threshold
        return None if base is None else min(1.0, base + task * self.threshold_increment)

    # ------------------------------------------------------------------ task end

    @override
    def _wants_task_batch(self, batches: int, examples: int) -> bool:
        return examples < self.samples

    def _candidates(self, pl_module: pl.LightningModule) -> dict[str, nn.Module]:
        """The layers to protect, by name in model order (checks ``threshold`` against them)."""
        modules = dict(pl_module.named_modules())
        if isinstance(self.threshold, tuple):
            found = [name for name, m in modules.items() if _supported(m)]
            if len(found) != len(self.threshold):
                raise MisconfigurationException(
                    f"{type(self).__name__}: `threshold` gives {len(self.threshold)} values, one "
                    f"per protected layer in model order, but the model has {len(found)} "
                    f"protected layers (trainable Linear/Conv1d/Conv2d with groups=1): {found}. "
                    "Give one value per layer, a dict {layer name: value}, or one float."
                )
            self._threshold_layers = tuple(found)
        if isinstance(self.threshold, dict):
            unknown = sorted(n for n in self.threshold if n not in modules)
            unsupported = sorted(
                n for n in self.threshold if n in modules and not _supported(modules[n])
            )
            if unknown or unsupported:
                raise MisconfigurationException(
                    f"{type(self).__name__}: `threshold` names layers that are not in the model "
                    f"({unknown}) or are not trainable Linear/Conv1d/Conv2d layers with "
                    f"groups=1 ({unsupported})."
                )
        return {
            name: m
            for name, m in modules.items()
            if _supported(m) and self.threshold_for(name, self.num_tasks) is not None
        }

    @override
    def _end_task(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, dataloader: TaskData
    ) -> None:
        layers = self._candidates(pl_module)
        covariances, rows = self._collect(trainer, pl_module, layers, dataloader)
        if trainer.world_size > 1:  # identical bases on every rank
            names = list(layers)
            means = mean_over_ranks(trainer, [covariances[n] for n in names])
            covariances = dict(zip(names, means))
        if not any(rows.values()):
            rank_zero_warn(
                f"{type(self).__name__}: no protected layer saw an input at the end of this "
                "task; no basis was added."
            )
        for name, cov in covariances.items():
            threshold = self.threshold_for(name, self.num_tasks)
            assert threshold is not None
            old = self._bases.get(name)
            if old is not None and old.shape[0] != cov.shape[0]:
                raise MisconfigurationException(
                    f"{type(self).__name__}: layer {name!r} now has {cov.shape[0]} input "
                    f"features, its stored basis {old.shape[0]}."
                )
            new = grow_basis(None if old is None else old.to(cov.device), cov, threshold)
            if new is None:
                continue
            self._bases[name] = new
            self._basis_grown(name, new, cov)
            if new.shape[1] >= new.shape[0] and name not in self._full:
                self._full.add(name)
                rank_zero_warn(
                    f"{type(self).__name__}: the basis of layer {name!r} spans all its "
                    f"{new.shape[0]} input features: {self._when_full}"
                )

    def _basis_grown(self, name: str, basis: Tensor, covariance: Tensor) -> None:
        """Called once a task end has set ``name``'s basis (grown, or unchanged when it already
        explained enough) from the task's input covariance; SGP updates its importances here."""

    def _collect(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        layers: dict[str, nn.Module],
        dataloader: Iterable[Any] | None,
    ) -> tuple[TensorDict, dict[str, int]]:
        """Per layer: ``Σ rows rowsᵀ / #rows`` over the first ``samples`` examples."""
        covariances: TensorDict = {
            name: torch.zeros(
                _num_features(m), _num_features(m), device=_weight(m).device, dtype=torch.float64
            )
            for name, m in layers.items()
        }
        rows = dict.fromkeys(layers, 0)
        window = {"remaining": 0, "taken": 0}

        def hook_for(name: str) -> Any:
            def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
                x = args[0] if args else None
                if not isinstance(x, Tensor) or window["remaining"] <= 0:
                    return
                unbatched = 1 if isinstance(module, nn.Linear) else _weight(module).dim() - 1
                if x.dim() == unbatched:
                    x = x.unsqueeze(0)
                x = x.detach()[: window["remaining"]]  # dim 0: the examples
                if x.shape[0] == 0:
                    return
                window["taken"] = max(window["taken"], x.shape[0])
                r = layer_inputs(module, x)
                covariances[name] += (r.T @ r).double()
                rows[name] += r.shape[0]

            return hook

        handles = [m.register_forward_hook(hook_for(n)) for n, m in layers.items()]
        seen = 0
        try:
            with quiet_eval(pl_module), extra_pass_context(trainer), torch.no_grad():
                who, purpose = type(self).__name__, "to find the layers' inputs"
                batches = training_batches(who, trainer, pl_module, dataloader, purpose)
                for batch_idx, batch in enumerate(batches):
                    window["remaining"], window["taken"] = self.samples - seen, 0
                    pl_module.training_step(batch, batch_idx)
                    if window["taken"] == 0:
                        break  # no protected layer is reached: more batches will not help
                    seen += window["taken"]
                    if seen >= self.samples:
                        break
        finally:
            for handle in handles:
                handle.remove()
        for name, count in rows.items():
            if count:
                covariances[name] /= count
        return covariances, rows

    # ------------------------------------------------------------------ projection

    @override
    def _bind(self, pl_module: pl.LightningModule, check: bool) -> None:
        """The protected layers with a stored basis, aligned with the live modules; ``check``
        (the fit start): a ``threshold`` that does not fit the model (a dict naming no layer,
        a sequence of the wrong length) fails now, not at the task end."""
        if check:
            self._candidates(pl_module)
        super()._bind(pl_module, check)
        modules = dict(pl_module.named_modules())
        shared: dict[int, list[tuple[str, nn.Module, Tensor, Tensor | None]]] = {}  # by weight
        missing = []
        for name, basis in self._bases.items():
            module = modules.get(name)
            if module is None or not isinstance(module, SUPPORTED_LAYERS):
                missing.append(name)
                continue
            if basis.shape[0] != _num_features(module):
                raise MisconfigurationException(
                    f"{type(self).__name__}: layer {name!r} has {_num_features(module)} input "
                    f"features, its stored basis {basis.shape[0]}."
                )
            basis = basis.to(device=module.weight.device, dtype=torch.float32)
            self._bases[name] = basis
            if module.weight.requires_grad:
                importance = self._importance_of(name, basis.device)
                shared.setdefault(id(module.weight), []).append((name, module, basis, importance))
        self._layers = [_Protected(members) for members in shared.values()]
        if missing:
            rank_zero_warn(
                f"{type(self).__name__}: stored bases name layers the model does not have (or "
                f"that are not Linear/Conv); they are not protected: {sorted(missing)[:5]}"
            )

    @override
    def _edit_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, names: list[str]
    ) -> None:
        layers = [layer for layer in self._layers if layer.weight.grad is not None]
        if not layers:
            return
        grads = [layer.weight.grad for layer in layers]
        grads += [b.grad for layer in layers for b in layer.biases]
        if not all_finite([g for g in grads if g is not None]):
            return  # leave inf/NaN for the AMP scaler (or the user) to see
        with torch.no_grad():
            for layer in layers:
                self._project(layer)

    @staticmethod
    def _project(layer: _Protected) -> None:
        dw: Tensor = layer.weight.grad  # type: ignore[assignment]
        g = dw.reshape(dw.shape[0], -1).float()
        if layer.biases:  # a missing bias gradient counts as zero (and stays missing)
            columns = [
                b.grad.float() if b.grad is not None else g.new_zeros(g.shape[0])
                for b in layer.biases
            ]
            g = torch.cat([g, torch.stack(columns, 1)], 1)
        m, coefficients = layer.basis, g @ layer.basis
        if layer.importance is not None:  # SGP: each direction's share that is removed
            coefficients = coefficients * layer.importance
        g = g - coefficients @ m.T
        dw.copy_(g[:, : layer.fan_in].reshape(dw.shape))
        for j, b in enumerate(layer.biases):
            if b.grad is not None:
                b.grad.copy_(g[:, layer.fan_in + j])

    def _importance_of(self, name: str, device: torch.device) -> Tensor | None:
        """Per direction of ``name``'s basis, the share of the gradient removed (float32 on
        ``device``); None: all of it (GPM)."""
        return None

    # ------------------------------------------------------------------ state

    @override
    def _config(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "samples": self.samples,
            "threshold_increment": self.threshold_increment,
        }

    @override
    def _extra_state(self) -> dict[str, Any]:
        return {"bases": dict(self._bases)}

    @override
    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self._bases = dict(state["bases"])
        self._full = {n for n, b in self._bases.items() if b.shape[1] >= b.shape[0]}

    @override
    def _release(self) -> None:
        super()._release()
        self._layers = []
