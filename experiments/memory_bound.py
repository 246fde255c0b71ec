"""Peak memory of the default predictor's tensors, per model parameter (issue 23, part 2).

For each model and predictor setting, two short tasks run through the plain-PyTorch engine
(``MetaGrad``: bind, SGD steps, a task boundary), and every call into the predictor (its
forward hooks, ``observe``, ``rewrite_``, ``end_task``) runs inside
:class:`~lightning_metagrad.meters.PeakTensorMemory`, which counts the tensors the
call allocates while they live. The figure is, over all calls, the largest
``floats held before the call + floats allocated during it (peak)``, divided by the model's
trainable parameters: state + workspace per parameter. Also printed: the floats held after the
second task (state) and the slowest boundary. Run::

    .venv/bin/python experiments/memory_bound.py [--steps 8] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_metagrad import MetaGrad, SubspacePredictor
from lightning_metagrad.meters import PeakTensorMemory

SETTINGS: dict[str, Callable[[], SubspacePredictor]] = {
    "the default (inputs; sketch='auto')": lambda: SubspacePredictor(every=1),
    "inputs, dense": lambda: SubspacePredictor(every=1, sketch=None),
    "inputs, sketch 32": lambda: SubspacePredictor(every=1, sketch=32),
    "gradient, dense (the earlier default)": lambda: SubspacePredictor(
        every=1, statistic="gradient", late_weight=1.0, sketch=None
    ),
    "gradient, sketch 32": lambda: SubspacePredictor(every=1, statistic="gradient", sketch=32),
    "inputs+gradient, dense": lambda: SubspacePredictor(every=1, statistic="both", sketch=None),
    "inputs+gradient, sketch 32": lambda: SubspacePredictor(every=1, statistic="both", sketch=32),
}


def _mlp_8192() -> tuple[nn.Module, Callable[[], Any]]:
    model = nn.Sequential(nn.Linear(8192, 64), nn.ReLU(), nn.Linear(64, 10))
    return model, lambda: (torch.randn(16, 8192), torch.randint(10, (16,)))


def _thin() -> tuple[nn.Module, Callable[[], Any]]:
    return nn.Linear(4096, 16), lambda: (torch.randn(16, 4096), torch.randint(16, (16,)))


def _transformer() -> tuple[nn.Module, Callable[[], Any]]:
    from lightning.pytorch.demos import Transformer  # the experiment may use Lightning

    model = Transformer()  # vocab 33278, width 200, 2 + 2 layers
    vocab = model.vocab_size

    def batch() -> Any:
        x = torch.randint(vocab, (4, 16))
        return (x, x), torch.randint(vocab, (4 * 16,))

    return model, batch


def _resnet18() -> tuple[nn.Module, Callable[[], Any]]:
    from torchvision.models import resnet18  # the benchmark extra

    model = resnet18(num_classes=10)
    return model, lambda: (torch.randn(4, 3, 32, 32), torch.randint(10, (4,)))


MODELS: dict[str, Callable[[], tuple[nn.Module, Callable[[], Any]]]] = {
    "MLP 8192-64-10": _mlp_8192,
    "Linear(4096, 16)": _thin,
    "resnet18": _resnet18,
    "demo Transformer": _transformer,
}


class _Meter:
    """Wraps the predictor's entry points: per call, floats held before + peak allocated."""

    def __init__(self, pred: SubspacePredictor) -> None:
        self.pred = pred
        self.peak = 0.0  # floats
        self.boundary_s = 0.0
        for name in ("_read_inputs", "observe", "rewrite_", "end_task"):
            setattr(pred, name, self._wrap(name, getattr(pred, name)))

    def _wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            held = self.pred.memory_floats()
            start = time.perf_counter()
            with PeakTensorMemory() as mem:
                out = fn(*args, **kwargs)
            if name == "end_task":
                self.boundary_s = max(self.boundary_s, time.perf_counter() - start)
            self.peak = max(self.peak, held + mem.peak / 4)
            return out

        return call


def measure(model_name: str, setting: str, steps: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model, batch = MODELS[model_name]()
    pred = SETTINGS[setting]()
    meter = _Meter(pred)  # before bind: the hooks call the wrapped reader
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    core = MetaGrad(pred)
    core.bind(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    core.use_optimizer(opt)
    model.train()
    for task in range(2):
        if task:
            core.start_task()
        for _ in range(steps):
            inputs, target = batch()
            opt.zero_grad()
            out = model(*inputs) if isinstance(inputs, tuple) else model(inputs)
            nn.functional.cross_entropy(out, target).backward()
            core.before_optimizer_step()
            opt.step()
    core.start_task()  # fold the second task in: the state after two tasks
    return {
        "model": model_name,
        "setting": setting,
        "parameters": params,
        "peak_floats_per_param": meter.peak / params,
        "state_floats_per_param": pred.memory_floats() / params,
        "boundary_s": meter.boundary_s,
        "subspace_dims": pred.subspace_dims(),
    }


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per task")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args(argv)
    rows = []
    print("| model | parameters | setting | peak floats/param | state after 2 tasks | boundary |")
    print("|---|---|---|---|---|---|")
    for model_name in args.models:
        for setting in args.settings:
            r = measure(model_name, setting, args.steps)
            rows.append(r)
            print(
                f"| {model_name} | {r['parameters']:,} | {setting} | "
                f"{r['peak_floats_per_param']:.3f} | {r['state_floats_per_param']:.3f} | "
                f"{r['boundary_s']:.2f} s |",
                flush=True,
            )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
