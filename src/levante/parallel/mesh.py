"""The distributed context: process group, DeviceMesh and the few collectives the trainer needs.

`Dist.from_env()` reads what torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK); without them it is the
single-process context (world size 1, no process group), so the trainer has one code path. gloo on
CPU, NCCL on GPU. The mesh has two dimensions, ("dp", "ep") with ep = parallel.ep: FSDP2 shards
over all ranks (dp x ep flattened), the routed experts are split over "ep" (expert parallelism is
carved out of data parallelism: every rank still trains its own slice of the batch).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from levante.errors import LevanteError


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    ep: int = 1
    mesh: Any = None  # DeviceMesh ("dp", "ep"), None in a single process

    @property
    def enabled(self) -> bool:
        return self.mesh is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: torch.device, ep: int = 1) -> Dist:
        """Initialise the process group when launched by torchrun; `device` is the run's device type."""
        if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
            if ep != 1:
                raise LevanteError(f"parallel.ep = {ep} needs {ep} or more ranks: launch with torchrun "
                                   "or `levante train --nproc N`")
            return cls()
        world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if world % ep:
            raise LevanteError(f"parallel.ep ({ep}) must divide the world size ({world})")
        if not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            if device.type == "cuda":
                torch.cuda.set_device(local_rank)
            dist.init_process_group(backend, timeout=datetime.timedelta(minutes=10))
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device.type, (world // ep, ep), mesh_dim_names=("dp", "ep"))
        return cls(rank, world, local_rank, ep, mesh)

    def device(self, device: torch.device) -> torch.device:
        return torch.device("cuda", self.local_rank) if device.type == "cuda" else device

    @property
    def fsdp_mesh(self):
        """All ranks, one dimension: FSDP2 shards every parameter over the whole world."""
        return self.mesh._flatten("dp_ep") if self.ep > 1 else self.mesh["dp"]

    # -- collectives (no-ops in a single process)

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In place over all ranks; op "sum" or "avg" (gloo has no AVG: sum, then divide)."""
        if self.enabled:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            if op == "avg":
                t.div_(self.world_size)
        return t

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def run_on_main(self, fn, *args, **kwargs):
        """Call `fn` on rank 0 only; a LevanteError there is raised on every rank (no rank hangs)."""
        error = None
        if self.is_main:
            try:
                fn(*args, **kwargs)
            except LevanteError as e:
                error = str(e)
        error = self.broadcast_object(error)
        if error is not None:
            raise LevanteError(error)



def shutdown() -> None:
    """Destroy the process group, if any: gloo aborts the process at exit when it is left alive."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
