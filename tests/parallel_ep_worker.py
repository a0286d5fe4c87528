"""Run under torchrun by test_parallel_ep.py: expert parallelism (+ FSDP) against one unsharded model.

Every rank builds the same reference model and trains it on the whole global batch; the parallel
copy trains only this rank's rows. Losses, expert loads, gradient norms and the weights after each
optimizer step must agree. Exits non-zero (an AssertionError) on any mismatch.
"""

import copy
import sys

import torch
import torch.distributed as dist

from levante.config import ModelConfig, OptimConfig, ParallelConfig
from levante.model.transformer import Transformer
from levante.parallel.expert_parallel import expert_modules
from levante.parallel.fsdp import parallelize
from levante.parallel.mesh import Dist
from levante.train.optim import build_optimizer, grad_norm_tensor, sharded_grad_norm

optim_name, ep, steps = sys.argv[1], int(sys.argv[2]), 2
ctx = Dist.from_env(torch.device("cpu"), ep=ep)
torch.manual_seed(0)
cfg = ModelConfig(vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
                  num_attention_heads=2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                  v_head_dim=8, first_k_dense_replace=1, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
                  topk_group=1, num_nextn_predict_layers=1, max_position_embeddings=64)
reference = Transformer(cfg)
model = parallelize(copy.deepcopy(reference), ctx, ParallelConfig(ep=ep), torch.device("cpu"))
ocfg = OptimConfig(name=optim_name, lr=1e-2, muon_lr=2e-2, muon_ns_dtype="float32")
ref_opt, opt = build_optimizer(reference, ocfg), build_optimizer(model, ocfg)
per_rank = 2
gen = torch.Generator().manual_seed(1)


def full_weights(m) -> dict[str, torch.Tensor]:
    """Whole tensors: FSDP shards gathered, then every ep rank's experts concatenated in order."""
    expert_ids = {id(p) for e in expert_modules(m) for p in e.parameters()}
    out = {}
    for name, p in m.named_parameters():
        t = p.full_tensor() if hasattr(p, "full_tensor") else p.detach()
        if id(p) in expert_ids and ep > 1:
            parts = [torch.empty_like(t) for _ in range(ep)]
            dist.all_gather(parts, t.contiguous(), group=ctx.mesh["ep"].get_group())
            t = torch.cat(parts)
        out[name] = t
    return out


def close(a: torch.Tensor, b: torch.Tensor, what: str, atol: float = 1e-6) -> None:
    torch.testing.assert_close(a, b, rtol=1e-5, atol=atol, msg=lambda m: f"rank {ctx.rank} {what}: {m}")


for step in range(steps):
    ids = torch.randint(0, 128, (per_rank * ctx.world_size, 16), generator=gen)
    ref_out = reference(ids, labels=ids)
    ref_out.loss.backward()
    ref_norm = grad_norm_tensor(reference.parameters())
    ref_opt.step()
    ref_opt.zero_grad()

    mine = ids[ctx.rank * per_rank:(ctx.rank + 1) * per_rank]
    out = model(mine, labels=mine)
    out.loss.backward()
    norm = sharded_grad_norm(model.parameters(), ctx.all_reduce)
    opt.step()
    opt.zero_grad()
    close(ctx.all_reduce(out.loss.detach().clone(), "avg"), ref_out.loss.detach(), f"step {step} loss")
    close(ctx.all_reduce(out.expert_load.clone()), ref_out.expert_load, f"step {step} expert loads")
    close(norm, ref_norm, f"step {step} grad norm")
    got, want = full_weights(model), dict(reference.named_parameters())
    for name, w in want.items():
        # AdamW's first steps are ~lr * sign(g): a gradient within rounding of 0 may move by up to lr.
        # 1% of lr bounds that while any real difference (a missing 1/ep, a wrong expert) is ~lr.
        close(got[name], w.detach(), f"step {step} weight {name}", atol=1e-2 * ocfg.lr)
if ctx.is_main:
    print(f"EP OK {optim_name} ep={ep} world={ctx.world_size}")
dist.destroy_process_group()
