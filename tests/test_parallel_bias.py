"""Every rank holds the same router biases after training: expert loads are all-reduced before the
aux-free bias update (train/balancing.py), so no rank's experts drift to a different routing.

Each rank dumps the biases it holds in memory (tests/parallel_bias_worker.py); they must be bitwise
equal across ranks, moved by the balancer, and equal to a 1-rank run's on the same global batch.
"""

from pathlib import Path

import pytest
import torch

from test_parallel import ENV, config, torchrun_script

WORKER = Path(__file__).with_name("parallel_bias_worker.py")


@pytest.fixture(scope="module")
def one_rank_biases(tiny_workspace, tmp_path_factory) -> dict[str, torch.Tensor]:
    tmp = tmp_path_factory.mktemp("bias_one")
    with pytest.MonkeyPatch.context() as mp:
        for key, value in ENV.items():
            mp.setenv(key, value)
        result = torchrun_script(1, WORKER, config(tiny_workspace, tmp / "one.toml", 4, "adamw"), tmp / "one")
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(tmp / "one" / "bias_rank0.pt")


@pytest.mark.parametrize("ep", [1, 2])
def test_router_biases_identical_on_all_ranks(tiny_workspace, one_rank_biases, tmp_path, ep, monkeypatch):
    for key, value in ENV.items():
        monkeypatch.setenv(key, value)
    two = tmp_path / "two"
    parallel = {"ep": ep} if ep > 1 else None
    result = torchrun_script(2, WORKER, config(tiny_workspace, tmp_path / "two.toml", 2, "adamw", parallel), two)
    assert result.returncode == 0, result.stderr[-3000:]

    ref = one_rank_biases
    ranks = [torch.load(two / f"bias_rank{r}.pt") for r in range(2)]
    assert ref.keys() == ranks[0].keys() == ranks[1].keys() and ref
    for name, bias in ranks[0].items():
        assert torch.equal(bias, ranks[1][name]), f"{name}: rank 0 {bias} vs rank 1 {ranks[1][name]}"
        assert bias.abs().sum() > 0, f"{name}: the balancer never moved it"
        torch.testing.assert_close(bias, ref[name], rtol=0, atol=1e-6, msg=lambda m, n=name: f"{n} vs 1 rank: {m}")
