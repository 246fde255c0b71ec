"""Every script in ``examples/`` runs end to end on small settings and reports what it promises."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_permuted_quickstart_prints_both_accuracy_matrices(capsys):
    results = load_example("permuted_quickstart").main(["--tasks", "2", "--steps", "150"])
    out = capsys.readouterr().out
    assert set(results) == {"plain SGD", "MetaGrad"}
    for R in results.values():
        assert R.shape == (2, 2) and torch.all((R >= 0) & (R <= 1))
        assert R[0, 0] > 0.3  # 150 steps on digits learn the first task well above chance (0.1)
    assert "plain SGD: ACC" in out and "MetaGrad: ACC" in out and "after task 1:" in out
