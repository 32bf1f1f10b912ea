"""The launchers through the CLI: the same bits whichever runs a job, and workers that end with their sweep."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cli

pytestmark = pytest.mark.slow

LAUNCHERS = {
    "basic": [],
    "joblib": ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
    "submitit_local": ["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10"],
}


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


@pytest.mark.parametrize("launcher", ["joblib", "submitit_local"])
def test_workers_of_a_killed_sweep_end(tmp_path, launcher):
    sweep = tmp_path / "sweep"
    args = [*LAUNCHERS[launcher], "data.num_examples=20000", "seed=1,2", "~logger"]
    long = ["trainer.max_epochs=200"]  # minutes: both jobs are still training when the sweep is killed
    cmd = [sys.executable, "-m", "linreg.train", "-m", *args, *long, f"hydra.sweep.dir={sweep}"]
    sweeper = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    locks = [sweep / j / ".lock" for j in ("0", "1")]
    try:
        deadline = time.monotonic() + 180
        while not all(p.exists() and p.read_text().strip() for p in locks):
            assert time.monotonic() < deadline and sweeper.poll() is None, "the jobs never started"
            time.sleep(0.01)  # kill at once: a job may not have built its Trainer yet, and must still end
        workers = [int(p.read_text()) for p in locks]
        assert sweeper.pid not in workers  # jobs run in joblib's worker processes
    finally:
        os.kill(sweeper.pid, signal.SIGKILL)  # the sweep's own process only: its workers are orphaned
        sweeper.wait()
    deadline = time.monotonic() + 180  # a loaded machine: a worker notices at its next training call
    while any(alive(pid) for pid in workers):
        assert time.monotonic() < deadline, [Path(f"/proc/{p}/status").read_text()[:300] for p in workers if alive(p)]
        time.sleep(0.2)
    assert not any((sweep / j / "metrics.json").exists() for j in ("0", "1"))
    assert all("job ended: the sweep's process" in (sweep / j / "train.log").read_text() for j in ("0", "1"))


@pytest.mark.parametrize("launcher", ["basic", "joblib"])
def test_a_sweeps_console_is_a_line_a_job_between_a_header_and_a_footer(tmp_path, launcher):
    sweep = tmp_path / "sweep"
    proc = run_cli("--multirun", "sweep=smoke", *LAUNCHERS[launcher], f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = (proc.stdout + proc.stderr).splitlines()
    assert len(lines) == 6, lines
    assert lines[0].endswith(f"sweep: 4 jobs -> {sweep}") and lines[-1].endswith(
        "4 jobs: 4 ok -> " + str(sweep / "results.md")
    )
    assert all("ok train_mse=" in line for line in lines[1:-1])
    assert len(set(lines)) == len(lines)  # every line once
