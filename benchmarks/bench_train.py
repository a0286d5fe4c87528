#!/usr/bin/env python
"""CPU training throughput: Levante's Transformer vs transformers' DeepseekV3ForCausalLM, same weights.

Measured in ONE process, interleaved: every round runs each measurement once (the order rotates
from round to round), and each side reports the median over rounds, so background load on a shared
machine hits every side alike. Measurements:

  fb/levante, fb/hf            forward + backward (loss.backward()) tokens/s
  step/levante-muon            full training step: forward, backward, clip, optimizer step,
  step/levante-adamw           zero_grad (+ Levante's router-bias update, as its trainer does)
  step/hf-adamw                the same loop around DeepseekV3ForCausalLM + torch.optim.AdamW

MFU = tokens/s x model_flops_per_token(cfg, seq) / peak, where peak is the best fp32 n x n matmul
FLOP/s measured in this run (measure_cpu_matmul_peak, once per round; the maximum is used).

Before timing, both models' losses on the benchmark batch must agree within --tol (the weights are
Levante's, copied into HF through levante.interop.hf_mapping.levante_to_hf). Peak RSS is per
process: run with `--only levante` and `--only hf` (separate processes) for one side's RSS each.

    python benchmarks/bench_train.py --preset tiny --batch 8 --seq 256 --json tiny.json
    python benchmarks/bench_train.py --preset small --batch 4 --seq 256 --json small.json
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import gc
import json
import os
import platform
import re
import resource
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

from common import cpu_model  # noqa: E402  (benchmarks/common.py)
from levante.config import ModelConfig, OptimConfig  # noqa: E402
from levante.interop.hf_mapping import config_to_hf, levante_to_hf  # noqa: E402
from levante.model.transformer import Transformer  # noqa: E402
from levante.train.balancing import RouterBalancer  # noqa: E402
from levante.train.metrics import measure_cpu_matmul_peak, mfu, model_flops_per_token  # noqa: E402
from levante.train.optim import build_optimizer, clip_grad_norm  # noqa: E402

_HF_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


# ----------------------------------------------------------------------------------------- helpers



def peak_rss_mib() -> float:
    # Linux reports ru_maxrss in KiB (macOS in bytes).
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def hf_state_from_levante(lv_state: dict, cfg: ModelConfig) -> dict:
    """Levante state -> DeepSeek checkpoint names (levante_to_hf: one tensor per expert) -> the
    in-memory layout of transformers 5.x, which stacks experts as gate_up_proj [E, 2I, H] (gate
    first, then up) and down_proj [E, H, I], as its checkpoint loader does."""
    per_expert: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    out = {}
    for name, t in levante_to_hf(lv_state, cfg).items():
        m = _HF_EXPERT.match(name)
        if m:
            per_expert.setdefault(m.group(1), {}).setdefault(int(m.group(2)), {})[m.group(3)] = t
        else:
            out[name] = t
    for base, experts in per_expert.items():
        ids = range(len(experts))
        out[f"{base}.gate_up_proj"] = torch.stack(
            [torch.cat((experts[e]["gate_proj"], experts[e]["up_proj"]), dim=0) for e in ids])
        out[f"{base}.down_proj"] = torch.stack([experts[e]["down_proj"] for e in ids])
    return out


def build_hf(cfg: ModelConfig, lv_model: Transformer, experts: str | None = None):
    import transformers
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    transformers.utils.logging.set_verbosity_error()
    hf_cfg = DeepseekV3Config(**config_to_hf(cfg))
    if experts:  # e.g. "eager": transformers' per-expert loop instead of its default kernel
        hf_cfg._experts_implementation = experts
    hf = DeepseekV3ForCausalLM(hf_cfg)  # default attention / experts implementation unless asked
    state = hf_state_from_levante(lv_model.state_dict(), cfg)
    missing, unexpected = hf.load_state_dict(state, strict=False)
    # Non-persistent buffers (rotary inv_freq) are not in either state dict.
    missing = [k for k in missing if not k.endswith("inv_freq")]
    if missing or unexpected:
        raise SystemExit(f"weight copy into HF failed: missing={missing[:5]} unexpected={unexpected[:5]}")
    impl = {
        "attn_implementation": hf.config._attn_implementation,
        "experts_implementation": getattr(hf.config, "_experts_implementation", None),
    }
    return hf, impl


# ------------------------------------------------------------------------------------ measurements


class Measurement:
    """One timed thing: `run()` is one iteration (forward+backward or a full training step)."""

    def __init__(self, name: str, side: str, run, prepare=None):
        self.name, self.side, self.run, self.prepare = name, side, run, prepare
        self.tps: list[float] = []  # tokens/s per round

    def time(self, iters: int, tokens_per_iter: int) -> float:
        elapsed = 0.0
        for _ in range(iters):
            if self.prepare is not None:
                self.prepare()  # untimed (e.g. dropping gradients before a forward+backward)
            start = time.perf_counter()
            self.run()
            elapsed += time.perf_counter() - start
        tps = iters * tokens_per_iter / elapsed
        self.tps.append(tps)
        return tps


def fb_measure(name, side, model, ids, hf: bool, hf_use_cache: bool = False):
    kwargs = {"use_cache": hf_use_cache} if hf else {}

    def prepare():
        model.zero_grad(set_to_none=True)

    def run():
        model(ids, labels=ids, **kwargs).loss.backward()

    return Measurement(name, side, run, prepare)


def step_measure(name, side, model, ids, optimizer, hf: bool, grad_clip: float, bias_speed: float,
                 hf_use_cache: bool = False):
    kwargs = {"use_cache": hf_use_cache} if hf else {}
    params = [p for p in model.parameters() if p.requires_grad]
    balancer = None if hf else RouterBalancer(model, bias_speed)

    def run():
        out = model(ids, labels=ids, **kwargs)
        out.loss.backward()
        if hf:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        else:
            clip_grad_norm(params, grad_clip)  # what Levante's trainer calls
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if balancer is not None:  # part of every Levante trainer step
            balancer.observe(out.expert_load)
            balancer.step()

    return Measurement(name, side, run)


# ------------------------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", help="ModelConfig preset (default: tiny)")
    p.add_argument("--batch", type=int, default=8, help="sequences per step (default: 8)")
    p.add_argument("--seq", type=int, default=256, help="tokens per sequence (default: 256)")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds; medians over these (default: 7)")
    p.add_argument("--iters", type=int, default=3, help="timed iterations per measurement per round (default: 3)")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations per measurement first (default: 2)")
    p.add_argument("--only", choices=("levante", "hf"), default=None,
                   help="measure one side in this process (for that side's peak RSS); skips the loss check")
    p.add_argument("--optims", default="muon,adamw",
                   help="Levante optimizers for the training-step rows, comma-separated from muon,adamw "
                        "(default: both; HF always uses torch.optim.AdamW)")
    p.add_argument("--no-step", action="store_true", help="forward+backward only, no training-step rows")
    p.add_argument("--hf-experts", default=None,
                   help="transformers experts implementation (e.g. eager, grouped_mm); default: its own choice")
    p.add_argument("--hf-use-cache", action="store_true",
                   help="call HF with use_cache=True (its config default; builds a KV cache even in training). "
                        "Default: use_cache=False, as a training loop does")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--peak-seconds", type=float, default=0.5,
                   help="seconds of matmul per peak measurement, one per round (default: 0.5)")
    p.add_argument("--peak-n", type=int, default=1024, help="matmul size for the peak (default: 1024)")
    p.add_argument("--tol", type=float, default=1e-4, help="max |loss_levante - loss_hf| (default: 1e-4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="PATH", help="write the result as JSON here")
    args = p.parse_args(argv)
    args.optims = [o.strip() for o in args.optims.split(",") if o.strip()]
    bad = [o for o in args.optims if o not in ("muon", "adamw")]
    if bad:
        p.error(f"--optims: unknown optimizer(s) {bad}; choose from muon, adamw")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    rss_start = peak_rss_mib()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    sides = ["levante", "hf"] if args.only is None else [args.only]

    cfg = ModelConfig.preset(args.preset)
    if args.seq > cfg.max_position_embeddings:
        raise SystemExit(f"--seq {args.seq} exceeds max_position_embeddings {cfg.max_position_embeddings}")
    tokens_per_iter = args.batch * args.seq
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=g)
    optim_cfg = OptimConfig()

    lv = Transformer(cfg)
    n_total, n_active = lv.num_params(), lv.num_params(active=True)
    flops_per_token = model_flops_per_token(cfg, args.seq)

    result: dict = {
        "benchmark": "bench_train",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join([sys.executable, *sys.argv]),
        "preset": args.preset, "batch": args.batch, "seq": args.seq, "tokens_per_step": tokens_per_iter,
        "rounds": args.rounds, "iters": args.iters, "warmup": args.warmup, "only": args.only,
        "params_total": n_total, "params_active": n_active, "flops_per_token": flops_per_token,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu_model(),
        "cpu_count": os.cpu_count(), "python": platform.python_version(),
        "batch_tokens": "uniform random token ids (seeded)",
    }

    # ---- models (and the HF copy of Levante's weights)
    hf = None
    if "hf" in sides:
        import transformers

        hf, impl = build_hf(cfg, lv, args.hf_experts)
        result["transformers"] = transformers.__version__
        result["hf"] = {**impl, "use_cache": args.hf_use_cache,
                        "optimizer": "torch.optim.AdamW (default foreach/fused)"}
        if args.only is None:
            lv.eval()
            hf.eval()
            # Grad stays enabled on purpose: Levante's grouped-matmul probe (kernels._grouped_mm_works) runs a
            # backward on first use and caches the answer, so a first forward under no_grad would pin
            # the per-expert fallback path for the rest of the process.
            with torch.enable_grad():
                out = lv(ids, labels=ids)
                out_hf = hf(ids, labels=ids, use_cache=False)
                loss_lv, loss_hf = float(out.lm_loss), float(out_hf.loss)  # lm_loss: HF has no MTP term
                logits_diff = float((out.logits.detach() - out_hf.logits.detach()).abs().max())
                del out, out_hf
            diff = abs(loss_lv - loss_hf)
            result["loss_check"] = {"levante": loss_lv, "hf": loss_hf, "abs_diff": diff, "tol": args.tol,
                                    "logits_max_abs_diff": logits_diff}
            print(f"loss check: levante {loss_lv:.6f}  hf {loss_hf:.6f}  |diff| {diff:.2e} (tol {args.tol:g}); "
                  f"max |logits diff| {logits_diff:.2e}")
            if not diff <= args.tol:
                print("FAIL: the two models disagree on the benchmark batch; not timing.", file=sys.stderr)
                return 1
        else:
            del lv  # --only hf: Levante's model only supplied the weights
            lv = None
            gc.collect()
        print(f"transformers {transformers.__version__}: attn_implementation={impl['attn_implementation']}, "
              f"experts_implementation={impl['experts_implementation']}")

    result["rss_mib_at_start"] = round(rss_start, 1)
    result["rss_mib_after_build"] = round(peak_rss_mib(), 1)

    # ---- measurements (separate model copies per optimizer, identical initial weights)
    measures: list[Measurement] = []
    if "levante" in sides:
        lv.train()
        measures.append(fb_measure("fwd+bwd", "levante", lv, ids, hf=False))
        if not args.no_step:
            for i, name in enumerate(args.optims):
                model = lv if i == len(args.optims) - 1 else copy.deepcopy(lv)
                model.train()
                opt = build_optimizer(model, OptimConfig(name=name))
                measures.append(step_measure(f"train step ({'Muon' if name == 'muon' else 'AdamW'})",
                                             "levante", model, ids, opt, hf=False,
                                             grad_clip=optim_cfg.grad_clip,
                                             bias_speed=cfg.bias_update_speed))
    if "hf" in sides:
        hf.train()
        measures.append(fb_measure("fwd+bwd", "hf", hf, ids, hf=True, hf_use_cache=args.hf_use_cache))
        if not args.no_step:
            opt = torch.optim.AdamW(hf.parameters(), lr=optim_cfg.lr, betas=tuple(optim_cfg.betas),
                                    eps=optim_cfg.eps, weight_decay=optim_cfg.weight_decay)
            measures.append(step_measure("train step (AdamW)", "hf", hf, ids, opt, hf=True,
                                         grad_clip=optim_cfg.grad_clip, bias_speed=0.0,
                                         hf_use_cache=args.hf_use_cache))
    # Pair rows so the table reads Levante vs HF for the same measurement.
    order = {"fwd+bwd": 0, "train step (Muon)": 1, "train step (AdamW)": 2}
    measures.sort(key=lambda m: (order[m.name], m.side != "levante"))

    print(f"preset {args.preset}: {n_total / 1e6:.1f}M params ({n_active / 1e6:.1f}M active), "
          f"batch {args.batch} x seq {args.seq}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    for m in measures:
        for _ in range(args.warmup):
            if m.prepare is not None:
                m.prepare()
            m.run()
    result["rss_mib_before_timing"] = round(peak_rss_mib(), 1)

    peaks = []
    for r in range(args.rounds):
        peaks.append(measure_cpu_matmul_peak(args.peak_seconds, n=args.peak_n))
        k = r % len(measures)
        line = []
        for m in measures[k:] + measures[:k]:  # rotate the order so no side always goes first
            tps = m.time(args.iters, tokens_per_iter)
            line.append(f"{m.side}/{m.name} {tps:,.0f}")
        print(f"round {r + 1}/{args.rounds}: peak {peaks[-1] / 1e9:.1f} GFLOP/s | " + " | ".join(line),
              flush=True)

    if "levante" in sides:
        # The expert path Levante's grouped_linear took in this process (the probe's cached answer).
        from levante.model import kernels as lv_kernels

        result["levante_experts_path"] = ("grouped_mm" if lv_kernels._grouped_mm_works("cpu", torch.float32)
                                          else "per-expert loop (fallback)")
    peak = max(peaks)
    result["peak_flops"] = peak
    result["peak_flops_per_round"] = peaks
    rows = []
    for m in measures:
        med = statistics.median(m.tps)
        rows.append({
            "measurement": m.name, "side": m.side, "tokens_per_s_median": med,
            "tokens_per_s_min": min(m.tps), "tokens_per_s_max": max(m.tps), "tokens_per_s_rounds": m.tps,
            "ms_per_step_median": 1000 * tokens_per_iter / med,
            "mfu": mfu(med, flops_per_token, peak),
        })
    result["rows"] = rows
    by = {(r["measurement"], r["side"]): r["tokens_per_s_median"] for r in rows}
    ratios = {}
    for name in ("fwd+bwd", "train step (AdamW)"):
        if (name, "levante") in by and (name, "hf") in by:
            ratios[f"{name}: levante / hf"] = by[(name, "levante")] / by[(name, "hf")]
    if ("train step (Muon)", "levante") in by and ("train step (AdamW)", "hf") in by:
        ratios["train step: levante Muon / hf AdamW"] = by[("train step (Muon)", "levante")] / by[
            ("train step (AdamW)", "hf")]
    result["ratios"] = ratios
    result["peak_rss_mib"] = round(peak_rss_mib(), 1)
    result["peak_rss_note"] = ("one process, " + (f"{args.only} only" if args.only else
                                                  "both models and all optimizers together"))

    # ---- report
    print()
    print(f"### bench_train: preset `{args.preset}` ({n_total / 1e6:.1f}M params, {n_active / 1e6:.1f}M active), "
          f"batch {args.batch} x {args.seq}, {torch.get_num_threads()} threads, {cpu_model()}")
    print()
    print("| measurement | side | tokens/s (median) | min – max over rounds | ms/step | MFU |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['measurement']} | {r['side']} | {r['tokens_per_s_median']:,.0f} | "
              f"{r['tokens_per_s_min']:,.0f} – {r['tokens_per_s_max']:,.0f} | {r['ms_per_step_median']:,.0f} | "
              f"{100 * r['mfu']:.1f}% |")
    print()
    for k, v in ratios.items():
        print(f"- {k}: {v:.2f}x")
    print(f"- model FLOPs/token (train, fwd+bwd): {flops_per_token / 1e6:.1f} MFLOP; measured fp32 matmul peak "
          f"(best of {len(peaks)}, n={args.peak_n}): {peak / 1e9:.1f} GFLOP/s "
          f"(median {statistics.median(peaks) / 1e9:.1f})")
    if "levante_experts_path" in result:
        print(f"- Levante experts path: {result['levante_experts_path']}")
    if "hf" in result:
        print(f"- transformers {result['transformers']}: attn_implementation={result['hf']['attn_implementation']}, "
              f"experts_implementation={result['hf']['experts_implementation']}, "
              f"called with use_cache={result['hf']['use_cache']}")
    if "loss_check" in result:
        lc = result["loss_check"]
        print(f"- loss check on the benchmark batch: |levante - hf| = {lc['abs_diff']:.2e} (tol {lc['tol']:g}), "
              f"max |logits diff| {lc['logits_max_abs_diff']:.2e}")
    print(f"- peak RSS: {result['peak_rss_mib']:,.0f} MiB ({result['peak_rss_note']}; "
          f"{result['rss_mib_at_start']:,.0f} MiB after imports, {result['rss_mib_after_build']:,.0f} after building "
          f"the models and the loss check, {result['rss_mib_before_timing']:,.0f} after warm-up)")
    print(f"- rounds {args.rounds} x iters {args.iters} (warmup {args.warmup}); torch {torch.__version__}")

    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2, allow_nan=False, default=str)
            f.write("\n")
        print(f"- wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
