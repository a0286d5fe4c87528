"""Document masking: packed documents neither see each other nor share rope positions."""

import torch

from levante import ModelConfig, Transformer
from levante.model.transformer import IGNORE_INDEX, document_layout


def small_config(**kw) -> ModelConfig:
    base = dict(vocab_size=97, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                num_hidden_layers=3, num_attention_heads=2, q_lora_rank=16, kv_lora_rank=16,
                qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=4,
                num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, max_position_embeddings=64)
    base.update(kw)
    return ModelConfig(**base).validate()


def _model(**kw) -> Transformer:
    torch.manual_seed(0)
    return Transformer(small_config(**kw)).eval()


def _shifted(ids: torch.Tensor) -> torch.Tensor:
    return torch.cat((ids[:, 1:], torch.full((ids.shape[0], 1), IGNORE_INDEX)), dim=1)


def test_layout_restarts_positions_and_blocks_attention():
    doc = torch.tensor([[0, 0, 0, 1, 1, 0]])  # the id 0 again later is a third document
    positions, mask, runs = document_layout(doc)
    assert positions.tolist() == [[0, 1, 2, 0, 1, 0]]
    assert runs.tolist() == [[1, 1, 1, 2, 2, 3]]
    allowed = {(i, j) for i in range(6) for j in range(6) if mask[0, 0, i, j]}
    assert allowed == {(0, 0), (1, 0), (1, 1), (2, 0), (2, 1), (2, 2), (3, 3), (4, 3), (4, 4), (5, 5)}


def test_packed_conversation_has_the_logits_it_has_alone():
    model = _model()
    g = torch.Generator().manual_seed(1)
    a = torch.randint(0, 97, (1, 7), generator=g)
    b = torch.randint(0, 97, (1, 11), generator=g)
    c = torch.randint(0, 97, (1, 5), generator=g)
    packed = torch.cat((a, b, c), dim=1)
    doc = torch.tensor([[0] * 7 + [1] * 11 + [2] * 5])
    with torch.no_grad():
        out = model(packed, document_ids=doc).logits
        alone = [model(x).logits for x in (a, b, c)]
        unmasked = model(packed).logits
    torch.testing.assert_close(out[:, :7], alone[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[:, 7:18], alone[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[:, 18:], alone[2], atol=1e-5, rtol=0)
    # Without document ids the second conversation does see the first (the test can fail).
    assert (unmasked[:, 7:18] - alone[1]).abs().max() > 1e-3


def test_one_document_equals_the_plain_causal_forward():
    model = _model()
    x = torch.randint(0, 97, (2, 13), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        plain = model(x).logits
        one_doc = model(x, document_ids=torch.zeros_like(x)).logits
    torch.testing.assert_close(one_doc, plain, atol=1e-5, rtol=0)


def test_mtp_loss_stays_inside_each_document():
    """With the first document's targets ignored, the packed MTP loss is the second document's alone:
    the first document's last position must not predict tokens of the next one."""
    model = _model(num_nextn_predict_layers=2)
    g = torch.Generator().manual_seed(3)
    a = torch.randint(0, 97, (1, 9), generator=g)
    b = torch.randint(0, 97, (1, 12), generator=g)
    packed = torch.cat((a, b), dim=1)
    doc = torch.tensor([[0] * 9 + [1] * 12])
    targets = _shifted(packed)
    targets[:, :9] = IGNORE_INDEX  # the packer's rule: no target crosses a boundary; here a is ignored too
    with torch.no_grad():
        out = model(packed, targets=targets, document_ids=doc)
        ref = model(b, targets=_shifted(b))
    torch.testing.assert_close(out.lm_loss, ref.lm_loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.mtp_loss, ref.mtp_loss, atol=1e-5, rtol=0)
