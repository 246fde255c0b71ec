"""Every script in ``examples/`` runs end to end on small settings and reports what it promises."""

from __future__ import annotations

import pytest
import torch
from helpers import ROOT, load_example, run_cli_example

pytestmark = pytest.mark.slow  # the examples end to end, on real data

EXAMPLES = ROOT / "examples"


def test_permuted_quickstart_prints_both_accuracy_matrices(capsys):
    results = load_example("permuted_quickstart").main(["--tasks", "2", "--steps", "150"])
    out = capsys.readouterr().out
    assert set(results) == {"plain SGD", "MetaGrad"}
    for R in results.values():
        assert R.shape == (2, 2) and torch.all((R >= 0) & (R <= 1))
        assert R[0, 0] > 0.3  # 150 steps on digits learn the first task well above chance (0.1)
    assert "plain SGD: ACC" in out and "MetaGrad: ACC" in out and "after task 1:" in out


def test_existing_cnn_is_trained_unchanged_with_and_without_metagrad(capsys):
    results = load_example("existing_cnn").main(["--tasks", "2", "--steps", "100"])
    out = capsys.readouterr().out
    assert results["same_model"] is True  # same class, same parameter names and shapes
    for name in ("plain", "MetaGrad"):
        R = results[name]
        assert R.shape == (2, 2) and torch.all((R >= 0) & (R <= 1))
        assert R[0, 0] > 0.5  # a CNN learns unrotated digits well above chance (0.1)
    # Task 0 is trained identically (MetaGrad has no old task yet): the same first row.
    assert torch.equal(results["plain"][0], results["MetaGrad"][0])
    assert "plain: ACC" in out and "MetaGrad: ACC" in out and "after task 1:" in out


def test_lightning_cli_example_trains_tasks_in_one_fit_from_the_yaml(tmp_path, capsys):
    from lightning_metagrad import MetaGradCallback

    results = run_cli_example(tmp_path)
    cb = results["metagrad"]
    assert isinstance(cb, MetaGradCallback)  # built from the YAML's trainer.callbacks
    assert cb.task_index == 1 and cb.num_old_tasks == 1  # the batches' task id changed once
    assert results["trainer"].current_epoch == 4
    R = results["matrix"]
    assert R.shape == (2, 2) and R[0, 0] > 0.3  # 34 steps learn task 0 above chance (0.1)
    assert (tmp_path / "config.yaml").is_file()  # LightningCLI saved the resolved config
    assert "MetaGrad saw 2 tasks" in capsys.readouterr().out


def test_task_free_detection_finds_the_silent_switch(capsys):
    results = load_example("task_free_detection").main(["--tasks", "2", "--steps-per-task", "600"])
    out = capsys.readouterr().out
    assert results["true_switches"] == [600]
    detected = results["detected_switches"]
    assert isinstance(detected, list) and all(isinstance(s, int) for s in detected)
    assert results["tasks_seen"] == len(detected) + 1
    assert len(detected) == 1 and 600 <= detected[0] <= 700  # found, within 100 steps
    R = results["matrix"]
    assert R.shape == (2, 2) and R[0, 0] > 0.5
    assert "detected switches (global step):" in out


def test_compare_baselines_runs_every_method_and_writes_plots(tmp_path, capsys):
    argv = ["--tasks", "2", "--iters", "100", "--lr", "0.1", "--hidden", "32", "--eval-every", "50"]
    out_dir = tmp_path / "compare"
    results = load_example("compare_baselines").main([*argv, "--out", str(out_dir)])
    methods = results["results"]["methods"]
    assert list(methods) == [
        "naive", "ewc", "online-ewc", "si", "mas", "metagrad", "metagrad-replay"
    ]  # fmt: skip
    for entry in methods.values():
        R = torch.tensor(entry["acc_matrix"])
        assert R.shape == (2, 2) and R[0, 0] > 0.5  # well above chance (0.1) on task 0
    for name in ("results.json", "curves.png", "matrices.png"):
        assert (out_dir / name).stat().st_size > 0
    assert [p.name for p in results["plots"]] == ["curves.png", "matrices.png"]
    assert "metagrad" in capsys.readouterr().out
