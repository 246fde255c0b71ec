"""The layers that read the data (``InputLayerProbe``) and the novelty of those layers alone
(``InputNoveltySignal``, the ``"inputs"`` signal of ``AutoBoundaries``), without a Trainer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_metagrad import AutoBoundaries, MetaGrad
from lightning_metagrad.boundaries.signals import InputNoveltySignal
from lightning_metagrad.input_layers import InputLayerProbe
from lightning_metagrad.runtime import Runtime


def probe_after(model: nn.Module, *inputs: torch.Tensor) -> list[str] | None:
    probe = InputLayerProbe(model, dict(model.named_parameters()))
    model(*inputs)
    names = probe.names()
    probe.remove()
    return names


def test_the_first_linear_layer_reads_the_data() -> None:
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 5), nn.ReLU(), nn.Linear(5, 2))
    assert probe_after(model, torch.randn(3, 6)) == ["0.weight", "0.bias"]


def test_an_embedding_reads_the_token_ids() -> None:
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 3))
    assert probe_after(model, torch.tensor([[1, 2, 3]])) == ["0.weight"]


def test_the_first_trainable_layer_after_a_frozen_backbone_reads_the_data() -> None:
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2))
    model[0].requires_grad_(False)
    assert probe_after(model, torch.randn(3, 6)) == ["0.weight", "0.bias", "2.weight", "2.bias"]


def test_evaluation_and_no_grad_forwards_say_nothing() -> None:
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))
    probe = InputLayerProbe(model, dict(model.named_parameters()))
    with torch.no_grad():
        model(torch.randn(3, 6))
    model.eval()
    model(torch.randn(3, 6))
    assert probe.names() is None
    model.train()
    model(torch.randn(3, 6))
    assert probe.names() == ["0.weight", "0.bias"]
    probe.remove()
    assert not model[0]._forward_pre_hooks


def test_the_signal_tracks_only_the_layers_it_is_told() -> None:
    signal = InputNoveltySignal()
    signal.on_gradients(["a.weight"], [torch.ones(4, 3)])
    assert signal.novelty.dims() == {} and signal.take() is None  # silent until told
    signal.layers = frozenset({"a.weight"})
    for _ in range(3):
        signal.on_gradients(["a.weight", "b.weight"], [torch.randn(4, 3), torch.randn(2, 4)])
    assert set(signal.novelty.dims()) == {"a.weight"}
    restored = InputNoveltySignal()
    restored.load_state_dict(signal.state_dict())
    assert restored.layers == signal.layers
    assert restored.novelty.dims() == signal.novelty.dims()


def test_the_engine_tells_the_source_at_the_first_step() -> None:
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))
    source = AutoBoundaries(signal="novelty+direction+inputs")
    assert source.uses_input_layers and not AutoBoundaries(signal="novelty").uses_input_layers
    core = MetaGrad(boundaries=source)
    core.bind(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    core.use_optimizer(opt)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(8, 6)).pow(2).mean().backward()
        core.before_optimizer_step()
        opt.step()
    signal = source.signals["inputs"]
    assert isinstance(signal, InputNoveltySignal)
    assert signal.layers == {"0.weight", "0.bias"}
    assert set(signal.novelty.dims()) == {"0.weight"}  # its bias is the matrix's column
    assert not model[0]._forward_pre_hooks  # the probe is gone after the first step


def test_named_parameters_alone_cannot_show_the_layers() -> None:
    warned: list[str] = []
    core = MetaGrad(
        boundaries=AutoBoundaries(signal="novelty+direction+inputs"),
        runtime=Runtime(warn=warned.append),
    )
    core.bind(nn.Linear(4, 2).named_parameters())
    assert any("nn.Module" in w for w in warned)


def test_the_inputs_argument_is_checked() -> None:
    with pytest.raises(ValueError, match="`inputs` must be a SubspaceNovelty"):
        AutoBoundaries(signal="novelty+direction+inputs", inputs=0.5)  # type: ignore[arg-type]
