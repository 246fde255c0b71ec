"""The benchmark runner and CLI: results.json schema, failed seeds recorded, table printed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from lightning_metagrad.benchmark import BenchmarkConfig, run_method
from lightning_metagrad.benchmark.cli import format_table, main
from lightning_metagrad.benchmark.runner import summarise

SMALL = {"tasks": 3, "iters": 150, "hidden_sizes": (32,), "eval_every": 30, "eval_samples": 200}


class Sabotage(pl.Callback):
    """At the end of ``task``'s fit, sets every weight to ``value`` (a real failure mode)."""

    def __init__(self, model: torch.nn.Module, task: int, value: float) -> None:
        self.model, self.task, self.value, self.fits = model, task, value, 0

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.fits == self.task:
            with torch.no_grad():
                for p in self.model.parameters():
                    p.fill_(self.value)
        self.fits += 1


def sabotaged_run(task: int, value: float) -> dict[str, Any]:
    def probes(stream: Any, model: torch.nn.Module, callbacks: list) -> list:
        return [Sabotage(model, task, value)]

    return run_method(BenchmarkConfig(**SMALL), "naive", seed=0, probes=probes)


def test_non_finite_weights_are_recorded_as_divergence_without_an_error() -> None:
    run = sabotaged_run(task=1, value=float("nan"))
    assert run["diverged_in_task"] == 1
    assert len(run["acc_matrix"]) == 3  # the run still yields a full matrix


def test_training_that_collapses_to_chance_is_recorded() -> None:
    run = sabotaged_run(task=2, value=0.0)  # all-zero weights: constant predictions
    assert run["diverged_in_task"] is None
    assert run["collapsed_in_task"] == 2
    entry = summarise([run])
    assert entry["collapsed_seeds"] == [0] and entry["diverged_seeds"] == []
    assert "0 collapsed" in format_table({"methods": {"naive": entry}})


def test_a_healthy_run_records_no_failure() -> None:
    run = run_method(BenchmarkConfig(**SMALL), "naive", seed=0)
    assert run["diverged_in_task"] is None and run["collapsed_in_task"] is None
    assert run["acc_matrix"][0][0] > 0.4


def test_cli_writes_the_documented_results_schema_and_plots(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--tasks", "2", "--iters", "40", "--hidden", "16", "--seeds", "0", "1"]
    argv += ["--methods", "naive", "metagrad", "ewc", "--strength", "ewc=10"]
    assert main([*argv, "--output-dir", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["config"]["strengths"]["ewc"] == 10.0
    assert list(results["methods"]) == ["naive", "metagrad", "ewc"]
    for entry in results["methods"].values():
        assert entry["seeds"] == [0, 1]
        R = torch.tensor(entry["acc_matrix"])
        assert R.shape == (2, 2) and bool(((R >= 0) & (R <= 1)).all())
        for key in ("acc", "acc_std", "bwt", "forgetting", "train_step_ms"):
            assert isinstance(entry[key], float)
        assert entry["fwt"] is None or isinstance(entry["fwt"], float)
    for plot in ("curves.png", "matrices.png"):
        assert (tmp_path / plot).stat().st_size > 1000
    assert "metagrad" in capsys.readouterr().out
