"""`python -m benchmarks.sweep_memory`: how the launcher process's memory grows over a sweep of tiny jobs.

It runs `python -m linreg.train -m` with N tiny jobs (`data.num_examples=10 trainer.max_epochs=1 ~logger
seed=range(N)`) and a Hydra callback, `RssRecorder`, that appends the launcher process's resident memory
(VmRSS) to `<sweep dir>/rss.tsv` as each job ends. With joblib the callback runs in a worker and reads the
launcher's RSS from /proc/<launcher pid>/status. `--trace` (basic launcher only) also compares tracemalloc
snapshots taken at job `--at` and at the last job, and prints where the memory between them was allocated.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import tracemalloc
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

REPO = Path(__file__).resolve().parents[1]
RSS_FILE = "rss.tsv"
TRACE_FILE = "tracemalloc.txt"
TRACE_FRAMES = 30  # deep enough to reach the code that asked for a copy, below copy.py and OmegaConf
TINY = ["data.num_examples=10", "trainer.max_epochs=1", "~logger"]


def rss_kb(pid: int) -> int:
    """VmRSS of a process in KiB, from /proc/<pid>/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


class RssRecorder(Callback):
    """Appends `<job num> <pid> <launcher RSS KiB> <this process's RSS KiB>` to rss.tsv as each job ends."""

    def __init__(self, trace_at: int = 0) -> None:
        self.trace_at = trace_at
        self.ended = 0
        self.launcher_pid = os.getpid()
        self.first: tracemalloc.Snapshot | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # Joblib pickles the callbacks to its workers after this: they read the launcher's pid from here.
        self.launcher_pid = os.getpid()
        if self.trace_at:
            tracemalloc.start(TRACE_FRAMES)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        pid = os.getpid()
        line = f"{config.hydra.job.num}\t{pid}\t{rss_kb(self.launcher_pid)}\t{rss_kb(pid)}\n"
        with open(Path(config.hydra.sweep.dir) / RSS_FILE, "a") as f:
            f.write(line)  # one short append: whole lines in finishing order, even from parallel workers
        self.ended += 1
        if self.trace_at and self.ended == self.trace_at:
            self.first = tracemalloc.take_snapshot()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.first is None:
            return
        last = tracemalloc.take_snapshot()
        top = last.compare_to(self.first, "traceback")[:12]
        lines = [
            f"{s.size_diff / 1024:9.1f} KiB {s.count_diff:+7d} blocks"
            + "".join(f"\n    {frame.filename}:{frame.lineno}" for frame in callers(s.traceback))
            for s in top
        ]
        (Path(config.hydra.sweep.dir) / TRACE_FILE).write_text("\n".join(lines) + "\n")


def callers(traceback: tracemalloc.Traceback) -> list[tracemalloc.Frame]:
    """The frames of an allocation outside copy and OmegaConf's internals: who made the copies."""
    frames = [f for f in traceback if not any(part in f.filename for part in ("/copy.py", "copyreg", "/omegaconf/"))]
    return frames[:6]


def read_records(sweep_dir: Path) -> list[tuple[int, int, int, int]]:
    """rss.tsv's rows, `(job num, pid, launcher KiB, own KiB)`, in the order the jobs finished."""
    rows = (line.split("\t") for line in (sweep_dir / RSS_FILE).read_text().splitlines())
    return [(int(num), int(pid), int(launcher), int(own)) for num, pid, launcher, own in rows]


def read_rss(sweep_dir: Path) -> list[int]:
    """The launcher's RSS in KiB after each finished job, in the order the jobs finished."""
    return [launcher for _, _, launcher, _ in read_records(sweep_dir)]


def worker_rss(sweep_dir: Path, after: int) -> dict[int, tuple[int, int]]:
    """Each worker process's RSS (KiB) at its first job after the `after`-th finished one, and at its last."""
    workers: dict[int, tuple[int, int]] = {}
    for _, pid, _, own in read_records(sweep_dir)[after:]:
        workers[pid] = (workers.get(pid, (own, own))[0], own)
    return workers


def sweep_command(
    sweep_dir: Path, jobs: int, launcher: str, n_jobs: int, trace_at: int = 0, extra: Sequence[str] = ()
) -> list[str]:
    """The CLI line of a sweep of `jobs` tiny jobs with the recorder on, and any extra overrides."""
    cmd = [sys.executable, "-m", "linreg.train", "-m", f"hydra.sweep.dir={sweep_dir}", *TINY, f"seed=range({jobs})"]
    cmd.append("+hydra.callbacks.rss._target_=benchmarks.sweep_memory.RssRecorder")
    if trace_at:
        cmd.append(f"+hydra.callbacks.rss.trace_at={trace_at}")
    if launcher == "joblib":
        cmd += ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={n_jobs}"]
    return cmd + list(extra)


def run_sweep(
    sweep_dir: Path, jobs: int, launcher: str = "basic", n_jobs: int = 2, trace_at: int = 0, extra: Sequence[str] = ()
) -> list[int]:
    """Run the sweep through the CLI; the launcher's RSS per finished job (KiB)."""
    cmd = sweep_command(sweep_dir, jobs, launcher, n_jobs, trace_at, extra)
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"sweep failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return read_rss(sweep_dir)


def main() -> None:
    """Run one sweep and print the launcher's RSS at job `--at` and at the end."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--at", type=int, default=100, help="the job to compare the end with")
    parser.add_argument("--launcher", choices=["basic", "joblib"], default="basic")
    parser.add_argument("--n-jobs", type=int, default=2, help="joblib workers")
    parser.add_argument("--trace", action="store_true", help="tracemalloc diff between job --at and the end")
    parser.add_argument("--set", action="append", default=[], help="one more override (repeatable)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sweep_dir = Path(tmp) / "sweep"
        rss = run_sweep(sweep_dir, args.jobs, args.launcher, args.n_jobs, args.at if args.trace else 0, args.set)
        at, end = rss[args.at - 1], rss[-1]
        print(
            f"{args.launcher}: {len(rss)} jobs; launcher RSS at job {args.at}: {at / 1024:.1f} MiB, "
            f"at the end: {end / 1024:.1f} MiB (+{(end - at) / 1024:.1f} MiB, "
            f"{(end - at) / max(1, len(rss) - args.at):.1f} KiB a job)"
        )
        for pid, (first, last) in worker_rss(sweep_dir, args.at).items() if args.launcher == "joblib" else ():
            print(f"  worker {pid}: {first / 1024:.1f} MiB after job {args.at}, {last / 1024:.1f} MiB at its last job")
        if args.trace and (sweep_dir / TRACE_FILE).exists():
            print((sweep_dir / TRACE_FILE).read_text())


if __name__ == "__main__":
    main()
