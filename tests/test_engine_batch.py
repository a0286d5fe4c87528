"""The continuous-batching engine against plain full forwards: batching, joining, speculation, text."""

from dataclasses import replace

import pytest
import torch

from levante import ModelConfig, Transformer
from levante.errors import LevanteError
from levante.infer.batch import Engine, apply_repetition_penalty
from levante.infer.cpu import PackedLinear
from levante.infer.engine import SamplingParams
from levante.model.attention import LatentCache
from levante.model.kernels import grouped_linear

GREEDY = SamplingParams(max_new_tokens=10, temperature=0, stop_at_eos=False)


class LetterTokenizer:
    """Token i decodes to one letter (ids past 'z' wrap): enough to test text handling."""

    eos_id = 1

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + i % 26) for i in ids)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, q_lora_rank=16,
                      kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=4,
                      num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=16, intermediate_size=32,
                      first_k_dense_replace=1, num_nextn_predict_layers=1, max_position_embeddings=64)
    m = Transformer(cfg).eval().requires_grad_(False)
    m.init_weights(std=0.2)  # peaked logits: greedy ties (which would make argmax comparisons flaky) are unlikely
    return m


PROMPTS = [[3, 17, 5], [8], [40, 2, 9, 11, 30, 7, 21], [5, 5, 6, 60], [12, 13]]


def full_forward_greedy(model, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def test_batched_greedy_equals_alone_equals_full_forward(model):
    oracle = [full_forward_greedy(model, p, GREEDY.max_new_tokens) for p in PROMPTS]
    alone = [Engine(model, LetterTokenizer(), max_batch=1).generate([p], GREEDY)[0] for p in PROMPTS]
    # 3 slots for 5 prompts: two requests wait, then take the slots of the first to finish
    batched = Engine(model, LetterTokenizer(), max_batch=3).generate(PROMPTS, GREEDY)
    assert alone == oracle
    assert batched == oracle


def test_cpu_engine_stores_linear_weights_transposed_with_the_same_values_and_ties(model):
    torch.manual_seed(0)
    m = Transformer(replace(model.config, tie_word_embeddings=True)).eval().requires_grad_(False)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    head = m.lm_head.weight
    out = Engine(m, LetterTokenizer(), max_batch=1).generate([PROMPTS[0]], GREEDY)[0]
    linears = [mod for mod in m.modules() if isinstance(mod, torch.nn.Linear)]
    assert linears and all(mod.weight.stride() == (1, mod.weight.shape[0]) for mod in linears)
    assert m.lm_head.weight is head and m.embed_tokens.weight is head
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert out == full_forward_greedy(m, PROMPTS[0], GREEDY.max_new_tokens)


@pytest.mark.skipif(not PackedLinear.available(torch.zeros(1)), reason="this torch build has no oneDNN")
def test_packed_head_equals_the_linear_it_replaces(model):
    w = torch.randn(300, 40).t().contiguous().t()  # the engine's CPU layout
    for rows in (1, 2, 16):
        x = torch.randn(rows, 1, 40)
        torch.testing.assert_close(PackedLinear(w, rows_hint=4)(x), torch.nn.functional.linear(x, w))
    engine = Engine(model, LetterTokenizer(), max_batch=2)
    assert isinstance(engine._head, PackedLinear) and engine._head.weight is model.lm_head.weight


def test_joining_a_running_batch_changes_no_output(model):
    engine = Engine(model, LetterTokenizer(), max_batch=4)
    first = engine.submit(PROMPTS[2], SamplingParams(max_new_tokens=16, temperature=0, stop_at_eos=False))
    for _ in range(5):
        engine.step()
    assert len(first.output_ids) == 6  # the first step prefills and decodes
    late = [engine.submit(p, GREEDY) for p in PROMPTS[:2]]
    for r in [first, *late]:
        r.result()
    assert first.output_ids == full_forward_greedy(model, PROMPTS[2], 16)
    assert [r.output_ids for r in late] == [full_forward_greedy(model, p, 10) for p in PROMPTS[:2]]


@pytest.mark.parametrize("speculative", [False, True])
def test_rows_moved_to_the_front_keep_their_output(model, monkeypatch, speculative):
    """A request that finishes early leaves a hole at the front of the cache; a later row moves into it
    (the decode step reads rows 0..B-1 in place) and carries on exactly as it would have."""
    moves = []
    move = LatentCache.move
    monkeypatch.setattr(LatentCache, "move", lambda self, *a: (moves.append(a), move(self, *a)))
    lengths = [3, 14, 9, 12, 5]
    engine = Engine(model, LetterTokenizer(), max_batch=5, speculative=speculative)
    cases = list(zip(PROMPTS, lengths, strict=True))
    reqs = [engine.submit(p, SamplingParams(max_new_tokens=n, temperature=0, stop_at_eos=False)) for p, n in cases]
    for r in reqs:
        r.result()
    assert moves and all(dst < src for src, dst, _ in moves)
    assert [r.output_ids for r in reqs] == [full_forward_greedy(model, p, n) for p, n in cases]


def test_speculative_equals_greedy_and_reports_acceptance(model):
    params = SamplingParams(max_new_tokens=20, temperature=0, stop_at_eos=False)
    plain = Engine(model, LetterTokenizer(), max_batch=2).generate(PROMPTS, params)
    spec = Engine(model, LetterTokenizer(), max_batch=2, speculative=True)
    assert spec.generate(PROMPTS, params) == plain
    m = spec.metrics()
    assert m["drafted"] > 0 and 0 <= m["acceptance_rate"] <= 1
    assert m["generated_tokens"] == sum(len(p) for p in plain)


@pytest.mark.parametrize("oracle_draft", [True, False])
def test_verification_keeps_right_drafts_and_drops_wrong_ones(model, oracle_draft):
    """A drafter that knows the greedy answer has every draft kept (about half the main-model steps);
    one that is always wrong has none kept; the output is plain greedy output either way."""
    n = 20
    seq = PROMPTS[0] + full_forward_greedy(model, PROMPTS[0], n + 2)
    engine = Engine(model, LetterTokenizer(), max_batch=1, speculative=True)
    calls = []
    forward = engine._forward

    def counted(ids, slots):
        calls.append(ids.shape)
        return forward(ids, slots)

    def draft(h, next_ids, slots, pick):  # MTP at position i predicts token i + 2
        logits = torch.zeros(1, model.config.vocab_size)
        p = int(slots.positions[0, pick[0]])
        logits[0, (seq[p + 2] + (0 if oracle_draft else 1)) % model.config.vocab_size] = 1
        return logits

    engine._forward, engine._draft = counted, draft
    out = engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=n, temperature=0, stop_at_eos=False))[0]
    assert out == seq[len(PROMPTS[0]):][:n]
    m = engine.metrics()
    if oracle_draft:
        assert m["acceptance_rate"] == 1.0 and len(calls) == 1 + (n - 1 + 1) // 2
    else:
        assert m["accepted"] == 0 and len(calls) == n


def test_seeded_sampling_does_not_depend_on_batch_companions(model):
    params = SamplingParams(max_new_tokens=12, temperature=1.0, top_k=20, top_p=0.9, seed=3, stop_at_eos=False)
    alone = Engine(model, LetterTokenizer(), max_batch=1).generate([PROMPTS[0]], params)[0]
    engine = Engine(model, LetterTokenizer(), max_batch=4)
    reqs = [engine.submit(p, params if i == 0 else SamplingParams(max_new_tokens=12, temperature=1.0, seed=i))
            for i, p in enumerate(PROMPTS)]
    for r in reqs:
        r.result()
    assert reqs[0].output_ids == alone
    assert len({tuple(r.output_ids) for r in reqs}) > 1


def test_streamed_deltas_add_up_and_stop_strings_cut(model):
    engine = Engine(model, LetterTokenizer(), max_batch=2)
    full = LetterTokenizer().decode(full_forward_greedy(model, PROMPTS[0], 10))
    deltas = list(engine.submit(PROMPTS[0], GREEDY))
    assert "".join(d.text for d in deltas) == full
    assert sum(len(d.token_ids) for d in deltas) == 10 and deltas[-1].finish_reason == "length"
    stop = full[4:6]
    cut = full[: full.find(stop)]
    params = SamplingParams(max_new_tokens=10, temperature=0, stop_at_eos=False, stop=(stop, "not-there"))
    deltas = list(engine.submit(PROMPTS[0], params))
    assert "".join(d.text for d in deltas) == cut and deltas[-1].finish_reason == "stop"


def test_stop_token_ends_without_appearing(model):
    out = full_forward_greedy(model, PROMPTS[2], 10)
    engine = Engine(model, LetterTokenizer())
    req = engine.submit(PROMPTS[2], GREEDY, stop_ids={out[3]})
    req.result()
    assert req.output_ids == out[: out.index(out[3])] and req.finish_reason == "stop"


def test_repetition_penalty_matches_its_definition():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0])
    got = apply_repetition_penalty(logits, [0, 1, 1], 2.0)
    assert torch.equal(got, torch.tensor([1.0, -2.0, 0.5, 3.0]))
    assert torch.equal(apply_repetition_penalty(logits, [0], 1.0), logits)


def test_repetition_penalty_changes_greedy_choice(model):
    engine = Engine(model, LetterTokenizer())
    plain = engine.generate([PROMPTS[1]], SamplingParams(max_new_tokens=30, temperature=0, stop_at_eos=False))[0]
    pen = engine.generate([PROMPTS[1]], SamplingParams(max_new_tokens=30, temperature=0, stop_at_eos=False,
                                                        repetition_penalty=1e6))[0]
    assert len(set(pen)) == 30 > len(set(plain))  # a huge penalty forbids every repeat


def test_cancel_frees_the_slot_and_queue_waits(model):
    engine = Engine(model, LetterTokenizer(), max_batch=1)
    a = engine.submit(PROMPTS[0], SamplingParams(max_new_tokens=40, temperature=0, stop_at_eos=False))
    b = engine.submit(PROMPTS[1], GREEDY)
    engine.step()
    assert engine.metrics()["waiting"] == 1 and engine.metrics()["free_slots"] == 0
    a.cancel()
    b.result()
    assert a.finish_reason == "cancelled" and b.output_ids == full_forward_greedy(model, PROMPTS[1], 10)
    assert engine.metrics()["free_slots"] == 1 and engine.metrics()["running"] == 0


def test_background_thread_serves_concurrent_requests(model):
    engine = Engine(model, LetterTokenizer(), max_batch=3).start()
    try:
        reqs = [engine.submit(p, GREEDY) for p in PROMPTS]
        assert [r.result() and r.output_ids for r in reqs] == [full_forward_greedy(model, p, 10) for p in PROMPTS]
    finally:
        engine.stop()


def test_requests_past_the_context_are_refused(model):
    engine = Engine(model, LetterTokenizer())
    with pytest.raises(LevanteError, match="context length"):
        engine.submit([1] * 60, SamplingParams(max_new_tokens=10))
    with pytest.raises(LevanteError, match="empty"):
        engine.submit([], GREEDY)
    with pytest.raises(LevanteError, match="repetition_penalty"):
        engine.submit([1], SamplingParams(repetition_penalty=0))
    with pytest.raises(LevanteError, match="max_batch"):
        Engine(model, LetterTokenizer(), max_batch=0)
    with pytest.raises(LevanteError, match="MTP"):
        Engine(Transformer(ModelConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                                       n_routed_experts=0, first_k_dense_replace=1)),
               LetterTokenizer(), speculative=True)


@pytest.mark.parametrize("rows", [1, 3, 40])
def test_decode_grouped_linear_skipping_empty_experts_equals_per_row_products(rows):
    # Decoding on CPU runs only the experts that have rows (fewer rows than experts); every row must
    # still get exactly its own expert's product, also with empty experts between full ones.
    g = torch.Generator().manual_seed(rows)
    weight = torch.randn(8, 16, 8, generator=g)  # grouped_mm wants 16-byte strides
    expert = torch.randint(0, 8, (rows,), generator=g).sort().values
    x = torch.randn(rows, 8, generator=g)
    counts = torch.bincount(expert, minlength=8)
    with torch.no_grad():
        y = grouped_linear(x, weight, counts)
    want = torch.stack([weight[e] @ x[i] for i, e in enumerate(expert.tolist())])
    torch.testing.assert_close(y, want)


@pytest.mark.slow
@pytest.mark.parametrize("speculative", [False, True])
def test_compiled_engine_greedy_equals_eager(model, speculative):
    eager = Engine(model, LetterTokenizer(), max_batch=3).generate(PROMPTS, GREEDY)
    compiled = Engine(model, LetterTokenizer(), max_batch=3, compile=True, speculative=speculative)
    assert compiled.generate(PROMPTS, GREEDY) == eager


class ByteTokenizer:
    """Token i is byte i, decoded as byte-level BPE does: a character split over tokens shows as U+FFFD."""

    eos_id = 256

    def decode(self, ids, skip_special_tokens=True):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class SpaceTokenizer:
    """SentencePiece-style: every token is '▁word'; decoding drops the space of the first token only."""

    eos_id = 0
    words = ["", "das", "ist", "schön", "und", "gut"]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(" " + self.words[i] for i in ids if i)[1:]


class _Host:
    def __init__(self, tokenizer):
        self.tokenizer, self.device = tokenizer, "cpu"


@pytest.mark.parametrize("tokenizer, ids", [
    (ByteTokenizer(), list("Grüße, €5 ✓ ok".encode())),
    (ByteTokenizer(), list(b"ab") + [0xE2, 0x82]),  # ends inside a character: never shown
    (SpaceTokenizer(), [1, 2, 3, 4, 5, 1, 2, 3]),
])
def test_streamed_text_is_the_decoded_output_piece_by_piece(tokenizer, ids):
    # The engine decodes only the newest ids each step; the deltas must add up to decoding everything
    # at once, with no split character and no lost space on the way.
    from levante.infer.batch import Request

    req = Request(_Host(tokenizer), [5], SamplingParams(max_new_tokens=100, stop_at_eos=False), set(), None)
    texts = []
    for i in ids:
        req._accept(i, None)
        req._flush()
        texts.append(req.events.get_nowait().text if not req.events.empty() else "")
        assert "\ufffd" not in texts[-1]
    full = tokenizer.decode(ids)
    assert "".join(texts) == full.rstrip("\ufffd")
