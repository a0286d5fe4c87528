"""The loss-spike / NaN guard: outliers and non-finite steps are skipped, counted, and a stuck run stops."""

from __future__ import annotations

import json
import math

import pytest
import torch

from levante.config import TrainConfig
from levante.errors import LevanteError
from levante.model.moe import moe_layers
from levante.train.guard import SpikeGuard
from levante.train.trainer import Trainer


def test_outlier_test_is_off_until_the_window_is_full_and_one_sided():
    guard = SpikeGuard(window=4, sigma=6.0)
    for loss in (5.0, 5.1, 4.9):
        assert guard.reason_to_skip(100.0, 1.0) is None  # window not full: no outlier test yet
        guard.accept(loss, 1.0)
    guard.accept(5.0, 1.0)
    losses = [5.0, 5.1, 4.9, 5.0]
    mean = sum(losses) / 4
    std = math.sqrt(sum((x - mean) ** 2 for x in losses) / 4)
    assert guard.reason_to_skip(mean + 5.9 * std, 1.0) is None
    assert "loss spike" in guard.reason_to_skip(mean + 6.1 * std, 1.0)
    assert guard.reason_to_skip(0.0, 1.0) is None  # a sudden improvement is no reason to skip
    assert "gradient-norm spike" in guard.reason_to_skip(5.0, 1.5)  # the norms were all exactly 1
    assert "non-finite loss" in guard.reason_to_skip(float("nan"), 1.0)
    assert "non-finite gradient norm" in guard.reason_to_skip(5.0, float("inf"))
    assert SpikeGuard(window=4, enabled=False).reason_to_skip(float("nan"), 1.0) is None


def test_guard_state_round_trips_through_json_exactly():
    guard = SpikeGuard(window=3)
    for v in (1 / 3, 2 / 7, math.pi, 1e-17):
        guard.accept(v, v * 2)
    guard.skip()
    again = SpikeGuard(window=3)
    again.load_state_dict(json.loads(json.dumps(guard.state_dict())))
    assert again.state_dict() == guard.state_dict()
    assert list(again.losses) == [2 / 7, math.pi, 1e-17]  # the newest `window` accepted steps
    assert again.reason_to_skip(3.0, 1.0) == guard.reason_to_skip(3.0, 1.0)


def trainer_for(ws, tmp_path, **run) -> Trainer:
    cfg = TrainConfig.from_dict(ws.config_dict(
        optim={"name": "adamw", "lr": 3e-4},
        schedule={"name": "constant", "warmup_steps": 0},
        run={"steps": 40, "ckpt_every": 0, "spike_window": 16, **run}))
    return Trainer(cfg, tmp_path / "run")


def params_and_biases(trainer: Trainer) -> dict[str, torch.Tensor]:
    state = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    for i, moe in enumerate(moe_layers(trainer.model)):
        state[f"bias{i}"] = moe.gate.e_score_correction_bias.clone()
    return state


def test_a_corrupted_batch_is_skipped_without_update_or_rewind(tiny_workspace, tmp_path):
    trainer = trainer_for(tiny_workspace, tmp_path)
    for _ in range(20):  # fill the window with ordinary steps
        assert not trainer.train_step()["skipped"]

    # The corruption: a stretch of shard holding one token over and over (a damaged file, say).
    real_next = trainer.loader.next_batch

    def corrupted():
        inputs, targets = real_next()
        return torch.full_like(inputs, 100), torch.full_like(targets, 100)

    trainer.loader.next_batch = corrupted
    before, position = params_and_biases(trainer), trainer.loader.state_dict()["position"]
    record = trainer.train_step()
    trainer.loader.next_batch = real_next
    assert record["skipped"] and record["skipped_steps"] == 1, record
    assert "spike" in record["skip_reason"]
    after = params_and_biases(trainer)
    assert all(torch.equal(before[k], after[k]) for k in before), "a skipped step changed the model"
    assert trainer.loader.state_dict()["position"] == position + trainer.loader.batch_size, \
        "the bad batch must be consumed, not replayed"
    assert trainer.step == 21 and trainer.guard.consecutive == 1

    record = trainer.train_step()  # the next ordinary batch trains again
    assert not record["skipped"] and trainer.guard.consecutive == 0 and record["skipped_steps"] == 1
    assert any(not torch.equal(before[k], v) for k, v in params_and_biases(trainer).items())


def test_nine_nan_steps_stop_the_run_with_its_last_checkpoint_intact(tiny_workspace, tmp_path):
    from safetensors.torch import load_file

    from levante.checkpoint import checksum_problem

    trainer = trainer_for(tiny_workspace, tmp_path, steps=20, ckpt_every=5, keep_last=2, max_consecutive_skips=8)
    real_forward = trainer.forward

    def poisoned(*args, **kwargs):  # from step 7 on, every loss is NaN
        out = real_forward(*args, **kwargs)
        if trainer.step >= 6:
            out.loss = out.loss * float("nan")
        return out

    trainer.forward = poisoned
    with pytest.raises(LevanteError) as info:
        trainer.fit()
    message = str(info.value)
    assert "\n" not in message and "8 consecutive steps skipped" in message and "non-finite loss" in message
    assert trainer.step == 14  # steps 7..14 skipped: the 8th in a row stops the run, the 9th never runs
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step_00000005", "step_00000010"]
    last = root / "step_00000010"
    assert checksum_problem(last) is None
    weights = load_file(last / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())
    # No NaN step touched the weights: the checkpoint holds the model as step 6 left it.
    assert all(torch.equal(weights[n], p.detach()) for n, p in trainer.model.named_parameters())
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    skipped = [r for r in records if r.get("skipped")]
    assert [r["step"] for r in skipped] == list(range(7, 15))
    assert skipped[-1]["skipped_steps"] == 8 and skipped[0]["loss"] is None  # NaN is written as null
