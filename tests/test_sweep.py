"""Sweeps through the real CLI: the results table, diverged and failed jobs, resume, submitit (joblib: see
test_launchers.py)."""

import csv
import json
import os
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import REPO, SMALL, run_cli


def read_csv(sweep: Path) -> list[dict[str, str]]:
    with open(sweep / "results.csv") as f:
        return list(csv.DictReader(f))


def metrics_of(sweep: Path, job: str) -> dict:
    return json.loads((sweep / job / "metrics.json").read_text())


def number(cell: str) -> float | None:
    """A CSV cell as a number; an empty cell (no value: a diverged or failed job's) as None."""
    return float(cell) if cell else None


def check_rows_match_metrics(sweep: Path, jobs: int) -> list[dict[str, str]]:
    """Every job is one row, and its values are the job's metrics.json values exactly."""
    rows = read_csv(sweep)
    assert [r["job"] for r in rows] == [str(i) for i in range(jobs)]
    for row in rows:
        m = metrics_of(sweep, row["job"])
        assert row["status"] == m["status"] and row["model"] == m["model"]
        assert float(row["lr"]) == m["lr"] and int(row["batch_size"]) == m["batch_size"]
        assert float(row["deg"]) == m["data"]["deg"] and float(row["delta"]) == m["data"]["delta"]
        assert row["accelerator"] == m["accelerator"] and int(row["seed"]) == m["seed"]
        for key in ("train_mse", "ols_mse", "fit_seconds"):
            assert number(row[key]) == m[key], key
        assert (json.loads(row["weights"]) if row["weights"] else None) == m["weights"]
        assert int(row["steps"]) == m["steps"]
        assert Path(row["dir"]) == (sweep / row["job"]).resolve()
    return rows


@pytest.fixture(scope="module")
def grid(tmp_path_factory) -> tuple[Path, object]:
    """2 models x lr 0.03 (converges) and 100 (diverges): 4 jobs, one CLI call."""
    sweep = tmp_path_factory.mktemp("grid") / "sweep"
    proc = run_cli("--multirun", f"hydra.sweep.dir={sweep}", *SMALL, "model=manual,linear", "model.lr=0.03,100")
    return sweep, proc


def test_grid_table_matches_every_jobs_metrics(grid):
    sweep, proc = grid
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = check_rows_match_metrics(sweep, 4)
    assert [(r["model"], float(r["lr"])) for r in rows] == [
        ("manual", 0.03),
        ("manual", 100),
        ("linear", 0.03),
        ("linear", 100),
    ]
    md = (sweep / "results.md").read_text()
    assert "4 jobs: 2 ok, 2 diverged." in md


def test_diverging_job_is_an_outcome_not_a_failure(grid):
    sweep, proc = grid
    assert proc.returncode == 0
    diverged = [r for r in read_csv(sweep) if float(r["lr"]) == 100]
    assert [r["status"] for r in diverged] == ["diverged", "diverged"]
    assert all(r["diverged_epoch"] == "0" and r["train_mse"] == "" for r in diverged)
    assert all(r["status"] == "ok" and float(r["train_mse"]) < 5 for r in read_csv(sweep) if float(r["lr"]) == 0.03)


def test_grid_writes_valid_png_plots(grid):
    sweep, _ = grid
    for name in ("mse.png", "weights.png"):
        with Image.open(sweep / name) as img:
            img.verify()
            assert img.format == "PNG"
        with Image.open(sweep / name) as img:
            assert img.size[0] > 200 and img.size[1] > 200


def test_progress_line_per_finished_job(grid):
    sweep, proc = grid
    lines = (sweep / "progress.log").read_text().splitlines()
    assert [line.split(" ")[0] for line in lines] == ["[1/4", "[2/4", "[3/4", "[4/4"]
    clocks = [re.match(r"\[\d/4 ([^\]]*)\] ", line).group(1) for line in lines]
    # Elapsed, and (once the pace says something) what is left; the last line says only how long it took.
    assert all(re.fullmatch(r"[\dhms]+(, ~[\dhms]+ left)?", c) for c in clocks[:3])
    assert re.fullmatch(r"[\dhms]+", clocks[3])
    plain = [re.sub(r"^\[(\d/4) [^\]]*\]", r"[\1]", line) for line in lines]
    assert plain[0].startswith("[1/4] model=manual model.lr=0.03: ok train_mse=")
    assert plain[1] == "[2/4] model=manual model.lr=100: diverged train_mse=n/a"
    assert all(line in proc.stderr + proc.stdout for line in lines)  # shown while it runs, too


def test_resume_skips_finished_jobs_and_reproduces_the_table(grid):
    sweep, _ = grid
    before = (sweep / "results.csv").read_text()
    stamps = {j: (sweep / j / "metrics.json").stat().st_mtime_ns for j in "0123"}
    fit = {j: metrics_of(sweep, j)["fit_seconds"] for j in "0123"}
    proc = run_cli(
        "--multirun", f"hydra.sweep.dir={sweep}", *SMALL, "model=manual,linear", "model.lr=0.03,100", "resume=true"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert {j: (sweep / j / "metrics.json").stat().st_mtime_ns for j in "0123"} == stamps
    assert {j: metrics_of(sweep, j)["fit_seconds"] for j in "0123"} == fit
    assert (sweep / "results.csv").read_text() == before
    assert (sweep / "progress.log").read_text().count("(done before)") == 4


def test_interrupted_sweep_shows_missing_jobs_and_resume_runs_only_those(grid):
    sweep, _ = grid
    lost = metrics_of(sweep, "1")
    # As if the sweep was killed in job 1's first epoch: no metrics.json, no checkpoint yet.
    (sweep / "1" / "metrics.json").unlink()
    shutil.rmtree(sweep / "1" / "checkpoints")
    proc = run_cli("-m", "linreg.results", str(sweep))
    assert proc.returncode == 1 and "1 of 4 jobs did not finish: no metrics.json (#1)" in proc.stderr
    stamps = {j: (sweep / j / "metrics.json").stat().st_mtime_ns for j in "023"}
    proc = run_cli(
        "--multirun", f"hydra.sweep.dir={sweep}", *SMALL, "model=manual,linear", "model.lr=0.03,100", "resume=true"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert {j: (sweep / j / "metrics.json").stat().st_mtime_ns for j in "023"} == stamps
    redone = metrics_of(sweep, "1")
    assert redone["status"] == lost["status"] == "diverged" and redone["weights"] == lost["weights"]
    assert [r["status"] for r in read_csv(sweep)] == ["ok", "diverged", "ok", "diverged"]
    assert (sweep / "progress.log").read_text().count("(done before)") == 3


def test_failed_jobs_are_rows_the_rest_run_and_the_sweep_exits_1(tmp_path):
    # batch size 0 fails its check; one past float's range fails too, and the plots must still place the rest.
    sweep, huge = tmp_path / "sweep", "99999999999999999999999"
    proc = run_cli("--multirun", f"hydra.sweep.dir={sweep}", *SMALL, f"data.batch_size=10,0,{huge},20")
    assert proc.returncode == 1
    assert "Callback SweepResults" not in proc.stderr  # no exception turned into a warning
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: sweep {sweep}: ") and "data.batch_size=0: must be a positive integer (#1)" in last
    assert f"data.batch_size={huge}: " in last and "(#2)" in last
    rows = check_rows_match_metrics(sweep, 4)
    assert [r["status"] for r in rows] == ["ok", "failed", "failed", "ok"]
    assert "must be a positive integer" in rows[1]["error"]
    assert "**failed**" in (sweep / "results.md").read_text()
    progress = (sweep / "progress.log").read_text()
    assert "data.batch_size=0: failed (data.batch_size=0: must be a positive integer) train_mse=n/a" in progress
    assert (sweep / "mse.png").is_file() and (sweep / "weights.png").is_file()


@pytest.mark.system  # ~20 s: submitit's own start-up and polling
def test_submitit_local_runs_the_jobs_through_submitit(tmp_path):
    sweep = tmp_path / "sweep"
    launcher = ["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5"]
    proc = run_cli("--multirun", *launcher, f"hydra.sweep.dir={sweep}", *SMALL, "model.lr=0.03,0.1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert list((sweep / ".submitit").rglob("*_result.pkl"))  # the jobs ran as submitit jobs
    assert not (sweep / ".submitit" / "%j").exists()  # submitit's empty folder template is cleared
    rows = check_rows_match_metrics(sweep, 2)
    assert [r["status"] for r in rows] == ["ok", "ok"]


def test_a_sweep_without_overrides_is_named_defaults_and_a_blocked_table_exits_1(tmp_path):
    sweep = tmp_path / "sweep"
    (sweep / "results.csv").mkdir(parents=True)  # the table cannot be written there
    (sweep / ".sweep.json").write_text("{}")  # a sweep's dir (another dir is refused before any job runs)
    proc = run_cli("--multirun", f"hydra.sweep.dir={sweep}")
    progress = (sweep / "progress.log").read_text().strip()
    assert re.fullmatch(r"\[1/1 [\dhms]+\] defaults: ok train_mse=[\d.e-]+", progress)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last == f"error: sweep {sweep}: cannot write {sweep / 'results.csv'}: Is a directory"
    assert (sweep / "results.md").is_file() and (sweep / "mse.png").is_file()
    assert not [p for p in sweep.iterdir() if p.name.endswith(".tmp")]


def test_a_list_where_a_number_belongs_is_hydras_refusal(tmp_path):
    # The schema types data.batch_size: Hydra refuses the value when it composes that job, in its own words.
    sweep = tmp_path / "sweep"
    proc = run_cli("--multirun", f"hydra.sweep.dir={sweep}", *SMALL, "~logger", "data.batch_size=10,[3]")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "Error merging override data.batch_size=[3]" in proc.stderr
    assert "full_key: data.batch_size" in proc.stderr


def snapshot(tree: Path) -> dict[str, bytes]:
    """Every file under `tree`, by relative path, with its bytes."""
    return {str(p.relative_to(tree)): p.read_bytes() for p in sorted(tree.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    ("again", "why"),
    [
        # The grid's order changed: job 0 would now be lr 100, while 0/ holds lr 0.03's finished run.
        (["model=manual,linear", "model.lr=100,0.03"], "holds another sweep ("),
        # A value every job shares changed: no finished run in the dir is what the resume would compute.
        (["model=manual,linear", "model.lr=0.03,100", "trainer.max_epochs=2"], "holds another sweep ("),
        # The same command on a changed config file (here: another config dir with data.delta changed).
        (["-cp", "CHANGED", "model=manual,linear", "model.lr=0.03,100"], "holds this sweep run on another config"),
    ],
)
def test_resume_with_a_changed_grid_is_refused_before_any_file_changes(grid, again, why, tmp_path):
    sweep, _ = grid
    if "CHANGED" in again:
        shutil.copytree(REPO / "conf", tmp_path / "conf", symlinks=False)
        data = tmp_path / "conf" / "data" / "tutorial.yaml"
        data.write_text(re.sub(r"(?m)^delta: .*$", "delta: 2.0", data.read_text()))
        again = [str(tmp_path / "conf") if a == "CHANGED" else a for a in again]
    before = snapshot(sweep)
    cp, again = (again[:2], again[2:]) if again[0] == "-cp" else ([], again)  # options before the overrides
    proc = run_cli(*cp, "--multirun", f"hydra.sweep.dir={sweep}", *SMALL, *again, "resume=true")
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith(f"error: hydra.sweep.dir='{sweep}': {why}"), lines
    assert snapshot(sweep) == before  # .hydra/, metrics.json, multirun.yaml, progress, the table: as they were


@pytest.mark.system  # ~15 s: eight jobs on a disk that fills
def test_a_sweep_that_fills_its_disk_ends_with_the_table_and_one_line(small_disk):
    sweep = small_disk("2300k") / "sweep"  # room for a few jobs and the table (linreg.record.ROOM)
    proc = run_cli("--multirun", f"hydra.sweep.dir={sweep}", *SMALL, "model.lr=range(0.01,0.09,0.01)")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    assert proc.stderr.splitlines()[-1].startswith(f"error: sweep {sweep}: "), proc.stderr[-2000:]
    rows = read_csv(sweep)
    statuses = {r["status"] for r in rows}
    assert len(rows) == 8 and statuses == {"ok", "failed"}, statuses
    assert all("KiB free there" in r["error"] for r in rows if r["status"] == "failed")


@pytest.mark.system  # ~8 s: a 2-job sweep
def test_resolvers_hydra_accepts_reach_the_jobs_as_values(tmp_path):
    sweep = tmp_path / "sweep"
    env = {**os.environ, "DELTA": "0.5"}  # a string, typed by the schema as data.delta's float
    args = ["data.delta=${oc.env:DELTA}", "trainer.accelerator=${hydra:runtime.choices.trainer}", "seed=1,2"]
    proc = run_cli("--multirun", f"hydra.sweep.dir={sweep}", *SMALL, *args, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [(float(r["delta"]), r["accelerator"]) for r in read_csv(sweep)] == [(0.5, "cpu")] * 2


def catches_sigterm(pid: int) -> bool:
    """Whether process `pid` has a SIGTERM handler (Lightning installs one for a fit)."""
    import signal

    caught = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("SigCgt:"))
    return bool(int(caught.split()[1], 16) & 1 << (signal.SIGTERM - 1))


@pytest.mark.system  # ~10 s each: a job long enough to be stopped after its first checkpoint, or in its group's fit
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("launcher", ["basic", "vectorized"])
def test_a_sweep_stopped_by_sigterm_ends_with_its_table_and_one_line(tmp_path, launcher, sig):
    import signal
    import subprocess
    import sys
    import time

    sweep = tmp_path / "sweep"
    args = ["data.num_examples=200000", "trainer.max_epochs=5", "~logger", "seed=1,2", f"hydra.sweep.dir={sweep}"]
    args += ["hydra/launcher=vectorized"] * (launcher == "vectorized")
    cmd = [sys.executable, "-m", "linreg.train", "--multirun", *args]
    popen = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, "start_new_session": True}
    proc = subprocess.Popen(cmd, cwd=REPO, **popen)
    if launcher == "basic":
        while not (sweep / "0" / "checkpoints" / "last.ckpt").exists() and proc.poll() is None:
            time.sleep(0.1)
    else:  # the two jobs train as one group in the sweep's own process
        while not (sweep / "0" / ".lock").exists() or not catches_sigterm(proc.pid):
            assert proc.poll() is None
            time.sleep(0.05)
    os.killpg(proc.pid, getattr(signal, sig))  # as Ctrl-C sends SIGINT: to the group (the jobs run in the sweep's)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1 and "Traceback" not in err, err[-2000:]
    assert err.strip().splitlines()[-1] == f"error: sweep {sweep}: {STOPPED.replace('SIGTERM', BY[sig])}"
    assert [r["status"] for r in read_csv(sweep)] == ["missing", "missing"]


STOPPED = "stopped: by SIGTERM; once it can, resume=true goes on"
BY = {"SIGTERM": "SIGTERM", "SIGINT": "SIGINT (Ctrl-C)"}  # Ctrl-C: the same end, naming it


@pytest.mark.parametrize(("launcher", "sig"), [("basic", "SIGTERM"), ("vectorized", "SIGTERM"), ("basic", "SIGINT")])
def test_a_sweep_stopped_by_sigterm_between_fits_ends_with_its_table_and_one_line(tmp_path, launcher, sig):
    # Job 1's logger sends it: as the job is set up (basic), or as its group's results are written (vectorized).
    sweep = tmp_path / "sweep"
    logger = f"tests.user_classes.{sig.title()}CSVLogger"
    args = [*SMALL, "seed=1,2", "logger=csv", f"logger.csv._target_={logger}"]
    args += ["hydra/launcher=vectorized"] * (launcher == "vectorized")
    # The Ctrl-C case from a relative sweep dir, its jobs in their own dirs: the table is the sweep dir's still.
    chdir = ["hydra.job.chdir=true", "hydra.sweep.dir=sweep"] if sig == "SIGINT" else [f"hydra.sweep.dir={sweep}"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # tests.user_classes from another dir
    proc = run_cli("--multirun", *args, *chdir, cwd=tmp_path, env=env)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.splitlines()[-1] == f"error: sweep {sweep}: {STOPPED.replace('SIGTERM', BY[sig])}"
    assert [r["status"] for r in read_csv(sweep)] == ["ok", "missing"]
