"""Launching: `levante train --nproc N`, a killed rank ends the job with one line naming it, and the
sbatch script of `levante launch slurm` run end to end under stand-in srun / scontrol (two torchrun
agents, --nnodes 2, c10d rendezvous on this host) trains what one process trains."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from test_parallel import ENV, EXACT_OPTIM, RTOL, assert_close, config, steps_of


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_nproc_trains_on_two_ranks(tiny_workspace, run_levante, tmp_path, monkeypatch):
    for key, value in ENV.items():
        monkeypatch.setenv(key, value)
    one, two = tmp_path / "one", tmp_path / "two"
    assert run_levante("train", config(tiny_workspace, tmp_path / "1.toml", 4, "adamw"), "--out", one).returncode == 0
    result = run_levante("train", config(tiny_workspace, tmp_path / "2.toml", 2, "adamw"), "--out", two, "--nproc", 2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("done:") == 1
    for r1, r2 in zip(steps_of(one), steps_of(two), strict=True):
        assert_close(r1["loss"], r2["loss"], f"step {r1['step']}", RTOL)


def rank_pids(parent: int) -> dict[int, int]:
    """{RANK: pid} of the processes under `parent` (the elastic agent's workers)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat[1]) == parent:
            for item in env:
                if item.startswith(b"RANK="):
                    found[int(item[5:])] = int(entry.name)
    return found


KILL_STEPS = 24  # far more than the steps that can pass between seeing checkpoint 2 and the kill


def test_a_killed_rank_ends_the_job_with_one_line_and_resume_finishes(tiny_workspace, popen_levante, run_levante,
                                                                      tmp_path, monkeypatch):
    for key, value in ENV.items():
        monkeypatch.setenv(key, value)
    run_table = {"steps": KILL_STEPS, "micro_batch_size": 2, "log_every": 1, "eval_every": 0}
    cfg = tiny_workspace.write_config(tmp_path / "c.toml", optim=EXACT_OPTIM, run={**run_table, "ckpt_every": 1})
    run = tmp_path / "run"
    with open(tmp_path / "out", "wb") as out, open(tmp_path / "err", "wb") as err:
        proc = popen_levante("train", cfg, "--out", run, "--nproc", 2, stdout=out, stderr=err)
        deadline = time.monotonic() + 120
        while not (run / "checkpoints" / "step_00000002").is_dir():
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "err").read_text()[-2000:]
            time.sleep(0.1)
        os.kill(rank_pids(proc.pid)[1], signal.SIGKILL)
        rc = proc.wait(timeout=60)  # the bound: the job ends within 60 s
    errors = [line for line in (tmp_path / "err").read_text().splitlines() if line.startswith("error:")]
    assert rc == 2 and len(errors) == 1, (tmp_path / "err").read_text()[-2000:]
    assert "rank 1 failed (killed by signal 9)" in errors[0]
    # The newest checkpoint is intact, and `--resume` at 2 ranks continues from it to the end ...
    from levante.checkpoint.verify import newest_valid

    assert newest_valid(run / "checkpoints", required=("trainer.json",)) is not None
    result = run_levante("train", cfg, "--out", run, "--nproc", 2, "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    logged = [int(line.split()[1]) for line in result.stdout.splitlines() if line.startswith("step ")]
    assert logged and 2 < logged[0] and logged == list(range(logged[0], KILL_STEPS + 1)), logged
    # ... training what an uninterrupted 2-rank run trains.
    whole = tmp_path / "whole"
    reference = tiny_workspace.write_config(tmp_path / "r.toml", optim=EXACT_OPTIM, run={**run_table, "ckpt_every": 0})
    result = run_levante("train", reference, "--out", whole, "--nproc", 2)
    assert result.returncode == 0, result.stderr[-3000:]
    ref, got = steps_of(whole), steps_of(run)
    assert [r["step"] for r in got] == [r["step"] for r in ref] == list(range(1, KILL_STEPS + 1))
    for r1, r2 in zip(ref, got, strict=True):
        for key in ("loss", "grad_norm"):
            assert_close(r1[key], r2[key], f"step {r1['step']} {key}", RTOL)


STAND_IN_SRUN = """#!/bin/bash
# srun for a test: start the command once per "node" on this machine and wait for all of them.
while [[ "$1" == --* ]]; do shift; done
pids=()
for node in $(seq 1 "$SLURM_JOB_NUM_NODES"); do "$@" & pids+=($!); done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"""


def test_slurm_script_runs_under_stand_in_srun(tiny_workspace, run_levante, tmp_path, monkeypatch):
    for key, value in ENV.items():
        monkeypatch.setenv(key, value)
    one, run = tmp_path / "one", tmp_path / "run"
    assert run_levante("train", config(tiny_workspace, tmp_path / "1.toml", 4, "muon"), "--out", one).returncode == 0
    cfg = config(tiny_workspace, tmp_path / "2.toml", 2, "muon")
    port = free_port()
    result = run_levante("launch", "slurm", cfg, "--out", run, "--nodes", 2, "--gpus-per-node", 1,
                         "--partition", "booster", "--time", "01:00:00", "--port", port)
    assert result.returncode == 0, result.stderr
    script = (run / "train.sbatch").read_text()
    for needle in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=1",
                   "#SBATCH --partition=booster", "#SBATCH --time=01:00:00", "scontrol show hostnames",
                   "--rdzv_backend=c10d", f'--rdzv_endpoint="$head_node:{port}"', "--nproc_per_node=1",
                   "NCCL_DEBUG", "-m levante train", "--resume"):
        assert needle in script, needle

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(STAND_IN_SRUN)
    # Many lines, as a big allocation prints: the script must read them all (no SIGPIPE under pipefail).
    (bin_dir / "scontrol").write_text("#!/bin/bash\nfor i in $(seq 5000); do echo 127.0.0.1; done\n")
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NUM_NODES": "2",
           "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_JOB_ID": "4242"}
    done = subprocess.run(["bash", str(run / "train.sbatch")], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for r1, r2 in zip(steps_of(one), steps_of(run), strict=True):
        assert_close(r1["loss"], r2["loss"], f"step {r1['step']}", RTOL)
    assert len(steps_of(run)) == len(steps_of(one))


def test_bad_launch_input_is_one_line(tiny_workspace, run_levante, tmp_path):
    cfg = tiny_workspace.write_config(tmp_path / "c.toml")
    result = run_levante("launch", "slurm", cfg, "--out", tmp_path / "r", "--nodes", 0, "--gpus-per-node", 4)
    assert result.returncode == 2 and result.stderr.startswith("error:") and "--nodes" in result.stderr
