"""`levante train` survives SIGKILL and corrupted checkpoints, through the real command line.

The reference run A trains to completion in one process. Run B is the same config killed with
SIGKILL at a random point in the middle and resumed with `--resume`: its final weights, optimizer
state, trainer state (data position, RNG states) and metrics log must equal A's bit for bit.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

STEPS = 12
CKPT_EVERY = 2
RESUME_SEED = int(os.environ.get("LEVANTE_TEST_SEED", "0"))  # which checkpoint the kill waits for


def step_dir(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step_{step:08d}"


def checkpoint_steps(run: Path) -> list[int]:
    root = run / "checkpoints"
    return sorted(int(m.group(1)) for p in root.iterdir() if (m := re.fullmatch(r"step_(\d+)", p.name)))


def read_metrics(run: Path) -> tuple[dict[int, dict], dict[int, dict], list[int]]:
    """(train records by step, eval records by step, every train step in file order)."""
    train, evals, order = {}, {}, []
    for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if "eval" in record:
            assert record["step"] not in evals, f"eval at step {record['step']} logged twice"
            evals[record["step"]] = record["eval"]
        else:
            order.append(record["step"])
            train[record["step"]] = record
    return train, evals, order


def assert_tensors_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys(), f"{what}: tensor names differ: {sorted(a.keys() ^ b.keys())[:5]}"
    differ = [name for name in a if a[name].dtype != b[name].dtype or not torch.equal(a[name], b[name])]
    assert not differ, f"{what}: {len(differ)} tensors differ, e.g. {differ[:5]}"


def assert_one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, f"expected one 'error:' line, got:\n{stderr}"
    return errors[0]


def wait_then_kill(proc, target: Path, timeout: float = 240.0) -> None:
    """SIGKILL `proc` as soon as checkpoint dir `target` exists; fail if the run ends first."""
    deadline = time.monotonic() + timeout
    while not target.is_dir():
        if proc.poll() is not None:
            pytest.fail(f"training exited (rc {proc.returncode}) before {target.name} appeared")
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            pytest.fail(f"{target.name} did not appear within {timeout} s")
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL, "the run finished before SIGKILL landed"


# ----------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def resume_config(tiny_workspace, tmp_path_factory) -> Path:
    # MTP on, 2 micro-batches per step, eval every 4 steps and a spike guard whose window fills at
    # step 4: all of them go through checkpoints and the metrics log.
    return tiny_workspace.write_config(
        tmp_path_factory.mktemp("resume_cfg") / "cfg.toml",
        model={"num_nextn_predict_layers": 1},
        run={"steps": STEPS, "ckpt_every": CKPT_EVERY, "keep_last": 2, "log_every": 1, "eval_every": 4,
             "grad_accum": 2, "spike_window": 4})


@pytest.fixture(scope="module")
def reference_run(resume_config, run_levante, tmp_path_factory) -> Path:
    """Run A: the config trained to completion in one uninterrupted process."""
    out = tmp_path_factory.mktemp("run") / "A"
    result = run_levante("train", resume_config, "--out", out)
    assert result.returncode == 0, result.stderr
    assert checkpoint_steps(out) == [STEPS - CKPT_EVERY, STEPS]
    return out


# -------------------------------------------------------------------------------------------- tests


def test_resume_after_sigkill_is_bit_exact(resume_config, reference_run, run_levante, popen_levante, tmp_path):
    a, b = reference_run, tmp_path / "B"
    # A checkpoint strictly inside the run, with at least one checkpoint interval left after it.
    middle = list(range(CKPT_EVERY, STEPS - CKPT_EVERY, CKPT_EVERY))
    target = random.Random(RESUME_SEED).choice(middle)

    with open(tmp_path / "b1.out", "wb") as out, open(tmp_path / "b1.err", "wb") as err:
        proc = popen_levante("train", resume_config, "--out", b, stdout=out, stderr=err)
        wait_then_kill(proc, step_dir(b, target))
    survivors = checkpoint_steps(b)
    assert survivors and max(survivors) < STEPS, f"killed after step {target} but found {survivors}"

    result = run_levante("train", resume_config, "--out", b, "--resume")
    assert result.returncode == 0, f"resume after a kill at step {target} failed:\n{result.stderr}"
    assert "Traceback" not in result.stderr
    # The resumed process trained only the steps after its checkpoint, not the whole run again.
    logged = [int(s) for s in re.findall(r"^step (\d+) \|", result.stdout, flags=re.M)]
    assert logged and logged[0] == max(survivors) + 1 and logged[-1] == STEPS, result.stdout

    fa, fb = step_dir(a, STEPS), step_dir(b, STEPS)
    assert_tensors_equal(load_file(fa / "model.safetensors"), load_file(fb / "model.safetensors"),
                         f"model weights (killed at step {target})")
    assert_tensors_equal(load_file(fa / "optimizer.safetensors"), load_file(fb / "optimizer.safetensors"),
                         f"optimizer state (killed at step {target})")
    opt_a, opt_b = (json.loads((d / "optimizer.json").read_text()) for d in (fa, fb))
    assert opt_a == opt_b
    trainer_a, trainer_b = (json.loads((d / "trainer.json").read_text()) for d in (fa, fb))
    rng_a, rng_b = trainer_a.pop("rng"), trainer_b.pop("rng")
    assert trainer_a == trainer_b  # step, tokens, data loader position, the guard's window
    assert len(trainer_a["guard"]["losses"]) == 4

    train_a, eval_a, order_a = read_metrics(a)
    train_b, eval_b, order_b = read_metrics(b)
    assert order_a == list(range(1, STEPS + 1))
    assert order_b == list(range(1, STEPS + 1)), f"each step exactly once, in order (kill at {target})"
    for step in order_a:
        for key in ("loss", "lm_loss", "mtp_loss", "grad_norm", "lr", "tokens", "load_max_over_mean",
                    "skipped_steps"):
            assert train_b[step][key] == train_a[step][key], f"step {step} {key}: B {train_b[step][key]!r} " \
                                                             f"!= A {train_a[step][key]!r} (kill at {target})"
    assert sorted(eval_a) == [4, 8, STEPS]
    assert eval_b == eval_a
    # The RNG streams continue exactly too (nothing may draw from them differently after a resume).
    differ = [name for name in rng_a if rng_b.get(name) != rng_a[name]]
    assert not differ, (f"{differ} RNG state differs from the uninterrupted run after a resume from step "
                        f"{max(survivors)}: something drew from the global RNG after it was restored")


@pytest.mark.parametrize("damage", ["truncate", "flip_byte"])
def test_resume_skips_corrupt_latest_checkpoint(damage, reference_run, tiny_workspace, run_levante, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    newest, previous = step_dir(run, STEPS), step_dir(run, STEPS - CKPT_EVERY)
    weights = newest / "model.safetensors"
    data = bytearray(weights.read_bytes())
    if damage == "truncate":
        weights.write_bytes(data[: len(data) // 2])
    else:
        data[len(data) * 3 // 4] ^= 0x01
        weights.write_bytes(data)

    more = STEPS + 4
    cfg = tiny_workspace.write_config(
        tmp_path / "more.toml", model={"num_nextn_predict_layers": 1},
        run={"steps": more, "ckpt_every": CKPT_EVERY, "keep_last": 2, "log_every": 1, "eval_every": 4})
    result = run_levante("train", cfg, "--out", run, "--resume")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    warnings = [line for line in result.stderr.splitlines() if newest.name in line]
    assert warnings and "warning" in warnings[0].lower(), f"no warning naming {newest.name}:\n{result.stderr}"
    assert previous.name not in result.stderr, "the intact previous checkpoint was reported as bad"

    # Resumed from the previous checkpoint: the first step trained is the one after it.
    logged = [int(s) for s in re.findall(r"^step (\d+) \|", result.stdout, flags=re.M)]
    assert logged == list(range(STEPS - CKPT_EVERY + 1, more + 1)), result.stdout
    assert checkpoint_steps(run)[-1] == more
    trainer = json.loads((step_dir(run, more) / "trainer.json").read_text())
    assert trainer["step"] == more
    train, _, order = read_metrics(run)
    assert order == list(range(1, more + 1))
    train_a, _, _ = read_metrics(reference_run)
    for step in range(1, STEPS - CKPT_EVERY + 1):  # history before the restored checkpoint is kept as is
        assert train[step] == train_a[step]


def test_resume_with_every_checkpoint_corrupt_fails_cleanly(reference_run, resume_config, run_levante, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    for step in checkpoint_steps(run):
        weights = step_dir(run, step) / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    metrics_before = (run / "metrics.jsonl").read_bytes()

    result = run_levante("train", resume_config, "--out", run, "--resume")
    assert result.returncode != 0
    line = assert_one_error_line(result.stderr)
    assert "checkpoint" in line, line
    assert not re.search(r"^step \d+ \|", result.stdout, flags=re.M), "trained from scratch instead of failing"
    assert (run / "metrics.jsonl").read_bytes() == metrics_before, "a failed resume rewrote the metrics log"
    assert checkpoint_steps(run) == [STEPS - CKPT_EVERY, STEPS], "a failed resume deleted checkpoints"


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_finished_run_is_never_restarted_over(reference_run, resume_config, run_levante, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    before = tree_bytes(run)
    result = run_levante("train", resume_config, "--out", run)
    assert result.returncode == 2
    line = assert_one_error_line(result.stderr)
    assert f"holds a run at step {STEPS}; use --resume to continue or --overwrite to replace it" in line
    assert tree_bytes(run) == before, "a refused run changed the directory"

    result = run_levante("train", resume_config, "--out", run, "--overwrite")
    assert result.returncode == 0, result.stderr
    _, _, order = read_metrics(run)
    assert order == list(range(1, STEPS + 1)), "--overwrite must start a fresh log, not append to the old one"
    assert checkpoint_steps(run) == [STEPS - CKPT_EVERY, STEPS]
