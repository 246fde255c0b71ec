"""MetaGradCallback under FSDP2 (``ModelParallelStrategy``, data-parallel only): 2 CPU
processes (gloo), through a real Trainer, against one process with the same global batch.

``fully_shard`` splits every parameter by rows over the two processes (layers of 48 rows,
so the default predictor's 32 sampled rows fall on both shards); each process rewrites its
own rows and the statistic is summed over them at a task's end. As in ``test_ddp.py``, the
runs happen in a subprocess running this file (``python tests/integration/test_fsdp2.py
fsdp-run DIR``); rank 0 writes the whole weights and the callback's state to ``DIR``:

* with the gradient statistic (``statistic="gradient"``), after two tasks the weights equal
  the single process's within 1e-4 (plain SGD, AdamW, and a Frequent-Directions sketch), and
  both ranks hold the same callback state;
* with the default, the layer inputs' statistic (each rank reads its own samples), the ranks
  hold the same state;
* the engine refuses, naming the fix, what cannot run on row shards (the paper's
  elementwise predictor, the layer inputs' sketch, detection from gradients);
* a small Transformer fine-tuned with AdamW under ``bf16-mixed`` gets its protected
  subspaces, the same on both ranks;
* a run checkpointed in the middle of task 2 (a distributed checkpoint, a directory) and
  resumed by a fresh callback and model ends where the uninterrupted run ends.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import TinyClassifier, end_process_group, loader, make_trainer, run_distributed_script
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, Subset, TensorDataset

from lightning_metagrad import AutoBoundaries, MetaGrad, MetaGradCallback, SubspacePredictor

pytestmark = pytest.mark.slow  # subprocesses: a process group of 2 ranks

GLOBAL_BATCH, STEPS, TASKS = 16, 8, 2
# One batch an epoch: however Lightning replays a dataloader when a fit resumes, every step
# of the resumed run sees the batch the uninterrupted run saw.
SAMPLES = GLOBAL_BATCH
ATOL = 1e-4
SCENARIOS = ("sgd", "adamw", "sketch")
# The layer inputs: each rank reads its own samples, so one process with the same global batch
# samples other input rows; the ranks agree with each other (their moments are summed).
PER_RANK_DATA = ("inputs",)


class ShardedMLP(TinyClassifier):
    """The helpers' MLP (48 hidden units), fully sharded over the data-parallel mesh when the
    strategy provides one; rank r of w reads samples r, r+w, ... (the
    distributed sampler off), so the ranks' batches together are the single process's."""

    task = 0

    def __init__(self, optimizer: str = "sgd") -> None:
        super().__init__(optimizer=optimizer, hidden=48)

    def configure_model(self) -> None:
        from torch.distributed.fsdp import FSDPModule, fully_shard

        # A single process has nothing to shard; a later fit, nothing left to (idempotent).
        if self.device_mesh is None or isinstance(self, FSDPModule):
            return
        mesh = self.device_mesh["data_parallel"]
        fully_shard(self.net[0], mesh=mesh)
        fully_shard(self.net[2], mesh=mesh)
        fully_shard(self, mesh=mesh)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=0.01, weight_decay=0.01)
        return super().configure_optimizers()

    def train_dataloader(self) -> DataLoader:
        world, rank = self.trainer.world_size, self.trainer.global_rank
        data = loader(self.task, n=SAMPLES).dataset
        shard = Subset(data, range(rank, len(data), world))  # type: ignore[arg-type]
        return DataLoader(shard, batch_size=GLOBAL_BATCH // world, shuffle=False)


class ShardedLM(pl.LightningModule):
    """A small ``lightning.pytorch.demos.Transformer`` (vocabulary 100), each layer and the
    whole model fully sharded, fine-tuned with AdamW under ``bf16-mixed``; task t reads tokens
    of its own range."""

    task = 0

    def __init__(self) -> None:
        super().__init__()
        from lightning.pytorch.demos import Transformer

        self.model = Transformer(vocab_size=100, ninp=32, nhead=2, nhid=64, nlayers=1)

    def configure_model(self) -> None:
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if self.device_mesh is None or isinstance(self.model, FSDPModule):
            return
        mesh = self.device_mesh["data_parallel"]
        layers = self.model.transformer.encoder.layers, self.model.transformer.decoder.layers
        for layer in (*layers[0], *layers[1]):
            fully_shard(layer, mesh=mesh)
        fully_shard(self.model, mesh=mesh)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.nll_loss(self.model(x, y), y.reshape(-1))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(self.task)
        tokens = torch.randint(self.task * 50, self.task * 50 + 50, (64, 13), generator=g)
        return DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=8)


def run_transformer() -> dict[str, Any]:
    pl.seed_everything(0, verbose=False)
    model, cb = ShardedLM(), MetaGradCallback()
    for task in range(TASKS):
        model.task = task
        kwargs = trainer_kwargs(2) | {"use_distributed_sampler": True, "precision": "bf16-mixed"}
        trainer = make_trainer([cb], max_steps=6, **kwargs)
        trainer.fit(model)
    return {"rank": trainer.global_rank, "callback": cb.state_dict()}


def predictor(name: str) -> SubspacePredictor:
    if name == "inputs":  # the default: the layer inputs, leaning towards the task's end
        return SubspacePredictor()
    if name == "sketch":
        return SubspacePredictor(statistic="gradient", sketch=4, every=1)
    return SubspacePredictor(statistic="gradient")


def trainer_kwargs(devices: int) -> dict[str, Any]:
    if devices == 1:
        return {}
    from lightning.pytorch.strategies import ModelParallelStrategy

    strategy = ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1)
    return {"devices": devices, "strategy": strategy, "use_distributed_sampler": False}


def full_weights(model: pl.LightningModule) -> dict[str, torch.Tensor]:
    """The whole weights (a DTensor's gathered from its shards)."""
    return {
        n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
        for n, p in model.named_parameters()
    }


def run(name: str, devices: int, checkpoints: Path | None = None) -> dict[str, Any]:
    """Train ``TASKS`` tasks of ``STEPS`` steps; this rank's weights and callback state.
    ``checkpoints``: save task 2 every 4 steps there."""
    pl.seed_everything(0, verbose=False)
    model = ShardedMLP("adamw" if name == "adamw" else "sgd")
    cb = MetaGradCallback(predictor=predictor(name))
    trainer: pl.Trainer
    for task in range(TASKS):
        model.task = task
        extra: list[pl.Callback] = []
        if checkpoints is not None and task == TASKS - 1:
            extra = [ModelCheckpoint(checkpoints, "{step}", every_n_epochs=4, save_top_k=-1)]
        trainer = make_trainer(
            [cb, *extra],
            max_steps=STEPS,
            enable_checkpointing=bool(extra),
            **trainer_kwargs(devices),
        )
        trainer.fit(model)
    return {
        "rank": trainer.global_rank,
        "weights": full_weights(model),
        "callback": cb.state_dict(),
        "tasks": (cb.task_index, cb.num_old_tasks),
    }


def resume(checkpoint: Path, devices: int) -> dict[str, Any]:
    """A fresh model and callback resume task 2 from ``checkpoint`` (taken at its step 4)."""
    pl.seed_everything(0, verbose=False)
    model = ShardedMLP()
    model.task = TASKS - 1
    cb = MetaGradCallback(predictor=predictor("sgd"))
    trainer = make_trainer([cb], max_steps=STEPS, **trainer_kwargs(devices))
    trainer.fit(model, ckpt_path=checkpoint)
    weights = full_weights(model)
    return {"rank": trainer.global_rank, "weights": weights, "callback": cb.state_dict()}


def refusals() -> dict[str, str]:
    """The engine's errors when bound to a fully sharded model with what cannot run on it."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = ShardedMLP()
    fully_shard(model, mesh=init_device_mesh("cpu", (torch.distributed.get_world_size(),)))
    errors = {}
    for name, core in {
        "paper": MetaGrad(predictor="paper"),
        "inputs-sketch": MetaGrad(predictor=SubspacePredictor(statistic="inputs", sketch=8)),
        "auto": MetaGrad(boundaries=AutoBoundaries()),
    }.items():
        try:
            core.bind(model)
        except ValueError as err:
            errors[name] = str(err)
    return errors


def _fsdp_run(out: Path) -> None:
    for name in (*SCENARIOS, *PER_RANK_DATA):
        result = run(name, devices=2, checkpoints=out / "ckpt" if name == "sgd" else None)
        torch.save(result, out / f"{name}-rank{result['rank']}.pt")
    result = resume(out / "ckpt" / "step=4.ckpt", devices=2)
    torch.save(result, out / f"resumed-rank{result['rank']}.pt")
    torch.save(refusals(), out / f"refusals-rank{result['rank']}.pt")
    result = run_transformer()
    torch.save(result, out / f"transformer-rank{result['rank']}.pt")
    end_process_group()


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    out = tmp_path_factory.mktemp("fsdp2")
    run_distributed_script(__file__, "fsdp-run", out, timeout=600)
    results = {"refusals": [torch.load(out / f"refusals-rank{r}.pt") for r in range(2)]}
    return results | {
        name: [torch.load(out / f"{name}-rank{r}.pt", weights_only=False) for r in range(2)]
        for name in (*SCENARIOS, *PER_RANK_DATA, "resumed", "transformer")
    }


def _tensors(state: Any, path: str = "") -> Any:
    if isinstance(state, dict):
        for k, v in state.items():
            yield from _tensors(v, f"{path}/{k}")
    elif isinstance(state, (list, tuple)):
        for i, v in enumerate(state):
            yield from _tensors(v, f"{path}[{i}]")
    elif isinstance(state, torch.Tensor):
        yield path, state


def _bases(result: dict[str, Any]) -> dict[str, torch.Tensor]:
    predictor_state = result["callback"]["engine"]["predictor"]
    bases = dict(predictor_state["basis"])
    for name, blocks in predictor_state["blocks"].items():
        bases[name] = torch.cat(blocks, 1)
    return bases


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_fsdp2_matches_one_process_with_the_same_global_batch(
    fsdp_results: dict[str, list[dict[str, Any]]], scenario: str
) -> None:
    rank0 = fsdp_results[scenario][0]
    single = run(scenario, devices=1)
    assert rank0["tasks"] == single["tasks"] == (TASKS - 1, TASKS - 1)
    for n, w in single["weights"].items():
        torch.testing.assert_close(rank0["weights"][n], w, atol=ATOL, rtol=0, msg=n)
    # The protected subspaces (projectors: a basis is defined up to its vectors' signs).
    single_bases, sharded_bases = _bases(single), _bases(rank0)
    assert single_bases and single_bases.keys() == sharded_bases.keys()
    for n, m in single_bases.items():
        assert sharded_bases[n].shape == m.shape, n
        projector = sharded_bases[n] @ sharded_bases[n].T
        torch.testing.assert_close(projector, m @ m.T, atol=ATOL, rtol=0)


@pytest.mark.parametrize("scenario", (*SCENARIOS, *PER_RANK_DATA, "resumed", "transformer"))
def test_fsdp2_ranks_hold_the_same_callback_state(
    fsdp_results: dict[str, list[dict[str, Any]]], scenario: str
) -> None:
    rank0, rank1 = fsdp_results[scenario]
    states = dict(_tensors(rank0["callback"])), dict(_tensors(rank1["callback"]))
    assert states[0].keys() == states[1].keys()
    for path, t in states[0].items():
        if "generator" in path:
            continue
        assert torch.equal(t, states[1][path]), path


def test_fsdp2_protects_a_transformer_fine_tuned_with_adamw_in_bf16(
    fsdp_results: dict[str, list[dict[str, Any]]],
) -> None:
    state = fsdp_results["transformer"][0]["callback"]
    assert state["engine"]["num_tasks"] == TASKS
    bases = _bases(fsdp_results["transformer"][0])
    assert "model.embedding.weight" in bases
    assert all(m.shape[1] > 0 for m in bases.values())


def test_fsdp2_resumed_mid_task_ends_where_the_uninterrupted_run_ends(
    fsdp_results: dict[str, list[dict[str, Any]]],
) -> None:
    resumed, uninterrupted = fsdp_results["resumed"][0], fsdp_results["sgd"][0]
    for n, w in uninterrupted["weights"].items():
        torch.testing.assert_close(resumed["weights"][n], w, atol=ATOL, rtol=0, msg=n)
    for n, m in _bases(uninterrupted).items():
        torch.testing.assert_close(_bases(resumed)[n], m, atol=ATOL, rtol=0)


def test_fsdp2_refuses_what_cannot_run_on_row_shards_naming_the_fix(
    fsdp_results: dict[str, Any],
) -> None:
    errors = fsdp_results["refusals"][0]
    assert errors == fsdp_results["refusals"][1]
    assert "MetaNetPredictor cannot learn from parameters sharded" in errors["paper"]
    assert "SubspacePredictor()" in errors["paper"]
    assert "sketch=" in errors["inputs-sketch"] and "sketch=None" in errors["inputs-sketch"]
    assert "task_boundaries='auto'" in errors["auto"] and "('fit')" in errors["auto"]


if __name__ == "__main__" and sys.argv[1:2] == ["fsdp-run"]:
    _fsdp_run(Path(sys.argv[2]))
