"""What the tests of both lanes share (``from helpers import ...``; pyproject.toml puts
``tests/`` on the path): tiny models and data (BoringModel-style), a quiet CPU Trainer, the
tests' default predictor (the product's, ``SubspacePredictor``; the paper's ``MetaNetPredictor``
only where a test is about it), the spies and applied-update probes, state comparisons, and
the repository's scripts and examples as modules.

Spies read what a method did through Lightning's hooks only, so the tests survive refactors of
the methods' internals:

* :class:`GradSpy` records each step's ``.grad`` as the callbacks before it left it: placed
  before a method, what the method received; placed after it, what the optimizer applies;
* :class:`AppliedUpdates` (placed first) records each parameter before and after every
  optimizer step and the gradient it had: what the optimizer really applied.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple
from unittest import mock

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_metagrad import (
    AnchoredPredictor,
    AutoBoundaries,
    MetaNetPredictor,
    OldGradientPredictor,
    ReplayPredictor,
    SubspacePredictor,
    baselines,
)

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
LR = 0.1  # TinyClassifier's default learning rate

# --------------------------------------------------------------------------- data


class DictDataset(Dataset):
    """Dict batches {"x", "y", "task_id"}."""

    def __init__(self, x: Tensor, y: Tensor, task_id: int):
        self.x, self.y, self.task_id = x, y, task_id

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"x": self.x[i], "y": self.y[i], "task_id": self.task_id}


def task_data(task: int, n: int = 128, dim: int = 10, classes: int = 3) -> tuple:
    """A learnable synthetic classification task; each task has its own labelling rule."""
    g = torch.Generator().manual_seed(1000 + task)
    x = torch.randn(n, dim, generator=g)
    w = torch.randn(dim, classes, generator=g)
    return x, (x @ w).argmax(1)


def loader(task: int, dict_batches: bool = False, batch_size: int = 16, n: int = 128) -> DataLoader:
    x, y = task_data(task, n=n)
    ds: Dataset = DictDataset(x, y, task) if dict_batches else TensorDataset(x, y)
    return DataLoader(ds, batch_size=batch_size, shuffle=False)


# --------------------------------------------------------------------------- models


class TinyClassifier(pl.LightningModule):
    """A two-layer MLP; ``optimizer`` picks SGD, momentum SGD or Adam."""

    def __init__(self, optimizer: str = "sgd", lr: float = LR, hidden: int = 16):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(10, hidden), nn.ReLU(), nn.Linear(hidden, 3))
        self.optimizer_name = optimizer
        self.lr = lr

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = (batch["x"], batch["y"]) if isinstance(batch, dict) else batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        momentum = 0.9 if self.optimizer_name == "momentum" else 0.0
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=momentum)


class MultiHead(TinyClassifier):
    """A shared body and one output head per task; ``add_head`` before a new task (the newest
    head is used; the body's output alone while there is none)."""

    def __init__(self) -> None:
        super().__init__(lr=LR)
        self.heads = nn.ModuleList()

    def add_head(self) -> None:
        self.heads.append(nn.Linear(3, 3))

    def forward(self, x: Tensor) -> Tensor:
        out = self.net(x)
        return self.heads[-1](out) if len(self.heads) else out


class UnusedBranch(TinyClassifier):
    """A second head used only on odd batches: its parameters have no gradient on even ones."""

    def __init__(self, optimizer: str = "sgd", lr: float = LR) -> None:
        super().__init__(optimizer=optimizer, lr=lr)
        self.branch = nn.Linear(3, 3)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        out = self(x)
        if batch_idx % 2:
            out = self.branch(out)
        return nn.functional.cross_entropy(out, y)


class ManualModule(TinyClassifier):
    """Manual optimization (``automatic_optimization = False``), which the methods refuse."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> None:  # type: ignore[override]
        opt = self.optimizers()
        loss = super().training_step(batch, batch_idx)
        opt.zero_grad()  # type: ignore[union-attr]
        self.manual_backward(loss)
        opt.step()  # type: ignore[union-attr]


# --------------------------------------------------------------------------- Trainer


class EstimateOnly(AutoBoundaries):
    """``"auto"`` whose take-back is the detector's estimate alone, without the library's
    5-step margin (the take-back of stop 32)."""

    def onset_steps(self) -> int:
        return self._onset * self.every


def make_trainer(callbacks: list, max_steps: int = 8, **kwargs: Any) -> pl.Trainer:
    """A quiet single-process CPU Trainer: no logger, checkpoints, progress bar or summary."""
    defaults: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    defaults.update(kwargs)
    return pl.Trainer(callbacks=callbacks, max_steps=max_steps, **defaults)


def train_then_watch(
    callback: Callback,
    model: pl.LightningModule,
    first: DataLoader,
    second: DataLoader,
    steps: tuple[int, int] = (8, 6),
    **trainer_kwargs: Any,
) -> AppliedUpdates:
    """Train ``model`` with ``callback`` on ``first`` (one task), then on ``second`` with an
    :class:`AppliedUpdates` spy placed first; return the spy."""
    make_trainer([callback], max_steps=steps[0], **trainer_kwargs).fit(model, first)
    spy = AppliedUpdates()
    make_trainer([spy, callback], max_steps=steps[1], **trainer_kwargs).fit(model, second)
    return spy


# --------------------------------------------------------------------------- predictors


def small_predictor() -> SubspacePredictor:
    """The product's default predictor, its moments updated every step (fast tests)."""
    return SubspacePredictor(every=1)


def small_callback_kwargs() -> dict[str, Any]:
    """MetaGradCallback settings for fast tests (a fresh predictor each call)."""
    return {"predictor": small_predictor()}


def paper_predictor() -> MetaNetPredictor:
    """The paper's elementwise predictor, kept tiny and trained every step: for the tests of
    eq. 5, the meta-network and ``predict_old_gradient``."""
    return MetaNetPredictor(
        hidden_sizes=(16, 16),
        coords_per_step=128,
        update_every=1,
        distill_steps=20,
        distill_samples=256,
    )


def paper_callback_kwargs() -> dict[str, Any]:
    """MetaGradCallback settings with :func:`paper_predictor` (a fresh one each call)."""
    return {"predictor": paper_predictor()}


class ZeroPredictor(OldGradientPredictor):
    """The base class's docstring example: only the three methods, the default state."""

    def observe(self, names: Sequence[str], thetas: Sequence[Any], targets: Sequence[Any]) -> dict:
        return {}

    def end_task(self, names: Sequence[str], thetas: Sequence[Any]) -> None:
        self._old_tasks += 1

    def predict(self, names: Sequence[str], thetas: Sequence[Any]) -> list:
        return [(torch.zeros_like(t), None) for t in thetas]


# Every kind of predictor, small and fast, by a name for test ids.
PREDICTORS: dict[str, Callable[[], OldGradientPredictor]] = {
    "subspace": small_predictor,
    "subspace-sign": lambda: SubspacePredictor(every=1, in_basis="sign"),
    "anchored": AnchoredPredictor,
    "paper": paper_predictor,
    "replay": lambda: ReplayPredictor(memory_batches=2, refresh_every=2),
    "base-default": ZeroPredictor,
}


# The seven baselines: the quadratic penalties, then the gradient methods.
PENALTY_BASELINES = (
    baselines.EWCCallback,
    baselines.OnlineEWCCallback,
    baselines.SICallback,
    baselines.MASCallback,
)
GRADIENT_BASELINES = (
    baselines.GPMCallback,
    baselines.SGPCallback,
    baselines.AGEMCallback,
    baselines.ERCallback,
)
BASELINES = (*PENALTY_BASELINES, *GRADIENT_BASELINES)


# --------------------------------------------------------------------------- spies


def flat(tensors: Iterable[Tensor]) -> Tensor:
    """One detached fp32 vector of ``tensors``, in order."""
    return torch.cat([t.detach().reshape(-1).float() for t in tensors])


class GradSpy(Callback):
    """Per optimizer step, the ``.grad`` of every parameter that has one, by name, as the
    callbacks placed before the spy left it (``on_before_optimizer_step``: unscaled and fully
    accumulated). ``only``: the parameter names to record (default: all)."""

    def __init__(self, only: Iterable[str] | None = None) -> None:
        self.only = None if only is None else set(only)
        self.steps: list[dict[str, Tensor]] = []

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self.steps.append(
            {
                n: p.grad.detach().clone()
                for n, p in pl_module.named_parameters()
                if p.grad is not None and (self.only is None or n in self.only)
            }
        )

    def of(self, name: str) -> list[Tensor]:
        """``name``'s gradient at every step."""
        return [step[name] for step in self.steps]


class Applied(NamedTuple):
    """One parameter at one optimizer step."""

    before: Tensor
    after: Tensor
    grad: Tensor | None  # as the spy saw it; None where the parameter had no gradient


class FlatStep(NamedTuple):
    """One optimizer step over the parameters that had a gradient, flattened in order."""

    theta: Tensor
    grad: Tensor
    after: Tensor


class AppliedUpdates(Callback):
    """Place first: per optimizer step, each parameter before and after the step and the
    gradient it had when the spy ran (None where it had none), by name. Batches without an
    optimizer step (accumulation) add nothing."""

    def __init__(self) -> None:
        self.steps: list[dict[str, Applied]] = []
        self._before: dict[str, tuple[Tensor, Tensor | None]] = {}

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self._before = {
            n: (p.detach().clone(), None if p.grad is None else p.grad.detach().clone())
            for n, p in pl_module.named_parameters()
        }

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        if not self._before:
            return
        after = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
        self.steps.append({n: Applied(b, after[n], g) for n, (b, g) in self._before.items()})
        self._before = {}

    def flat(self) -> list[FlatStep]:
        """Each step as flat vectors over the parameters that had a gradient (the layout of
        ``MetaGradCallback.predict_old_gradient``)."""
        out = []
        for step in self.steps:
            used = [a for a in step.values() if a.grad is not None]
            out.append(
                FlatStep(
                    flat(a.before for a in used),
                    flat(a.grad for a in used),
                    flat(a.after for a in used),
                )
            )  # type: ignore[misc]
        return out

    @staticmethod
    def matrix(
        step: dict[str, Applied],
        weight: str,
        bias: str | None,
        features: int,
        received: bool = False,
    ) -> Tensor:
        """The applied update ``[dW, db]`` (before - after) of ``weight`` as rows x fan-in,
        plus the bias column when ``features`` (a basis's rows) is one more than the fan-in;
        ``received``: the gradient it had instead (zero where there was none)."""

        def part(name: str) -> Tensor:
            before, after, grad = step[name]
            if not received:
                return before - after
            return torch.zeros_like(before) if grad is None else grad

        update = part(weight).reshape(step[weight].before.shape[0], -1)
        if bias is not None and bias in step and features == update.shape[1] + 1:
            update = torch.cat([update, part(bias)[:, None]], dim=1)
        assert update.shape[1] == features, weight
        return update


def subspace_bases(predictor: SubspacePredictor) -> dict[str, Tensor]:
    """Every protected weight matrix's basis (features x k), by the weight's name."""
    return {name: predictor.basis(name) for name in predictor.subspace_dims()}


def bias_of(weight: str) -> str:
    """The bias that pairs with a weight by name (``l.weight`` -> ``l.bias``,
    ``attn.in_proj_weight`` -> ``attn.in_proj_bias``)."""
    return weight[: -len("weight")] + "bias"


def assert_orthogonal(update: Tensor, basis: Tensor, what: str, atol: float = 1e-5) -> None:
    """``update`` (rows x features) has no component in ``basis``'s span (features x k)."""
    scale = float(update.norm()) + 1e-12
    assert float((update @ basis).norm()) <= atol + 1e-4 * scale, what


# --------------------------------------------------------------------------- state


def state_differences(a: Any, b: Any, path: str = "state") -> list[str]:
    """Where two nested states differ (dicts by keys, lists and tuples alike, tensors by
    shape, dtype and value, other leaves by ``==`` with NaN equal to NaN)."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        same = (
            isinstance(a, Tensor)
            and isinstance(b, Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and torch.equal(a.cpu(), b.cpu())
        )
        return [] if same else [path]
    if isinstance(a, dict) or isinstance(b, dict):
        if not (isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys()):
            return [f"{path}: keys"]
        return [d for k in a for d in state_differences(a[k], b[k], f"{path}/{k}")]
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        if not (isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b)):
            return [f"{path}: length"]
        return [
            d for i, (u, v) in enumerate(zip(a, b)) for d in state_differences(u, v, f"{path}[{i}]")
        ]
    equal = a == b or (a != a and b != b)  # NaN == NaN
    return [] if equal else [f"{path}: {a!r} != {b!r}"]


def same_state(a: Any, b: Any) -> bool:
    return not state_differences(a, b)


def assert_same_state(a: Any, b: Any) -> None:
    """Exact equality of two (callback) states; the message names where they differ."""
    differences = state_differences(a, b)
    assert not differences, differences[:10]


def assert_same_params(a: nn.Module, b: nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


# --------------------------------------------------------------------------- scripts and examples


def load_script(relative: str) -> ModuleType:
    """A script of the repository (``experiments/variants.py``, ``examples/cli/train.py``)
    imported as a module, to call its ``main(argv)``."""
    path = ROOT / relative
    name = "script_" + "_".join(path.with_suffix("").parts[-2:])  # e.g. script_cli_train
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def load_example(name: str) -> ModuleType:
    """``examples/<name>.py`` (e.g. ``"cli/train"``) imported as a module."""
    return load_script(f"examples/{name}.py")


def run_cli_example(tmp_path: Path, *overrides: Path) -> Any:
    """``examples/cli/train.py fit`` with its shipped ``config.yaml`` (then each override
    config) on tiny settings: 2 tasks of 2 epochs, no logger, its files under ``tmp_path``;
    returns what its ``main`` returns."""
    args = ["fit", "--config", str(ROOT / "examples" / "cli" / "config.yaml")]
    for override in overrides:
        args += ["--config", str(override)]
    args += ["--trainer.max_epochs", "4", "--trainer.logger", "false"]
    args += ["--trainer.default_root_dir", str(tmp_path), "--data.epochs_per_task", "2"]
    args += ["--data.stream.init_args.num_tasks", "2"]
    with mock.patch.object(sys, "argv", ["train.py"]):  # LightningCLI also looks at sys.argv
        return load_example("cli/train").main(args)


def assert_imports_without_lightning(*modules: str) -> None:
    """A fresh interpreter imports ``modules`` without loading Lightning (any of its
    distributions) or torchmetrics."""
    code = (
        "import sys\n"
        f"import {', '.join(modules)}\n"
        "loaded = [m for m in sys.modules if m.split('.')[0] in "
        "('lightning', 'pytorch_lightning', 'lightning_fabric', 'torchmetrics')]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def script_env(**extra: str) -> dict[str, str]:
    """The environment for a test file run as a script in a subprocess: this one, with
    ``tests/`` on the path (so the script imports this module too)."""
    path = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


_LAUNCHER_VARS = {"MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE"}


def run_distributed_script(script: str, verb: str, out: Path, timeout: int) -> None:
    """Run test file ``script`` as ``python script verb out`` in a fresh process (Lightning's
    launcher then re-executes it once per extra rank), without this process's launcher
    variables; fails the test with the end of its stderr if it fails."""
    env = {k: v for k, v in script_env(PYTHONWARNINGS="ignore").items() if k not in _LAUNCHER_VARS}
    proc = subprocess.run(
        [sys.executable, script, verb, str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]


def end_process_group() -> None:
    """Tear the gloo group down while every rank is alive: left to interpreter exit, its
    threads sometimes abort the process ("terminate called without an active exception")."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
