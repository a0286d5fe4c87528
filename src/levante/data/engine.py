"""`levante data prepare` on datatrove's executors: the same two stages on one machine
(LocalPipelineExecutor) or on a Slurm cluster (SlurmPipelineExecutor).

    stage 1, N tasks:  PrepareFiles  — rank r processes input files r, r + N, r + 2N, ... and leaves
                                       candidates, rejects, keys and MinHash signatures in a scratch
                                       folder on the shared filesystem
    stage 2, 1 task:   PrepareFinalize — dedup over *all* files at once, in input order, then shards,
                                       report and data card; renamed into place at the end

Dedup stays global because stage 2 sees every signature; the output is byte-identical to the
process-pool engine for any task count. datatrove is an optional dependency (`pip install
levante[cluster]`).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from datatrove.pipeline.base import PipelineStep

from levante.checkpoint.layout import refuse_non_empty
from levante.data.prepare import PrepareConfig, Task, finalize, plan_tasks, process_task
from levante.util import fsync_dir


class PrepareFiles(PipelineStep):
    name = "levante prepare: files"
    type = "Levante"

    def __init__(self, tasks: list[Task], config: PrepareConfig, scratch: str):
        super().__init__()
        self.tasks, self.config, self.scratch = tasks, config, scratch

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        for task in self.tasks[rank::world_size]:
            process_task(task, self.config, self.scratch)
            self.stat_update("files")
        yield from data or ()


class PrepareFinalize(PipelineStep):
    name = "levante prepare: dedup + write"
    type = "Levante"

    def __init__(self, tasks: list[Task], excluded: list[dict], config: PrepareConfig, stage: str, out: str):
        super().__init__()
        self.tasks, self.excluded, self.config, self.stage, self.out = tasks, excluded, config, stage, out

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        stage, scratch = Path(self.stage), Path(self.stage) / ".scratch"
        finalize(stage, scratch, self.tasks, self.excluded, self.config, time.time())
        shutil.rmtree(scratch)
        refuse_non_empty(self.out, overwrite=False)  # nothing appeared there while the job ran
        if Path(self.out).is_dir():
            Path(self.out).rmdir()
        os.replace(stage, self.out)
        fsync_dir(Path(self.out).parent)
        yield from data or ()


def run_datatrove_local(tasks: list[Task], config: PrepareConfig, scratch: Path, workers: int) -> None:
    """Stage 1 under LocalPipelineExecutor (the caller runs stage 2 in its staged directory)."""
    from datatrove.executor import LocalPipelineExecutor

    n = max(1, min(workers, len(tasks)))
    LocalPipelineExecutor(pipeline=[PrepareFiles(tasks, config, str(scratch))], tasks=n, workers=n,
                          logging_dir=str(scratch / "datatrove-logs"), skip_completed=False).run()


def executors(inputs: list[str], out: str | Path, config: PrepareConfig, *, tasks: int, slurm: dict | None = None):
    """(stage1, stage2) executors for a whole run; `stage2.run()` runs both (it depends on stage 1).

    slurm=None gives LocalPipelineExecutors (what the tests run); otherwise a dict of
    SlurmPipelineExecutor arguments (partition, time, cpus_per_task, venv_path, ...). Stage and
    scratch live next to `out`, which must be on a filesystem every node sees."""
    out = Path(out).absolute()
    refuse_non_empty(out, overwrite=False)
    file_tasks, excluded = plan_tasks(inputs, config.license)
    stage = out.parent / f".{out.name}.staging"
    (stage / ".scratch").mkdir(parents=True, exist_ok=False)
    logs = str(out.parent / f".{out.name}.datatrove-logs")  # outside the stage, which is renamed away
    first = [PrepareFiles(file_tasks, config, str(stage / ".scratch"))]
    last = [PrepareFinalize(file_tasks, excluded, config, str(stage), str(out))]
    if slurm is None:
        from datatrove.executor import LocalPipelineExecutor

        s1 = LocalPipelineExecutor(pipeline=first, tasks=tasks, workers=tasks, logging_dir=logs + "/files")
        s2 = LocalPipelineExecutor(pipeline=last, tasks=1, workers=1, logging_dir=logs + "/finalize", depends=s1)
        return s1, s2
    from datatrove.executor import SlurmPipelineExecutor

    s1 = SlurmPipelineExecutor(pipeline=first, tasks=tasks, logging_dir=logs + "/files",
                               job_name="levante-prepare-files", **slurm)
    s2 = SlurmPipelineExecutor(pipeline=last, tasks=1, logging_dir=logs + "/finalize",
                               job_name="levante-prepare-finalize", depends=s1, **slurm)
    return s1, s2
