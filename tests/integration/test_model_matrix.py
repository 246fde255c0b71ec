"""Model shapes x methods x optimizers: each case trains two tasks through real Trainers on CPU
and checks the update the optimizer applied in task 2, not only that nothing crashed.

Shapes: an unused branch, tied weights, frozen layers (one always, one only in task 1, one
only in task 2), a new head, BatchNorm, Conv2d, ``nn.MultiheadAttention``. Methods:
``MetaGradCallback`` with the default (subspace), anchored and replay predictors,
``EWCCallback``, ``GPMCallback``. Optimizers: plain SGD, SGD with momentum and weight decay,
AdamW. Every shape runs every method with plain SGD, and the default MetaGrad with the two
other optimizers.

Checked on every step of task 2, from the parameters before and after the step and the
gradient the method received (a spy placed first):

* frozen parameters never change;
* parameters the first task never trained (a new head, a layer unfrozen for task 2) follow
  exactly the plain optimizer's update of the received gradient (a shadow optimizer of the
  same kind replays it on copies; for plain SGD that is ``-lr * grad``);
* a parameter without a gradient on a step is unchanged on that step;
* every parameter stays finite;
* per method: the default MetaGrad's update of each protected weight matrix ``[W, b]`` is
  orthogonal to its basis (with every optimizer: the update itself is projected); with plain
  SGD, GPM's is orthogonal to task 1's bases and EWC's is the gradient plus ``λ F (θ − θ*)``.

A last test runs three tasks: a layer trained in task 1, frozen for task 2 and unfrozen for
task 3 is still protected there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import (
    AppliedUpdates,
    assert_orthogonal,
    bias_of,
    make_trainer,
    subspace_bases,
)
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_metagrad import MetaGradCallback, SubspacePredictor
from lightning_metagrad.baselines import EWCCallback, GPMCallback

OPTIMIZERS: dict[str, Callable[[Iterable[Tensor]], torch.optim.Optimizer]] = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.05),
    "sgd-momentum-wd": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-4),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.01),
}
LR = 0.05  # plain SGD
EWC_STRENGTH = 10.0


# ---------------------------------------------------------------------------- models


class Shape(pl.LightningModule):
    """A classifier of ``input_shape`` inputs; ``before_task(t)`` changes it between tasks."""

    input_shape: tuple[int, ...] = (10,)

    def __init__(self, optimizer: str) -> None:
        super().__init__()
        self.optimizer_name = optimizer

    def before_task(self, task: int) -> None:
        pass

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.logits(x, batch_idx), y)

    def logits(self, x: Tensor, batch_idx: int) -> Tensor:
        return self(x)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return OPTIMIZERS[self.optimizer_name](self.parameters())


class UnusedBranch(Shape):
    """A second head used only on odd batches: it has no gradient on even ones."""

    def __init__(self, optimizer: str) -> None:
        super().__init__(optimizer)
        self.net = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3))
        self.branch = nn.Linear(3, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def logits(self, x: Tensor, batch_idx: int) -> Tensor:
        out = self(x)
        return self.branch(out) if batch_idx % 2 else out


class TiedWeights(Shape):
    """One layer applied twice, and a second head that shares the output head's weight."""

    def __init__(self, optimizer: str) -> None:
        super().__init__(optimizer)
        self.inp = nn.Linear(10, 16)
        self.shared = nn.Linear(16, 16)
        self.out = nn.Linear(16, 3)
        self.aux = nn.Linear(16, 3, bias=False)
        self.aux.weight = self.out.weight  # one parameter, two layers

    def forward(self, x: Tensor) -> Tensor:
        h1 = torch.tanh(self.shared(torch.relu(self.inp(x))))
        h2 = torch.tanh(self.shared(h1))
        return self.out(h2) + self.aux(h1)


class FrozenLayers(Shape):
    """``net.0`` frozen throughout, ``net.2`` frozen in task 1 and unfrozen for task 2 (never
    seen), ``net.4`` trained in task 1 and frozen for task 2, ``net.6`` trained in both."""

    def __init__(self, optimizer: str) -> None:
        super().__init__(optimizer)
        self.net = nn.Sequential(
            nn.Linear(10, 16),
            nn.ReLU(),
            nn.Linear(16, 16),
            nn.ReLU(),
            nn.Linear(16, 16),
            nn.ReLU(),
            nn.Linear(16, 3),
        )
        self.net[0].requires_grad_(False)
        self.net[2].requires_grad_(False)

    def before_task(self, task: int) -> None:
        if task == 1:
            self.net[2].requires_grad_(True)
            self.net[4].requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class NewHead(Shape):
    """A shared body and one output head per task (``heads.1`` is new in task 2)."""

    def __init__(self, optimizer: str) -> None:
        super().__init__(optimizer)
        self.body = nn.Sequential(nn.Linear(10, 16), nn.ReLU())
        self.heads = nn.ModuleList()

    def before_task(self, task: int) -> None:
        self.heads.append(nn.Linear(16, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.heads[-1](self.body(x))


class WithBatchNorm(Shape):
    def __init__(self, optimizer: str) -> None:
        super().__init__(optimizer)
        self.net = nn.Sequential(nn.Linear(10, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class WithConv2d(Shape):
    input_shape = (2, 6, 6)

    def __init__(self, optimizer: str) -> None:
        super().__init__(optimizer)
        self.net = nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(36, 3)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class WithAttention(Shape):
    input_shape = (4, 8)  # a sequence of 4 tokens of width 8

    def __init__(self, optimizer: str) -> None:
        super().__init__(optimizer)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x + self.attn(x, x, x, need_weights=False)[0])
        return self.head(h.mean(1))


SHAPES: dict[str, type[Shape]] = {
    "unused-branch": UnusedBranch,
    "tied": TiedWeights,
    "frozen": FrozenLayers,
    "new-head": NewHead,
    "batchnorm": WithBatchNorm,
    "conv2d": WithConv2d,
    "attention": WithAttention,
}


def task_loader(task: int, shape: tuple[int, ...]) -> DataLoader:
    """64 examples (4 batches of 16) with a task-specific linear labelling rule."""
    g = torch.Generator().manual_seed(300 + task)
    x = torch.randn(64, *shape, generator=g)
    w = torch.randn(x[0].numel(), 3, generator=g)
    return DataLoader(TensorDataset(x, (x.flatten(1) @ w).argmax(1)), batch_size=16)


# ---------------------------------------------------------------------------- methods


METHODS: dict[str, Callable[[], Callback]] = {
    "metagrad": lambda: MetaGradCallback(),  # the default: the subspace predictor
    "metagrad-anchored": lambda: MetaGradCallback(predictor="anchored"),
    "metagrad-replay": lambda: MetaGradCallback(predictor="replay"),
    "ewc": lambda: EWCCallback(strength=EWC_STRENGTH, fisher_batches=2),
    "gpm": lambda: GPMCallback(threshold=0.9, samples=32),
}

CASES = [(shape, method, "sgd") for shape in SHAPES for method in METHODS] + [
    (shape, "metagrad", optimizer) for shape in SHAPES for optimizer in ("sgd-momentum-wd", "adamw")
]


# ---------------------------------------------------------------------------- the matrix


def _run(shape: str, method: str, optimizer: str) -> dict[str, Any]:
    pl.seed_everything(0, verbose=False)
    model, cb = SHAPES[shape](optimizer), METHODS[method]()
    data = [task_loader(t, model.input_shape) for t in range(2)]
    model.before_task(0)
    first_task = {n for n, p in model.named_parameters() if p.requires_grad}
    make_trainer([cb], max_steps=8).fit(model, data[0])
    snapshot: dict[str, Any] = {}
    if isinstance(cb, GPMCallback):
        snapshot = {n: b.clone() for n, b in cb.bases.items()}
    elif isinstance(cb, EWCCallback):
        ((anchors, fisher),) = cb.terms
        snapshot = {n: (a.clone(), fisher[n].clone()) for n, a in anchors.items()}
    model.before_task(1)
    spy = AppliedUpdates()
    make_trainer([spy, cb], max_steps=6).fit(model, data[1])
    return {"model": model, "cb": cb, "spy": spy, "first": first_task, "snapshot": snapshot}


@pytest.mark.parametrize(("shape", "method", "optimizer"), CASES)
def test_the_applied_update_of_task_two(shape: str, method: str, optimizer: str) -> None:
    run = _run(shape, method, optimizer)
    model, cb, spy = run["model"], run["cb"], run["spy"]
    steps: list[dict[str, tuple[Tensor, Tensor, Tensor | None]]] = spy.steps
    assert len(steps) == 6
    params = dict(model.named_parameters())
    frozen = {n for n, p in params.items() if not p.requires_grad}
    new = {n for n, p in params.items() if p.requires_grad and n not in run["first"]}
    assert (shape == "frozen") == bool(frozen)
    assert (shape in ("frozen", "new-head")) == bool(new)

    # The plain optimizer on the parameters the first task never trained, replayed on copies.
    shadow = {n: steps[0][n][0].clone() for n in sorted(new)}
    shadow_opt = OPTIMIZERS[optimizer](list(shadow.values())) if shadow else None
    without_grad = 0
    for i, step in enumerate(steps):
        for name, (before, after, grad) in step.items():
            assert bool(torch.isfinite(after).all()), (i, name)
            if name in frozen or grad is None:
                assert torch.equal(before, after), (i, name)
                without_grad += name not in frozen
        if shadow_opt is None:
            continue
        for name, copy in shadow.items():
            copy.grad = step[name][2]
        shadow_opt.step()
        for name, copy in shadow.items():
            assert torch.equal(step[name][1], copy), name
    if shape in ("unused-branch", "new-head"):
        assert without_grad > 0  # the branch, the old head: the check above was not vacuous

    if optimizer == "sgd" and method == "ewc":
        _check_ewc(steps, run["snapshot"], new)
    if optimizer == "sgd" and method == "gpm":
        _check_gpm(steps, run["snapshot"], model)
    if method == "metagrad":
        pred = cb.predictor
        assert isinstance(pred, SubspacePredictor)
        # Task 1's bases (folded in at task 2's start; task 2 is folded in only at task 3's).
        bases = subspace_bases(pred)
        assert bases, "no protected subspace"
        removed = 0.0
        for step in steps:
            for weight, basis in bases.items():
                bias = bias_of(weight)
                update = AppliedUpdates.matrix(step, weight, bias, basis.shape[0])
                assert_orthogonal(update, basis, weight)
                received = AppliedUpdates.matrix(step, weight, bias, basis.shape[0], received=True)
                removed = max(removed, float((received @ basis).norm()))
        assert removed > 1e-4  # the received gradients had something to remove


def _check_ewc(steps: list[dict[str, Any]], terms: dict[str, Any], new: set[str]) -> None:
    """Plain SGD with EWC: θ' = θ − lr (g + λ F (θ − θ*)) where θ* exists, else θ − lr g."""
    assert not (set(terms) & new)
    for step in steps:
        for name, (before, after, grad) in step.items():
            if grad is None:
                continue
            total = grad
            if name in terms:
                anchor, fisher = terms[name]
                total = grad + EWC_STRENGTH * fisher * (before - anchor)
            torch.testing.assert_close(after, before - LR * total, rtol=0, atol=1e-6, msg=name)


def _check_gpm(steps: list[dict[str, Any]], bases: dict[str, Tensor], model: nn.Module) -> None:
    """Plain SGD with GPM: each protected layer's update ``[dW, db]`` is orthogonal to task 1's
    basis (a tied weight, e.g. ``aux.weight`` is ``out.weight``, to each of its layers')."""
    assert bases, "no protected layer"
    modules = dict(model.named_modules())
    name_of = {id(p): n for n, p in model.named_parameters()}
    removed = 0.0
    for step in steps:
        for layer, basis in bases.items():
            module = modules[layer]
            weight = name_of[id(module.weight)]
            bias = None if module.bias is None else name_of[id(module.bias)]
            assert_orthogonal(
                AppliedUpdates.matrix(step, weight, bias, basis.shape[0]), basis, layer
            )
            received = AppliedUpdates.matrix(step, weight, bias, basis.shape[0], received=True)
            removed = max(removed, float((received @ basis).norm()))
    assert removed > 1e-4  # the received gradients had something to remove


# ---------------------------------------------------------------------------- three tasks


class RefrozenLayer(Shape):
    """``net.0`` trains in task 1, is frozen for task 2 and unfrozen again for task 3."""

    def __init__(self, optimizer: str) -> None:
        super().__init__(optimizer)
        self.net = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3))

    def before_task(self, task: int) -> None:
        self.net[0].requires_grad_(task != 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


@pytest.mark.parametrize(
    "method",
    [
        "metagrad",
        "metagrad-anchored",
        "metagrad-replay",
        "ewc",
        "gpm",
    ],
)
def test_a_layer_frozen_for_one_task_is_protected_again_when_unfrozen(method: str) -> None:
    pl.seed_everything(0, verbose=False)
    model, cb = RefrozenLayer("sgd"), METHODS[method]()
    engine: Any = getattr(cb, "engine", None)
    for task in range(2):
        model.before_task(task)
        make_trainer([cb], max_steps=8).fit(model, task_loader(task, model.input_shape))
    model.before_task(2)
    protected: list[str] = []

    class Protected(Callback):  # what MetaGrad's rule may rewrite in task 3
        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            names = list(engine.params)
            chosen = engine.protected(names, list(engine.params.values()))
            protected.extend(names[i] for i in chosen)

    spy = AppliedUpdates()
    extra = [Protected()] if isinstance(cb, MetaGradCallback) else []
    make_trainer([spy, cb, *extra], max_steps=6).fit(model, task_loader(2, model.input_shape))
    if isinstance(cb, MetaGradCallback):
        assert {"net.0.weight", "net.0.bias"} <= set(protected), protected
    if method == "metagrad-anchored":
        return  # its trust-region rule need not change net.0's update on these few steps
    edited = 0.0
    for step in spy.steps:
        for name in ("net.0.weight", "net.0.bias"):
            before, after, grad = step[name]
            assert grad is not None
            edited = max(edited, float((after - (before - LR * grad)).abs().max()))
    assert edited > 1e-6, "task 1's protection of net.0 is gone: plain SGD on it"
