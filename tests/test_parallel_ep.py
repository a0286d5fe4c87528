"""Expert parallelism (routed experts split over ep ranks, tokens exchanged with all_to_all) under FSDP
equals one unsharded model step by step: losses, expert loads, gradient norm and weights
(tests/parallel_ep_worker.py does the comparison on every rank)."""

from pathlib import Path

import pytest

from test_parallel import ENV, torchrun_script


@pytest.mark.parametrize("world, optim", [(2, "adamw"), (2, "muon"), (4, "muon")])
def test_ep2_equals_one_model(world, optim, monkeypatch):
    """world 2: experts split over both ranks; world 4: also sharded over 2 dp ranks each."""
    for key, value in ENV.items():
        monkeypatch.setenv(key, value)
    result = torchrun_script(world, Path(__file__).with_name("parallel_ep_worker.py"), optim, 2)
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"EP OK {optim} ep=2 world={world}" in result.stdout
