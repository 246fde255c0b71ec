"""MetaGradCallback under ``strategy="ddp"``: 2 CPU processes (gloo), through a real Trainer.

Lightning's DDP launcher re-executes the running script once per extra rank, so the DDP runs
happen in a subprocess running this very file (``python tests/integration/test_ddp.py ddp-run
DIR``, ``tests/`` on ``PYTHONPATH``); each rank writes its final state to ``DIR``. The
module-scoped fixture runs it once (both scenarios in one process group, ~10 s on 2 cores) and
the tests compare the files:

* every rank ends with identical callback state (meta-network, distilled predictor, table,
  task bookkeeping, a loss-based switch detector's statistics; with the replay predictor the
  replayed old gradient and the model), bit for bit;
* the run matches a single-process run with the same global batch: 2 ranks x 8 samples vs
  1 x 16, the distributed sampler off and each rank reading every other sample, so the union
  of the ranks' batches is the single process's batch. DDP averages the two per-rank mean
  gradients, which equals the global mean up to float rounding; the tolerance below covers
  that rounding (measured differences ~3e-8).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import (
    TinyClassifier,
    end_process_group,
    loader,
    make_trainer,
    paper_callback_kwargs,
    run_distributed_script,
)
from torch.utils.data import DataLoader, Subset

from lightning_metagrad import (
    AutoBoundaries,
    MetaGradCallback,
    ReplayPredictor,
    SubspacePredictor,
)
from lightning_metagrad.boundaries.changepoint import ChangePointDetector
from lightning_metagrad.boundaries.novelty import SubspaceNovelty

pytestmark = pytest.mark.slow  # subprocesses: a DDP process group of 2 ranks

GLOBAL_BATCH = 16
# name -> (tasks, optimizer steps per task, accumulate_grad_batches)
SCENARIOS = {
    "plain": (2, 6, 1),
    "accumulate": (2, 3, 2),
    "auto-loss": (2, 6, 1),
    "auto-novelty": (2, 6, 1),
    "replay": (2, 6, 1),
    "subspace": (3, 6, 1),
    "inputs": (2, 6, 1),
}
# Scenarios whose statistic reads each rank's own data (its layer inputs), so a single process
# with the same global batch samples other input rows: the ranks agree with each other only.
PER_RANK_DATA = {"inputs"}


def scenario_kwargs(name: str) -> dict[str, Any]:
    """The callback's arguments: the paper predictor (its meta-network, distilled network and
    prediction are compared), except

    * ``auto-loss``: detection on the training loss, which differs per rank unless reduced;
    * ``auto-novelty``: detection on the gradient-subspace novelty (and, in the default of
      ``"auto"``, the recent steps' mean direction, from the same reduced gradients),
      whose per-layer moments and bases are built from the reduced gradients;
    * ``replay``: each rank stores its own shard of the batches; the replayed old gradient
      (and the rule's mask from it) must be averaged over ranks to be the same everywhere.
    """
    if name == "replay":
        return {"predictor": ReplayPredictor(memory_batches=4, refresh_every=1, free_below=1.0)}
    if name == "subspace":  # a basis per weight matrix from the gradients
        return {"predictor": SubspacePredictor(every=1, threshold=0.9, statistic="gradient")}
    if name == "inputs":  # the default statistic: the layer inputs' moments, averaged over the
        # ranks at a task's end
        return {"predictor": SubspacePredictor(every=1, threshold=0.9)}
    kwargs = paper_callback_kwargs()
    if name == "auto-novelty":
        novelty = SubspaceNovelty(refresh=2, lag=1, sample_rows=2)
        return {**kwargs, "task_boundaries": ["fit", AutoBoundaries(novelty=novelty)]}
    if name != "auto-loss":
        return kwargs
    detector = ChangePointDetector(signal="loss", weights={"error": 1.0}, warmup=2, window=1)
    auto = AutoBoundaries(every=1, settle=0, detector=detector)
    return {**kwargs, "task_boundaries": ["fit", auto]}


ATOL, RTOL = 1e-5, 1e-4  # DDP vs single process (float reduction order only)
PROBE = torch.linspace(-1.0, 1.0, sum(p.numel() for p in TinyClassifier().parameters()))


class ShardedClassifier(TinyClassifier):
    """Reads ``task``'s data; rank r of w gets samples r, r+w, r+2w, ... in batches of 16 / w."""

    task = 0

    def train_dataloader(self) -> DataLoader:
        world, rank = self.trainer.world_size, self.trainer.global_rank
        data = loader(self.task).dataset
        shard = Subset(data, range(rank, len(data), world))  # type: ignore[arg-type]
        return DataLoader(shard, batch_size=GLOBAL_BATCH // world, shuffle=False)


def run_scenario(name: str, devices: int) -> dict[str, Any]:
    """Train the scenario's tasks on ``devices`` CPU processes; this rank's final state."""
    tasks, steps, accumulate = SCENARIOS[name]
    pl.seed_everything(0, verbose=False)
    model = ShardedClassifier()
    cb = MetaGradCallback(**scenario_kwargs(name))
    ddp: dict[str, Any] = {}
    if devices > 1:
        ddp = {"strategy": "ddp", "use_distributed_sampler": False}
    for task in range(tasks):
        model.task = task
        trainer = make_trainer(
            [cb], max_steps=steps, devices=devices, accumulate_grad_batches=accumulate, **ddp
        )
        trainer.fit(model)
    result = {
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "task_index": cb.task_index,
        "num_old_tasks": cb.num_old_tasks,
        "callback": cb.state_dict(),
        "model": model.state_dict(),
    }
    if name in ("subspace", "inputs"):
        bases = result["callback"]["engine"]["predictor"]["basis"]
        assert bases and all(m.shape[1] > 0 for m in bases.values())
        # A basis is defined up to the signs of its vectors; the projector M M^T is not, so it
        # is what a single process must match (the ranks must agree on M itself, bit for bit).
        result["projectors"] = {n: m @ m.T for n, m in bases.items()}
        return result
    if name == "replay":
        predictor_state = result["callback"]["engine"].pop(
            "predictor"
        )  # stored batches: this rank's shard
        # The old gradient the last step used, averaged over ranks (read from the state: a
        # fresh prediction would need a collective after the fit).
        result["prediction"] = predictor_state["cached"]
        return result
    predictor_network = cb.predictor_network
    assert predictor_network is not None
    result["meta_network"] = cb.meta_network.state_dict()
    result["predictor_network"] = predictor_network.state_dict()
    result["prediction"] = cb.predict_old_gradient(PROBE)
    return result


def _ddp_run(out_dir: Path) -> None:
    for name in SCENARIOS:
        result = run_scenario(name, devices=2)
        torch.save(result, out_dir / f"{name}-rank{result['rank']}.pt")
    end_process_group()


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    out = tmp_path_factory.mktemp("ddp")
    run_distributed_script(__file__, "ddp-run", out, timeout=300)
    return {
        name: [torch.load(out / f"{name}-rank{r}.pt", weights_only=True) for r in range(2)]
        for name in SCENARIOS
    }


def _pairs(a: Any, b: Any, path: str = "") -> Any:
    """Yield (path, a_leaf, b_leaf) over two nested states of the same structure."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for k in a:
            yield from _pairs(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        for i, (u, v) in enumerate(zip(a, b)):
            yield from _pairs(u, v, f"{path}[{i}]")
    else:
        yield path, a, b


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_ddp_ranks_end_with_identical_callback_state(
    ddp_results: dict[str, list[dict[str, Any]]], scenario: str
) -> None:
    rank0, rank1 = ddp_results[scenario]
    assert (rank0["rank"], rank1["rank"]) == (0, 1) and rank0["world_size"] == 2
    tasks = SCENARIOS[scenario][0]
    assert rank0["task_index"] == rank1["task_index"] == tasks - 1
    assert rank0["num_old_tasks"] == rank1["num_old_tasks"] == tasks - 1
    for path, a, b in _pairs(rank0, rank1):
        if path == "/rank":
            continue
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), path
        else:
            assert a == b, path


@pytest.mark.parametrize("scenario", [s for s in SCENARIOS if s not in PER_RANK_DATA])
def test_ddp_matches_a_single_process_run_with_the_same_global_batch(
    ddp_results: dict[str, list[dict[str, Any]]], scenario: str
) -> None:
    single = run_scenario(scenario, devices=1)
    ddp = ddp_results[scenario][0]
    assert single["task_index"] == ddp["task_index"]
    assert single["num_old_tasks"] == ddp["num_old_tasks"]
    compared = 0
    for path, a, b in _pairs(ddp, single):
        if path in ("/rank", "/world_size") or path.startswith("/callback/engine/predictor/basis"):
            continue  # a basis vector's sign is arbitrary: the projectors are compared
        if "/novelty/layers/" in path and path.endswith("/basis"):
            continue  # the same: the novelty's moments (compared) fix its bases up to sign
        if path.endswith("/batch_size/size"):
            assert a * ddp["world_size"] == b, path  # each process sees its share of the batch
            continue
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL, msg=path)
            compared += a.numel()
        elif isinstance(a, float):
            assert a == pytest.approx(b, abs=ATOL, rel=RTOL), path
        elif isinstance(a, torch.Tensor):
            assert torch.equal(a, b), path  # integer tensors, e.g. the RNG state
        else:
            assert a == b, path
    assert compared > 400  # at least the model and the prediction


if __name__ == "__main__":
    if sys.argv[1:2] == ["ddp-run"]:
        _ddp_run(Path(sys.argv[2]))
    else:
        raise SystemExit(f"usage: python {__file__} ddp-run DIR")
