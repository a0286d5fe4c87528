"""Language mixture in the training loader: p ∝ n^τ or explicit weights, realised shares logged,
exact resume unchanged."""

from __future__ import annotations

import json

import numpy as np
import pytest

from levante.data.loader import TokenLoader, mixture_probabilities
from levante.data.shards import open_shards
from levante.errors import LevanteError


def test_mixture_probabilities():
    n = {"en": 900, "ga": 100}
    assert mixture_probabilities(n, 1.0) == {"en": 0.9, "ga": 0.1}
    assert mixture_probabilities(n, 0.0) == {"en": 0.5, "ga": 0.5}
    p = mixture_probabilities(n, 0.5)
    assert p["ga"] == pytest.approx(10 / (30 + 10))
    assert mixture_probabilities(n, weights={"ga": 3, "en": 1}) == {"en": 0.25, "ga": 0.75}
    assert mixture_probabilities(n, weights={"ga": 1}) == {"en": 0.0, "ga": 1.0}
    with pytest.raises(LevanteError, match="xx"):
        mixture_probabilities(n, weights={"xx": 1})


@pytest.fixture(scope="module")
def shards(tiny_workspace):
    return open_shards(tiny_workspace.train_shards)


def _epoch_langs(loader: TokenLoader) -> dict[str, int]:
    perm = loader._epoch_windows(0)
    counts = np.bincount(loader.window_lang[perm], minlength=len(loader.shards.langs))
    return {lang: int(counts[i]) for i, lang in enumerate(loader.shards.langs) if counts[i]}


def test_natural_order_is_the_plain_permutation(shards):
    loader = TokenLoader(shards, 16, 4, seed=3)
    assert loader.mixture is None
    assert np.array_equal(loader._epoch_windows(2), np.random.default_rng([3, 2]).permutation(loader.num_windows))


def test_uniform_and_weighted_epochs(shards):
    natural = TokenLoader(shards, 16, 4, seed=3).windows_per_lang
    uniform = TokenLoader(shards, 16, 4, seed=3, mix_temperature=0.0)
    got = _epoch_langs(uniform)
    share = uniform.num_windows / len(natural)
    assert sum(got.values()) == uniform.num_windows
    assert all(abs(c - share) <= 1 for c in got.values()), (got, natural)
    smallest = min(natural, key=natural.get)
    only = TokenLoader(shards, 16, 4, seed=3, mix_weights={smallest: 1.0})
    assert _epoch_langs(only) == {smallest: only.num_windows}  # up-sampled: its windows repeat
    served = [only.next_batch() for _ in range(3)]
    assert served and only.pop_mix() == {smallest: 1.0}


def test_exact_resume_with_a_mixture(shards):
    a = TokenLoader(shards, 16, 4, seed=5, mix_temperature=0.3)
    steps = int(a.batches_per_epoch) + 3  # cross an epoch boundary
    for _ in range(steps):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))
    b = TokenLoader(shards, 16, 4, seed=5, mix_temperature=0.3)
    b.load_state_dict(state)
    for _ in range(5):
        xa, ya = a.next_batch()
        xb, yb = b.next_batch()
        assert xa.equal(xb) and ya.equal(yb)
    other = TokenLoader(shards, 16, 4, seed=5, mix_temperature=0.7)
    with pytest.raises(LevanteError, match="mixture"):
        other.load_state_dict(state)


def test_metrics_log_the_realised_mix(tiny_workspace, run_levante, tmp_path):
    cfg = tiny_workspace.write_config(tmp_path / "c.toml", data={"mix_temperature": 0.0},
                                      run={"steps": 2, "ckpt_every": 0})
    r = run_levante("train", cfg, "--out", tmp_path / "run")
    assert r.returncode == 0, r.stderr
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    mixes = [rec["mix"] for rec in records if "mix" in rec]
    assert mixes and all(abs(sum(m.values()) - 1) < 1e-3 for m in mixes)
    assert set().union(*mixes) <= set(tiny_workspace.langs)
