import json
import logging
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from levante.checkpoint import checksum_problem, list_checkpoints, load_latest, save_checkpoint
from levante.config import OptimConfig
from levante.errors import LevanteError
from levante.train.metrics import MetricsWriter
from levante.train.optim import build_optimizer

V, H, E = 16, 8, 3


class Norm(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(H))


class Block(nn.Module):
    def __init__(self, reverse: bool):
        super().__init__()
        # Registration order differs with `reverse`, names do not: optimizer state must follow names.
        if reverse:
            self.q_proj = nn.Linear(H, H, bias=False)
            self.input_layernorm = Norm()
        else:
            self.input_layernorm = Norm()
            self.q_proj = nn.Linear(H, H, bias=False)
        self.gate_up_proj = nn.Parameter(torch.randn(E, 2 * H, H) * 0.3)
        self.register_buffer("e_score_correction_bias", torch.zeros(E))

    def forward(self, x):
        x = x * self.input_layernorm.weight
        x = x + torch.tanh(self.q_proj(x))
        gate, up = torch.einsum("bth,eih->btei", x, self.gate_up_proj).chunk(2, dim=-1)
        return x + (torch.nn.functional.silu(gate) * up).mean(2)[..., :H]


class Tiny(nn.Module):
    def __init__(self, reverse: bool = False, tied: bool = False):
        super().__init__()
        self.embed_tokens = nn.Embedding(V, H)
        self.layers = nn.ModuleList([Block(reverse)])
        self.lm_head = nn.Linear(H, V, bias=False)
        if tied:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, ids):
        return self.lm_head(self.layers[0](self.embed_tokens(ids)))


def train_step(model, opt, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (4, 6), generator=g)
    opt.zero_grad()
    loss = nn.functional.cross_entropy(model(ids[:, :-1]).reshape(-1, V), ids[:, 1:].reshape(-1))
    loss.backward()
    opt.step()


def trained(name="muon", steps=3, **kw):
    torch.manual_seed(0)
    model = Tiny(**kw)
    opt = build_optimizer(model, OptimConfig(name=name))
    for s in range(steps):
        train_step(model, opt, s)
    with torch.no_grad():
        model.layers[0].e_score_correction_bias.add_(torch.arange(E, dtype=torch.float32))
    return model, opt


def fresh(name="muon", **kw):
    torch.manual_seed(123)  # a different init: loading must overwrite everything
    model = Tiny(**kw)
    return model, build_optimizer(model, OptimConfig(name=name))


def save(run, step, model, opt, keep_last=5, **state):
    return save_checkpoint(run, step, model, opt, {"tokens_seen": step * 100, **state}, keep_last=keep_last)


@pytest.mark.parametrize("name", ["muon", "adamw"])
def test_roundtrip_gives_identical_params_and_next_step(tmp_path, name):
    model, opt = trained(name)
    path = save(tmp_path, 3, model, opt, data={"shard": 2, "offset": 77}, extra={"loss": 1.5})
    other, other_opt = fresh(name, reverse=True)  # different init AND parameter order
    assert [n for n, _ in other.named_parameters()] != [n for n, _ in model.named_parameters()]
    got_path, state = load_latest(tmp_path, other, other_opt)
    assert got_path == path
    assert state == {"tokens_seen": 300, "data": {"shard": 2, "offset": 77}, "extra": {"loss": 1.5},
                     "step": 3}
    ref = model.state_dict()
    for key, value in other.state_dict().items():
        assert torch.equal(value, ref[key]), key
    train_step(model, opt, 10)
    train_step(other, other_opt, 10)
    ref = dict(model.named_parameters())
    for key, value in other.named_parameters():
        assert torch.equal(value, ref[key]), key


def test_optimizer_state_is_keyed_by_parameter_name(tmp_path):
    model, opt = trained()
    path = save(tmp_path, 1, model, opt)
    keys = set(load_file(path / "optimizer.safetensors"))
    assert "state.layers.0.gate_up_proj.momentum_buffer" in keys
    assert {"state.embed_tokens.weight.exp_avg", "state.embed_tokens.weight.step"} <= keys
    meta = json.loads((path / "optimizer.json").read_text())
    assert sorted(meta["param_names"]) == sorted(n for n, _ in model.named_parameters())


def test_rng_streams_continue_identically(tmp_path):
    model, opt = trained()
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leaves a cached gaussian in Python's state
    save(tmp_path, 1, model, opt)
    expected = (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), torch.rand(3))
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    load_latest(tmp_path, *fresh())
    got = (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), torch.rand(3))
    assert got[:3] == expected[:3]
    assert torch.equal(got[3], expected[3])


def test_tied_weights_save_and_load(tmp_path):
    model, opt = trained(tied=True)
    save(tmp_path, 1, model, opt)
    other, other_opt = fresh(tied=True)
    load_latest(tmp_path, other, other_opt)
    assert other.lm_head.weight is other.embed_tokens.weight
    assert torch.equal(other.embed_tokens.weight, model.embed_tokens.weight)


def test_keep_last_prunes_oldest(tmp_path):
    model, opt = trained()
    for step in (10, 20, 30, 40):
        save(tmp_path, step, model, opt, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000040", "step_00000030"]


def test_saving_an_older_step_drops_stale_newer_ones(tmp_path):
    model, opt = trained()
    for step in (10, 20):
        save(tmp_path, step, model, opt)
    save(tmp_path, 15, model, opt)  # the run went back to an earlier point
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000015", "step_00000010"]


def truncate(file):
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


def flip_byte(file):
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x01
    file.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [truncate, flip_byte])
def test_corrupt_newest_falls_back_with_warning(tmp_path, caplog, damage):
    model, opt = trained()
    good = save(tmp_path, 1, model, opt)
    train_step(model, opt, 5)
    bad = save(tmp_path, 2, model, opt)
    damage(bad / "model.safetensors")
    assert "model.safetensors" in checksum_problem(bad)
    assert checksum_problem(good) is None
    other, other_opt = fresh()
    with caplog.at_level(logging.WARNING, logger="levante"):
        path, state = load_latest(tmp_path, other, other_opt)
    assert path == good and state["step"] == 1
    assert any("step_00000002" in r.getMessage() for r in caplog.records)


def test_damaged_optimizer_detected_and_missing_checksums_loaded_with_a_warning(tmp_path, caplog):
    """The one trust rule (checkpoint/verify.py), the same as from_pretrained's (test_hf_errors)."""
    model, opt = trained()
    path = save(tmp_path, 1, model, opt)
    flip_byte(path / "optimizer.safetensors")
    assert checksum_problem(path) == "optimizer.safetensors sha256 mismatch (corrupted)"
    path2 = save(tmp_path, 2, model, opt)
    (path2 / "checksums.json").unlink()
    with caplog.at_level(logging.WARNING, logger="levante"):
        assert checksum_problem(path2) is None
        found, _ = load_latest(tmp_path, *trained())
    assert found == path2
    assert any("no checksums.json" in r.getMessage() for r in caplog.records)


def test_all_corrupt_raises(tmp_path):
    model, opt = trained()
    for step in (1, 2):
        flip_byte(save(tmp_path, step, model, opt) / "trainer.json")
    with pytest.raises(LevanteError, match="no valid checkpoint"):
        load_latest(tmp_path, *fresh())


def test_no_checkpoint_returns_none(tmp_path):
    assert load_latest(tmp_path, *fresh()) is None


def test_tmp_dirs_are_ignored_and_cleaned(tmp_path):
    model, opt = trained()
    good = save(tmp_path, 1, model, opt)
    leftover = tmp_path / "checkpoints" / "step_00000009.tmp-4242"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half a file")
    assert list_checkpoints(tmp_path) == [good]
    path, _ = load_latest(tmp_path, *fresh())
    assert path == good and not leftover.exists()


def test_model_mismatch_is_a_levante_error(tmp_path):
    model, opt = trained()
    save(tmp_path, 1, model, opt)
    other = nn.Sequential()
    other.embed_tokens = nn.Embedding(V, H)
    with pytest.raises(LevanteError, match="missing|unexpected"):
        load_latest(tmp_path, other, None)


def test_optimizer_kind_change_is_a_levante_error(tmp_path):
    model, opt = trained("muon")
    save(tmp_path, 1, model, opt)
    with pytest.raises(LevanteError, match="optim.name changed"):
        load_latest(tmp_path, *fresh("adamw"))


def test_tokenizer_copy_is_checksummed(tmp_path):
    model, opt = trained()
    tok = tmp_path / "tok.json"
    tok.write_text('{"model": "bpe"}')
    path = save_checkpoint(tmp_path / "run", 1, model, opt, {}, keep_last=1, tokenizer_path=tok)
    assert (path / "tokenizer.json").read_text() == '{"model": "bpe"}'
    (path / "tokenizer.json").write_text('{"model": "bpf"}')
    assert checksum_problem(path) == "tokenizer.json sha256 mismatch (corrupted)"
    with pytest.raises(LevanteError, match="tokenizer file not found"):
        save_checkpoint(tmp_path / "run", 2, model, opt, {}, keep_last=1, tokenizer_path=tmp_path / "no")


def test_metrics_resume_drops_lines_after_checkpoint(tmp_path):
    log = tmp_path / "metrics.jsonl"
    with MetricsWriter(log) as w:
        for step in range(1, 6):
            w.write({"step": step, "loss": torch.tensor(1.0 / step), "nan": float("nan")})
    with open(log, "a") as f:
        f.write('{"step": 6, "lo')  # a crash mid-line
    with MetricsWriter(log, resume_step=3) as w:
        w.write({"step": 4, "loss": 0.2})
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[0]["nan"] is None and rows[1]["loss"] == pytest.approx(0.5)
    with MetricsWriter(log):  # a fresh run starts a fresh log
        pass
    assert log.read_text() == ""
