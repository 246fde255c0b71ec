"""The benchmark: one configuration with presets for every script, callbacks passed to the
runner, results.json schema, failed seeds recorded with the metrics' definitions, table printed."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import ROOT, load_script

from lightning_metagrad import MetaGradCallback, ReplayPredictor
from lightning_metagrad.benchmark import (
    PRESETS,
    BenchmarkConfig,
    methods,
    preset,
    run_method,
    runner,
)
from lightning_metagrad.benchmark.cli import build_parser, format_table, main
from lightning_metagrad.benchmark.config import (
    config_argv,
    config_flag,
    config_from_args,
    parse_config,
)
from lightning_metagrad.benchmark.models import MLPClassifier
from lightning_metagrad.benchmark.quiet import quiet_trainer_kwargs
from lightning_metagrad.benchmark.runner import summarise
from lightning_metagrad.benchmark.variants import parse_variant
from lightning_metagrad.metrics import average_accuracy, backward_transfer, collapsed_in_task

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


# ------------------------------------------------------------------ one experiment configuration

TINY = ["--preset", "digits", "--tasks", "2", "--iters", "20", "--hidden", "16", "--seeds", "0"]


def cli_parser() -> argparse.ArgumentParser:
    return build_parser()


# Every experiment entry point: (how to get its parser, its preset, arguments it requires, the
# config fields it does not take because it has its own option in their place).
SCRIPTS: dict[str, tuple[Callable[[], argparse.ArgumentParser], str, list[str], set[str]]] = {
    "metagrad-benchmark": (cli_parser, "digits", [], set()),
    "experiments/science.py": (
        lambda: load_script("experiments/science.py").build_parser(),
        "fig1",
        [],
        {"methods", "strengths"},  # --predictors
    ),
    "experiments/variants.py": (
        lambda: load_script("experiments/variants.py").build_parser(),
        "fig1",
        ["naive"],
        {"methods", "strengths"},  # the positional NAME=SPEC variants
    ),
    "experiments/tasks_scaling.py": (
        lambda: load_script("experiments/tasks_scaling.py").build_parser(),
        "tasks-scaling",
        [],
        set(),
    ),
    "experiments/replay_staleness.py": (
        lambda: load_script("experiments/replay_staleness.py").build_parser(),
        "replay-staleness",
        [],
        {"methods", "strengths", "eval_every", "eval_samples", "eval_split"},  # no evaluation
    ),
    "examples/compare_baselines.py": (
        lambda: load_script("examples/compare_baselines.py").build_parser(),
        "compare",
        [],
        set(),
    ),
}


def test_the_fig1_preset_is_the_papers_protocol() -> None:
    fig1 = PRESETS["fig1"]
    assert (fig1.stream, fig1.dataset, fig1.root) == ("permuted", "fashion_mnist", "../shared/data")
    assert (fig1.tasks, fig1.iters, fig1.batch_size) == (5, 2000, 64)
    assert (fig1.optimizer, fig1.lr, fig1.hidden_sizes) == ("sgd", 0.03, (256, 256, 256))
    assert fig1.seeds == (0, 1, 2) and fig1.eval_split == "test"
    assert (fig1.eval_every, fig1.eval_samples) == (400, 500)  # docs/results.md's commands


def test_the_other_presets_are_the_scripts_protocols() -> None:
    assert PRESETS["digits"] == BenchmarkConfig()  # the README's `metagrad-benchmark`
    assert PRESETS["compare"] == BenchmarkConfig(
        tasks=3,
        methods=("naive", "ewc", "online-ewc", "si", "mas", "metagrad", "metagrad-replay"),
        eval_every=25,
    )
    fig1 = PRESETS["fig1"]
    assert PRESETS["tasks-scaling"] == dataclasses.replace(
        fig1, tasks=10, seeds=(0,), methods=("metagrad", "naive"), eval_every=2000
    )
    assert PRESETS["replay-staleness"] == dataclasses.replace(
        fig1, tasks=2, seeds=(1,), methods=("metagrad-replay",)
    )


def test_a_preset_is_a_fresh_copy_with_changes() -> None:
    config = preset("fig1", seeds=(0,), strengths={"ewc": 300.0})
    assert config.seeds == (0,) and config.iters == 2000
    config.strengths["si"] = 1.0
    assert PRESETS["fig1"].strengths == {}
    with pytest.raises(ValueError, match="unknown preset 'paper'"):
        preset("paper")


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_every_script_defaults_to_its_preset(script: str) -> None:
    make_parser, name, required, _ = SCRIPTS[script]
    assert config_from_args(make_parser().parse_args(required)) == PRESETS[name]


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_every_config_field_is_an_option_of_every_script(script: str) -> None:
    """A field added to BenchmarkConfig is a flag of each script without touching the script."""
    make_parser, _, _, replaced = SCRIPTS[script]
    parser = make_parser()
    help_text = parser.format_help()
    assert "--preset" in help_text
    for f in dataclasses.fields(BenchmarkConfig):
        if f.name not in replaced:
            assert config_flag(f.name) in help_text, f"{script} lacks {config_flag(f.name)}"


def test_options_change_the_chosen_preset() -> None:
    argv = ["--preset", "fig1", "--tasks", "3", "--seed", "1", "--strength", "ewc=300"]
    config = config_from_args(build_parser().parse_args(argv))
    assert config == preset("fig1", tasks=3, seeds=(1,), strengths={"ewc": 300.0})
    # The documented Fig. 1 command line spells the preset out: the same configuration.
    spelled = "--stream permuted --dataset fashion_mnist --root ../shared/data --tasks 5 "
    spelled += "--iters 2000 --batch-size 64 --optimizer sgd --lr 0.03 --eval-every 400 "
    spelled += "--eval-samples 500 --seeds 0 1 2"
    assert config_from_args(build_parser().parse_args(spelled.split())) == dataclasses.replace(
        PRESETS["fig1"], methods=PRESETS["digits"].methods
    )


def test_a_rejected_value_exits_with_the_fields_name(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_config(build_parser(), ["--tasks", "1"])
    assert "`tasks` must be >= 2" in capsys.readouterr().err


def test_the_docs_list_every_option() -> None:
    page = (ROOT / "docs" / "benchmark.md").read_text()
    for flag in ["--preset", *(config_flag(f.name) for f in dataclasses.fields(BenchmarkConfig))]:
        assert f"`{flag}" in page, f"docs/benchmark.md does not describe {flag}"
    for name in PRESETS:
        assert f"`{name}`" in page, f"docs/benchmark.md does not describe the preset {name}"


# ------------------------------------------------------------------ task-incremental Split


def test_a_head_per_task_needs_the_split_stream() -> None:
    with pytest.raises(ValueError, match="`heads='task'` needs the Split stream"):
        BenchmarkConfig(stream="permuted", heads="task")
    with pytest.raises(ValueError, match="`heads` must be 'shared' or 'task'"):
        BenchmarkConfig(stream="split", heads="multi")


def test_with_a_head_per_task_each_task_trains_and_is_scored_on_its_own_classes() -> None:
    config = BenchmarkConfig(stream="split", heads="task", tasks=5, iters=20, hidden_sizes=(16,))
    stream = runner.make_stream(config, seed=0)
    stream.setup("fit")
    model = runner.make_model(config, stream)
    head = model.net[-1].weight
    before = head.detach().clone()
    trainer = pl.Trainer(max_steps=20, **quiet_trainer_kwargs())
    stream.set_task(1)
    trainer.fit(model, stream.train_dataloader())
    changed = (head.detach() != before).any(dim=1)
    assert changed.tolist() == [c in (2, 3) for c in range(10)]  # only task 1's rows moved
    batch = next(iter(stream.task_dataloader(3, split="test")))
    predicted = model.task_logits(batch).argmax(dim=-1)
    assert set(predicted.tolist()) <= {6, 7}  # scored among task 3's classes only


def test_a_head_per_task_refuses_batches_without_task_ids() -> None:
    model = MLPClassifier(
        input_dim=4, num_classes=4, hidden_sizes=(), task_classes=[(0, 1), (2, 3)]
    )
    with pytest.raises(ValueError, match="'task_id'"):
        model.training_step((torch.zeros(2, 4), torch.tensor([0, 1])), 0)
    with pytest.raises(ValueError, match=r"`task_classes\[1\]` must name classes in \[0, 4\)"):
        MLPClassifier(input_dim=4, num_classes=4, task_classes=[(0, 1), (4,)])


def test_task_incremental_split_is_above_chance_where_class_incremental_forgets() -> None:
    shared = BenchmarkConfig(stream="split", tasks=5, iters=60, hidden_sizes=(32,))
    task = dataclasses.replace(shared, heads="task")
    last_shared = run_method(shared, "naive", seed=0)["acc_matrix"][-1]
    last_task = run_method(task, "naive", seed=0)["acc_matrix"][-1]
    # One shared head predicts only the last task's classes; a head per task keeps each
    # earlier task's two-way decision well above its chance of 0.5.
    assert max(last_shared[:-1]) < 0.2
    assert min(last_task[:-1]) > 0.6


# ----------------------------------------------------------------------- callbacks as arguments


class FitCounter(pl.Callback):
    def __init__(self) -> None:
        self.fits = 0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.fits += 1


def test_the_runner_takes_a_callbacks_factory() -> None:
    made: list[FitCounter] = []

    def factory() -> list[pl.Callback]:
        made.append(FitCounter())
        return [made[-1]]

    config = BenchmarkConfig(tasks=2, iters=5, hidden_sizes=(8,))
    run = run_method(config, "counted", seed=0, callbacks=factory)
    assert len(made) == 1 and made[0].fits == 2  # one list for the run, used by every task
    assert len(run["acc_matrix"]) == 2


def test_variants_runs_configured_callbacks_end_to_end(tmp_path: Path) -> None:
    variants = load_script("experiments/variants.py")
    spec = "MetaGradCallback(predictor=ReplayPredictor(free_below=1.0))"
    out = variants.main([*TINY, "--output", str(tmp_path), f"replay1={spec}", "naive"])
    written = json.loads((tmp_path / "results.json").read_text())
    assert written == json.loads(json.dumps(out))
    assert list(written["methods"]) == ["replay1", "naive"]
    assert written["methods"]["replay1"]["expression"] == spec
    assert written["config"]["variants"] == [f"replay1={spec}", "naive"]
    assert written["config"]["tasks"] == 2 and written["config"]["dataset"] == "digits"
    assert len(written["methods"]["replay1"]["acc_matrix"]) == 2
    assert runner.make_callbacks is methods.make_callbacks  # nothing was patched


def test_a_variant_spec_builds_fresh_callbacks_of_its_constructors() -> None:
    name, spec, factory = parse_variant(
        "r=MetaGradCallback(predictor=ReplayPredictor(free_below=2.0))"
    )
    first, second = factory(), factory()
    assert (name, spec) == ("r", "MetaGradCallback(predictor=ReplayPredictor(free_below=2.0))")
    assert first[0] is not second[0]
    assert isinstance(first[0], MetaGradCallback)
    assert isinstance(first[0].predictor, ReplayPredictor) and first[0].predictor.free_below == 2.0


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("x=__import__('os').system('true')", "not a constructor"),
        ("x=MetaGradCallback(**{'predictor': 'replay'})", r"no \*args"),
        ("x=MetaGradCallback(predictor=1 + 2)", "neither a literal"),
        ("x=ReplayPredictor()", "not a callback"),
        ("x=MetaGradCallback(colour='red')", "colour"),
        ("not-a-method", "not a method"),
    ],
)
def test_a_variant_spec_is_parsed_never_evaluated(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_variant(text)


# ------------------------------------------------------------------- one definition of a metric


def test_runs_and_tables_use_the_metrics_definition_of_collapsed(tmp_path: Path) -> None:
    run = sabotaged_run(task=2, value=0.0)
    assert run["collapsed_in_task"] == collapsed_in_task(run["acc_matrix"], run["num_classes"])
    # A seed that collapsed and then partly recovered still counts as collapsed in the table.
    recovered = {**run, "acc_matrix": [[0.9, 0.1, 0.1], [0.8, 0.1, 0.1], [0.3, 0.2, 0.4]]}
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"config": {}, "methods": {"m": {"per_seed": [recovered]}}}))
    (row,) = load_script("experiments/results_table.py").rows([path])
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[0] == "m" and cells[4] == "1/1"
    assert cells[1] == f"{average_accuracy(recovered['acc_matrix']):.3f} ± 0.000"
    assert cells[2].startswith(f"{backward_transfer(recovered['acc_matrix']):+.3f}")


def test_the_table_pools_one_methods_seeds_from_several_files(tmp_path: Path) -> None:
    table = load_script("experiments/results_table.py")
    paths = []
    for seeds, acc in (((0,), 0.5), ((1, 2), 0.8)):
        per_seed = [
            {
                "seed": s,
                "acc_matrix": [[acc, 0.1], [acc, acc]],
                "random_init": [0.1, 0.1],
                "train_step_ms": 1.0,
            }
            for s in seeds
        ]
        paths.append(tmp_path / f"seeds{seeds[0]}.json")
        paths[-1].write_text(json.dumps({"config": {}, "methods": {"m": {"per_seed": per_seed}}}))
    assert len(table.rows(paths)) == 2  # one row per file without --pool
    (row,) = table.rows(paths, pool=True)
    assert "| 0.500 / 0.800 / 0.800 |" in row  # the three seeds, in seed order
    with pytest.raises(SystemExit, match="seed"):
        table.rows([paths[0], paths[0]], pool=True)


# ------------------------------------------------------------------ GPM's protocol (issue 23)

GPM_THRESHOLDS = {"net.0": 0.95, "net.2": 0.99, "net.4": 0.99}


def documented_gpm_command() -> list[str]:
    """docs/benchmark.md's GPM protocol spelled out (the command after ``metagrad-benchmark
    --dataset mnist``, with its continuation lines), as argv."""
    page = (ROOT / "docs" / "benchmark.md").read_text()
    found = re.search(r"metagrad-benchmark (--dataset mnist (?:.*\\\n)*.*)", page)
    assert found, "docs/benchmark.md lacks the spelled-out GPM protocol"
    return shlex.split(found.group(1).replace("\\\n", " "))


def parsed(argv: list[str]) -> BenchmarkConfig:
    return config_from_args(build_parser().parse_args(argv))


def test_the_gpm_pmnist_preset_is_gpms_protocol() -> None:
    gpm = PRESETS["gpm-pmnist"]
    assert (gpm.stream, gpm.dataset, gpm.tasks, gpm.heads) == ("permuted", "mnist", 10, "shared")
    assert (gpm.epochs, gpm.batch_size, gpm.optimizer, gpm.lr) == (5, 10, "sgd", 0.01)
    assert (gpm.hidden_sizes, gpm.bias, gpm.standardize) == ((100, 100), False, True)
    assert gpm.method_kwargs == {"gpm": {"threshold": GPM_THRESHOLDS}}
    assert "gpm" in gpm.methods and gpm.seeds == (0, 1, 2)
    assert parsed(documented_gpm_command()) == gpm


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_is_reachable_from_flags_alone(name: str) -> None:
    argv = config_argv(PRESETS[name])
    assert "--preset" not in argv
    assert parsed(argv) == PRESETS[name]  # from the default preset (digits)


def test_steps_come_from_epochs_of_the_tasks_training_data() -> None:
    steps: list[int] = []

    class CountSteps(pl.Callback):
        def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            steps.append(trainer.global_step)

    config = BenchmarkConfig(tasks=2, epochs=2, batch_size=500, hidden_sizes=(8,), eval_every=3)
    run = run_method(config, "naive", seed=0, probes=lambda *a: [CountSteps()])
    assert steps == [6, 6]  # 1077 training digits: 3 batches of 500, twice
    assert sorted({r["iteration"] for r in run["curves"]}) == [3, 6, 9, 12]  # offset: 6 a task
    joint = run_method(config, "joint", seed=0, probes=lambda *a: [CountSteps()])
    assert steps[2:] == [6, 6] and len(joint["acc_matrix"]) == 2  # joint: as many as the task


def test_iters_alone_counts_steps_and_both_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert (parsed(["--preset", "gpm-pmnist", "--iters", "50"]).epochs, 50) == (0, 50)
    assert parsed(["--preset", "gpm-pmnist", "--epochs", "1"]).epochs == 1
    with pytest.raises(SystemExit):
        parse_config(build_parser(), ["--iters", "50", "--epochs", "2"])
    assert "give either --iters" in capsys.readouterr().err
    with pytest.raises(ValueError, match="`epochs` must be >= 0"):
        BenchmarkConfig(epochs=-1)


def test_no_bias_builds_linear_layers_without_bias() -> None:
    config = parsed(["--no-bias", "--hidden", "16", "8"])
    linears = [m for m in runner.make_model(config, runner.make_stream(config, 0)).modules()]
    linears = [m for m in linears if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 3 and all(m.bias is None for m in linears)
    default = runner.make_model(parsed([]), runner.make_stream(parsed([]), 0))
    assert all(m.bias is not None for m in default.modules() if isinstance(m, torch.nn.Linear))


def test_standardize_reaches_the_stream_with_train_mean_0_and_std_1() -> None:
    config = parsed(["--standardize", "--tasks", "3"])
    stream = runner.make_stream(config, seed=0)
    for task in (0, 2):
        x = torch.cat([b["x"] for b in stream.task_dataloader(task, split="train")])
        assert abs(float(x.mean())) < 1e-5 and abs(float(x.std(unbiased=False)) - 1) < 1e-5
    assert runner.make_stream(parsed([]), seed=0).input_stats is None


def test_method_kwargs_reach_the_callback() -> None:
    from lightning_metagrad.baselines import GPMCallback

    argv = ["--tasks", "2", "--iters", "3", "--hidden", "8", "--methods", "gpm"]
    argv += ["--method-kwargs", 'gpm={"threshold": {"net.0": 0.95, "net.2": 0.9}}']
    argv += ["--method-kwargs", "gpm={'samples': 40}"]  # a Python literal; merged per method
    argv += ["--method-kwargs", 'ewc={"fisher_batches": 4}', "--strength", "ewc=7"]
    config = parsed(argv)
    assert config.method_kwargs == {
        "gpm": {"threshold": {"net.0": 0.95, "net.2": 0.9}, "samples": 40},
        "ewc": {"fisher_batches": 4},
    }
    seen: list[pl.Callback] = []
    run_method(config, "gpm", seed=0, probes=lambda s, m, callbacks: seen.extend(callbacks) or [])
    (gpm,) = seen
    assert isinstance(gpm, GPMCallback) and gpm.num_tasks == 2
    assert (gpm.threshold, gpm.samples) == ({"net.0": 0.95, "net.2": 0.9}, 40)
    (ewc,) = methods.make_callbacks("ewc", 7.0, config.method_kwargs["ewc"])
    assert (ewc.strength, ewc.fisher_batches) == (7.0, 4)
    # A preset's arguments are merged with the ones given.
    merged = parsed(["--preset", "gpm-pmnist", "--method-kwargs", 'gpm={"samples": 100}'])
    assert merged.method_kwargs["gpm"] == {"threshold": GPM_THRESHOLDS, "samples": 100}
    assert PRESETS["gpm-pmnist"].method_kwargs["gpm"] == {"threshold": GPM_THRESHOLDS}


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ('gmp={"threshold": 0.9}', r"argument --method-kwargs: unknown method 'gmp'; choose"),
        ("gpm", r"--method-kwargs: expected METHOD=JSON.*gpm='\{\"threshold\": 0.97\}'"),
        ("gpm={threshold: 0.9}", r"--method-kwargs: the arguments of 'gpm' are not a JSON object"),
        ("gpm=[0.95, 0.99]", r"--method-kwargs: .*must be a JSON object"),
        ('gpm={"thresholds": [0.95]}', r"--method-kwargs.*'thresholds'.*it takes threshold, "),
        ('gpm={"threshold": 1.5}', r"--method-kwargs.*GPMCallback.*`threshold`"),
        ('naive={"lr": 0.1}', r"--method-kwargs.*'naive' has no callback"),
    ],
)
def test_bad_method_kwargs_exit_naming_the_option_and_the_fix(
    value: str, match: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        parse_config(build_parser(), ["--method-kwargs", value])
    assert re.search(match, capsys.readouterr().err), match


def test_a_strength_is_given_once(capsys: pytest.CaptureFixture[str]) -> None:
    assert parsed(["--method-kwargs", 'ewc={"strength": 5}']).method_kwargs["ewc"]["strength"] == 5
    with pytest.raises(SystemExit):
        parse_config(
            build_parser(), ["--method-kwargs", 'ewc={"strength": 5}', "--strength", "ewc=3"]
        )
    assert "given twice, by --strength and by --method-kwargs" in capsys.readouterr().err


def test_method_kwargs_are_checked_in_python_too() -> None:
    with pytest.raises(ValueError, match="unknown method 'gmp'"):
        BenchmarkConfig(method_kwargs={"gmp": {}})
    with pytest.raises(ValueError, match="must be JSON values"):
        BenchmarkConfig(method_kwargs={"metagrad": {"predictor": object()}})
    config = BenchmarkConfig(tasks=2, iters=2, methods=("gpm",), method_kwargs={"gpm": {"x": 1}})
    with pytest.raises(ValueError, match=r"'x'.*it takes threshold"):
        runner.run_benchmark(config)  # before any training


@pytest.mark.filterwarnings("ignore:GPMCallback. the basis of layer")
def test_gpm_warns_about_layers_its_thresholds_leave_unprotected() -> None:
    config = preset(
        "gpm-pmnist", dataset="digits", tasks=2, epochs=0, iters=2, hidden_sizes=(8,) * 3
    )
    with pytest.warns(UserWarning, match=r"layers \['net.6'\] stay unprotected"):
        run_method(config, "gpm", seed=0)  # the preset's thresholds name net.0, net.2, net.4


def test_missing_mnist_exits_before_training_naming_the_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        parse_config(build_parser(), ["--preset", "gpm-pmnist", "--root", str(tmp_path)])
    err = capsys.readouterr().err
    assert "'mnist' not found" in err and "--download" in err and "--root" in err


def test_the_gpm_protocol_runs_on_digits_from_the_cli(tmp_path: Path) -> None:
    argv = ["--preset", "gpm-pmnist", "--dataset", "digits", "--tasks", "2", "--epochs", "1"]
    argv += ["--batch-size", "100", "--hidden", "32", "32", "--seeds", "0", "--eval-every", "4"]
    argv += ["--eval-samples", "100"]
    assert main([*argv, "--methods", "naive", "gpm", "--output-dir", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    config = results["config"]
    assert config["method_kwargs"] == {"gpm": {"threshold": GPM_THRESHOLDS}}
    assert (config["bias"], config["standardize"], config["epochs"]) == (False, True, 1)
    for entry in results["methods"].values():
        assert len(entry["acc_matrix"]) == 2
        iterations = sorted({r["iteration"] for r in entry["per_seed"][0]["curves"]})
        assert iterations == [4, 8, 15, 19]  # 11 steps a task: 1077 digits in batches of 100
