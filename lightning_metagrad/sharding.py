"""Parameters sharded by rows over processes (FSDP2's ``fully_shard``), seen from the engine.

FSDP2 holds each parameter as a DTensor split on dim 0 (``Shard(0)``, ``torch.chunk``'s
split) and reduce-scatters gradients, so every process holds its rows of the *global mean*
gradient. The default predictor's statistic and projection act on the input side
(``G <- G - G M M^T``, ``M`` of fan-in rows), so:

* the rule is local: each process rewrites its own rows;
* the statistic ``sum_t G_t^T G_t`` is the sum of each process's ``G_r^T G_r``: one
  all-reduce per matrix at a task's end (and at a checkpoint) makes it the single process's;
* a step's energy ``|G|^2`` (unit-energy steps) is the sum of the shards' (one all-reduce
  per step); sampled rows are drawn as global indices from the same generator on every
  process, each keeping the ones in its slice.

Anything else (a 2-D device mesh, a shard on another dim, ``Partial``) is refused at
:func:`shards_of`. Plain PyTorch; without DTensors every method is the identity.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["RowShard", "Shards", "local", "shards_of"]


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed tensors
        return None
    return DTensor


def is_dtensor(t: Tensor) -> bool:
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def local(t: Tensor) -> Tensor:
    """This process's part of ``t``: the local shard of a DTensor (sharing its storage, so an
    in-place change is the DTensor's), else ``t`` itself."""
    return t.to_local() if is_dtensor(t) else t  # type: ignore[attr-defined]


@dataclass(frozen=True)
class RowShard:
    """This process's rows ``[offset, offset + rows)`` of a parameter of ``total`` rows."""

    offset: int
    rows: int
    total: int


@dataclass
class Shards:
    """The bound parameters' row shards and the process group they are split over; empty in a
    single process (or DDP, where every process holds whole tensors)."""

    rows: dict[str, RowShard] = field(default_factory=dict)
    group: ProcessGroup | None = None
    world: int = 1
    rank: int = 0

    @property
    def active(self) -> bool:
        return bool(self.rows) and self.world > 1

    def sharded(self, name: str) -> bool:
        return self.active and name in self.rows

    def sum_(self, tensor: Tensor) -> Tensor:
        """All-reduce (sum) ``tensor`` in place over the shards' processes."""
        if self.active:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        return tensor

    def all_true(self, flag: bool | Tensor) -> bool | Tensor:
        """Whether ``flag`` holds on every process (a bool, or a 0-dim bool tensor kept on its
        device), so that all of them take the same decision."""
        if not self.active:
            return flag
        if isinstance(flag, Tensor):
            out = flag.to(torch.int32).clone()
            dist.all_reduce(out, op=dist.ReduceOp.MIN, group=self.group)
            return out.bool()
        out = torch.tensor(int(flag), dtype=torch.int32)
        dist.all_reduce(out, op=dist.ReduceOp.MIN, group=self.group)
        return bool(out.item())

    def pick(self, name: str, index: Tensor, rows: Tensor) -> Tensor:
        """The rows of ``rows`` (this process's slice of parameter ``name``) among the global
        row ``index`` (on ``rows``' device); all of ``index`` without sharding."""
        if not self.sharded(name):
            return rows[index]
        shard = self.rows[name]
        mine = index[(index >= shard.offset) & (index < shard.offset + shard.rows)]
        return rows[mine - shard.offset]

    def gather(self, name: str, picked: Tensor, index: Tensor | None) -> Tensor:
        """The whole matrix's rows from each process's ``picked`` ones (its rows of parameter
        ``name`` among the global ``index``, by :meth:`pick`; all its rows for None), in the
        order a single process would pick them: the same on every process."""
        if not self.sharded(name):
            return picked
        total, chunk = self.rows[name].total, -(-self.rows[name].total // self.world)
        if index is None:
            owner = torch.arange(total, device=picked.device) // chunk
        else:
            owner = index // chunk
        counts = torch.bincount(owner, minlength=self.world).tolist()  # known everywhere
        top = max(counts)
        padded = picked.new_zeros(top, *picked.shape[1:])
        padded[: picked.shape[0]] = picked
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded, group=self.group)
        stacked = torch.cat([part[:count] for part, count in zip(parts, counts)])
        if index is None:
            return stacked
        out = torch.empty_like(stacked)
        out[torch.sort(owner, stable=True).indices] = stacked  # back to the index's order
        return out


def shards_of(params: Mapping[str, Tensor]) -> Shards:
    """The row shards of ``params``; raises ``ValueError`` naming the parameter and the fix
    for a layout the engine cannot rewrite locally."""
    rows: dict[str, RowShard] = {}
    group: ProcessGroup | None = None
    world, rank = 1, 0
    mesh_seen = None
    for name, p in params.items():
        if not is_dtensor(p):
            continue
        from torch.distributed.tensor import Replicate, Shard

        mesh, placements = p.device_mesh, p.placements  # type: ignore[attr-defined]
        if mesh.ndim != 1:
            raise ValueError(
                f"parameter {name!r} is a DTensor on a {mesh.ndim}-D device mesh (tensor or "
                "hybrid parallelism); MetaGrad supports parameters sharded by rows over one "
                "data-parallel dimension (FSDP2's fully_shard). Use "
                "ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1) and "
                "fully_shard without tensor parallelism."
            )
        placement = placements[0]
        if isinstance(placement, Replicate):
            continue  # whole on every process, like DDP
        if not (isinstance(placement, Shard) and placement.dim == 0):
            raise ValueError(
                f"parameter {name!r} is placed as {placement!r} on its mesh; MetaGrad rewrites "
                "gradients sharded by rows (Shard(0), what fully_shard does) or replicated. "
                "Tensor parallelism (ColwiseParallel/RowwiseParallel) is not supported: use "
                "ModelParallelStrategy(tensor_parallel_size=1)."
            )
        if mesh_seen is not None and mesh != mesh_seen:
            raise ValueError(
                f"parameter {name!r} is sharded over another device mesh than the others; "
                "MetaGrad needs every parameter sharded over the same data-parallel mesh."
            )
        mesh_seen = mesh
        group, world, rank = mesh.get_group(), mesh.size(), mesh.get_local_rank()
        total = p.shape[0]
        chunk = -(-total // world)  # torch.chunk: ceil-sized slices, the last ones short
        offset = min(rank * chunk, total)
        rows[name] = RowShard(offset=offset, rows=min(chunk, total - offset), total=total)
    return Shards(rows=rows, group=group, world=world, rank=rank)
