"""SFT: chat data checks, packing, loss only on assistant tokens, and a resumable run through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tomli_w
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from levante import ModelConfig, Transformer
from levante.data.chat_data import (
    ChatLoader,
    conversation_targets,
    pack_conversations,
    read_conversations,
    read_pairs,
)
from levante.errors import LevanteError
from levante.model.transformer import IGNORE_INDEX
from levante.tokenizer import LevanteTokenizer
from levante.tokenizer.chat import chat_segments
from test_parallel import EXACT_OPTIM, RTOL, steps_of, torchrun

GOOD = [
    {"lang": "en", "messages": [{"role": "user", "content": "Hello!"},
                                {"role": "assistant", "content": "Hello, how can I help?"}]},
    {"lang": "de", "messages": [{"role": "system", "content": "Sei kurz."},
                                {"role": "user", "content": "Wie viele Wörter: eins zwei drei"},
                                {"role": "assistant", "content": "3"},
                                {"role": "user", "content": "Und jetzt: rot grün"},
                                {"role": "assistant", "content": "2"}]},
    {"lang": "fr", "messages": [{"role": "user", "content": "Répète : bonjour le monde"},
                                {"role": "assistant", "content": "bonjour le monde"}]},
]


def write_jsonl(path: Path, records: list) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def conversations(n: int) -> list[dict]:
    langs = ["en", "de", "fr"]
    return [{"lang": langs[i % 3], "messages": [
        {"role": "user", "content": f"Count the words: {' '.join(['la'] * (1 + i % 4))}"},
        {"role": "assistant", "content": str(1 + i % 4)}]} for i in range(n)]


@pytest.fixture(scope="module")
def tok(tiny_workspace) -> LevanteTokenizer:
    return LevanteTokenizer(tiny_workspace.tokenizer)


def test_bad_chat_records_are_counted_per_reason(tmp_path, tok):
    long_text = "word " * 400
    bad = [
        "{not json",
        "[1, 2]",
        {"messages": "hi"},
        {"messages": [{"role": "robot", "content": "beep"}, {"role": "assistant", "content": "x"}]},
        {"messages": [{"role": "user", "content": "no answer"}]},
        {"messages": [{"role": "assistant", "content": "answer first"}, {"role": "user", "content": "x"}]},
        {"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "x"}]},
        {"messages": [{"role": "user", "content": long_text}, {"role": "assistant", "content": "x"}]},
    ]
    convs, report = read_conversations(write_jsonl(tmp_path / "c.jsonl", GOOD + bad), tok, seq_len=128)
    assert len(convs) == report.kept == 3
    assert report.records_in == 11
    assert report.rejected == {"not_json": 1, "not_an_object": 1, "bad_messages": 1, "wrong_roles": 3,
                               "empty_turn": 1, "too_long": 1}
    assert [c.lang for c in convs] == ["en", "de", "fr"]
    with pytest.raises(LevanteError, match="no usable chat records"):
        read_conversations(write_jsonl(tmp_path / "bad.jsonl", bad), tok, seq_len=128)


def test_bad_preference_records_are_counted_per_reason(tmp_path, tok):
    prompt = [{"role": "user", "content": "Say hello in German."}]
    records = [
        {"prompt": prompt, "chosen": "Hallo!", "rejected": "Hello!", "lang": "de"},
        {"prompt": prompt, "chosen": {"role": "assistant", "content": "Hallo!"}, "rejected": "Hal"},
        {"prompt": prompt, "chosen": "", "rejected": "x"},
        {"prompt": prompt + [{"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b"},
        {"prompt": prompt, "chosen": 3, "rejected": "b"},
        {"prompt": prompt, "chosen": "w " * 300, "rejected": "b"},
        "oops",
    ]
    pairs, report = read_pairs(write_jsonl(tmp_path / "p.jsonl", records), tok, seq_len=64)
    assert len(pairs) == 2 and pairs[1].lang == "und"
    assert report.rejected == {"empty_turn": 1, "wrong_roles": 1, "bad_messages": 1, "too_long": 1,
                               "not_json": 1}
    assert pairs[0].chosen == tok.encode("Hallo!") + [tok.end_id]


def test_packing_trains_exactly_the_assistant_tokens(tmp_path, tok):
    convs, _ = read_conversations(write_jsonl(tmp_path / "c.jsonl", GOOD * 4), tok, seq_len=64)
    rows = pack_conversations(convs, 64, tok.pad_id, seed=0)
    assert rows.inputs.shape[1] == 64
    trained = {}
    for r in range(rows.inputs.shape[0]):
        for d in rows.document_ids[r].unique().tolist():
            pos = (rows.document_ids[r] == d).nonzero().flatten()
            ids = rows.inputs[r, pos].tolist()
            if ids[0] != tok.bos_id:  # the padding document
                assert set(ids) == {tok.pad_id} and (rows.targets[r, pos] == IGNORE_INDEX).all()
                continue
            conv = next(c for c in convs if c.ids == ids)
            # oracle from the chat format itself: the next token is an assistant text/<|end|> token
            flags = [a for piece, is_answer in chat_segments(tok, GOOD[[g["lang"] for g in GOOD].index(conv.lang)]
                                                             ["messages"]) for a in [is_answer] * len(piece)]
            expect = [ids[t + 1] if flags[t + 1] else IGNORE_INDEX for t in range(len(ids) - 1)] + [IGNORE_INDEX]
            assert rows.targets[r, pos].tolist() == expect
            trained[conv.lang] = trained.get(conv.lang, 0) + 1
    assert trained == {"en": 4, "de": 4, "fr": 4}  # every conversation packed exactly once
    ends = (rows.targets == tok.end_id).sum()
    assert int(ends) == 4 * (1 + 2 + 1)  # every answer's <|end|> is trained


def _sft_loss(model, ids, targets):
    out = model(ids[None], targets=torch.tensor(targets)[None], document_ids=torch.zeros(1, len(ids), dtype=torch.long))
    return out.lm_loss


def test_user_labels_never_change_the_loss_assistant_labels_do(tok):
    conv = GOOD[1]["messages"]
    ids, answer = [], []
    for piece, is_answer in chat_segments(tok, conv):
        ids += piece
        answer += [is_answer] * len(piece)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=2, kv_lora_rank=16,
                                    qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=0,
                                    max_position_embeddings=64)).eval()
    x = torch.tensor(ids)
    base = _sft_loss(model, x, conversation_targets(ids, answer))
    # independent oracle: mean CE of the next token over positions whose next token is an answer token
    logits = model(x[None]).logits[0]
    pos = [t for t in range(len(ids) - 1) if answer[t + 1]]
    oracle = F.cross_entropy(logits[pos], x[[t + 1 for t in pos]])
    torch.testing.assert_close(base, oracle, atol=1e-6, rtol=0)
    user_positions = [t for t in range(len(ids)) if not answer[t] and t > 0]
    for t in user_positions:  # any other identity of a context token as a label: same loss
        changed = list(ids)
        changed[t] = (ids[t] + 5) % tok.vocab_size
        assert torch.equal(_sft_loss(model, x, conversation_targets(changed, answer)), base)
    t = answer.index(True)  # the first assistant token as a label
    changed = list(ids)
    changed[t] = (ids[t] + 5) % tok.vocab_size
    assert not torch.equal(_sft_loss(model, x, conversation_targets(changed, answer)), base)


def test_chat_loader_resumes_exactly(tmp_path, tok):
    convs, _ = read_conversations(write_jsonl(tmp_path / "c.jsonl", conversations(30)), tok, seq_len=48)
    rows = pack_conversations(convs, 48, tok.pad_id, seed=3)
    a = ChatLoader(rows, 3, seed=3)
    seen = [a.next_batch() for _ in range(7)]
    b = ChatLoader(rows, 3, seed=3)
    for _ in range(4):
        b.next_batch()
    c = ChatLoader(rows, 3, seed=3)
    c.load_state_dict(b.state_dict())
    for want in seen[4:]:
        got = c.next_batch()
        assert all(torch.equal(x, y) for x, y in zip(want, got, strict=True))


# ------------------------------------------------------------------------------------- through the CLI


def _sft_config(ws, base_run: Path, data: Path, steps: int) -> dict:
    cfg = ws.config_dict(run={"steps": steps, "ckpt_every": 2, "eval_every": 2},
                         schedule={"name": "constant", "warmup_steps": 1})
    del cfg["model"]
    cfg["data"] = {"train": str(data / "train.jsonl"), "valid": str(data / "valid.jsonl"), "seq_len": 64}
    cfg["task"] = {"kind": "sft", "init_from": str(base_run)}
    return cfg


@pytest.fixture(scope="module")
def base_run(tiny_workspace, run_levante, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sft_base")
    config = tiny_workspace.write_config(root / "pre.toml", run={"steps": 2, "ckpt_every": 2})
    r = run_levante("train", config, "--out", root / "run")
    assert r.returncode == 0, r.stderr
    return root / "run"


@pytest.fixture(scope="module")
def sft_runs(tiny_workspace, base_run, run_levante, tmp_path_factory) -> Path:
    """Run a: 4 SFT steps in one go. Run b: 2 steps, refused restart, then --resume to 4."""
    tmp_path = tmp_path_factory.mktemp("sft_runs")
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "train.jsonl", conversations(24) + ["not json"])
    write_jsonl(data / "valid.jsonl", conversations(6))
    full, part = tmp_path / "full.toml", tmp_path / "part.toml"
    full.write_text(tomli_w.dumps(_sft_config(tiny_workspace, base_run, data, 4)), encoding="utf-8")
    part.write_text(tomli_w.dumps(_sft_config(tiny_workspace, base_run, data, 2)), encoding="utf-8")
    r = run_levante("train", full, "--out", tmp_path / "a")
    assert r.returncode == 0, r.stderr
    assert "answer loss" in r.stdout
    assert run_levante("train", part, "--out", tmp_path / "b").returncode == 0
    r = run_levante("train", full, "--out", tmp_path / "b")  # an existing run is never restarted over
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error:") and "holds a run" in r.stderr
    r = run_levante("train", full, "--out", tmp_path / "b", "--resume")
    assert r.returncode == 0, r.stderr
    return tmp_path


def test_sft_run_through_the_cli_resumes_bit_for_bit(sft_runs, base_run):
    report = json.loads((sft_runs / "a" / "data_report.json").read_text())
    assert report["train"]["rejected"] == {"not_json": 1} and report["train"]["kept"] == 24
    evals = [json.loads(x) for x in (sft_runs / "a" / "metrics.jsonl").read_text().splitlines()]
    evals = [e["eval"] for e in evals if "eval" in e]
    assert evals and set(evals[-1]["per_language"]) == {"en", "de", "fr"}
    wa = load_file(sft_runs / "a" / "checkpoints" / "step_00000004" / "model.safetensors")
    wb = load_file(sft_runs / "b" / "checkpoints" / "step_00000004" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    w0 = load_file(next((base_run / "checkpoints").iterdir()) / "model.safetensors")
    assert any(not torch.equal(w0[k], wa[k]) for k in wa)  # SFT did train


def test_sft_export_answers_the_same_in_transformers(sft_runs, tmp_path):
    """HF export: apply_chat_template + greedy generate gives levante's greedy answer, stopping at <|end|>."""
    transformers = pytest.importorskip("transformers")
    from levante.infer.engine import SamplingParams, generate_ids
    from levante.infer.load import load_for_inference
    from levante.interop.hf import export_hf
    from levante.tokenizer.chat import render_chat

    model, tok, _ = load_for_inference(sft_runs / "a", device="cpu")
    out = export_hf(sft_runs / "a", tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    produced = 0
    for messages in (GOOD[0]["messages"][:1], GOOD[1]["messages"][:4], [{"role": "user", "content": "Zähle: a b"}]):
        ids = render_chat(tok, messages)
        enc = hf_tok.apply_chat_template(messages, add_generation_prompt=True)
        assert (enc["input_ids"] if hasattr(enc, "keys") else enc) == ids
        new = min(12, model.config.max_position_embeddings - len(ids))  # the test model's context is 64
        assert new >= 4, len(ids)
        ours = list(generate_ids(model, ids, SamplingParams(max_new_tokens=new, temperature=0), eos_id=tok.end_id))
        with torch.no_grad():
            gen = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                    max_new_tokens=new, do_sample=False, pad_token_id=tok.pad_id)
        if tok.eos_id in ours:  # transformers stops at either end token (generation_config eos ids)
            ours = ours[: ours.index(tok.eos_id)]
        theirs = gen[0, len(ids):].tolist()
        if theirs and theirs[-1] in (tok.end_id, tok.eos_id):
            theirs = theirs[:-1]
        assert theirs == ours
        produced += len(ours)
    assert produced > 0  # the comparison saw real answer tokens


@pytest.fixture(scope="module")
def global_batch_runs(tiny_workspace, base_run, run_levante, tmp_path_factory) -> tuple[Path, dict]:
    """Data whose packed rows hold different numbers of answer tokens, and the reference: one process,
    the whole global batch of 4 rows in one micro-batch."""
    tmp_path = tmp_path_factory.mktemp("sft_global")
    data = tmp_path / "data"
    data.mkdir()
    long = [{"lang": "en", "messages": [{"role": "user", "content": "Say it all."},
                                        {"role": "assistant", "content": " ".join(["la"] * (2 + 3 * i))}]}
            for i in range(8)]
    write_jsonl(data / "train.jsonl", conversations(8) + long)
    write_jsonl(data / "valid.jsonl", conversations(3))
    cfg = _sft_config(tiny_workspace, base_run, data, 2)
    cfg["data"]["seq_len"] = 32  # short rows: a few conversations each, different answer lengths
    cfg["run"].update(ckpt_every=2, eval_every=0, micro_batch_size=4, grad_accum=1)
    cfg["optim"] = {**cfg.get("optim", {}), **EXACT_OPTIM}  # see test_parallel.py
    path = tmp_path / "whole.toml"
    path.write_text(tomli_w.dumps(cfg), encoding="utf-8")
    r = run_levante("train", path, "--out", tmp_path / "whole")
    assert r.returncode == 0, r.stderr
    return tmp_path, cfg


def _step2_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / "step_00000002" / "model.safetensors")


def _assert_same_training(ref: Path, got: Path, got_weights: dict[str, torch.Tensor]) -> None:
    a, b = steps_of(ref), steps_of(got)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2]
    for r1, r2 in zip(a, b, strict=True):
        for key in ("loss", "lm_loss", "grad_norm"):
            assert r2[key] == pytest.approx(r1[key], rel=RTOL), (r1["step"], key)
    wa, wb = _step2_weights(ref), got_weights
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=RTOL, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_sft_loss_is_the_mean_over_the_global_batch_not_of_micro_batch_means(global_batch_runs, run_levante):
    """Two micro-batches of 2 rows train what one micro-batch of the same 4 rows trains."""
    root, cfg = global_batch_runs
    cfg = {**cfg, "run": {**cfg["run"], "micro_batch_size": 2, "grad_accum": 2}}
    path = root / "accum.toml"
    path.write_text(tomli_w.dumps(cfg), encoding="utf-8")
    r = run_levante("train", path, "--out", root / "accum")
    assert r.returncode == 0, r.stderr
    _assert_same_training(root / "whole", root / "accum", _step2_weights(root / "accum"))


def test_sft_on_two_ranks_trains_what_one_rank_trains(global_batch_runs, run_levante):
    """torchrun (gloo, CPU): 2 ranks x 2 rows against 1 process x 4 rows, the same global batch."""
    root, cfg = global_batch_runs
    cfg = {**cfg, "run": {**cfg["run"], "micro_batch_size": 2}}
    path = root / "two.toml"
    path.write_text(tomli_w.dumps(cfg), encoding="utf-8")
    r = torchrun(2, "train", path, "--out", root / "two", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_levante("checkpoint", "consolidate", root / "two", root / "two_c")
    assert r.returncode == 0, r.stderr
    _assert_same_training(root / "whole", root / "two", load_file(root / "two_c" / "model.safetensors"))


def test_bundled_post_training_set_is_clean_and_multilingual(tok):
    from levante.data.chat_data import bundled_post_corpus

    for split in ("train", "valid"):
        convs, report = read_conversations(bundled_post_corpus("chat", split), tok, seq_len=256)
        assert report.rejected == {} and len({c.lang for c in convs}) >= 8
        pairs, preport = read_pairs(bundled_post_corpus("prefs", split), tok, seq_len=256)
        assert preport.rejected == {} and len({p.lang for p in pairs}) >= 8
        assert all(p.chosen != p.rejected for p in pairs)
    train = {json.dumps(json.loads(x)["messages"]) for x in bundled_post_corpus("chat", "train").open()}
    valid = [json.dumps(json.loads(x)["messages"]) for x in bundled_post_corpus("chat", "valid").open()]
    held_out = [v for v in valid if v not in train]
    assert len(held_out) >= 0.7 * len(valid)  # greetings repeat by design; the rest is held out


def test_language_guesser_tells_the_bundled_languages_apart():
    from levante.chat_eval import LanguageGuesser
    from levante.data.chat_data import bundled_post_corpus

    records = [json.loads(x) for x in bundled_post_corpus("chat", "valid").open()]
    langs = sorted({r["lang"] for r in records})
    guesser = LanguageGuesser(langs)
    answers = [(r["lang"], r["messages"][-1]["content"]) for r in records if r["task"] in ("greeting", "count")]
    right = sum(guesser.guess(text) == lang for lang, text in answers)
    assert right >= 0.9 * len(answers)
    assert guesser.guess("   ") is None


def test_chat_section_shows_every_model_side_by_side():
    from levante.report import chat_section

    chat = {"prompts": [{"lang": "de", "user": "Hallo!"}, {"lang": "en", "user": "Hi <b>"}],
            "models": {name: {"end_of_turn_rate": r, "same_language_rate": r, "preference_accuracy": r,
                              "answers": [f"{name} a", f"{name} b"]} for name, r in (("base", 0.0), ("sft", 1.0))},
            "dpo_eval": {"reward_accuracy": 0.75, "reward_margin": 0.5, "pairs": 4}, "steps": {"sft": 3, "dpo": 2}}
    page = chat_section(chat)
    assert "Hi &lt;b&gt;" in page and "sft b" in page and "base a" in page and "75%" in page
