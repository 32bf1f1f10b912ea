"""The submitit_slurm launcher against a real SLURM cluster (`scripts/slurm-local.sh start`); skipped without one."""

import csv
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cli

SCRIPTS = REPO / "scripts"
PARTITION = "debug"  # scripts/slurm-local.sh's only partition


def cluster_problem() -> str | None:
    """Why no SLURM cluster is usable here, or None when one answers with an idle `debug` partition."""
    if shutil.which("sbatch") is None:
        return "sbatch not on PATH (install: scripts/slurm-local.sh install)"
    if not os.environ.get("SLURM_CONF"):
        return "SLURM_CONF unset (start a cluster: scripts/slurm-local.sh start, then export what it prints)"
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30)
        states = subprocess.run(
            ["sinfo", "-h", "-p", PARTITION, "-o", "%t"], capture_output=True, text=True, timeout=30
        ).stdout.split()
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"SLURM clients failed: {err}"
    if ping.returncode != 0 or "UP" not in ping.stdout:
        return f"slurmctld not answering: {(ping.stdout + ping.stderr).strip()}"
    if not any(s.rstrip("*~#") in ("idle", "mix", "alloc") for s in states):
        return f"no usable node in partition {PARTITION!r} (states: {states})"
    return None


@pytest.fixture(scope="module")
def slurm() -> dict[str, str]:
    """The environment for SLURM's clients: the cluster's, with the sacct stand-in first on PATH."""
    if (problem := cluster_problem()) is not None:
        pytest.skip(problem)
    # Without slurmdbd the real sacct fails; the stand-in lets submitit see hard-dead jobs instead of hanging.
    return {**os.environ, "PATH": f"{SCRIPTS}{os.pathsep}{os.environ['PATH']}"}


def job_states(job_id: str, env: dict[str, str]) -> dict[str, tuple[str, str]]:
    """{array task id: (state, node)} of a SLURM job, as the sacct stand-in reads them from scontrol."""
    out = subprocess.run(
        [str(SCRIPTS / "sacct"), "-o", "JobID,State,NodeList", "--parsable2", "-j", job_id],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout
    rows = [line.split("|") for line in out.splitlines()[1:]]
    return {task: (state, node) for task, state, node in rows}


@pytest.mark.timeout(400)
def test_grid_runs_as_slurm_array(slurm: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 2-job grid through `hydra/launcher=slurm`: one array job, every task COMPLETED, every job's metrics ok."""
    monkeypatch.setenv("PATH", slurm["PATH"])  # run_cli passes os.environ to the CLI (and so to submitit)
    sweep = tmp_path / "sweep"  # submitit's folder is under it: the node (this host) sees it
    grid = ["model=manual,linear"]
    proc = run_cli(
        *("-m", "linreg.train", "-m"),
        "hydra/launcher=slurm",
        f"hydra.launcher.partition={PARTITION}",
        "hydra.launcher.mem_gb=1",  # exercises --mem: needs the node's RealMemory
        "hydra.launcher.timeout_min=10",
        f"hydra.sweep.dir={sweep}",
        *grid,
        "data.num_examples=100",
        "trainer.max_epochs=1",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    metrics = {int(d.name): json.loads((d / "metrics.json").read_text()) for d in sweep.iterdir() if d.name.isdigit()}
    assert sorted(metrics) == [0, 1]
    assert {m["model"] for m in metrics.values()} == {"manual", "linear"}
    for m in metrics.values():
        assert m["status"] == "ok", m
        assert m["steps"] == 10  # 100 samples, batch 10, 1 epoch
        assert m["train_mse"] is not None and m["train_mse"] < 10

    # The jobs ran on the cluster: one array job, its tasks finished on this node.
    submitted = sorted(p.name for p in (sweep / ".submitit").iterdir() if re.fullmatch(r"\d+_\d+", p.name))
    array_id = submitted[0].split("_")[0]
    assert submitted == [f"{array_id}_0", f"{array_id}_1"]
    node = subprocess.run(["hostname", "-s"], capture_output=True, text=True, check=True).stdout.strip()
    states = job_states(array_id, slurm)
    assert {task: states.get(task) for task in submitted} == {task: ("COMPLETED", node) for task in submitted}

    # The multirun callback's table, built in the submitting process from the jobs' metrics.json.
    assert (sweep / "results.md").is_file()
    with (sweep / "results.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(metrics)
    assert sorted(r["status"] for r in rows) == ["ok", "ok"]
    assert sorted(r["model"] for r in rows) == ["linear", "manual"]
    by_model = {m["model"]: m for m in metrics.values()}
    for r in rows:
        assert float(r["train_mse"]) == pytest.approx(by_model[r["model"]]["train_mse"], rel=1e-6)


@pytest.mark.timeout(180)
def test_hard_dead_job_is_reported(slurm: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A job killed without a result file ends submitit's wait with an error (via the sacct stand-in), not a hang."""
    submitit = pytest.importorskip("submitit")
    monkeypatch.setenv("PATH", slurm["PATH"])
    executor = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="slurm")
    executor.update_parameters(slurm_partition=PARTITION, timeout_min=5, cpus_per_task=1)
    job = executor.submit(os._exit, 3)  # dies before submitit can write a result
    # Without a working sacct this waits forever (pytest-timeout ends it); the watcher polls at 2, 4, 8, ... s.
    with pytest.raises(submitit.core.utils.UncompletedJobError):
        job.result()
    assert job.state == "FAILED"
