"""The launchers through the CLI: a sweep's console, the same bits whichever runs a job, and workers that end with
their sweep. `make test` runs one quick joblib sweep; the rest are `system` tests."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import REPO, Ran, run_cli

LAUNCHERS = {
    "basic": [],
    "joblib": ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
    "submitit_local": ["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10"],
}


@pytest.mark.system
@pytest.mark.parametrize("model", ["manual", "linear"])
def test_every_launcher_gives_the_same_bits(tmp_path, model):
    # 60,000 samples: big enough that torch splits its reductions across threads unless the run fixes them.
    args = [f"model={model}", "data.num_examples=60000", "trainer.max_epochs=1", "seed=1,2", "~logger"]
    results = {}
    for name, launcher in LAUNCHERS.items():
        sweep = tmp_path / name
        proc = run_cli("--multirun", *launcher, *args, f"hydra.sweep.dir={sweep}")
        assert proc.returncode == 0, proc.stderr[-2000:]
        results[name] = [json.loads((sweep / j / "metrics.json").read_text()) for j in ("0", "1")]
    keys = ("train_mse", "epoch_mse", "weights", "ols_mse", "steps")
    basic = [{k: m[k] for k in keys} for m in results["basic"]]
    for name in ("joblib", "submitit_local"):
        assert [{k: m[k] for k in keys} for m in results[name]] == basic, name


def alive(pid: int) -> bool:
    """Whether `pid` is a live process (not gone, not a zombie)."""
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in state


def lock_holders(sweep_pid: int, locks: list[Path]) -> dict[Path, int]:
    """{run-dir lock: pid} for the sweep's descendants that hold a job's `.lock` open (the processes running jobs)."""
    found = {}
    for proc in psutil.Process(sweep_pid).children(recursive=True):
        try:
            opened = {Path(f.path) for f in proc.open_files()}
        except psutil.Error:  # gone, or a zombie: not running a job
            continue
        found |= {lock: proc.pid for lock in locks if lock in opened}
    return found


@pytest.mark.system
@pytest.mark.parametrize("ctrl_c", [False, True], ids=["SIGKILL", "SIGINT"])
@pytest.mark.parametrize("launcher", ["joblib", "submitit_local"])
def test_workers_of_a_killed_sweep_end(tmp_path, launcher, ctrl_c):
    sweep = tmp_path / "sweep"
    args = [*LAUNCHERS[launcher], "data.num_examples=20000", "seed=1,2", "~logger"]
    long = ["trainer.max_epochs=200"]  # minutes: both jobs are still training when the sweep is killed
    cmd = [sys.executable, "-m", "linreg.train", "-m", *args, *long, f"hydra.sweep.dir={sweep}"]
    err = (tmp_path / "stderr").open("w+")
    sweeper = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    locks = [sweep / j / ".lock" for j in ("0", "1")]
    try:
        deadline = time.monotonic() + 180
        while len(holders := lock_holders(sweeper.pid, locks)) < len(locks):
            assert time.monotonic() < deadline and sweeper.poll() is None, "the jobs never started"
            time.sleep(0.02)  # kill at once: a job may not have built its Trainer yet, and must still end
        workers = sorted(holders.values())
        assert sweeper.pid not in workers  # jobs run in the launcher's worker processes
        others = [p.pid for p in psutil.Process(sweeper.pid).children(recursive=True)]
    finally:
        if sweeper.poll() is None and ctrl_c:  # a terminal's Ctrl-C: the whole group, workers too; the sweep ends
            os.killpg(sweeper.pid, signal.SIGINT)
        elif sweeper.poll() is None:
            os.kill(sweeper.pid, signal.SIGKILL)  # the sweep's own process only: its workers are orphaned
        sweeper.wait()
        err.close()
    if ctrl_c:  # joblib's resource tracker may add its "leaked semlock objects" warning after the sweep's line
        said = Path(err.name).read_text()
        assert sweeper.returncode == 1 and "Traceback" not in said, said[-2000:]
        assert f"error: sweep {sweep}: stopped: by SIGINT (Ctrl-C); once it can, resume=true goes on" in said
    deadline = time.monotonic() + 180  # a loaded machine: a worker notices at its next training call
    while any(alive(pid) for pid in workers):
        assert time.monotonic() < deadline, [Path(f"/proc/{p}/status").read_text()[:300] for p in workers if alive(p)]
        time.sleep(0.2)
    assert not any((sweep / j / "metrics.json").exists() for j in ("0", "1"))
    assert all("job ended: the sweep's process" in (sweep / j / "train.log").read_text() for j in ("0", "1"))
    # Nothing else the sweep started stays behind either (joblib's idle workers, its resource tracker).
    while any(alive(pid) for pid in others):
        assert time.monotonic() < deadline, [Path(f"/proc/{p}/cmdline").read_text()[:300] for p in others if alive(p)]
        time.sleep(0.2)


@pytest.fixture(scope="module")
def joblib_sweep(tmp_path_factory: pytest.TempPathFactory) -> Ran:
    """The smoke sweep (4 jobs) with joblib's 2 workers: the one parallel sweep of `make test`. Each job runs in its
    own dir (`hydra.job.chdir=true`), the sweep dir given relative to where the sweep starts."""
    cwd = tmp_path_factory.mktemp("joblib")
    args = ["--multirun", "sweep=smoke", *LAUNCHERS["joblib"], "hydra.job.chdir=true", "hydra.sweep.dir=sweep"]
    proc = run_cli(*args, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return Ran(cwd / "sweep", proc)


def test_a_parallel_sweeps_console_is_a_line_a_job_between_a_header_and_a_footer(joblib_sweep: Ran) -> None:
    # The basic launcher's console is tests/test_results.py's; with 2 workers each job's line still comes once.
    sweep, proc = joblib_sweep.dir, joblib_sweep.proc
    lines = (proc.stdout + proc.stderr).splitlines()
    assert len(lines) == 6, lines
    assert lines[0].endswith("sweep: 4 jobs -> sweep") and lines[-1].endswith("4 jobs: 4 ok -> sweep/results.md")
    # Each its finishing rank and what it varies, also in progress.log: the jobs found the sweep dir from theirs.
    assert sorted(line.split("[linreg.results][INFO] - ")[1][:4] for line in lines[1:-1]) == [f"[{k}/4" for k in "1234"]
    assert all(" model=" in line and "ok train_mse=" in line and "data." not in line for line in lines[1:-1])
    assert len((sweep / "progress.log").read_text().splitlines()) == 4
    assert len(set(lines)) == len(lines)  # every line once


def test_joblib_jobs_get_distinct_dirs_and_tensorboard_runs(joblib_sweep: Ran) -> None:
    """Jobs that run at once in 2 workers: each writes its own dir and its own TensorBoard run."""
    sweep = joblib_sweep.dir
    records = [json.loads((sweep / j / "metrics.json").read_text()) for j in "0123"]
    assert [(r["model"], r["lr"], r["status"]) for r in records] == [
        ("manual", 0.03, "ok"),
        ("manual", 0.1, "ok"),
        ("linear", 0.03, "ok"),
        ("linear", 0.1, "ok"),
    ]
    events = [sorted((sweep / j / "tensorboard").rglob("events.out.tfevents.*")) for j in "0123"]
    assert all(len(e) == 1 for e in events)  # one run each: no job wrote into another's TensorBoard dir


def test_a_setting_the_launcher_refuses_is_one_line_and_leaves_no_dir(tmp_path):
    proc = run_cli("--multirun", "model.lr=0.1,0.2", "hydra/launcher=joblib", "hydra.launcher.prefer=nope",
                   f"hydra.sweep.dir={tmp_path / 'sweep'}")  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.splitlines()[-1].startswith("error: hydra.launcher: ValueError: ")
    assert not (tmp_path / "sweep").exists()


@pytest.mark.system
def test_a_dead_worker_stops_the_sweep_with_the_table_of_what_finished(tmp_path):
    sweep = tmp_path / "sweep"
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # tests.user_classes for the workers
    logger = "logger.csv._target_=tests.user_classes.SigkillCSVLogger"
    proc = run_cli("--multirun", "model.lr=0.1,0.2", "data.num_examples=100", "trainer.max_epochs=1", "logger=csv",
                   logger, *LAUNCHERS["joblib"], f"hydra.sweep.dir={sweep}", env=env)  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    why = "stopped: its launcher failed: TerminatedWorkerError: "
    assert proc.stderr.splitlines()[-1].startswith(f"error: sweep {sweep}: {why}")
    with open(sweep / "results.csv", newline="") as f:
        assert [(r["job"], r["status"]) for r in csv.DictReader(f)] == [("0", "ok"), ("1", "missing")]
