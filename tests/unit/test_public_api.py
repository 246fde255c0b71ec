"""The top level holds what a user imports; names are typed so that LightningCLI checks them."""

from __future__ import annotations

import importlib
import typing

import pytest

import lightning_metagrad as lm
from lightning_metagrad.baselines import __all__ as baseline_names


def test_the_top_level_holds_what_a_user_imports() -> None:
    callbacks = {"MetaGradCallback", "MetaGrad", "StepReport", "Runtime"}
    predictors = {
        "OldGradientPredictor",
        "SubspacePredictor",
        "GradientSubspacePredictor",
        "RelaxedSubspacePredictor",
        "AnchoredPredictor",
        "MetaNetPredictor",
        "ReplayPredictor",
    }
    boundaries = {
        "TaskBoundarySource",
        "NewFitBoundaries",
        "BatchTaskIdBoundaries",
        "AutoBoundaries",
        "CombinedBoundaries",
        "ManualBoundaries",
    }
    baselines = {name for name in baseline_names if name.endswith("Callback")}
    namespaces = {"baselines", "data", "metrics"}
    assert set(lm.__all__) == callbacks | predictors | boundaries | baselines | namespaces
    for name in lm.__all__:
        assert getattr(lm, name) is not None


@pytest.mark.parametrize(
    ("name", "module"),
    [
        ("CoordinateMLP", "lightning_metagrad.predictors.paper.meta_network"),
        ("MetaNetwork", "lightning_metagrad.predictors.paper.meta_network"),
        ("RunningMeanDistiller", "lightning_metagrad.predictors.paper.distillation"),
        ("TabulatedFunction", "lightning_metagrad.predictors.paper.tabulation"),
        ("ChangePointDetector", "lightning_metagrad.boundaries.changepoint"),
        ("Diagnostics", "lightning_metagrad.diagnostics"),
        ("sign_agreement", "lightning_metagrad.predictors.rules"),
        ("joint_average", "lightning_metagrad.predictors.rules"),
    ],
)
def test_internals_left_the_top_level_for_their_modules(name: str, module: str) -> None:
    assert name not in lm.__all__ and name not in vars(lm)
    moved = getattr(importlib.import_module(module), name)
    with pytest.warns(DeprecationWarning, match=f"import it from {module}"):
        assert getattr(lm, name) is moved  # old imports keep working, with a warning
    with pytest.raises(AttributeError):
        lm.NotAName  # type: ignore[attr-defined]  # noqa: B018


def test_names_are_literal_typed() -> None:
    hints = typing.get_type_hints(lm.MetaGradCallback.__init__)

    def literals(hint: object) -> set[object]:
        if typing.get_origin(hint) is typing.Literal:
            return set(typing.get_args(hint))
        found: set[object] = set()
        for arg in typing.get_args(hint):
            if typing.get_origin(arg) is typing.Literal:
                found |= set(typing.get_args(arg))
            else:
                found |= literals(arg)
        return found

    assert literals(hints["predictor"]) == {
        "subspace",
        "gradient-subspace",
        "anchored",
        "paper",
        "replay",
        "relaxed",
    }
    assert literals(hints["task_boundaries"]) == {"fit", "batch", "manual", "auto"}
    assert literals(hints["combine"]) == {"sign", "average"}
    auto = typing.get_type_hints(lm.AutoBoundaries.__init__)
    assert literals(auto["signal"]) == {
        "novelty",
        "inputs",
        "loss",
        "error",
        "direction",
        "novelty+direction",
        "novelty+direction+inputs",
    }


def test_lightning_cli_refuses_an_unknown_predictor_name() -> None:
    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(lm.MetaGradCallback, "callback")
    config = parser.parse_args(["--callback.predictor=anchored"])
    assert config.callback.predictor == "anchored"
    with pytest.raises(jsonargparse.ArgumentError):
        parser.parse_args(["--callback.predictor=subspac"])
    with pytest.raises(jsonargparse.ArgumentError):
        parser.parse_args(["--callback.task_boundaries=epoch"])


def test_properties_of_the_paper_predictor_say_what_to_use_elsewhere() -> None:
    paper = lm.MetaGradCallback(predictor="paper")
    assert paper.meta_network is paper.predictor.h  # type: ignore[attr-defined]
    assert paper.predictor_network is None  # before task 2
    with pytest.raises(AttributeError, match="predictor='paper'"):
        _ = lm.MetaGradCallback().meta_network


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("lightning_metagrad.subspace", "lightning_metagrad.predictors.subspace"),
        ("lightning_metagrad.detection", "lightning_metagrad.boundaries.changepoint"),
        ("lightning_metagrad.novelty", "lightning_metagrad.boundaries.novelty"),
        ("lightning_metagrad.meta_network", "lightning_metagrad.predictors.paper.meta_network"),
    ],
)
def test_a_moved_module_still_imports_with_a_deprecation_warning(old: str, new: str) -> None:
    import sys

    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=new.replace(".", r"\.")):
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)
