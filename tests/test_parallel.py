"""N ranks train exactly what 1 rank trains: torchrun (gloo, CPU) against one process, same global batch.

The 1-rank reference runs `levante train` in one process with micro_batch_size = 2 x 2; the 2-rank
run is `torchrun --nproc_per_node 2 -m levante train` with micro_batch_size 2 per rank. Their
per-step losses, gradient norms and expert loads, and the final weights (the 2-rank DCP checkpoint
consolidated), must agree to float rounding.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

STEPS = 3
RTOL = 1e-5
ENV = {"OMP_NUM_THREADS": "1"}
# Two optimizer settings turn 1e-7 gradient rounding differences (all-reduce order) into far larger
# weight differences, and are set here so that N ranks must match 1 rank to float rounding:
# - Muon's Newton–Schulz runs in bf16 where the CPU has fast bf16 ("auto"): ~1e-4; fp32 here.
# - Adam divides by sqrt(v) + eps: an element whose gradient is near eps (a rare token's lm_head row:
#   2.9e-8 at step 1, seen) moves by lr * g / (|g| + eps), so 1e-9 of rounding shifts it by ~1% of lr.
#   eps 1e-5 keeps every element well away from that.
# test_parallel_acceptance.py measures the defaults.
EXACT_OPTIM = {"muon_ns_dtype": "float32", "eps": 1e-5}


def torchrun(nproc: int, *args, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, **ENV, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "levante", *map(str, args)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def torchrun_script(nproc: int, script: Path, *args, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, **ENV, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(script),
           *map(str, args)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def steps_of(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [r for r in map(json.loads, lines) if "eval" not in r]


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / f"step_{STEPS:08d}" / "model.safetensors")


def assert_close(a: float, b: float, what: str, rtol: float) -> None:
    assert abs(a - b) <= rtol * max(abs(a), abs(b), 1e-12), f"{what}: {a} vs {b}"


def config(ws, path: Path, micro: int, optim: str, parallel: dict | None = None, steps: int = STEPS,
           ns_dtype: str = "float32", eps: float = EXACT_OPTIM["eps"]) -> Path:
    path = ws.write_config(path, model={"num_nextn_predict_layers": 1},
                           optim={"name": optim, "muon_ns_dtype": ns_dtype, "eps": eps},
                           run={"steps": steps, "micro_batch_size": micro, "ckpt_every": 0, "eval_every": 0,
                                "log_every": 1})
    if parallel:  # TinyWorkspace.write_config knows the five classic tables only
        path.write_text(path.read_text() + "\n[parallel]\n" + "".join(
            f"{k} = {json.dumps(v)}\n" for k, v in parallel.items()))
    return path


@pytest.mark.parametrize("optim, parallel", [
    ("adamw", None),
    ("muon", None),
    ("adamw", {"activation_checkpointing": "full"}),  # recomputation under FSDP: the same numbers
    ("muon", {"ep": 2}),  # experts split over both ranks, tokens exchanged with all_to_all
])
def test_two_ranks_train_what_one_rank_trains(tiny_workspace, run_levante, tmp_path, optim, parallel,
                                              monkeypatch):
    for key, value in ENV.items():
        monkeypatch.setenv(key, value)
    one, two = tmp_path / "one", tmp_path / "two"
    result = run_levante("train", config(tiny_workspace, tmp_path / "one.toml", 4, optim), "--out", one)
    assert result.returncode == 0, result.stderr
    result = torchrun(2, "train", config(tiny_workspace, tmp_path / "two.toml", 2, optim, parallel), "--out", two)
    assert result.returncode == 0, result.stderr[-3000:]
    # Only rank 0 prints: one progress line per step, not two.
    assert sum(line.startswith("step ") for line in result.stdout.splitlines()) == STEPS, result.stdout

    ref, got = steps_of(one), steps_of(two)
    assert [r["step"] for r in got] == [r["step"] for r in ref] == list(range(1, STEPS + 1))
    for r1, r2 in zip(ref, got, strict=True):
        assert r1.keys() == r2.keys()  # the same metrics.jsonl format
        assert r1["tokens"] == r2["tokens"]
        for key in ("loss", "lm_loss", "mtp_loss", "grad_norm", "load_max_over_mean"):
            assert_close(r1[key], r2[key], f"step {r1['step']} {key}", RTOL)
        assert r1["loss_per_language"].keys() == r2["loss_per_language"].keys()
        for lang, value in r1["loss_per_language"].items():
            assert_close(value, r2["loss_per_language"][lang], f"step {r1['step']} loss[{lang}]", RTOL)

    consolidated = tmp_path / "consolidated"
    result = run_levante("checkpoint", "consolidate", two, consolidated)
    assert result.returncode == 0, result.stderr
    w1, w2 = final_weights(one), load_file(consolidated / "model.safetensors")
    assert w1.keys() == w2.keys()
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=RTOL, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    biases = [n for n in w1 if n.endswith("e_score_correction_bias")]
    assert biases and any(w1[n].abs().sum() > 0 for n in biases)  # the balancer moved them
