"""The GPM, A-GEM and ER baselines through tiny real Trainers on CPU."""

from __future__ import annotations

import doctest
import itertools
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import (
    GRADIENT_BASELINES,
    GradSpy,
    ManualModule,
    TinyClassifier,
    assert_same_state,
    loader,
    make_trainer,
)
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_metagrad import replay_memory as replay_memory_mod
from lightning_metagrad.baselines import (
    AGEMCallback,
    EpisodicMemory,
    ERCallback,
    GPMCallback,
    SGPCallback,
)
from lightning_metagrad.baselines import agem as agem_mod
from lightning_metagrad.baselines import er as er_mod
from lightning_metagrad.baselines import gpm as gpm_mod
from lightning_metagrad.baselines import memory as memory_mod

ALL = list(GRADIENT_BASELINES)


def make(cls: type) -> Any:
    if cls in (GPMCallback, SGPCallback):
        return cls(threshold=0.8, samples=64)
    return cls(memory_batches=2)


class Classifier(pl.LightningModule):
    """``body`` (any layers on the flattened or image input) and plain SGD; logs its loss."""

    def __init__(self, body: nn.Module, lr: float = 0.1, nan_at_step: int | None = None):
        super().__init__()
        self.body = body
        self.lr = lr
        self.nan_at_step = nan_at_step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        if self.nan_at_step is not None and self.trainer.global_step == self.nan_at_step:
            loss = loss * float("nan")
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def conv_net() -> nn.Module:
    """Conv2d (padding, stride, bias) -> ReLU -> Linear head, on 2 x 6 x 6 images."""
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(36, 3)
    )


def image_loader(task: int, n: int = 64, batch_size: int = 16, shape: tuple = (2, 6, 6)) -> Any:
    g = torch.Generator().manual_seed(50 + task)
    x = torch.randn(n, *shape, generator=g)
    w = torch.randn(x[0].numel(), 3, generator=g)
    return DataLoader(TensorDataset(x, (x.flatten(1) @ w).argmax(1)), batch_size=batch_size)


def protected_matrix(step: dict[str, torch.Tensor], layer: str) -> torch.Tensor:
    """``[dW (out x fan_in), db]`` of ``layer`` from a GradSpy step."""
    dw = step[f"{layer}.weight"]
    return torch.cat([dw.reshape(dw.shape[0], -1), step[f"{layer}.bias"][:, None]], 1)


# ---------------------------------------------------------------------------- GPM


def test_gpm_projected_gradient_is_orthogonal_to_the_stored_bases() -> None:
    model, gpm = Classifier(conv_net()), GPMCallback(threshold=0.9, samples=32)
    make_trainer([gpm], max_steps=6).fit(model, image_loader(0))
    assert set(gpm.bases) == {"body.0", "body.3"}  # the conv and the head
    bases = {n: b.clone() for n, b in gpm.bases.items()}  # task 2 adds to them at its end
    before, after = GradSpy(), GradSpy()
    make_trainer([before, gpm, after], max_steps=4).fit(model, image_loader(1))
    assert len(after.steps) == 4
    for raw, projected in zip(before.steps, after.steps):
        for layer, basis in bases.items():
            g, g_raw = protected_matrix(projected, layer), protected_matrix(raw, layer)
            assert 0 < basis.shape[1] < basis.shape[0]
            assert float((g_raw @ basis).norm()) > 1e-3  # there was something to remove
            torch.testing.assert_close(g @ basis, torch.zeros_like(g @ basis), atol=1e-6, rtol=0)
            torch.testing.assert_close(g, g_raw - g_raw @ basis @ basis.T)


def test_gpm_bases_grow_with_tasks_and_stay_orthonormal() -> None:
    model, gpm = Classifier(conv_net()), GPMCallback(threshold=0.9, samples=32)
    history = []
    for task in range(3):
        make_trainer([gpm], max_steps=4).fit(model, image_loader(task))
        history.append({n: b.clone() for n, b in gpm.bases.items()})
    assert gpm.num_tasks == 3
    for layer in history[0]:
        ranks = [h[layer].shape[1] for h in history]
        assert ranks == sorted(ranks) and ranks[-1] > ranks[0]
        for old, new in itertools.pairwise(history):
            m, m_new = old[layer], new[layer]
            eye = torch.eye(m_new.shape[1])
            torch.testing.assert_close(m_new.T @ m_new, eye, atol=1e-5, rtol=0)
            # The old subspace is kept: M_new M_newᵀ M_old = M_old.
            torch.testing.assert_close(m_new @ (m_new.T @ m), m, atol=1e-5, rtol=0)


def _gpm_reference(r: torch.Tensor, old: torch.Tensor | None, threshold: float) -> torch.Tensor:
    """The official GPM update (main_pmnist.py's update_GPM) with SVDs of R (features x n)."""
    r = r.double()
    if old is None:
        u, s, _ = torch.linalg.svd(r, full_matrices=False)
        ratio = s**2 / (s**2).sum()
        k = int((torch.cumsum(ratio, 0) < threshold).sum()) + 1  # paper: ‖R_k‖² ≥ ε‖R‖²
        return u[:, :k]
    total = float((torch.linalg.svdvals(r) ** 2).sum())
    old = old.double()
    hat = r - old @ (old.T @ r)
    u, s, _ = torch.linalg.svd(hat, full_matrices=False)
    accumulated, ratio, count = (total - float((s**2).sum())) / total, s**2 / total, 0
    for value in ratio:
        if accumulated >= threshold:
            break
        accumulated += float(value)
        count += 1
    return torch.cat([old, u[:, :count]], 1)


def test_gpm_threshold_rule_is_gpms_on_the_first_and_later_tasks() -> None:
    layer = nn.Linear(6, 3)
    model = Classifier(nn.Sequential(layer))
    trainer = make_trainer([], max_steps=1)
    gpm = GPMCallback(threshold=0.8, samples=20)
    expected = None
    for task in range(3):
        g = torch.Generator().manual_seed(task)
        mix = torch.randn(6, 6, generator=g) * torch.tensor([4.0, 2, 1, 0.5, 0.2, 0.1])
        x = torch.randn(30, 6, generator=g) @ mix  # anisotropic: a few strong directions
        data = DataLoader(TensorDataset(x, torch.zeros(30, dtype=torch.long)), batch_size=8)
        gpm.consolidate(trainer, model, dataloader=data)
        r = torch.cat([x[:20], torch.ones(20, 1)], 1).T  # first 20 examples, bias column
        expected = _gpm_reference(r, expected, 0.8)
        basis = gpm.bases["body.0"]
        assert basis.shape == expected.shape, task
        torch.testing.assert_close(
            basis @ basis.T, (expected @ expected.T).float(), atol=1e-4, rtol=0
        )
    assert 1 <= gpm.bases["body.0"].shape[1] < 7


@pytest.mark.parametrize(
    ("first", "shape", "samples"),
    [
        (nn.Linear(6, 4), (6,), 2),
        (nn.Conv1d(3, 4, 3, padding=2, dilation=2, stride=2), (3, 6), 2),
        (nn.Conv2d(2, 4, 3, padding=1, stride=2), (2, 4, 4), 2),
        (nn.Conv2d(2, 4, 3, padding="same", padding_mode="reflect"), (2, 4, 4), 1),
    ],
    ids=["linear", "conv1d-dilated", "conv2d-strided", "conv2d-same-reflect"],
)
def test_gpm_at_threshold_one_keeps_old_layer_outputs(
    first: nn.Module, shape: tuple, samples: int
) -> None:
    # The first layer's input representation is exact data: with ε = 1 every direction of
    # the collected samples is protected, so that layer's outputs on them cannot change,
    # provided the patches are built like the layer itself computes (padding, stride...).
    with torch.no_grad():
        width = first(torch.zeros(1, *shape)).numel()
    model = Classifier(nn.Sequential(first, nn.ReLU(), nn.Flatten(), nn.Linear(width, 3)))
    gpm = GPMCallback(threshold=1.0, samples=samples)
    task1 = image_loader(0, n=16, batch_size=8, shape=shape)
    make_trainer([gpm], max_steps=2).fit(model, task1)
    old_x = next(iter(task1))[0][:samples]
    with torch.no_grad():
        out_before, w_before = first(old_x), first.weight.clone()
    make_trainer([gpm], max_steps=6).fit(model, image_loader(1, n=16, batch_size=8, shape=shape))
    with torch.no_grad():
        torch.testing.assert_close(first(old_x), out_before, atol=1e-4, rtol=0)
        assert float((first.weight - w_before).abs().max()) > 1e-3  # it did learn task 2


def test_gpm_leaves_norm_layers_and_one_d_parameters_free() -> None:
    body = nn.Sequential(
        nn.Linear(10, 16), nn.LayerNorm(16), nn.ReLU(), nn.BatchNorm1d(16), nn.Linear(16, 3)
    )
    model, gpm = Classifier(body), GPMCallback(threshold=0.8, samples=32)
    make_trainer([gpm], max_steps=4).fit(model, loader(0))
    assert set(gpm.bases) == {"body.0", "body.4"}
    before, after = GradSpy(), GradSpy()
    make_trainer([before, gpm, after], max_steps=3).fit(model, loader(1))
    for raw, projected in zip(before.steps, after.steps):
        for name in ("body.1.weight", "body.1.bias", "body.3.weight", "body.3.bias"):
            assert torch.equal(raw[name], projected[name])
        assert not torch.equal(raw["body.0.weight"], projected["body.0.weight"])


def test_gpm_threshold_dict_protects_only_the_named_layers() -> None:
    model = Classifier(nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3)))
    gpm = GPMCallback(threshold={"body.2": 0.9}, samples=32)
    make_trainer([gpm], max_steps=3).fit(model, loader(0))
    assert set(gpm.bases) == {"body.2"}
    typo = GPMCallback(threshold={"body.9": 0.9})
    with pytest.raises(MisconfigurationException, match=r"not in the model \(\['body.9'\]\)"):
        make_trainer([typo], max_steps=1).fit(model, loader(0))


def test_gpm_warns_when_a_basis_reaches_full_rank() -> None:
    model = Classifier(nn.Sequential(nn.Linear(10, 3)))
    with pytest.warns(UserWarning, match="spans all its 11 input features"):
        make_trainer([GPMCallback(threshold=1.0, samples=64)], max_steps=2).fit(model, loader(0))


# ---------------------------------------------------------------------------- A-GEM and ER


class Regression(pl.LightningModule):
    """``f(x) = W x`` with MSE loss and plain SGD."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 3, bias=False)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return (self.layer(x) - y).square().mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def one_batch(sign: float) -> DataLoader:
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(8, 4, generator=g), 10 * torch.randn(8, 3, generator=g)
    return DataLoader(TensorDataset(x, sign * y), batch_size=8)


class ReplaySpy(Callback):
    """Before the callback: the raw gradient and g_ref recomputed by hand on the memory."""

    def __init__(self, cb: Any) -> None:
        self.cb = cb
        self.raw: list[torch.Tensor] = []
        self.ref: list[torch.Tensor] = []

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self.raw.append(pl_module.layer.weight.grad.clone())
        ((x, y),) = self.cb.memory.tasks[0]  # the one stored batch
        loss = (pl_module.layer(x) - y).square().mean()
        self.ref.append(torch.autograd.grad(loss, pl_module.layer.weight)[0])


def replay_run(cb: Any, sign: float) -> tuple[ReplaySpy, GradSpy]:
    model = Regression()
    make_trainer([cb], max_steps=1).fit(model, one_batch(1.0))
    spy, after = ReplaySpy(cb), GradSpy(only=["layer.weight"])
    make_trainer([spy, cb, after], max_steps=3).fit(model, one_batch(sign))
    return spy, after


@pytest.mark.parametrize("conflicting", [True, False], ids=["conflicting", "aligned"])
def test_agem_projects_only_when_the_gradients_conflict(conflicting: bool) -> None:
    agem = AGEMCallback(memory_batches=1)
    spy, after = replay_run(agem, -1.0 if conflicting else 1.0)
    for g, ref, out in zip(spy.raw, spy.ref, after.of("layer.weight")):
        dot = float((g * ref).sum())
        assert (dot < 0) == conflicting
        if conflicting:
            torch.testing.assert_close(out, g - dot / float(ref.square().sum()) * ref)
            assert abs(float((out * ref).sum())) < 1e-4 * float(g.norm() * ref.norm())
        else:
            assert torch.equal(out, g)
    assert agem.num_projections == (3 if conflicting else 0)


def test_er_averages_the_current_and_the_replayed_gradient() -> None:
    er = ERCallback(memory_batches=1)
    spy, after = replay_run(er, -1.0)
    assert len(after.of("layer.weight")) == 3
    for g, ref, out in zip(spy.raw, spy.ref, after.of("layer.weight")):
        torch.testing.assert_close(out, (g + ref) / 2)


def test_memory_stays_constant_and_is_shared_evenly_as_tasks_grow() -> None:
    memory = EpisodicMemory(capacity=4, seed=0)
    for task in range(7):
        for i in range(6):
            memory.observe([torch.tensor([task, i])])
        memory.end_task()
        sizes = [len(b) for b in memory.tasks]
        assert memory.num_batches == 4 and max(sizes) - min(sizes) <= 1
        assert all(
            int(b[0][0]) == t for batches, t in zip(memory.tasks, memory.task_ids) for b in batches
        )
    assert len(set(memory.task_ids)) == 4 and memory.tasks_ended == 7
    # Through a Trainer: the memory of A-GEM stays at `memory_batches` whatever the tasks.
    agem, model = AGEMCallback(memory_batches=3), TinyClassifier()
    for task in range(4):
        make_trainer([agem], max_steps=8).fit(model, loader(task))
        assert agem.memory.num_batches == 3 and len(agem.memory.tasks) == min(task + 1, 3)


# ---------------------------------------------------------------------------- all three


@pytest.mark.parametrize("cls", ALL)
def test_resume_mid_task_from_a_checkpoint_matches_the_uninterrupted_run(
    cls: type, tmp_path: Path
) -> None:
    # Task 2's loader has 3 batches, so the step-3 checkpoint sits at an epoch end (a plain
    # DataLoader cannot resume mid-epoch); task 2 runs 9 steps.
    def start(seed: int = 0) -> tuple[TinyClassifier, Any]:
        pl.seed_everything(seed, verbose=False)
        return TinyClassifier(), make(cls)

    ref_model, ref_cb = start()
    make_trainer([ref_cb], max_steps=8).fit(ref_model, loader(0))
    make_trainer([ref_cb], max_steps=9).fit(ref_model, loader(1, n=48))

    model, cb = start()
    make_trainer([cb], max_steps=8).fit(model, loader(0))
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1)
    make_trainer([cb, ckpt], max_steps=5, enable_checkpointing=True).fit(model, loader(1, n=48))
    new_model, new_cb = start(seed=123)  # "a new process"
    make_trainer([new_cb], max_steps=9).fit(
        new_model, loader(1, n=48), ckpt_path=tmp_path / "epoch=0-step=3.ckpt"
    )
    assert new_cb.num_tasks == 2
    for a, b in zip(new_model.parameters(), ref_model.parameters()):
        assert torch.equal(a, b)
    assert_same_state(new_cb.state_dict(), ref_cb.state_dict())


@pytest.mark.parametrize("cls", ALL)
def test_non_finite_gradients_pass_untouched_and_non_finite_weights_are_refused(cls: type) -> None:
    model, cb = Classifier(conv_net()), make(cls)
    make_trainer([cb], max_steps=4).fit(model, image_loader(0))
    model.nan_at_step = 2  # global step 2 of task 2's Trainer
    before, after = GradSpy(), GradSpy()
    with pytest.warns(UserWarning, match="task 1: the model's parameters are non-finite"):
        make_trainer([before, cb, after], max_steps=4).fit(model, image_loader(1))
    with pytest.raises(RuntimeError, match="task 1: the model's parameters are non-finite"):
        make_trainer([cb], max_steps=4).fit(model, image_loader(2))
    assert len(after.steps) == 4
    for raw, out in zip(before.steps[2:], after.steps[2:]):
        for name, g in raw.items():
            assert not bool(torch.isfinite(g).all())
            torch.testing.assert_close(out[name], g, equal_nan=True, rtol=0, atol=0)
    assert cb.num_tasks == 1


@pytest.mark.parametrize("cls", ALL)
def test_manual_optimization_is_refused(cls: type) -> None:
    with pytest.raises(MisconfigurationException, match="manual optimization"):
        make_trainer([make(cls)], max_steps=2).fit(ManualModule(), loader(0))


@pytest.mark.parametrize("module", [gpm_mod, agem_mod, er_mod, memory_mod, replay_memory_mod])
def test_docstring_examples_run(module: Any) -> None:
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
