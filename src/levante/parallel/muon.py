"""Newton–Schulz on sharded parameters: it needs whole matrices.

FSDP2 shards every parameter along dim 0 (`Shard(0)`). A stack of experts [E, rows, cols] split along
dim 0 leaves whole expert matrices on each rank, so each rank orthogonalises its own experts (the
"give each rank a share of whole matrices" scheme of distributed Muon). A 2-D matrix split along
its rows is gathered (`full_tensor`), orthogonalised identically on every rank, and each rank keeps
its own rows. Either way the result equals the single-process update.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def _is_dtensor(t: torch.Tensor) -> bool:
    return hasattr(t, "full_tensor") and hasattr(t, "placements")


def _whole_matrices_per_rank(t) -> bool:
    """3-D (stacked experts) sharded on dim 0 only: every local slice is a set of whole matrices."""
    from torch.distributed.tensor import Replicate, Shard

    return t.ndim == 3 and all(isinstance(p, Replicate) or (isinstance(p, Shard) and p.dim == 0)
                               for p in t.placements)


def orthogonalize_sharded(update: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """fn (batched over leading dims, matrix-wise) applied to the whole matrices of `update`; the result
    has `update`'s sharding. A plain tensor goes straight to fn."""
    if not _is_dtensor(update):
        return fn(update)
    from torch.distributed.tensor import DTensor, distribute_tensor

    if _whole_matrices_per_rank(update):
        local = fn(update.to_local())
        return DTensor.from_local(local, update.device_mesh, update.placements, run_check=False,
                                  shape=update.shape, stride=update.stride())
    whole = fn(update.full_tensor())
    # Every rank holds the same `whole`: src_data_rank=None cuts the local shard without communication.
    return distribute_tensor(whole, update.device_mesh, update.placements, src_data_rank=None)
