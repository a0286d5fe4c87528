#!/usr/bin/env python
"""Wall time, peak RSS and held-out bits-per-byte of `levante quickstart`, run as a child process.

Runs `levante quickstart --out DIR --minutes M` (or `--steps N`), waits for it with os.wait4 and
reports:

  * wall time of the whole job (tokenizer, shards, calibration, training, eval, samples, report);
  * peak RSS of the largest single process in the child's tree (ru_maxrss from wait4: Linux folds
    in the waited-for descendants, e.g. the tokenizer's spawn workers, as a max, not a sum);
  * on Linux, also the peak SUM of RSS over the child and all its descendants, sampled from /proc
    every --sample-s seconds (a sampled figure: short spikes between samples are missed);
  * untrained vs trained held-out bits per byte per language and overall, read from DIR/eval.json.

    python benchmarks/bench_quickstart.py --minutes 4 --json quickstart.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import cpu_model  # benchmarks/common.py (the script's own folder is on sys.path)


def maxrss_mib(ru_maxrss: int) -> float:
    return ru_maxrss / (1024 * 1024) if sys.platform == "darwin" else ru_maxrss / 1024


class TreeRSSSampler(threading.Thread):
    """Peak of sum(RSS) over a process and its descendants, read from /proc (Linux only)."""

    def __init__(self, root: int, interval: float):
        super().__init__(daemon=True)
        self.root, self.interval = root, interval
        self.page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self.peak_bytes = 0
        self.max_procs = 0
        self._halt = threading.Event()

    def _tree_rss(self) -> tuple[int, int]:
        children: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", encoding="utf-8") as f:
                    stat = f.read()
            except OSError:
                continue
            # The command name is in parentheses and may hold spaces: split after the last ')'.
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
        total, count, todo = 0, 0, [self.root]
        while todo:
            pid = todo.pop()
            try:
                with open(f"/proc/{pid}/statm", encoding="utf-8") as f:
                    total += int(f.read().split()[1]) * self.page
                count += 1
            except (OSError, IndexError, ValueError):
                pass
            todo.extend(children.get(pid, []))
        return total, count

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                total, count = self._tree_rss()
            except OSError:
                total, count = 0, 0
            self.peak_bytes = max(self.peak_bytes, total)
            self.max_procs = max(self.max_procs, count)
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)


def levante_command() -> list[str]:
    exe = shutil.which("levante")
    if exe:
        return [exe]
    return [sys.executable, "-c", "import sys; from levante.cli import main; sys.exit(main())"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=4.0, help="quickstart training budget (default: 4)")
    p.add_argument("--steps", type=int, default=0,
                   help="exact training steps instead of --minutes (for a quick sanity run)")
    p.add_argument("--out", default=None,
                   help="quickstart output directory (default: a temporary one, deleted afterwards)")
    p.add_argument("--keep", action="store_true", help="keep the temporary output directory")
    p.add_argument("--quiet", action="store_true", help="send the quickstart's own output to DIR/quickstart.log")
    p.add_argument("--sample-s", type=float, default=0.2, help="process-tree RSS sampling period (default: 0.2)")
    p.add_argument("--json", default=None, metavar="PATH", help="write the result as JSON here")
    args = p.parse_args(argv)

    tmp = None
    if args.out is None:
        tmp = tempfile.mkdtemp(prefix="levante-bench-quickstart-")
        out = Path(tmp) / "qs"
    else:
        out = Path(args.out)
    cmd = [*levante_command(), "quickstart", "--out", str(out)]
    cmd += ["--steps", str(args.steps)] if args.steps > 0 else ["--minutes", str(args.minutes)]
    print("running:", " ".join(cmd), flush=True)

    log = None
    if args.quiet:
        out.parent.mkdir(parents=True, exist_ok=True)
        log = open(out.parent / f"{out.name}.quickstart.log", "w", encoding="utf-8")
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT if log else None)
    sampler = None
    if sys.platform.startswith("linux") and os.path.isdir("/proc"):
        sampler = TreeRSSSampler(proc.pid, args.sample_s)
        sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if sampler is not None:
        sampler.stop()
    if log is not None:
        log.close()

    result = {
        "benchmark": "bench_quickstart",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join([sys.executable, *sys.argv]),
        "quickstart_command": cmd,
        "cpu": cpu_model(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
        "exit_code": proc.returncode,
        "wall_s": wall,
        "user_cpu_s": usage.ru_utime, "sys_cpu_s": usage.ru_stime,
        "peak_rss_mib_largest_process": maxrss_mib(usage.ru_maxrss),
        "peak_rss_mib_tree_sum_sampled": sampler.peak_bytes / 2**20 if sampler else None,
        "max_processes_in_tree": sampler.max_procs if sampler else None,
    }
    try:
        import torch

        result["torch"] = torch.__version__
        result["threads"] = torch.get_num_threads()
    except ImportError:
        pass

    if proc.returncode != 0:
        print(f"FAIL: quickstart exited with {proc.returncode} after {wall:.1f} s", file=sys.stderr)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        return 1

    ev = json.loads((out / "eval.json").read_text(encoding="utf-8"))
    untrained, trained = ev["untrained"], ev["trained"]
    langs = sorted(trained["per_language"])
    result["bpb"] = {
        "per_language": {lang: {"untrained": untrained["per_language"][lang]["bpb"],
                                "trained": trained["per_language"][lang]["bpb"]} for lang in langs},
        "overall": {"untrained": untrained["bpb"], "trained": trained["bpb"]},
    }
    steps = None
    for candidate in sorted(out.glob("**/metrics.jsonl")):
        try:  # the last logged step, if the trainer left a metrics log
            lines = [json.loads(x) for x in candidate.read_text(encoding="utf-8").splitlines() if x.strip()]
            steps = max((r["step"] for r in lines if isinstance(r.get("step"), int)), default=None)
        except (OSError, ValueError):
            pass
    result["trained_steps_logged"] = steps

    print()
    budget = f"--steps {args.steps}" if args.steps > 0 else f"--minutes {args.minutes:g}"
    print(f"### bench_quickstart: `levante quickstart {budget}` on {cpu_model()} ({os.cpu_count()} CPUs)")
    print()
    print(f"- wall time: {wall:.1f} s (user {usage.ru_utime:.1f} s, sys {usage.ru_stime:.1f} s of CPU)")
    print(f"- peak RSS, largest process: {result['peak_rss_mib_largest_process']:,.0f} MiB")
    if sampler:
        print(f"- peak RSS, sum over the process tree (sampled every {args.sample_s:g} s): "
              f"{result['peak_rss_mib_tree_sum_sampled']:,.0f} MiB (up to {sampler.max_procs} processes)")
    if steps is not None:
        print(f"- last logged training step: {steps}")
    print()
    print("| language | untrained bpb | trained bpb | change |")
    print("|---|---:|---:|---:|")
    for lang in langs:
        u, t = result["bpb"]["per_language"][lang]["untrained"], result["bpb"]["per_language"][lang]["trained"]
        print(f"| {lang} | {u:.3f} | {t:.3f} | {t - u:+.3f} |")
    u, t = untrained["bpb"], trained["bpb"]
    print(f"| **all** | **{u:.3f}** | **{t:.3f}** | **{t - u:+.3f}** |")

    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"\n- wrote {args.json}")
    if tmp is not None and not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    elif tmp is not None:
        print(f"- kept {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
