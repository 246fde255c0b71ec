"""Weight matrices are grouped with their per-row tensors by the module that owns them."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations, prune

from lightning_metagrad.matrices import matrix_groups


def _groups(model: nn.Module) -> dict[str, str | None]:
    params, modules = dict(model.named_parameters()), dict(model.named_modules())
    return {g.weight: g.bias for g in matrix_groups(params, modules)}


def test_lstm_and_gru_biases_pair_with_their_own_weights() -> None:
    lstm = nn.LSTM(4, 3, bidirectional=True)
    assert _groups(lstm) == {
        "weight_ih_l0": "bias_ih_l0",
        "weight_hh_l0": "bias_hh_l0",
        "weight_ih_l0_reverse": "bias_ih_l0_reverse",
        "weight_hh_l0_reverse": "bias_hh_l0_reverse",
    }
    assert _groups(nn.GRU(4, 4)) == {"weight_ih_l0": "bias_ih_l0", "weight_hh_l0": "bias_hh_l0"}


def test_weight_norm_scale_is_free_and_the_bias_pairs_with_the_direction() -> None:
    layer = parametrizations.weight_norm(nn.Linear(5, 3))
    groups = matrix_groups(dict(layer.named_parameters()), dict(layer.named_modules()))
    assert [(g.weight, g.bias, g.cols) for g in groups] == [
        ("parametrizations.weight.original1", "bias", 6)
    ]


def test_spectral_norm_and_pruning_keep_the_bias_with_the_matrix() -> None:
    sn = parametrizations.spectral_norm(nn.Linear(5, 3))
    assert _groups(sn) == {"parametrizations.weight.original": "bias"}
    pruned = nn.Sequential(nn.Linear(5, 3))
    prune.l1_unstructured(pruned[0], "weight", amount=0.5)
    assert _groups(pruned) == {"0.weight_orig": "0.bias"}


def test_a_transposed_convolution_leaves_its_bias_free() -> None:
    deconv = nn.Sequential(nn.ConvTranspose2d(4, 4, 3))  # in == out channels
    assert _groups(deconv) == {"0.weight": None}
    assert _groups(nn.Sequential(nn.Conv2d(4, 4, 3))) == {"0.weight": "0.bias"}


def test_norm_scales_and_a_fan_in_of_one_are_not_matrices() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Conv1d(1, 2, 1))
    assert _groups(model) == {"0.weight": "0.bias"}


@pytest.mark.parametrize("cls", [nn.Embedding, nn.EmbeddingBag])
def test_sparse_embedding_gradients_are_refused_at_bind_with_the_fix(cls: type) -> None:
    from lightning_metagrad import MetaGrad

    model = nn.Sequential(cls(10, 4, sparse=True))
    with pytest.raises(ValueError, match="sparse=False"):
        MetaGrad().bind(model)


def test_names_alone_group_as_the_modules_do() -> None:
    model = nn.Sequential(nn.Linear(3, 2), nn.LSTM(2, 2))
    by_names = matrix_groups(dict(model.named_parameters()))
    assert by_names == matrix_groups(dict(model.named_parameters()), dict(model.named_modules()))
    assert torch.Size([2, 3]) == model[0].weight.shape
