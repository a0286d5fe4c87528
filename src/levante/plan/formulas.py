"""Compute and memory planner: parameters, FLOPs, GPU-hours, memory per GPU and KV cache for a config.

Everything here is analytic (no torch import, so `levante plan` is instant) and cross-checked in the
tests against the meta-device model, whose parameter count it must match exactly. What is exact and
what is an estimate:

  exact      parameter counts (total, active, per component), KV-cache bytes per token.
  formula    training FLOPs per token (below) — the convention MFU numbers are quoted in, not a
             kernel-level count.
  estimate   GPU-hours (only as good as the MFU you assume), activation memory (±30%: it depends on
             kernels, fusion and allocator behaviour we do not model), minimum GPU counts.

Active parameters follow DeepSeek's convention (671B total / 37B active for V3): the main model
without MTP, only the top-k routed experts, and without the input embedding table — a lookup reads a
single row and does no matmul. `active_params_with_embedding` adds the table back and equals
`Transformer.num_params(active=True)`.

Training FLOPs per token (forward + backward = 3 × forward; a weight matrix with P entries costs
2·P FLOPs per token forward):

    flops/token = 6 · N_matmul + 6 · L' · n_heads · (qk_head_dim + v_head_dim) · seq_len

N_matmul = every weight one token multiplies by: attention projections, dense MLPs, router,
shared + top-k routed experts, the head, and each MTP module (eh_proj, its block, the shared head
again); embeddings and norm gains are excluded. The second term is attention itself (q·kᵀ and
attn·v over seq_len keys) for L' = layers + MTP blocks. Like PaLM's 12·L·H·Q·T it ignores the causal
mask (a causal kernel does about half), so `mfu` means what published MFU numbers mean. Same
formula the trainer's MFU uses (`levante.train.metrics.model_flops_per_token` wraps it).
"""

from __future__ import annotations

import math

from levante.config import ModelConfig
from levante.errors import LevanteError
from levante.plan.hardware import GPUS

# Share of a card's memory we let the plan use: CUDA context, NCCL buffers and allocator
# fragmentation take the rest. A rule of thumb, not a measurement.
USABLE_MEMORY = 0.85
CHINCHILLA_TOKENS_PER_PARAM = 20
ZERO_STAGES = ("fsdp", "zero2", "zero1", "ddp")
CATEGORIES = ("embedding", "attention", "dense_mlp", "routed_experts", "shared_experts", "router",
              "norms", "head", "mtp_proj")

# ------------------------------------------------------------------------------------- parameters


def _attention(c: ModelConfig) -> tuple[int, int]:
    """(projection weights, norm gains) of one MLA layer."""
    h, n = c.hidden_size, c.num_attention_heads
    if c.q_lora_rank is None:
        q, norms = h * n * c.qk_head_dim, 0
    else:
        q, norms = h * c.q_lora_rank + c.q_lora_rank * n * c.qk_head_dim, c.q_lora_rank
    kv = h * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank * n * (c.qk_nope_head_dim + c.v_head_dim)
    return q + kv + n * c.v_head_dim * h, norms + c.kv_lora_rank


def _block(c: ModelConfig, layer: int) -> dict[str, int]:
    """Parameters of decoder block `layer` by category (routed experts: all of them)."""
    h = c.hidden_size
    attn, attn_norms = _attention(c)
    out = dict.fromkeys(CATEGORIES, 0)
    out["attention"], out["norms"] = attn, attn_norms + 2 * h  # + input / post-attention norms
    if c.is_moe_layer(layer):
        expert = 3 * h * c.moe_intermediate_size  # SwiGLU: gate, up, down
        out["routed_experts"] = c.n_routed_experts * expert
        out["shared_experts"] = c.n_shared_experts * expert
        out["router"] = c.n_routed_experts * h
    else:
        out["dense_mlp"] = 3 * h * c.intermediate_size
    return out


def _add(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return {k: a[k] + b[k] for k in a}


def _activate(c: ModelConfig, counts: dict[str, int]) -> dict[str, int]:
    """What one token uses: top-k of the routed experts; the embedding table only if tied to the head."""
    out = dict(counts)
    if c.n_routed_experts:
        out["routed_experts"] = counts["routed_experts"] // c.n_routed_experts * c.num_experts_per_tok
    if not c.tie_word_embeddings:
        out["embedding"] = 0
    return out


def param_breakdown(c: ModelConfig) -> dict[str, dict[str, int]]:
    """Exact parameter counts by category: {"main": ..., "mtp": ...} (MTP: all depths together)."""
    h = c.hidden_size
    main = dict.fromkeys(CATEGORIES, 0)
    main["embedding"] = c.vocab_size * h
    main["head"] = 0 if c.tie_word_embeddings else c.vocab_size * h
    main["norms"] = h  # final norm
    for layer in range(c.num_hidden_layers):
        main = _add(main, _block(c, layer))
    mtp = dict.fromkeys(CATEGORIES, 0)
    for depth in range(c.num_nextn_predict_layers):
        # enorm, hnorm, eh_proj and the module's final norm, around one block numbered after the stack.
        extra = dict.fromkeys(CATEGORIES, 0)
        extra["norms"], extra["mtp_proj"] = 3 * h, 2 * h * h
        mtp = _add(mtp, _add(extra, _block(c, c.num_hidden_layers + depth)))
    return {"main": main, "mtp": mtp}


def _matmul_params(c: ModelConfig, counts: dict[str, int], with_head: bool) -> int:
    """Weights one token multiplies by (norms and lookups excluded; a tied head still multiplies)."""
    active = _activate(c, counts)
    skip = ("embedding", "norms", "head")
    head = c.vocab_size * c.hidden_size if with_head else 0
    return sum(v for k, v in active.items() if k not in skip) + head


def flops_per_token(c: ModelConfig, seq_len: int, include_mtp: bool = True) -> dict[str, float]:
    """Training FLOPs per token (see the module docstring) split into matmul and attention terms."""
    parts = param_breakdown(c)
    matmul = _matmul_params(c, parts["main"], with_head=True)
    layers = c.num_hidden_layers
    if include_mtp and c.num_nextn_predict_layers:
        # Each MTP depth runs the shared head again, so its matmuls include one more head.
        matmul += _matmul_params(c, parts["mtp"], with_head=False)
        matmul += c.num_nextn_predict_layers * c.vocab_size * c.hidden_size
        layers += c.num_nextn_predict_layers
    attention = 6 * layers * c.num_attention_heads * (c.qk_head_dim + c.v_head_dim) * seq_len
    return {"matmul_params": matmul, "matmul": 6.0 * matmul, "attention": float(attention),
            "total": 6.0 * matmul + attention}


# ----------------------------------------------------------------------------------------- memory


def _optimizer_bytes(c: ModelConfig, counts: dict[str, int]) -> dict[str, int]:
    """Optimizer-state bytes: AdamW keeps 2 fp32 moments for everything; Muon keeps 1 fp32 momentum
    for 2-D hidden matrices (attention, MLPs, experts, router) and AdamW's 2 for the rest."""
    total = sum(counts.values())
    adamw_only = counts["embedding"] + counts["head"] + counts["norms"]
    return {"adamw": 8 * total, "muon": 4 * (total - adamw_only) + 8 * adamw_only}


def _block_activations(c: ModelConfig, layer: int) -> int:
    """Elements one block saves for backward per token (bf16), no recomputation, flash attention
    (no T×T matrix). Counted: residual and normed inputs, q / latent / k / v / attention output,
    MLP gate+up+product, routed copies of the token in and out; ignored: fp32 norm internals,
    dropout masks (none), temporaries freed before backward."""
    h, n = c.hidden_size, c.num_attention_heads
    q_lora = 2 * c.q_lora_rank if c.q_lora_rank else 0
    attn = (2 * h + q_lora + n * c.qk_head_dim + 2 * c.kv_lora_rank + c.qk_rope_head_dim
            + n * (c.qk_head_dim + c.v_head_dim) + n * c.v_head_dim)
    if c.is_moe_layer(layer):
        i = c.moe_intermediate_size
        mlp = (2 * h + 2 * c.n_routed_experts  # fp32 router scores ≈ 2 bf16 slots each
               + c.num_experts_per_tok * (2 * h + 3 * i) + c.n_shared_experts * 3 * i)
    else:
        mlp = 2 * h + 3 * c.intermediate_size
    return attn + mlp


def activation_bytes(c: ModelConfig, seq_len: int, micro_batch: int) -> dict[str, int]:
    """Activation memory of one micro-batch, without and with full per-block recomputation.

    With recomputation only each block's input (h per token) is kept, plus one block's full
    activations while it is recomputed. Both add the logits: bf16 from the head plus the fp32 copy
    the cross-entropy saves (6 bytes × vocab per token, per head call — MTP calls it again).
    """
    tokens = seq_len * micro_batch
    n_blocks = c.num_hidden_layers + c.num_nextn_predict_layers
    per_block = [_block_activations(c, i) for i in range(n_blocks)]
    logits = 6 * c.vocab_size * (1 + c.num_nextn_predict_layers)
    return {
        "no_recompute": tokens * (2 * sum(per_block) + logits),
        "full_recompute": tokens * (2 * (n_blocks * c.hidden_size + max(per_block)) + logits),
    }


def _auto_ep(c: ModelConfig, gpus: int) -> int:
    # Experts spread over as many ranks as divide both counts; dense models have nothing to spread.
    return math.gcd(gpus, c.n_routed_experts) if c.n_routed_experts else 1


def _fixed_parts(c: ModelConfig, seq_len: int, micro_batch: int) -> dict:
    """What memory_per_gpu needs that does not depend on the GPU count (computed once per search)."""
    parts = param_breakdown(c)
    counts = _add(parts["main"], parts["mtp"])
    blocks = [_block(c, i) for i in range(c.num_hidden_layers + c.num_nextn_predict_layers)]
    return {
        "total": sum(counts.values()), "experts": counts["routed_experts"],
        "opt": _optimizer_bytes(c, counts),
        # (dense part, routed experts) of each FSDP unit: every block, the embedding, the head.
        "units": [(sum(b.values()) - b["routed_experts"], b["routed_experts"]) for b in blocks]
        + [(c.vocab_size * c.hidden_size, 0)],
        "acts": activation_bytes(c, seq_len, micro_batch),
    }


def _per_gpu(fixed: dict, gpus: int, ep: int, zero_stage: str) -> dict:
    total = fixed["total"]
    # Parameters one rank would hold unsharded: the dense part plus its 1/ep of the routed experts.
    per_rank = total - fixed["experts"] + fixed["experts"] // ep
    sharded = {"fsdp": ("weights", "grads", "master", "state"), "zero2": ("grads", "master", "state"),
               "zero1": ("master", "state"), "ddp": ()}[zero_stage]
    states = {}
    for name, opt in fixed["opt"].items():
        sizes = {"weights": 2 * total, "grads": 2 * total, "master": 4 * total, "state": opt}
        states[name] = int(sum(v / gpus if k in sharded else v * per_rank / total for k, v in sizes.items()))
    # FSDP holds about three gathered bf16 units at once: current + prefetched weights, one unit's grads.
    largest = max(dense + experts // ep for dense, experts in fixed["units"])
    gathered = 3 * 2 * largest if zero_stage == "fsdp" else 0
    acts = fixed["acts"]
    return {
        "gpus": gpus, "zero_stage": zero_stage, "expert_parallel": ep,
        "state_bytes": states, "gathered_bytes": gathered, "activation_bytes": acts,
        # Totals assume full recomputation, as anything beyond toy scale trains with it.
        "total_bytes": {k: v + gathered + acts["full_recompute"] for k, v in states.items()},
    }


def memory_per_gpu(c: ModelConfig, gpus: int, *, seq_len: int, micro_batch: int, zero_stage: str,
                   expert_parallel: int | None) -> dict:
    """Bytes per GPU for training (main model + MTP), mixed precision as in ZeRO (Rajbhandari et
    al. 2020): bf16 weights 2 + bf16 grads 2 + fp32 master 4 bytes per parameter, plus optimizer
    state. `zero_stage` says what is sharded over all `gpus`: fsdp (= ZeRO-3) everything,
    zero2 grads + master + state, zero1 master + state, ddp nothing. Routed experts are split over
    the expert-parallel ranks (`expert_parallel`, default: gcd(gpus, n_routed_experts)) first."""
    ep = _auto_ep(c, gpus) if expert_parallel is None else expert_parallel
    if ep < 1 or gpus % ep or (c.n_routed_experts and c.n_routed_experts % ep):
        raise LevanteError(f"plan: expert_parallel={ep} must divide both gpus ({gpus}) and "
                           f"n_routed_experts ({c.n_routed_experts})")
    return _per_gpu(_fixed_parts(c, seq_len, micro_batch), gpus, ep, zero_stage)


def min_gpus(c: ModelConfig, memory_bytes: float, *, seq_len: int, micro_batch: int, zero_stage: str,
             optimizer: str = "adamw", limit: int = 1 << 17) -> int | None:
    """Smallest sensible GPU count (1, 2, 4, then whole 8-GPU nodes) whose per-GPU total fits in
    USABLE_MEMORY of the card, expert parallelism chosen automatically; None if none up to `limit`."""
    budget = USABLE_MEMORY * memory_bytes
    fixed = _fixed_parts(c, seq_len, micro_batch)
    if fixed["acts"]["full_recompute"] > budget:  # activations alone do not fit: more GPUs won't help
        return None
    for n in [1, 2, 4, *range(8, limit + 1, 8)]:
        if _per_gpu(fixed, n, _auto_ep(c, n), zero_stage)["total_bytes"][optimizer] <= budget:
            return n
    return None


def kv_cache(c: ModelConfig) -> dict[str, float]:
    """Inference KV cache per token (bf16, main layers; MTP is dropped at inference). MLA caches the
    normalised latent + the shared rope key; plain MHA would cache full per-head keys and values."""
    mla = (c.kv_lora_rank + c.qk_rope_head_dim) * c.num_hidden_layers * 2
    mha = c.num_attention_heads * (c.qk_head_dim + c.v_head_dim) * c.num_hidden_layers * 2
    return {"mla_bytes_per_token": mla, "mha_bytes_per_token": mha, "mha_over_mla": mha / mla}


# ------------------------------------------------------------------------------------------- plan


def _check(seq_len, tokens, gpus, gpu, micro_batch, mfu, zero_stage) -> None:
    checks = [
        (seq_len > 0, f"seq_len must be positive, got {seq_len}"),
        (tokens is None or tokens > 0, f"tokens must be positive, got {tokens}"),
        (gpus is None or gpus >= 1, f"gpus must be >= 1, got {gpus}"),
        (gpu in GPUS, f"unknown gpu '{gpu}'; choose one of: {', '.join(GPUS)}"),
        (micro_batch >= 1, f"micro_batch must be >= 1, got {micro_batch}"),
        (0 < mfu <= 1, f"mfu must be in (0, 1], got {mfu}"),
        (zero_stage in ZERO_STAGES,
         f"zero_stage must be one of {', '.join(ZERO_STAGES)}, got '{zero_stage}'"),
    ]
    for ok, msg in checks:
        if not ok:
            raise LevanteError(f"plan: {msg}")


def plan(cfg: ModelConfig, *, seq_len: int = 4096, tokens: float | None = None, gpus: int | None = None,
         gpu: str = "h100", micro_batch: int = 1, mfu: float = 0.4, zero_stage: str = "fsdp",
         expert_parallel: int | None = None) -> dict:
    """Everything `levante plan` reports, as a JSON-ready dict (see the module docstring)."""
    gpu = gpu.lower()
    _check(seq_len, tokens, gpus, gpu, micro_batch, mfu, zero_stage)
    cfg.validate()
    parts = param_breakdown(cfg)
    total, mtp = sum(parts["main"].values()), sum(parts["mtp"].values())
    active = sum(_activate(cfg, parts["main"]).values())
    head_copies = 0 if not mtp else cfg.num_nextn_predict_layers * 2 * cfg.vocab_size * cfg.hidden_size
    table = 0 if cfg.tie_word_embeddings else parts["main"]["embedding"]  # already in `active` when tied

    flops = flops_per_token(cfg, seq_len)
    tokens_note = "given"
    if tokens is None:
        tokens = float(CHINCHILLA_TOKENS_PER_PARAM * active)
        # Chinchilla's ratio was fitted on dense models; for MoE it is a convention, not a law.
        tokens_note = f"default: {CHINCHILLA_TOKENS_PER_PARAM} x active params, Chinchilla-style"
    train_flops = flops["total"] * tokens
    gpu_hours = {k: train_flops / (g["peak_flops"] * mfu) / 3600 for k, g in GPUS.items()}

    common = {"seq_len": seq_len, "micro_batch": micro_batch, "zero_stage": zero_stage}
    fits_on = {f"{g:g}GB": min_gpus(cfg, g * 1e9, **common) for g in (80, 141)}
    gpus_note = "given"
    if gpus is None:
        gpus = min_gpus(cfg, GPUS[gpu]["memory_bytes"], **common)
        gpus_note = f"minimum for {GPUS[gpu]['name']} (AdamW)"
    memory = None
    if gpus is not None:
        memory = memory_per_gpu(cfg, gpus, expert_parallel=expert_parallel, **common)
        memory["fits"] = memory["total_bytes"]["adamw"] <= USABLE_MEMORY * GPUS[gpu]["memory_bytes"]

    return {
        "total_params": total,
        "active_params": active,
        "active_params_with_embedding": active + table,
        "mtp_params": mtp,
        # HF DeepseekV3 checkpoints store the MTP module with its own copies of embedding and head.
        "mtp_params_in_hf_checkpoint": mtp + head_copies,
        "breakdown": {"total": parts["main"], "active": _activate(cfg, parts["main"]), "mtp": parts["mtp"]},
        "seq_len": seq_len,
        "flops_per_token": flops["total"],
        "flops": flops,
        "tokens": tokens,
        "tokens_note": tokens_note,
        "train_flops": train_flops,
        "mfu": mfu,
        "gpu": gpu,
        "gpu_hours": gpu_hours,
        "gpus": gpus,
        "gpus_note": gpus_note,
        "wall_clock_days": None if gpus is None else gpu_hours[gpu] / gpus / 24,
        "memory": memory,
        "min_gpus": fits_on,
        "kv_cache": kv_cache(cfg),
        "assumptions": [
            "active params: main model, top-k routed experts, no embedding table (DeepSeek's convention)",
            "FLOPs: 6*N_matmul + attention without the causal discount (PaLM MFU convention), MTP included",
            f"GPU-hours at mfu={mfu:g} of dense bf16 peak; real MFU depends on kernels and network",
            "memory: bf16 weights+grads, fp32 master, AdamW 2 / Muon 1 fp32 states; full recomputation; "
            f"cards usable to {USABLE_MEMORY:.0%}; activations +-30%",
        ],
    }
