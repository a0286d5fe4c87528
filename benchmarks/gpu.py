"""The GPU path on one card, in one command (< 8 minutes on one H200):

    python benchmarks/gpu.py [--json gpu.json] [--steps 20]

1. correctness: `tiny` loss under bf16 autocast within 1% of fp32 (routing stays fp32); the grouped
   expert matmul (grouped_mm) against a per-expert loop over the same rows;
2. training throughput of a dense and a MoE model sized for the card: tokens/s, MFU against the
   card's dense bf16 peak (levante.plan.GPUS), peak memory;
3. decode tokens/s with the MLA latent cache at batch 1 and 16.

Without CUDA it exits with one line and code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
import time

import torch

from levante.config import ModelConfig, OptimConfig
from levante.model.kernels import _grouped_linear, _grouped_mm_works
from levante.model.transformer import Transformer
from levante.train.metrics import model_flops_per_token
from levante.train.optim import build_optimizer
from levante.train.trainer import peak_flops


def moe_model() -> ModelConfig:
    """A MoE sized for one 80-141 GB card: the `1b` preset (fine-grained experts, MLA, MTP)."""
    return ModelConfig.preset("1b")


def dense_model() -> ModelConfig:
    """A Llama-style ~1.3B dense baseline with the same attention and vocabulary as `1b`."""
    return dataclasses.replace(ModelConfig.preset("1b"), n_routed_experts=0, first_k_dense_replace=16,
                               hidden_size=2048, intermediate_size=5632, num_nextn_predict_layers=0).validate()


def sync() -> None:
    torch.cuda.synchronize()


def check_bf16_loss(device) -> dict:
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny")).to(device)
    ids = torch.randint(2, model.config.vocab_size, (8, 256), device=device)
    with torch.no_grad():
        fp32 = float(model(ids, labels=ids).loss)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = float(model(ids, labels=ids).loss)
    rel = abs(bf16 - fp32) / fp32
    return {"fp32_loss": fp32, "bf16_loss": bf16, "rel_diff": rel, "ok": rel < 0.01}


def check_grouped_mm(device) -> dict:
    g = torch.Generator(device=device).manual_seed(0)
    counts = torch.tensor([0, 37, 5, 120, 64, 1, 0, 29], device=device)
    x = torch.randn(int(counts.sum()), 256, device=device, dtype=torch.bfloat16, generator=g)
    w = torch.randn(8, 512, 256, device=device, dtype=torch.bfloat16, generator=g) / 16
    grouped = _grouped_linear(x, w, counts).float()
    loop = torch.cat([c.float() @ e.float().T for e, c in zip(w.unbind(0), x.split(counts.tolist()), strict=True)])
    err = float((grouped - loop).abs().max() / loop.abs().max())
    return {"grouped_mm_available": _grouped_mm_works("cuda", torch.bfloat16), "max_rel_err": err, "ok": err < 2e-2}


def train_throughput(cfg: ModelConfig, device, batch: int, seq: int, steps: int) -> dict:
    torch.manual_seed(0)
    torch.cuda.reset_peak_memory_stats(device)
    model = Transformer(cfg).to(device)
    opt = build_optimizer(model, OptimConfig(name="adamw"))
    ids = torch.randint(2, cfg.vocab_size, (batch, seq + 1), device=device)
    x, y = ids[:, :-1], ids[:, 1:]

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(x, targets=y).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(3):  # warm-up: kernels, allocator
        step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    sync()
    elapsed = time.perf_counter() - start
    tps = batch * seq * steps / elapsed
    peak = peak_flops(device)
    return {"params": sum(p.numel() for p in model.parameters()), "batch": batch, "seq": seq,
            "tokens_per_s": tps, "mfu": tps * model_flops_per_token(cfg, seq) / peak,
            "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 1e9, "final_loss": float(loss)}


@torch.no_grad()
def decode_throughput(cfg: ModelConfig, device, batch: int, prompt: int = 64, new: int = 128) -> float:
    torch.manual_seed(0)
    model = Transformer(cfg).to(device, torch.bfloat16).eval()
    ids = torch.randint(2, cfg.vocab_size, (batch, prompt), device=device)
    cache = model.new_cache(batch, prompt + new)
    logits = model(ids, cache=cache).logits[:, -1]
    sync()
    start = time.perf_counter()
    for _ in range(new):
        token = logits.argmax(-1, keepdim=True)
        logits = model(token, cache=cache).logits[:, -1]
    sync()
    return batch * new / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="Write the results here.")
    parser.add_argument("--steps", type=int, default=20, help="Timed training steps per model.")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: benchmarks/gpu.py needs a CUDA GPU and none is visible", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    results = {"gpu": torch.cuda.get_device_name(device), "torch": torch.__version__,
               "date": datetime.date.today().isoformat(), "argv": sys.argv}
    results["bf16_vs_fp32"] = check_bf16_loss(device)
    results["grouped_vs_loop"] = check_grouped_mm(device)
    for name, cfg in (("dense", dense_model()), ("moe", moe_model())):
        results[name] = train_throughput(cfg, device, args.batch, args.seq, args.steps)
        results[name]["decode_tokens_per_s"] = {b: decode_throughput(cfg, device, b) for b in (1, 16)}
        torch.cuda.empty_cache()
    print(f"| check | result |\n|---|---|\n| bf16 vs fp32 loss | {results['bf16_vs_fp32']['rel_diff']:.2%} |\n"
          f"| grouped vs loop | {results['grouped_vs_loop']['max_rel_err']:.1e} |\n")
    print("| model | params | tokens/s | MFU | peak GB | decode b=1 | decode b=16 |\n|---|---|---|---|---|---|---|")
    for name in ("dense", "moe"):
        r = results[name]
        d = r["decode_tokens_per_s"]
        print(f"| {name} | {r['params'] / 1e9:.2f}B | {r['tokens_per_s']:,.0f} | {r['mfu']:.1%} | "
              f"{r['peak_memory_gb']:.1f} | {d[1]:,.0f} | {d[16]:,.0f} |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
    ok = results["bf16_vs_fp32"]["ok"] and results["grouped_vs_loop"]["ok"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
