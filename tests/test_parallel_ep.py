"""Expert parallelism (routed experts split over ep ranks, tokens exchanged with all_to_all) under FSDP
equals one unsharded model step by step: losses, expert loads, gradient norm and weights
(tests/parallel_ep_worker.py does the comparison on every rank)."""

from pathlib import Path

import pytest

from test_parallel import ENV, torchrun_script


@pytest.mark.parametrize("optim", ["adamw", "muon"])
def test_two_ranks_ep2_equal_one_model(optim, monkeypatch):
    for key, value in ENV.items():
        monkeypatch.setenv(key, value)
    result = torchrun_script(2, Path(__file__).with_name("parallel_ep_worker.py"), optim, 2)
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"EP OK {optim} ep=2 world=2" in result.stdout
