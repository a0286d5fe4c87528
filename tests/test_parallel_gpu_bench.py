"""benchmarks/gpu.py is importable, its models build, and without CUDA it stops with one line (exit 2)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the benchmark would run")
def test_without_cuda_one_line_and_exit_2():
    result = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: benchmarks/gpu.py needs a CUDA GPU and none is visible"]


def test_models_are_sized_for_one_card():
    sys.path.insert(0, str(SCRIPT.parent))
    import gpu
    from levante.model.transformer import Transformer

    for cfg in (gpu.dense_model(), gpu.moe_model()):
        with torch.device("meta"):
            params = sum(p.numel() for p in Transformer(cfg).parameters())
        assert 0.5e9 < params < 5e9  # trains with AdamW in bf16 autocast well inside 141 GB
    assert not gpu.dense_model().is_moe and gpu.moe_model().is_moe
