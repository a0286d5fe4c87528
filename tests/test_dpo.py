"""DPO: the loss and its gradient against the paper's formulas (Rafailov et al. 2023), answer log-probs
against a per-token loop, and a short DPO run through the CLI with a frozen reference."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import tomli_w
import torch
from safetensors.torch import load_file

from levante import ModelConfig, Transformer
from levante.data.chat_data import Pair, pair_batch
from levante.train.dpo import answer_logps, dpo_loss
from test_parallel import EXACT_OPTIM, RTOL, steps_of, torchrun_script


def paper_loss(pw, pl, rw, rl, beta):
    """Eq. 7: -E log sigma(beta log pi(yw)/pi_ref(yw) - beta log pi(yl)/pi_ref(yl)), in float64 loops."""
    total = 0.0
    for a, b, c, d in zip(pw.tolist(), pl.tolist(), rw.tolist(), rl.tolist(), strict=True):
        z = beta * (a - c) - beta * (b - d)
        total += -math.log(1.0 / (1.0 + math.exp(-z)))
    return total / len(pw)


def paper_gradient(pw, pl, rw, rl, beta):
    """§4 'What does the DPO update do?': grad = -beta E[sigma(r(yl) - r(yw)) (grad log pi(yw) - grad log pi(yl))],
    so d/d log pi(yw) = -beta sigma(r_l - r_w) / N and d/d log pi(yl) = +beta sigma(r_l - r_w) / N."""
    n = len(pw)
    gw, gl = [], []
    for a, b, c, d in zip(pw.tolist(), pl.tolist(), rw.tolist(), rl.tolist(), strict=True):
        s = 1.0 / (1.0 + math.exp(-(beta * (b - d) - beta * (a - c))))
        gw.append(-beta * s / n)
        gl.append(beta * s / n)
    return torch.tensor(gw, dtype=torch.float64), torch.tensor(gl, dtype=torch.float64)


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_dpo_loss_and_gradient_equal_the_paper(beta):
    g = torch.Generator().manual_seed(int(beta * 10))
    pw, pl, rw, rl = (-30 * torch.rand(16, generator=g, dtype=torch.float64) for _ in range(4))
    pw.requires_grad_(True)
    pl.requires_grad_(True)
    loss, margin = dpo_loss(pw, pl, rw, rl, beta)
    loss.backward()
    assert math.isclose(float(loss.detach()), paper_loss(pw.detach(), pl.detach(), rw, rl, beta), rel_tol=1e-12)
    want_w, want_l = paper_gradient(pw.detach(), pl.detach(), rw, rl, beta)
    torch.testing.assert_close(pw.grad, want_w, atol=1e-14, rtol=1e-10)
    torch.testing.assert_close(pl.grad, want_l, atol=1e-14, rtol=1e-10)
    torch.testing.assert_close(margin.detach(), beta * ((pw - rw) - (pl - rl)).detach())


def test_answer_logps_sum_the_answer_tokens_only():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=2, kv_lora_rank=16, qk_nope_head_dim=8,
                                    qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=0,
                                    max_position_embeddings=64)).eval()
    pairs = [Pair([0, 4, 11, 12, 5], [20, 21, 6], [22, 6], "en"), Pair([0, 4, 13, 5], [23, 6], [24, 25, 26, 6], "de")]
    ids, answer = pair_batch(pairs, pad_id=2)
    with torch.no_grad():
        got = answer_logps(model(ids).logits, ids, answer)
        rows = [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]
        for r, (prompt, ans) in enumerate(rows):  # each row alone, unpadded, one token at a time
            seq = torch.tensor(prompt + ans)[None]
            logp = torch.log_softmax(model(seq).logits[0].double(), -1)
            want = sum(float(logp[len(prompt) + j - 1, tok]) for j, tok in enumerate(ans))
            assert math.isclose(float(got[r]), want, abs_tol=1e-4)


# ------------------------------------------------------------------------------------- through the CLI


def _pairs(n: int) -> list[dict]:
    out = []
    for i in range(n):
        words = " ".join(["la"] * (1 + i % 4))
        out.append({"lang": "en", "prompt": [{"role": "user", "content": f"Repeat: {words}"}],
                    "chosen": words, "rejected": "no" if i % 2 else "Hallo Welt, ich bin hier"})
    return out


@pytest.fixture(scope="module")
def base_run(tiny_workspace, run_levante, tmp_path_factory) -> Path:
    """A 2-step pretraining run: the policy's start and the frozen reference."""
    root = tmp_path_factory.mktemp("dpo_base")
    config = tiny_workspace.write_config(root / "pre.toml", run={"steps": 2, "ckpt_every": 2})
    assert run_levante("train", config, "--out", root / "base").returncode == 0
    return root / "base"


def test_dpo_run_through_the_cli(tiny_workspace, run_levante, tmp_path, base_run):
    for split, n in (("train", 16), ("valid", 8)):
        (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps(p) for p in _pairs(n)) + "\n")
    cfg = tiny_workspace.config_dict(run={"steps": 6, "ckpt_every": 0, "eval_every": 3, "micro_batch_size": 4},
                                     optim={"lr": 1e-2, "muon_lr": 0.05})
    del cfg["model"]
    cfg["data"] = {"train": str(tmp_path / "train.jsonl"), "valid": str(tmp_path / "valid.jsonl"), "seq_len": 48}
    cfg["task"] = {"kind": "dpo", "init_from": str(base_run), "beta": 0.5}
    (tmp_path / "dpo.toml").write_text(tomli_w.dumps(cfg))
    r = run_levante("train", tmp_path / "dpo.toml", "--out", tmp_path / "dpo")
    assert r.returncode == 0, r.stderr
    assert "reward margin" in r.stdout
    evals = [json.loads(x)["eval"] for x in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()
             if "eval" in json.loads(x)]
    assert len(evals) == 2 and all(e["pairs"] == 8 for e in evals)
    # The policy moved away from the frozen reference in the direction of the chosen answers.
    assert evals[-1]["reward_margin"] > 0 and evals[-1]["reward_accuracy"] > 0.5
    ckpt = next(Path(tmp_path / "dpo" / "checkpoints").iterdir())
    base = next(Path(base_run / "checkpoints").iterdir())
    assert load_file(ckpt / "model.safetensors").keys() == load_file(base / "model.safetensors").keys()


def test_dpo_on_two_ranks_trains_what_one_rank_trains_with_the_reference_sharded(tiny_workspace, run_levante,
                                                                                   tmp_path, base_run):
    """torchrun (gloo, CPU), 2 ranks x 2 pairs against 1 process x 4 pairs: the same losses and weights,
    and each rank holds about half of the frozen reference, not a full copy."""
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(p) for p in _pairs(16)) + "\n")
    cfg = tiny_workspace.config_dict(run={"steps": 2, "ckpt_every": 2, "eval_every": 0, "micro_batch_size": 4},
                                     optim={"lr": 1e-2, "muon_lr": 0.05, **EXACT_OPTIM})
    del cfg["model"]
    cfg["data"] = {"train": str(tmp_path / "train.jsonl"), "seq_len": 48}
    cfg["task"] = {"kind": "dpo", "init_from": str(base_run), "beta": 0.5}
    (tmp_path / "one.toml").write_text(tomli_w.dumps(cfg))
    assert run_levante("train", tmp_path / "one.toml", "--out", tmp_path / "one").returncode == 0
    cfg["run"]["micro_batch_size"] = 2
    (tmp_path / "two.toml").write_text(tomli_w.dumps(cfg))
    worker = Path(__file__).parent / "parallel_dpo_worker.py"
    r = torchrun_script(2, worker, tmp_path / "two.toml", tmp_path / "two", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    for a, b in zip(steps_of(tmp_path / "one"), steps_of(tmp_path / "two"), strict=True):
        for key in ("loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=RTOL), (a["step"], key)
    assert run_levante("checkpoint", "consolidate", tmp_path / "two", tmp_path / "two_c").returncode == 0
    w1 = load_file(next((tmp_path / "one" / "checkpoints").iterdir()) / "model.safetensors")
    w2 = load_file(tmp_path / "two_c" / "model.safetensors")
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=RTOL, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    for rank in (0, 1):
        ref = json.loads((tmp_path / "two" / f"ref_rank{rank}.json").read_text())
        assert 0.4 < ref["held"] / ref["total"] < 0.6, ref


def test_dpo_without_a_reference_is_refused(tiny_workspace, run_levante, tmp_path):
    cfg = tiny_workspace.config_dict()
    cfg["task"] = {"kind": "dpo"}
    (tmp_path / "c.toml").write_text(tomli_w.dumps(cfg))
    r = run_levante("train", tmp_path / "c.toml", "--out", tmp_path / "o")
    assert r.returncode == 2 and r.stderr.startswith("error:") and "init_from" in r.stderr
