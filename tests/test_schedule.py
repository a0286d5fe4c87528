import math

import pytest
import torch
from torch import nn

from levante.config import ScheduleConfig
from levante.errors import LevanteError
from levante.train.schedule import apply_lr, lr_multiplier


def curve(total, **kw):
    cfg = ScheduleConfig(**kw)
    return [lr_multiplier(s, total, cfg) for s in range(total)]


@pytest.mark.parametrize("name", ["wsd", "cosine", "constant"])
def test_warmup_ramps_linearly_to_one(name):
    c = curve(100, name=name, warmup_steps=10)
    assert c[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])
    assert c[0] > 0  # the first update is not wasted at lr 0


def test_wsd_plateau_then_sqrt_decay_to_floor():
    c = curve(100, name="wsd", warmup_steps=10, decay_fraction=0.2, min_lr_ratio=0.1)
    assert c[9:80] == [1.0] * 71  # stable phase holds the peak exactly
    decay = c[80:]
    assert all(a > b for a, b in zip(decay, decay[1:], strict=False))  # strictly decreasing
    assert decay[-1] == pytest.approx(0.1)  # the last update is at min_lr_ratio
    # 1-sqrt shape: halfway through the cool-down, 1 - sqrt(0.5) of the way from the floor.
    assert c[89] == pytest.approx(0.1 + 0.9 * (1 - math.sqrt(0.5)))
    assert lr_multiplier(500, 100, ScheduleConfig(name="wsd", min_lr_ratio=0.1)) == pytest.approx(0.1)


def test_wsd_decay_never_overlaps_warmup():
    c = curve(10, name="wsd", warmup_steps=8, decay_fraction=0.5, min_lr_ratio=0.0)
    assert c[:8] == pytest.approx([(i + 1) / 8 for i in range(8)])
    assert c[-1] == pytest.approx(0.0)


def test_cosine_ends_at_floor_and_is_monotone():
    c = curve(50, name="cosine", warmup_steps=5, min_lr_ratio=0.2)
    tail = c[4:]
    assert all(a >= b for a, b in zip(tail, tail[1:], strict=False))
    assert c[-1] == pytest.approx(0.2)
    mid = 5 + (50 - 5) // 2 - 1  # progress = 22/45 ~ 0.49: about halfway between 1 and the floor
    assert c[mid] == pytest.approx(0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * 22 / 45)))


def test_constant_stays_at_one():
    assert curve(30, name="constant", warmup_steps=3)[3:] == [1.0] * 27


def test_bad_inputs_raise():
    with pytest.raises(LevanteError, match="schedule.name"):
        lr_multiplier(0, 10, ScheduleConfig(name="linear"))
    with pytest.raises(LevanteError, match="total_steps"):
        lr_multiplier(0, 0, ScheduleConfig())


def test_apply_lr_scales_each_groups_base_lr():
    a, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([dict(params=[a], lr=0.1, base_lr=0.1), dict(params=[b], lr=0.02, base_lr=0.02)])
    apply_lr(opt, 0.5)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.05, 0.01])
    apply_lr(opt, 1.0)  # multiplies base_lr, not the current lr
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.1, 0.02])
