"""An embedding's gradient is row-sparse: in gradient mode the default predictor samples its
statistic among the rows a step looked up, and (on CPU) projects only those rows, giving the
same gradient as projecting the whole matrix, also when the weight is used elsewhere too (tied
to the output layer)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from lightning_metagrad import MetaGrad, SubspacePredictor


class TinyLM(nn.Module):
    def __init__(self, tied: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 6)
        self.out = nn.Linear(6, 50, bias=False)
        if tied:
            self.out.weight = self.embed.weight

    def forward(self, ids: Tensor) -> Tensor:
        return self.out(torch.tanh(self.embed(ids)))


def _loss(model: nn.Module, ids: Tensor) -> Tensor:
    return nn.functional.cross_entropy(model(ids).reshape(-1, 50), ids.roll(1).reshape(-1))


def _after_one_task(tied: bool) -> tuple[nn.Module, MetaGrad, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = TinyLM(tied)
    core = MetaGrad(predictor=SubspacePredictor(every=1, threshold=0.9))
    core.bind(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    core.use_optimizer(opt)
    for _ in range(6):
        opt.zero_grad()
        _loss(model, torch.randint(0, 25, (4, 5))).backward()  # task 1: tokens 0..24
        core.before_optimizer_step()
        opt.step()
    core.start_task()
    assert isinstance(core.predictor, SubspacePredictor)
    assert core.predictor.subspace_dims()["embed.weight"] > 0
    return model, core, opt


def _dense_projection(grad: Tensor, basis: Tensor) -> Tensor:
    return grad - grad @ basis @ basis.T


@pytest.mark.parametrize("tied", [False, True])
def test_embedding_gradient_equals_the_whole_matrix_projection(tied: bool) -> None:
    model, core, opt = _after_one_task(tied)
    predictor = core.predictor
    assert isinstance(predictor, SubspacePredictor)
    opt.zero_grad()
    ids = torch.tensor([[1, 3, 3, 7, 40]])  # a handful of the 50 rows
    _loss(model, ids).backward()
    grad = model.embed.weight.grad.clone()
    core.before_optimizer_step()
    name = "embed.weight"
    expected = _dense_projection(grad, predictor.basis(name))
    torch.testing.assert_close(model.embed.weight.grad, expected, atol=1e-6, rtol=0)
    if not tied:  # rows the step did not look up keep their zero gradient
        untouched = torch.ones(50, dtype=torch.bool)
        untouched[ids.unique()] = False
        assert model.embed.weight.grad[untouched].abs().max() == 0


def test_only_the_looked_up_rows_are_projected_when_the_rest_is_zero() -> None:
    model, core, opt = _after_one_task(tied=False)
    predictor = core.predictor
    assert isinstance(predictor, SubspacePredictor)
    opt.zero_grad()
    _loss(model, torch.tensor([[2, 9, 9]])).backward()
    group = next(g for g in core.groups if g.weight == "embed.weight")
    used = predictor._looked_up_rows(group, model.embed.weight.grad)
    assert used is not None and used.tolist() == [2, 9]


def test_a_weight_tied_elsewhere_falls_back_to_the_whole_matrix() -> None:
    model, core, opt = _after_one_task(tied=True)
    predictor = core.predictor
    assert isinstance(predictor, SubspacePredictor)
    opt.zero_grad()
    _loss(model, torch.tensor([[2, 9, 9]])).backward()
    group = next(g for g in core.groups if g.weight == "embed.weight")
    assert predictor._looked_up_rows(group, model.embed.weight.grad) is None


class BagOfIds(nn.Module):
    """A 2,000-row embedding, mean-pooled, and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(2000, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(self.embed(ids).mean(1))


def test_an_embeddings_subspace_is_learned_from_the_rows_the_task_looked_up() -> None:
    # Uniform row sampling would draw 32 of 2,000 rows, almost all with a zero gradient; the
    # statistic samples among the looked-up ones, so the task's gradient is in the subspace.
    torch.manual_seed(0)
    model, core = BagOfIds(), MetaGrad(predictor=SubspacePredictor())
    core.bind(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    core.use_optimizer(opt)

    def batch() -> tuple[Tensor, Tensor]:
        ids = torch.randint(0, 40, (8, 6))  # the task uses 40 of the 2,000 rows
        return ids, ids[:, 0] % 4

    for _ in range(12):
        opt.zero_grad()
        ids, y = batch()
        nn.functional.cross_entropy(model(ids), y).backward()
        core.before_optimizer_step()
        opt.step()
    core.start_task()
    opt.zero_grad()
    ids, y = batch()
    nn.functional.cross_entropy(model(ids), y).backward()
    grad = model.embed.weight.grad
    basis = core.predictor.basis("embed.weight")  # type: ignore[attr-defined]
    inside = (grad @ basis).pow(2).sum() / grad.pow(2).sum()
    assert inside > 0.9  # uniform row sampling: 0.46
