"""Inference: Levante's batching engine vs transformers' `generate`, same weights; MTP; server; cache size.

  decode/levante/bN    Engine (latent cache, absorbed attention), greedy, N prompts in one batch
  decode/hf/bN         DeepseekV3ForCausalLM.generate (its own K/V cache), greedy, same prompts
  speculative          Engine with MTP drafts vs without, batch 1 (acceptance rate, speed-up)
  server               `levante serve`'s app: 16 concurrent streaming clients vs one at a time
  cache                bytes per token of the latent cache vs a full multi-head K/V cache

Decode tokens/s counts new tokens only, over the whole generate call (prefill included, as a user
waits for it). Both sides run in one process, interleaved round by round; medians over rounds. The
weights are copied into transformers through the exporter's name mapping, and the run stops unless
both sides produce the same greedy tokens for the first prompt.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import resource
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_train import build_hf  # noqa: E402
from common import cpu_model  # noqa: E402
from levante import Transformer  # noqa: E402
from levante.config import PRESETS  # noqa: E402
from levante.infer.batch import Engine  # noqa: E402
from levante.infer.engine import SamplingParams  # noqa: E402


class IdsTokenizer:
    """Engine needs decode for text deltas; ids are what both sides are compared on."""

    eos_id = -1

    def decode(self, ids, skip_special_tokens=True):
        return ""


def levante_generate(model, prompts, n, speculative=False, engine=None):
    engine = engine or Engine(model, IdsTokenizer(), max_batch=len(prompts), max_len=len(prompts[0]) + n + 1,
                              speculative=speculative)
    t0 = time.perf_counter()
    out = engine.generate(prompts, SamplingParams(max_new_tokens=n, temperature=0, stop_at_eos=False))
    return out, time.perf_counter() - t0, engine.metrics()


@torch.no_grad()
def hf_generate(hf, prompts, n):
    ids = torch.tensor(prompts)
    t0 = time.perf_counter()
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                      do_sample=False, use_cache=True, pad_token_id=0)
    return out[:, ids.shape[1]:].tolist(), time.perf_counter() - t0


def server_throughput(model, prompts, n, clients):
    import httpx
    import uvicorn

    from levante.infer.server import create_app

    class Tok(IdsTokenizer):
        eos_id = -1

        def encode_prompt(self, text):
            raise AssertionError("prompts are sent as token ids")

    engine = Engine(model, Tok(), max_batch=clients).start()
    app = create_app(engine, "bench")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    import threading

    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}/v1/completions"

    async def one(client, p):
        body = {"prompt": p, "max_tokens": n, "temperature": 0, "stream": True}
        async with client.stream("POST", url, json=body, timeout=600) as r:
            async for _ in r.aiter_lines():
                pass

    async def concurrent():
        async with httpx.AsyncClient() as c:
            await asyncio.gather(*(one(c, p) for p in prompts[:clients]))

    async def sequential():
        async with httpx.AsyncClient() as c:
            for p in prompts[:clients]:
                await one(c, p)

    results = {}
    for name, fn in (("one at a time", sequential), (f"{clients} concurrent", concurrent)):
        t0 = time.perf_counter()
        asyncio.run(fn())
        results[name] = clients * n / (time.perf_counter() - t0)
    server.should_exit = True
    thread.join()
    engine.stop()
    return results


def weight_bytes_per_step(model, batch: int) -> int:
    """fp32 weight bytes a decode step must read: all but the embedding table (one row per token) and,
    at batch 1, all but the routed experts the token does not use (each MoE layer reads top-k)."""
    cfg = model.config
    total = sum(p.numel() for n, p in model.named_parameters() if n != "embed_tokens.weight" and "mtp." not in n)
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n and "mtp." not in n)
    used = min(batch * cfg.num_experts_per_tok, cfg.n_routed_experts) / max(cfg.n_routed_experts, 1)
    return 4 * int(total - experts * (1 - used))


def stream_bandwidth(mib: int = 64) -> dict[str, float]:
    """Bytes/s of a one-row F.linear over `mib` MiB of fp32 weights, more than the L3 cache holds: the
    rate a batch-1 decode step can read its weights at, for weights laid out [out, in] (PyTorch's
    default, what transformers runs) and transposed in memory (what the engine stores on CPU)."""
    rows = [torch.randn(8192, 256) for _ in range(mib // 8)]
    layouts = {"[out, in]": rows, "transposed": [w.t().contiguous().t() for w in rows]}
    x = torch.randn(1, 256)
    rates: dict[str, list[float]] = {}
    for _ in range(5):  # interleaved, medians: the other core's jobs share the memory bus
        for name, ws in layouts.items():
            t0, n = time.perf_counter(), 4
            for _ in range(n):
                for w in ws:
                    torch.nn.functional.linear(x, w)
            rates.setdefault(name, []).append(n * mib * 2**20 / (time.perf_counter() - t0))
    return {name: statistics.median(r) for name, r in rates.items()}


def trained_speculation(checkpoint: Path, new: int, n_prompts: int, rounds: int, compile: bool) -> dict:
    """MTP self-speculation on a trained checkpoint with an MTP module, batch 1: held-out prompts (the
    first 24 tokens of the bundled corpus's valid documents, one language after another), greedy."""
    from levante.data.readers import bundled_corpus
    from levante.infer.load import load_for_inference

    model, tok, _ = load_for_inference(checkpoint, device="cpu")
    model.requires_grad_(False)
    docs = []
    for f in bundled_corpus("valid"):
        docs += [json.loads(line)["text"] for line in f.read_text(encoding="utf-8").splitlines()[:2]]
    prompts = [tok.encode_prompt(d)[:24] for d in docs[:n_prompts]]
    max_len = 24 + new + 2
    engines = {"plain": Engine(model, tok, max_batch=1, max_len=max_len),
               "speculative": Engine(model, tok, max_batch=1, max_len=max_len, speculative=True)}
    if compile:
        engines["speculative, compiled"] = Engine(model, tok, max_batch=1, max_len=max_len, speculative=True,
                                                  compile=True)
        engines["plain, compiled"] = Engine(model, tok, max_batch=1, max_len=max_len, compile=True)
    params = SamplingParams(max_new_tokens=new, temperature=0, stop_at_eos=False)
    outputs, rates = {}, {}
    for name, eng in engines.items():  # one untimed pass each: builds compiled graphs, checks outputs
        outputs[name] = [eng.generate([p], params)[0] for p in prompts]
    if any(o != outputs["plain"] for o in outputs.values()):
        raise SystemExit("speculative output differs from plain greedy output")
    for _ in range(rounds):
        for name, eng in engines.items():
            t0 = time.perf_counter()
            for p in prompts:
                eng.generate([p], params)
            rates.setdefault(name, []).append(len(prompts) * new / (time.perf_counter() - t0))
    m = engines["speculative"].metrics()
    return {"prompts": len(prompts), "acceptance": m["accepted"] / m["drafted"],
            "tokens_per_s": {k: statistics.median(v) for k, v in rates.items()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--compile", action="store_true",
                    help="also time an Engine(compile=True), built once per batch size (build time reported)")
    ap.add_argument("--mtp-checkpoint", type=Path,
                    help="also measure MTP speculation on this trained checkpoint (it must have an MTP module)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = replace(PRESETS[args.preset], num_nextn_predict_layers=1)
    with_mtp = Transformer(cfg).eval().requires_grad_(False)
    model = Transformer(replace(cfg, num_nextn_predict_layers=0)).eval().requires_grad_(False)
    model.load_state_dict({k: v for k, v in with_mtp.state_dict().items() if not k.startswith("mtp.")})
    hf, impl = build_hf(model.config, model)
    hf.eval()
    batches = [int(b) for b in args.batches.split(",")]
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(3, cfg.vocab_size, (max(batches), args.prompt_len), generator=g).tolist()

    lv1, _, _ = levante_generate(model, prompts[:1], args.new)
    hf1, _ = hf_generate(hf, prompts[:1], args.new)
    same = sum(a == b for a, b in zip(lv1[0], hf1[0], strict=True))
    if lv1[0][:8] != hf1[0][:8]:
        raise SystemExit(f"greedy tokens differ between Levante and transformers: {lv1[0][:8]} vs {hf1[0][:8]}")

    compiled, build_s = {}, {}
    if args.compile:  # built and checked outside the timed rounds; an engine is reused, not rebuilt
        for b in batches:
            compiled[b] = Engine(model, IdsTokenizer(), max_batch=b, max_len=args.prompt_len + args.new + 1,
                                 compile=True)
            t0 = time.perf_counter()
            out, _, _ = levante_generate(model, prompts[:b], args.new, engine=compiled[b])
            build_s[b] = time.perf_counter() - t0
            if out != levante_generate(model, prompts[:b], args.new)[0]:
                raise SystemExit(f"compiled engine's greedy tokens differ from eager at batch {b}")
    times: dict[str, list[float]] = {}
    accept = []
    for _ in range(args.rounds):
        for b in batches:
            n_tok = b * args.new
            _, t, _ = levante_generate(model, prompts[:b], args.new)
            times.setdefault(f"levante b{b}", []).append(n_tok / t)
            _, t = hf_generate(hf, prompts[:b], args.new)
            times.setdefault(f"hf b{b}", []).append(n_tok / t)
            if b in compiled:
                _, t, _ = levante_generate(model, prompts[:b], args.new, engine=compiled[b])
                times.setdefault(f"levante compiled b{b}", []).append(n_tok / t)
        _, t, m = levante_generate(with_mtp, prompts[:1], args.new, speculative=True)
        times.setdefault("levante b1 speculative", []).append(args.new / t)
        accept.append(m["acceptance_rate"])

    bandwidth = stream_bandwidth()
    srv = server_throughput(model, prompts * 2, args.new, clients=16) if max(batches) >= 16 else {}
    elem = torch.finfo(torch.float32).bits // 8
    latent = cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * elem
    full = cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * elem
    med = {k: statistics.median(v) for k, v in times.items()}

    print(f"# inference, preset {args.preset} ({model.num_params():,} params), prompt {args.prompt_len}, "
          f"{args.new} new tokens, {args.rounds} rounds, {args.threads} threads")
    print(f"transformers {impl}; greedy tokens equal for prompt 0: {same}/{args.new}\n")
    print("| measurement | Levante tokens/s | transformers tokens/s | ratio |\n|---|---:|---:|---:|")
    for b in batches:
        lv, h = med[f"levante b{b}"], med[f"hf b{b}"]
        print(f"| decode, batch {b} | {lv:,.0f} | {h:,.0f} | {lv / h:.2f}x |")
        if b in compiled:
            lc = med[f"levante compiled b{b}"]
            print(f"| decode, batch {b}, Engine(compile=True) (built in {build_s[b]:.0f} s) "
                  f"| {lc:,.0f} | {h:,.0f} | {lc / h:.2f}x |")
    print("\nmemory floor: a one-row linear over 64 MiB of weights streams at " + ", ".join(
        f"{v / 1e9:.1f} GB/s {k}" for k, v in bandwidth.items()) + " (this run)")
    need_bytes = {b: weight_bytes_per_step(model, b) for b in batches}
    for b, need in need_bytes.items():
        floor = b * max(bandwidth.values()) / need
        print(f"  batch {b}: {need / 2**20:.1f} MiB of weights per step -> at most {floor:,.0f} tokens/s, "
              f"{floor / med[f'hf b{b}']:.2f}x transformers")
    spec = med["levante b1 speculative"]
    print(f"\nMTP speculative, batch 1: {spec:,.0f} tokens/s vs {med['levante b1']:,.0f} plain "
          f"({spec / med['levante b1']:.2f}x), acceptance {statistics.median(accept):.1%} (random weights)")
    for k, v in srv.items():
        print(f"server, {k}: {v:,.0f} tokens/s")
    trained = {}
    if args.mtp_checkpoint:
        trained = trained_speculation(args.mtp_checkpoint, args.new, 24, args.rounds, args.compile)
        print(f"trained MTP ({args.mtp_checkpoint}), batch 1, {trained['prompts']} held-out prompts: acceptance "
              f"{trained['acceptance']:.1%}; tokens/s " + ", ".join(
                  f"{k} {v:,.0f}" for k, v in trained["tokens_per_s"].items()))
    print(f"cache bytes per token (fp32): latent {latent:,} vs full multi-head K/V {full:,} ({full / latent:.1f}x)")
    # One process holds both models, both sides' caches and the compiled graphs: a shared peak.
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS of the process (both sides together): {peak_rss:,.0f} MiB")
    if args.json:
        args.json.write_text(json.dumps({
            "date": datetime.datetime.now(datetime.UTC).isoformat(), "torch": torch.__version__,
            "cpu": cpu_model(), "argv": sys.argv, "tokens_per_s": times, "acceptance": accept, "server": srv,
            "cache_bytes_per_token": {"latent": latent, "full": full}, "hf_impl": impl,
            "compile_build_s": build_s, "peak_rss_mib": peak_rss, "trained_mtp": trained,
            "stream_bytes_per_s": bandwidth,
            "weight_bytes_per_step": need_bytes}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
