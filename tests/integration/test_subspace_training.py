"""The default predictor, ``SubspacePredictor``, through real Trainers: the update the optimizer
applies has no component in the protected subspaces, whatever the model and the optimizer.
Without a Trainer: ``tests/unit/test_subspace.py``."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import (
    LR,
    AppliedUpdates,
    TinyClassifier,
    UnusedBranch,
    assert_orthogonal,
    bias_of,
    loader,
    make_trainer,
    subspace_bases,
    train_then_watch,
)
from lightning.pytorch.demos import Transformer
from torch import Tensor, nn

from lightning_metagrad import MetaGradCallback, SubspacePredictor


def _assert_updates_orthogonal_to_bases(
    cb: MetaGradCallback, spy: AppliedUpdates, atol: float = 1e-5
) -> int:
    """Every weight matrix's applied update [dW, db] has no component in its basis."""
    pred = cb.predictor
    assert isinstance(pred, SubspacePredictor)
    bases = subspace_bases(pred)
    assert bases, "no protected subspace"
    checked = 0
    for step in spy.steps:
        for name, m in bases.items():
            assert_orthogonal(spy.matrix(step, name, bias_of(name), m.shape[0]), m, name, atol)
            checked += 1
    return checked


def test_default_callback_is_the_subspace_predictor_and_projects_sgd_updates() -> None:
    cb, model = MetaGradCallback(), TinyClassifier(lr=LR)
    assert isinstance(cb.predictor, SubspacePredictor)
    make_trainer([cb], max_steps=8).fit(model, loader(0))
    spy = AppliedUpdates()
    trainer = make_trainer([spy, cb], max_steps=6, log_every_n_steps=1)
    trainer.fit(model, loader(1))
    assert _assert_updates_orthogonal_to_bases(cb, spy) == 6 * 2
    # Something was removed, and the figures reached the logger.
    assert 0 < float(trainer.callback_metrics["metagrad/removed_energy"]) <= 1
    assert float(trainer.callback_metrics["metagrad/subspace_dim/net.0.weight"]) >= 1


@pytest.mark.parametrize("optimizer", ["adam", "momentum"])
def test_update_vector_mode_projects_the_optimizers_update(optimizer: str) -> None:
    cb = MetaGradCallback(predictor=SubspacePredictor(every=1))
    spy = train_then_watch(cb, TinyClassifier(optimizer=optimizer, lr=0.01), loader(0), loader(1))
    assert _assert_updates_orthogonal_to_bases(cb, spy) == 12


@pytest.mark.parametrize(
    ("optimizer", "setting", "normalizes"),
    [
        ("sgd", "auto", True),  # the gradient itself
        ("momentum", "auto", True),  # SGD's update vector
        ("adam", "auto", False),  # an adaptive optimizer's update vector: raw
        ("adam", True, True),  # an explicit choice wins
        ("sgd", False, False),
    ],
)
def test_step_weighting_follows_what_the_predictor_learns_from(
    optimizer: str, setting: Any, normalizes: bool
) -> None:
    cb = MetaGradCallback(predictor=SubspacePredictor(normalize_steps=setting))
    make_trainer([cb], max_steps=4).fit(TinyClassifier(optimizer=optimizer, lr=0.01), loader(0))
    assert cb.predictor.normalizes_steps is normalizes


class ConvAttentionModel(pl.LightningModule):
    """Conv2d + BatchNorm + Embedding + nn.MultiheadAttention + LayerNorm + a tied head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.norm = nn.BatchNorm2d(4)
        self.embed = nn.Embedding(5, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.ln = nn.LayerNorm(8)
        self.fc = nn.Linear(4 * 4 * 4, 8)
        self.out = nn.Linear(8, 5, bias=False)
        self.out.weight = self.embed.weight  # tied weights: one parameter, two uses

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        img, tokens, y = batch
        h = self.fc(torch.relu(self.norm(self.conv(img))).flatten(1))[:, None]
        seq = torch.cat([h, self.embed(tokens)], dim=1)
        seq = self.ln(seq + self.attn(seq, seq, seq, need_weights=False)[0])
        return nn.functional.cross_entropy(self.out(seq[:, 0]), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _conv_attention_loader(task: int) -> Any:
    g = torch.Generator().manual_seed(task)
    img = torch.randn(64, 1, 6, 6, generator=g) + task
    tokens = torch.randint(5, (64, 3), generator=g)
    y = (tokens[:, 0] + task) % 5
    return torch.utils.data.DataLoader(list(zip(img, tokens, y)), batch_size=16)


def test_conv_embedding_attention_norms_and_tied_weights_are_handled() -> None:
    cb = MetaGradCallback(predictor=SubspacePredictor(every=1))
    data = [_conv_attention_loader(task) for task in range(2)]
    spy = train_then_watch(cb, ConvAttentionModel(), *data)
    pred = cb.predictor
    assert isinstance(pred, SubspacePredictor)
    dims = pred.subspace_dims()
    # Conv as out x in*kh*kw (+ bias), the packed attention projection and its bias, the
    # embedding (tied to the head: one parameter), linear layers; norms are not matrices.
    assert set(dims) == {
        "conv.weight",
        "embed.weight",
        "attn.in_proj_weight",
        "attn.out_proj.weight",
        "fc.weight",
    }
    assert subspace_bases(pred)["conv.weight"].shape[0] == 1 * 3 * 3 + 1
    assert subspace_bases(pred)["attn.in_proj_weight"].shape[0] == 8 + 1
    assert _assert_updates_orthogonal_to_bases(cb, spy) == 6 * len(dims)
    for step in spy.steps:  # 1-D norm parameters are left free: plain SGD on them
        for name in ("norm.weight", "norm.bias", "ln.weight", "ln.bias"):
            before, after, grad = step[name]
            assert grad is not None
            torch.testing.assert_close(after, before - 0.05 * grad, rtol=0, atol=1e-6)


@pytest.mark.parametrize("predictor", ["subspace", "anchored", "paper", "replay"])
def test_a_parameter_without_a_gradient_on_some_steps_is_handled(
    predictor: str,
) -> None:
    cb = MetaGradCallback(predictor=predictor)
    spy = train_then_watch(cb, UnusedBranch(), loader(0), loader(1))
    assert cb.num_old_tasks == 1
    for i, step in enumerate(spy.steps):
        before, after, grad = step["branch.weight"]
        assert (grad is None) == (i % 2 == 0)
        if grad is None:  # untouched by the step and by the rule
            assert torch.equal(before, after)
        assert all(bool(torch.isfinite(a).all()) for _, a, _ in step.values())


def test_bf16_mixed_and_accumulation_project_the_full_unscaled_gradient() -> None:
    cb, model = (
        MetaGradCallback(predictor=SubspacePredictor(every=1)),
        TinyClassifier(lr=LR),
    )
    mixed = {"precision": "bf16-mixed", "accumulate_grad_batches": 2}
    spy = train_then_watch(cb, model, loader(0), loader(1), steps=(4, 3), **mixed)
    assert len(spy.steps) == 3  # optimizer steps, each over two batches
    _assert_updates_orthogonal_to_bases(cb, spy, atol=1e-4)


def test_the_demo_transformer_trains_with_the_default() -> None:
    class LM(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = Transformer(vocab_size=20, ninp=16, nhead=2, nhid=16, nlayers=1)

        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            x, y = batch
            out = self.model(x, y)
            return nn.functional.nll_loss(out, y.view(-1))

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def data(task: int) -> Any:
        g = torch.Generator().manual_seed(task)
        x = torch.randint(20, (32, 6), generator=g)
        return torch.utils.data.DataLoader(list(zip(x, (x + task) % 20)), batch_size=8)

    cb = MetaGradCallback(predictor=SubspacePredictor(every=1))
    spy = train_then_watch(cb, LM(), data(0), data(1), steps=(4, 4))
    pred = cb.predictor
    assert isinstance(pred, SubspacePredictor)
    names = set(pred.subspace_dims())
    assert any("self_attn.in_proj_weight" in n for n in names)
    assert any("embedding" in n for n in names)
    _assert_updates_orthogonal_to_bases(cb, spy, atol=1e-4)
