"""The default predictor's statistic options (issue 23, part 2), without a Trainer: the Frequent
Directions sketch against the exact second moment, the memory bound of the sketch on wide, thin
and embedding layers, and the layer-input forward hooks (silent outside training, removed on
re-bind, no graph kept)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from lightning_metagrad import MetaGrad, Runtime, SubspacePredictor
from lightning_metagrad.matrices import matrix_groups
from lightning_metagrad.meters import PeakTensorMemory
from lightning_metagrad.predictors.basis import complement_of, grow_basis, symmetric_eigh
from lightning_metagrad.predictors.sketch import FrequentDirections, new_directions

# ------------------------------------------------------------------ the sketch


@pytest.mark.parametrize("ell", [4, 16])
def test_the_sketch_is_within_the_frequent_directions_bound(ell: int) -> None:
    g = torch.Generator().manual_seed(0)
    low = torch.randn(300, 6, generator=g) @ torch.randn(6, 50, generator=g)
    a = low + 0.1 * torch.randn(300, 50, generator=g)
    fd = FrequentDirections(cols=50, ell=ell)
    for chunk in a.split(7):  # streamed in uneven chunks
        fd.add(chunk)
    exact = a.T @ a
    error = exact - fd.gram()
    # 0 <= AᵀA − BᵀB (FD never overestimates) and ‖AᵀA − BᵀB‖₂ <= ‖A − A_k‖²_F / (ell − k).
    assert torch.linalg.eigvalsh(error).min() >= -1e-3 * exact.norm()
    spectral = torch.linalg.matrix_norm(error, ord=2)
    assert spectral <= a.pow(2).sum() / ell
    values = torch.linalg.svdvals(a).square()
    for k in range(ell):
        assert spectral <= values[k:].sum() / (ell - k) * 1.001 + 1e-3
    assert fd.filled <= 2 * ell
    assert float(fd.energy) == pytest.approx(float(a.pow(2).sum()), rel=1e-5)


def test_the_sketch_recovers_a_low_rank_stream_exactly() -> None:
    g = torch.Generator().manual_seed(1)
    a = torch.randn(200, 3, generator=g) @ torch.randn(3, 40, generator=g)
    fd = FrequentDirections(cols=40, ell=4)
    fd.add(a)
    assert torch.allclose(fd.gram(), a.T @ a, rtol=1e-3, atol=1e-3 * float((a.T @ a).norm()))


def test_gpm_rule_on_a_sketch_matches_the_exact_rule_when_the_sketch_holds_the_rank() -> None:
    g = torch.Generator().manual_seed(2)
    r = torch.randn(120, 5, generator=g) @ torch.randn(5, 30, generator=g)
    exact = grow_basis(None, r.T @ r, 0.97)
    fd = FrequentDirections(cols=30, ell=8)
    fd.add(r)
    energy = float(r.pow(2).sum())
    block, capped = new_directions([], fd.rows(), energy, float(fd.energy), 0.97, limit=30)
    assert exact is not None and block is not None and not capped
    assert block.shape == exact.shape
    assert torch.allclose(block @ block.T, exact @ exact.T, atol=1e-4)
    # A second task: only directions outside the first block, orthogonal to it.
    r2 = torch.randn(60, 30, generator=g)
    residual = r2 - (r2 @ block) @ block.T
    fd2 = FrequentDirections(cols=30, ell=8)
    fd2.add(residual)
    total = float(r2.pow(2).sum())
    more, capped = new_directions([block], fd2.rows(), total, float(fd2.energy), 0.5, limit=9)
    assert more is not None and capped and more.shape[1] == 9 - block.shape[1]
    assert torch.allclose(block.T @ more, torch.zeros(block.shape[1], more.shape[1]), atol=1e-5)


# ------------------------------------------------------------------ the memory bound


def _mlp_8192() -> tuple[nn.Module, Callable[[], Any]]:
    model = nn.Sequential(nn.Linear(8192, 64), nn.ReLU(), nn.Linear(64, 10))
    return model, lambda: (torch.randn(16, 8192), torch.randint(10, (16,)))


def _thin() -> tuple[nn.Module, Callable[[], Any]]:
    return nn.Linear(4096, 16), lambda: (torch.randn(16, 4096), torch.randint(16, (16,)))


class _Bag(nn.Module):
    """A vocabulary-sized embedding (row-sparse gradients) under a small classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5000, 32)
        self.head = nn.Linear(32, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.embed(x).mean(1))


def _bag() -> tuple[nn.Module, Callable[[], Any]]:
    return _Bag(), lambda: (torch.randint(5000, (8, 12)), torch.randint(4, (8,)))


def _transformer() -> tuple[nn.Module, Callable[[], Any]]:
    from lightning.pytorch.demos import Transformer

    model = Transformer(vocab_size=300, ninp=32, nhead=2, nhid=32, nlayers=1, dropout=0.0)

    def batch() -> Any:
        x = torch.randint(300, (4, 8))
        return (x, x), torch.randint(300, (32,))

    return model, batch


def peak_floats_per_parameter(
    make: Callable[[], tuple[nn.Module, Callable[[], Any]]], pred: SubspacePredictor, steps: int
) -> float:
    """Two tasks through the engine; per predictor call, floats held before + peak allocated
    during it (every entry point, the forward hooks included), over the parameters."""
    model, batch = make()
    peak = 0.0

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            nonlocal peak
            held = pred.memory_floats()
            with PeakTensorMemory() as mem:
                out = fn(*args, **kwargs)
            peak = max(peak, held + mem.peak / 4, pred.memory_floats())
            return out

        return call

    for name in ("_read_inputs", "observe", "rewrite_", "end_task"):
        setattr(pred, name, wrap(getattr(pred, name)))
    core = MetaGrad(pred)
    core.bind(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    core.use_optimizer(opt)
    for task in range(3):
        if task:
            core.start_task()
        for _ in range(steps):
            inputs, target = batch()
            opt.zero_grad()
            out = model(*inputs) if isinstance(inputs, tuple) else model(inputs)
            nn.functional.cross_entropy(out, target).backward()
            core.before_optimizer_step()
            opt.step()
    assert pred.num_old_tasks == 2 and any(pred.subspace_dims().values())
    return peak / sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "make", [_mlp_8192, _thin, _bag, _transformer], ids=["8192-wide", "4096x16", "bag", "tf"]
)
@pytest.mark.parametrize("statistic", ["gradient", "both"])
def test_the_sketch_holds_at_most_one_float_per_parameter(
    make: Callable[[], tuple[nn.Module, Callable[[], Any]]], statistic: str
) -> None:
    torch.manual_seed(0)
    pred = SubspacePredictor(every=1, statistic=statistic, sketch=32)  # type: ignore[arg-type]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the thin layer's sketch is lowered to fit: warned
        assert peak_floats_per_parameter(make, pred, steps=5) <= 1.0


def _thin_small() -> tuple[nn.Module, Callable[[], Any]]:
    # Thin like Linear(4096, 16) (fan-in x fan-in >> parameters), but its dense boundary
    # takes a second rather than minutes.
    return nn.Linear(1024, 4), lambda: (torch.randn(16, 1024), torch.randint(4, (16,)))


def test_the_dense_statistic_of_a_thin_layer_exceeds_the_budget_and_says_so() -> None:
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="memory_budget"):
        pred = SubspacePredictor(every=1, memory_budget=0.5, sketch=None)
        assert peak_floats_per_parameter(_thin_small, pred, steps=3) > 1.0


def _bind(pred: SubspacePredictor, model: nn.Module) -> SubspacePredictor:
    params = dict(model.named_parameters())
    pred.bind(params, matrix_groups(params), dict(model.named_modules()))
    return pred


def test_the_default_sketches_only_a_wide_fan_in() -> None:
    model = nn.Sequential(nn.Linear(4096, 16), nn.ReLU(), nn.Linear(16, 10))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the thin layer's 32 rows are lowered to fit: warned
        pred = _bind(SubspacePredictor(), model)
    assert pred._sketched == {"0.weight"}  # 4097² floats: 256 per parameter of that layer
    small = _bind(SubspacePredictor(), nn.Sequential(nn.Linear(784, 256), nn.Linear(256, 10)))
    assert small._sketched == set()  # 785² floats, 2.4 MiB: dense
    assert _bind(SubspacePredictor(sketch=None), model)._sketched == set()


@pytest.mark.parametrize("make", [_mlp_8192, _thin], ids=["8192-wide", "4096x16"])
def test_the_default_holds_at_most_one_float_per_parameter_on_a_wide_fan_in(
    make: Callable[[], tuple[nn.Module, Callable[[], Any]]],
) -> None:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert peak_floats_per_parameter(make, SubspacePredictor(every=1), steps=5) <= 1.0


def test_under_several_processes_the_default_sketches_a_wide_fan_in_from_its_gradients() -> None:
    model = nn.Sequential(nn.Linear(4096, 16), nn.ReLU(), nn.Linear(16, 10))
    pred = SubspacePredictor()
    pred.runtime = Runtime(warn=lambda message: None, mean_over_ranks=lambda t: t)
    _bind(pred, model)
    assert pred._sketched == {"0.weight"} and pred._hooked == {"2.weight"}


def test_without_a_sketch_a_large_dense_moment_warns_at_bind_naming_the_fix() -> None:
    warned: list[str] = []
    pred = SubspacePredictor(sketch=None)
    pred.runtime = Runtime(warn=warned.append)
    _bind(pred, nn.Linear(4096, 16))
    assert len(warned) == 1 and "256 per parameter" in warned[0] and "sketch=32" in warned[0]
    quiet: list[str] = []
    pred = SubspacePredictor(sketch=None)
    pred.runtime = Runtime(warn=quiet.append)
    _bind(pred, nn.Linear(784, 256))  # 3 floats per parameter, but 2.4 MiB: no warning
    assert quiet == []


def test_a_sketch_too_big_for_the_budget_is_lowered_with_a_warning() -> None:
    layer = nn.Linear(4096, 16)
    params = dict(layer.named_parameters())
    pred = SubspacePredictor(sketch=64)
    with pytest.warns(UserWarning, match="sketch=64 rows do not fit"):
        pred.bind(params, matrix_groups(params), dict(layer.named_modules()))
    ell, most = pred._plan(matrix_groups(params)[0])
    assert 1 <= ell < 64 and (most + 4 * ell) * 4097 <= 16 * 4097


def test_the_budget_stops_the_basis_and_warns() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(64, 8)
    params = dict(layer.named_parameters())
    names = list(params)
    pred = SubspacePredictor(every=1, sketch=8, threshold=0.999)
    pred.bind(params, matrix_groups(params), dict(layer.named_modules()))
    with pytest.warns(UserWarning, match="reached the memory budget"):
        for _ in range(8):  # tasks: each adds at most the sketch's rank
            for _ in range(4):
                layer.zero_grad()
                layer(torch.randn(32, 64)).pow(2).sum().backward()
                grads = [p.grad for p in params.values()]
                pred.observe(names, [p.detach() for p in params.values()], grads)  # type: ignore[arg-type]
            pred.end_task(names, [p.detach() for p in params.values()])
    assert pred.subspace_dims()["weight"] == pred._plan(matrix_groups(params)[0])[1] > 0


# ------------------------------------------------------------------ the layer-input hooks


def _bound(statistic: str = "inputs", **kwargs: Any) -> tuple[nn.Sequential, SubspacePredictor]:
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Conv1d(1, 2, 3), nn.Flatten())
    kwargs.setdefault("every", 1)
    pred = SubspacePredictor(statistic=statistic, **kwargs)  # type: ignore[arg-type]
    params = dict(model.named_parameters())
    pred.bind(params, matrix_groups(params), dict(model.named_modules()))
    return model, pred


def _forward(model: nn.Sequential, x: Tensor) -> Tensor:
    return model[3](model[2](model[1](model[0](x)).unsqueeze(1)))


def test_the_hooks_read_the_rows_the_matrices_multiply_in_training_steps_only() -> None:
    model, pred = _bound()
    x = torch.randn(4, 6)
    model.eval()
    _forward(model, x)
    model.train()
    with torch.no_grad():
        _forward(model, x)
    assert pred._pending == {}  # silent in eval mode and under no_grad
    out = _forward(model, x)
    rows = pred._pending["0.weight"]
    assert rows.shape == (4, 7) and torch.equal(rows[:, -1], torch.ones(4))
    assert {tuple(r.tolist()) for r in rows[:, :6]} == {tuple(r.tolist()) for r in x}
    conv = pred._pending["2.weight"]  # unfolded patches [x_i, x_i+1, x_i+2, 1]
    assert conv.shape[1] == 4 and not conv.requires_grad and conv.grad_fn is None
    out.sum().backward()
    names = list(dict(model.named_parameters()))
    params = list(model.parameters())
    pred.observe(names, [p.detach() for p in params], [p.grad for p in params])  # type: ignore[misc]
    assert pred._pending == {} and set(pred._cov) == {"0.weight", "2.weight"}


def test_the_hooks_are_silent_on_steps_that_are_not_observed() -> None:
    model, pred = _bound(every=2)
    names, params = list(dict(model.named_parameters())), list(model.parameters())
    for step in range(3):
        model.zero_grad()
        _forward(model, torch.randn(4, 6)).sum().backward()
        assert bool(pred._pending) == (step % 2 == 0)
        pred.observe(names, [p.detach() for p in params], [p.grad for p in params])  # type: ignore[misc]


def test_the_hooks_are_removed_on_rebind_and_with_the_gradient_statistic() -> None:
    model, pred = _bound()
    counts = [len(m._forward_hooks) for m in (model[0], model[2])]
    assert counts == [1, 1]
    params = dict(model.named_parameters())
    pred.bind(params, matrix_groups(params), dict(model.named_modules()))  # re-bind
    assert [len(m._forward_hooks) for m in (model[0], model[2])] == [1, 1]
    pred.remove_hooks()
    assert [len(m._forward_hooks) for m in (model[0], model[2])] == [0, 0]
    gradient_only = SubspacePredictor(statistic="gradient")
    gradient_only.bind(params, matrix_groups(params), dict(model.named_modules()))
    assert all(not m._forward_hooks for m in model.modules())


def test_the_hooks_keep_no_graph_alive() -> None:
    import gc
    import weakref

    model, pred = _bound()
    x = torch.randn(4, 6, requires_grad=True)
    out = _forward(model, x)
    refs = [weakref.ref(x), weakref.ref(out)]
    del out, x
    gc.collect()
    assert pred._pending and all(ref() is None for ref in refs)  # nothing holds the graph


def test_a_layer_without_readable_inputs_falls_back_to_its_gradient() -> None:
    model = _Bag()
    params = dict(model.named_parameters())
    pred = SubspacePredictor(every=1, statistic="inputs")
    pred.bind(params, matrix_groups(params), dict(model.named_modules()))
    assert pred._hooked == {"head.weight"}  # an Embedding's inputs are one-hot rows
    model(torch.randint(5000, (3, 4))).sum().backward()
    pred.observe(
        list(params), [p.detach() for p in params.values()], [p.grad for p in params.values()]
    )  # type: ignore[misc]
    assert set(pred._cov) == {"embed.weight", "head.weight"}


@pytest.mark.parametrize("sketch", [None, 8])
def test_the_input_statistic_protects_the_inputs_a_task_saw(sketch: int | None) -> None:
    """A layer trained on inputs in a 3-dim subspace: with the input statistic the next
    task's gradient has no component there (the gradient alone may miss the mean input)."""
    torch.manual_seed(0)
    layer = nn.Linear(12, 4, bias=False)
    params = dict(layer.named_parameters())
    pred = SubspacePredictor(
        every=1, statistic="inputs", sketch=sketch, threshold=0.999, memory_budget=None
    )
    pred.bind(params, matrix_groups(params), dict(layer.named_modules()))
    span = torch.linalg.qr(torch.randn(12, 3))[0]
    for _ in range(6):
        layer.zero_grad()
        layer(torch.randn(16, 3) @ span.T + 2.0 * span[:, 0]).pow(2).sum().backward()
        pred.observe(["weight"], [layer.weight.detach()], [layer.weight.grad])  # type: ignore[list-item]
    pred.end_task(["weight"], [layer.weight.detach()])
    basis = pred.basis("weight")
    assert basis.shape[1] == 3
    assert torch.allclose(basis @ basis.T, span @ span.T, atol=1e-3)
    g = torch.randn(4, 12)
    pred.rewrite_(["weight"], [layer.weight.detach()], [g])
    assert (g @ span).abs().max() < 1e-4


# ------------------------------------------------------------------ state


def test_a_sketch_state_round_trips_and_a_version_2_state_still_loads() -> None:
    model, pred = _bound(statistic="both", sketch=4)
    names, params = list(dict(model.named_parameters())), list(model.parameters())
    for task in range(2):
        for _ in range(3):
            model.zero_grad()
            _forward(model, torch.randn(4, 6)).sum().backward()
            pred.observe(names, [p.detach() for p in params], [p.grad for p in params])  # type: ignore[misc]
        if not task:
            pred.end_task(names, [p.detach() for p in params])
    state = pred.state_dict()
    assert state["version"] == 4 and state["blocks"] and state["sketch"]
    restored = SubspacePredictor(statistic="both", sketch=4)
    restored.load_state_dict(state)
    bound = dict(model.named_parameters())
    restored.bind(bound, matrix_groups(bound), dict(model.named_modules()))
    assert restored.subspace_dims() == pred.subspace_dims()
    pred.end_task(names, [p.detach() for p in params])
    restored.end_task(names, [p.detach() for p in params])
    for name in pred.subspace_dims():
        assert torch.allclose(restored.basis(name), pred.basis(name))
    old = {k: v for k, v in SubspacePredictor().state_dict().items()}
    for key in ("blocks", "sketch", "total"):
        old.pop(key)
    old["version"] = 2
    SubspacePredictor().load_state_dict(old)


def test_the_sign_rule_needs_the_dense_statistic() -> None:
    with pytest.raises(ValueError, match="sketch=None"):
        SubspacePredictor(in_basis="sign", sketch=8)
    with pytest.raises(ValueError, match="statistic"):
        SubspacePredictor(statistic="activations")  # type: ignore[arg-type]


def test_the_jittered_eigensolver_finds_the_same_directions_on_a_rank_deficient_moment() -> None:
    # The fallback for LAPACK's convergence failures (large clusters of zero eigenvalues).
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(5, 40, generator=gen, dtype=torch.float64)
    moment = rows.T @ rows  # rank 5 of 40: 35 equal (zero) eigenvalues
    total = float(moment.trace())
    plain_values, plain_vectors = torch.linalg.eigh(moment)
    values, vectors = symmetric_eigh(moment, total, jitter=True)
    torch.testing.assert_close(values, plain_values, atol=1e-9 * total, rtol=0)
    top, plain_top = vectors[:, -5:], plain_vectors[:, -5:]
    torch.testing.assert_close(top @ top.T, plain_top @ plain_top.T)


def test_the_complement_spans_what_the_basis_leaves_out() -> None:
    basis = torch.linalg.qr(torch.randn(30, 7, generator=torch.Generator().manual_seed(1)))[0]
    rest = complement_of(basis)
    assert rest.shape == (30, 23)
    eye = torch.eye(30)
    torch.testing.assert_close(basis @ basis.T + rest @ rest.T, eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(rest.T @ rest, torch.eye(23), atol=1e-5, rtol=0)


@pytest.mark.parametrize("value", ["Auto", 0, 2.5, True])
def test_a_sketch_that_is_neither_auto_none_nor_a_count_is_refused_naming_the_choices(
    value: object,
) -> None:
    with pytest.raises(ValueError, match="'auto', None or an int >= 1"):
        SubspacePredictor(sketch=value)  # type: ignore[arg-type]
