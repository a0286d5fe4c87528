"""Apply parallelism to a plain `Transformer` from outside: expert parallelism, activation
checkpointing, per-block compile, then FSDP2 `fully_shard` per block and on the root.

Order matters, as in torchtitan: expert parallelism first (it decides which experts a rank owns),
then activation checkpointing and compile (they wrap a block's computation), then FSDP (it shards
whatever parameters remain, block by block, so only one block is gathered at a time).
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from levante.config import ParallelConfig
from levante.model.kernels import _grouped_mm_works
from levante.model.transformer import Transformer
from levante.parallel.mesh import Dist


def blocks(model: Transformer) -> list[nn.Module]:
    """The decoder blocks, main layers then MTP blocks: the units of sharding and recomputation."""
    return [*model.layers, *(m.block for m in model.mtp)]


def _recomputed(forward):
    """`forward` whose activations are recomputed in the backward instead of stored."""

    @functools.wraps(forward)
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def apply_activation_checkpointing(model: Transformer, mode: str) -> None:
    """"full": recompute every block; "selective": only the feed-forward (MoE / MLP) part, whose
    activations (k copies of every token through the experts) dominate the memory of a MoE block.

    The forward is replaced on the instance, not wrapped in a new module, so parameter names (and
    with them checkpoints and the optimizer's routing) stay the same.
    """
    if mode == "none":
        return
    # The grouped-matmul probe runs a tiny forward+backward on first use; inside a checkpointed region
    # its saved tensors would make the recomputation disagree with the forward. Run it now.
    device = model.embed_tokens.weight.device
    for dtype in (torch.float32, torch.bfloat16):
        _grouped_mm_works(device.type, dtype)
    for block in blocks(model):
        target = block if mode == "full" else block.mlp
        target.forward = _recomputed(target.forward)


def apply_compile(model: Transformer) -> None:
    """torch.compile each block in place (one graph per block type; the grouped expert matmul stays eager)."""
    for block in blocks(model):
        block.compile()


def apply_fsdp(model: Transformer, dist: Dist, device: torch.device) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs = {"mesh": dist.fsdp_mesh}
    if device.type == "cuda":  # bf16 compute copies, fp32 master weights and gradient reduction
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if dist.ep > 1:  # each rank's experts, sharded over the ranks that hold the same ones
        from levante.parallel.expert_parallel import expert_modules

        for experts in expert_modules(model):
            fully_shard(experts, **{**kwargs, "mesh": dist.mesh["dp"]})  # grads: see expert_parallel.py
    for block in blocks(model):
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)


def parallelize(model: Transformer, dist: Dist, cfg: ParallelConfig, device: torch.device) -> Transformer:
    """Everything `cfg` asks for, in place; a single process gets checkpointing and compile only."""
    if dist.ep > 1:
        from levante.parallel.expert_parallel import apply_expert_parallel

        apply_expert_parallel(model, dist)
    apply_activation_checkpointing(model, cfg.activation_checkpointing)
    if cfg.compile:
        apply_compile(model)
    if dist.enabled:
        apply_fsdp(model, dist, device)
    return model


def release_gathered(model: nn.Module) -> None:
    """Free the parameters FSDP2 keeps gathered after a forward without a backward (the root module's:
    it expects the backward to need them at once). For models that only run forward, as DPO's reference."""
    if hasattr(model, "reshard"):
        model.reshard()
