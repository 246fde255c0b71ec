"""GPM's per-layer thresholds without a Trainer: a sequence of floats, one per protected layer
in model order, checked at construction (each value) and when the model is bound (the count).
Through real Trainers: ``tests/integration/test_sgp_training.py``."""

from __future__ import annotations

import re

import lightning.pytorch as pl
import pytest
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_metagrad.baselines import GPMCallback, SGPCallback
from lightning_metagrad.benchmark.methods import make_callbacks

GPM_PMNIST = [0.95, 0.99, 0.99]  # main_pmnist.py: first layer 0.95, the others 0.99


class MLP(pl.LightningModule):
    """GPM's permuted-MNIST network, small: Linear-ReLU-Linear-ReLU-Linear without biases, and
    a LayerNorm and a frozen Linear that GPM does not protect."""

    def __init__(self, hidden: int = 5) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(8, hidden, bias=False),
            nn.ReLU(),
            nn.Linear(hidden, hidden, bias=False),
            nn.LayerNorm(hidden),
            nn.Linear(hidden, 3, bias=False),
        )
        self.frozen = nn.Linear(3, 3)
        self.frozen.requires_grad_(False)


@pytest.mark.parametrize("cls", [GPMCallback, SGPCallback])
def test_a_sequence_gives_each_protected_layer_its_threshold_in_model_order(cls: type) -> None:
    gpm = cls(threshold=GPM_PMNIST, threshold_increment=0.001)
    assert gpm.threshold == (0.95, 0.99, 0.99)
    assert gpm.threshold_for("net.0", 0) is None  # not known before the model is bound
    gpm._bind(MLP(), check=True)  # what the fit start does
    assert [gpm.threshold_for(n, 0) for n in ("net.0", "net.2", "net.4")] == GPM_PMNIST
    assert gpm.threshold_for("net.0", 10) == pytest.approx(0.96)
    assert gpm.threshold_for("frozen", 0) is None and gpm.threshold_for("net.3", 0) is None


def test_a_sequence_and_the_same_dict_or_float_agree() -> None:
    model, names = MLP(), ("net.0", "net.2", "net.4")
    as_list, as_dict = (
        GPMCallback(threshold=(0.9,) * 3),
        GPMCallback(threshold=dict.fromkeys(names, 0.9)),
    )
    for gpm in (as_list, as_dict, GPMCallback(threshold=0.9)):
        gpm._bind(model, check=True)
        assert [gpm.threshold_for(n, 2) for n in names] == [0.9] * 3
        assert set(gpm._candidates(model)) == set(names)
    assert as_list.state_key != as_dict.state_key  # separate checkpoint entries


@pytest.mark.parametrize("cls", [GPMCallback, SGPCallback])
@pytest.mark.parametrize("values", [[0.95, 0.99], [0.95, 0.99, 0.99, 0.99]])
def test_a_sequence_of_the_wrong_length_fails_when_the_model_is_bound(
    cls: type, values: list[float]
) -> None:
    gpm = cls(threshold=values)  # the model is not known yet
    expected = (
        f"{cls.__name__}: `threshold` gives {len(values)} values, one per protected layer in "
        "model order, but the model has 3 protected layers (trainable Linear/Conv1d/Conv2d "
        "with groups=1): ['net.0', 'net.2', 'net.4']"
    )
    with pytest.raises(MisconfigurationException, match=re.escape(expected)):
        gpm._bind(MLP(), check=True)


@pytest.mark.parametrize(
    ("threshold", "name", "value"),
    [
        ([0.95, 0.0, 0.99], "threshold[1]", "0.0"),
        ([0.95, 0.99, 1.5], "threshold[2]", "1.5"),
        ([-0.1], "threshold[0]", "-0.1"),
        ([0.9, float("nan")], "threshold[1]", "nan"),
        ([0.9, "0.9"], "threshold[1]", "'0.9'"),
        ([], "threshold", "empty sequence"),
        ((), "threshold", "empty sequence"),
    ],
)
def test_out_of_range_values_are_refused_at_construction(
    threshold: list, name: str, value: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(f"`{name}`") + ".*" + re.escape(value)):
        GPMCallback(threshold=threshold)
    with pytest.raises(ValueError, match=re.escape(f"`{name}`")):
        SGPCallback(threshold=threshold)


def test_the_benchmark_passes_a_json_list_of_thresholds() -> None:
    (gpm,) = make_callbacks("gpm", kwargs={"threshold": GPM_PMNIST})
    assert isinstance(gpm, GPMCallback) and gpm.threshold == (0.95, 0.99, 0.99)
    with pytest.raises(ValueError, match=r"method 'gpm' \(GPMCallback\): `threshold\[0\]`"):
        make_callbacks("gpm", kwargs={"threshold": [2.0]})
