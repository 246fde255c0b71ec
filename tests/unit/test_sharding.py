"""Row-sharded parameters (FSDP2) as the engine sees them, without a Trainer: the layouts
:func:`shards_of` accepts or refuses (on a one-process gloo group, where DTensors exist but
nothing is split), the identity without sharding, and which predictors can run sharded. The
two-process runs against a single process are in ``tests/integration/test_fsdp2.py``."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

from lightning_metagrad import MetaGrad, MetaNetPredictor, Runtime, SubspacePredictor
from lightning_metagrad._module_utils import refuse_unsupported
from lightning_metagrad.sharding import RowShard, Shards, local, shards_of


@pytest.fixture(scope="module")
def one_process_group() -> Any:
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_without_sharding_every_operation_is_the_identity() -> None:
    shards, t = Shards(), torch.arange(6.0).reshape(3, 2)
    assert not shards.active and local(t) is t
    assert shards.sum_(t) is t and shards.all_true(True) is True
    index = torch.tensor([2, 0])
    assert torch.equal(shards.pick("w", index, t), t[index])
    assert shards.gather("w", t, None) is t


def test_plain_tensors_have_no_shards() -> None:
    assert not shards_of({"w": torch.zeros(3, 2)}).active


def test_row_shards_are_torch_chunk_slices(one_process_group: Any) -> None:
    mesh = init_device_mesh("cpu", (1,))
    w = distribute_tensor(torch.randn(7, 3), mesh, [Shard(0)])
    shards = shards_of({"w": w, "b": distribute_tensor(torch.randn(7), mesh, [Replicate()])})
    assert shards.rows == {"w": RowShard(offset=0, rows=7, total=7)}  # replicated: whole
    assert not shards.active  # one process: nothing is split
    assert torch.equal(local(w), w.to_local())


def test_a_shard_on_another_dim_is_refused_naming_the_parameter(one_process_group: Any) -> None:
    w = distribute_tensor(torch.randn(4, 6), init_device_mesh("cpu", (1,)), [Shard(1)])
    with pytest.raises(ValueError, match=r"'enc\.weight'.*Shard\(dim=1\).*tensor_parallel_size=1"):
        shards_of({"enc.weight": w})


def test_a_two_dimensional_mesh_is_refused(one_process_group: Any) -> None:
    mesh = init_device_mesh("cpu", (1, 1), mesh_dim_names=("dp", "tp"))
    w = distribute_tensor(torch.randn(4, 6), mesh, [Shard(0), Shard(0)])
    with pytest.raises(ValueError, match=r"2-D device mesh.*data_parallel_size=N"):
        shards_of({"w": w})


def test_the_default_predictor_runs_sharded_and_the_variants_that_cannot_say_why() -> None:
    assert SubspacePredictor().sharding_unsupported() is None
    assert SubspacePredictor(statistic="gradient", sketch=8).sharding_unsupported() is None
    assert SubspacePredictor(statistic="both").sharding_unsupported() is None
    inputs_sketch = SubspacePredictor(statistic="inputs", sketch=8).sharding_unsupported()
    assert "sketch=None" in str(inputs_sketch)
    assert "in_basis='project'" in str(SubspacePredictor(in_basis="sign").sharding_unsupported())
    assert MetaNetPredictor().sharding_unsupported() is not None


def test_the_inputs_sketch_over_several_processes_is_refused_at_bind() -> None:
    # Each process reads its own data's inputs; a sketch of them would differ per process.
    ddp = Runtime(mean_over_ranks=lambda t: t)
    core = MetaGrad(predictor=SubspacePredictor(statistic="inputs", sketch=8), runtime=ddp)
    with pytest.raises(ValueError, match=r"sketch=None.*statistic='gradient'"):
        core.bind(torch.nn.Linear(4, 3))


def _trainer(strategy: Any) -> Any:
    return SimpleNamespace(strategy=strategy)


def _module() -> Any:
    return SimpleNamespace(automatic_optimization=True)


def test_fsdp1_is_refused_pointing_to_model_parallel_strategy() -> None:
    with pytest.raises(MisconfigurationException, match="ModelParallelStrategy\\(data_parallel"):
        refuse_unsupported(
            "MetaGradCallback", _trainer(FSDPStrategy()), _module(), edit="e", fsdp2=True
        )


def test_the_baselines_still_refuse_model_parallel_strategy() -> None:
    with pytest.raises(MisconfigurationException, match="single device or strategy='ddp'"):
        refuse_unsupported("GPMCallback", _trainer(ModelParallelStrategy()), _module(), edit="e")


def test_tensor_parallelism_is_refused_with_its_size() -> None:
    strategy = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2)
    # The device mesh exists once the processes started; a stand-in with its sizes.
    sizes = {"data_parallel": 1, "tensor_parallel": 2}
    strategy._device_mesh = {k: SimpleNamespace(size=lambda v=v: v) for k, v in sizes.items()}  # type: ignore[assignment]
    with pytest.raises(MisconfigurationException, match="tensor_parallel_size is 2"):
        refuse_unsupported("MetaGradCallback", _trainer(strategy), _module(), edit="e", fsdp2=True)
