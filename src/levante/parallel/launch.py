"""Starting distributed training: `levante train --nproc N` on this machine (torch's elastic agent,
as torchrun --standalone does), and the sbatch script for multi-node Slurm jobs.

Multi-node (the script's pattern): one torchrun agent per node, all meeting at a c10d rendezvous on
the first node's host name; each agent starts `--nproc_per_node` ranks. By hand on two machines:

    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST0:29500 \\
        --rdzv_id myrun -m levante train CONFIG --out DIR
"""

from __future__ import annotations

import shlex
import sys
import uuid
from pathlib import Path

from levante.errors import LevanteError


def launch_local(nproc: int, train_args: list[str]) -> None:
    """Run `levante train *train_args` on `nproc` local ranks; a failing rank -> one LevanteError line."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if nproc < 1:
        raise LevanteError(f"--nproc must be >= 1, got {nproc}")
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.5)
    try:
        elastic_launch(config, sys.executable)("-m", "levante", "train", *train_args)
    except ChildFailedError as e:
        raise LevanteError(describe_failure(e.failures)) from None


def describe_failure(failures: dict) -> str:
    """One line naming the failed rank: the agent stops the others with SIGTERM, so a rank that ended
    otherwise is the cause; among several, the earliest."""
    causes = {r: f for r, f in failures.items() if f.exitcode != -15} or failures
    rank = min(causes, key=lambda r: (getattr(causes[r], "timestamp", 0), r))
    failure = causes[rank]
    code = failure.exitcode
    how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
    return f"training rank {rank} failed ({how}); the other ranks were stopped"


NCCL_NOTES = """\
# NCCL settings (see https://docs.nvidia.com/deeplearning/nccl/user-guide/docs/env.html):
#   NCCL_DEBUG=WARN                  warnings only; INFO prints the chosen transports (first run on a cluster)
#   NCCL_SOCKET_IFNAME               the interface for bootstrap traffic: set it on nodes with several NICs
#   NCCL_IB_HCA / NCCL_NET_GDR_LEVEL InfiniBand adapters and GPUDirect RDMA, cluster specific
#   TORCH_NCCL_ASYNC_ERROR_HANDLING=1  a hung or failed collective ends the job instead of blocking it
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
"""


def slurm_script(config: Path, out: Path, nodes: int, gpus_per_node: int, partition: str | None = None,
                 time: str | None = None, port: int = 29500, python: str | None = None) -> str:
    """An sbatch script: srun starts one torchrun agent per node, c10d rendezvous on the first node."""
    if nodes < 1 or gpus_per_node < 1:
        raise LevanteError(f"--nodes and --gpus-per-node must be >= 1, got {nodes} and {gpus_per_node}")
    python = python or sys.executable
    q = shlex.quote
    lines = ["#!/bin/bash", "#SBATCH --job-name=levante", f"#SBATCH --nodes={nodes}",
             "#SBATCH --ntasks-per-node=1", f"#SBATCH --gpus-per-node={gpus_per_node}",
             f"#SBATCH --output={out.resolve()}/slurm-%j.out"]
    if partition:
        lines.append(f"#SBATCH --partition={partition}")
    if time:
        lines.append(f"#SBATCH --time={time}")
    lines += ["set -euo pipefail", "", NCCL_NOTES,
              "# The rendezvous host: the first node of the allocation.",
              # sed reads all of scontrol's lines: `head -n 1` could close the pipe early and, under
              # pipefail, kill the script with SIGPIPE.
              'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)',
              "",
              "# One torchrun agent per node; --resume makes a requeued job continue from its last checkpoint.",
              f"srun --kill-on-bad-exit=1 {q(python)} -m torch.distributed.run \\",
              f'    --nnodes="$SLURM_JOB_NUM_NODES" --nproc_per_node={gpus_per_node} \\',
              f'    --rdzv_id="$SLURM_JOB_ID" --rdzv_backend=c10d --rdzv_endpoint="$head_node:{port}" \\',
              f"    -m levante train {q(str(config.resolve()))} --out {q(str(out.resolve()))} --resume", ""]
    return "\n".join(lines)
