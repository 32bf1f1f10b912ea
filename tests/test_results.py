"""results.py: rows, the table, the summary and exit status, the CLI, progress lines and the plan; one real sweep."""

import csv
import json
import os
import re
from pathlib import Path

import pytest
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.utils import JobReturn, JobStatus
from hydra.types import RunMode
from omegaconf import OmegaConf
from PIL import Image

import linreg.plots
import linreg.results
from linreg.results import SweepResults, duration, main, planned, progress_line
from linreg.train import CONFIG_DIR
from tests.conftest import run_cli

OK = {
    "status": "ok", "model": "manual", "seed": 420, "data": {"deg": 1, "delta": 0.01, "bias": True}, "lr": 0.03,
    "batch_size": 10, "epochs": 1, "accelerator": "cpu", "train_mse": 0.25, "weights": [1.5, -0.5, 0.9],
    "true_weights": [2.0, -1.0, 1.0], "ols_mse": 1e-4, "steps": 10, "fit_seconds": 0.1,
}  # fmt: skip
NO_RESULT = {"train_mse": None, "weights": None}


def job(sweep: Path, num: int | str, overrides: list[str], metrics: dict | str | None = None) -> Path:
    """A job dir as Hydra and a run leave it: .hydra/overrides.yaml, and metrics.json (a record or raw text)."""
    d = sweep / str(num)
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text(json.dumps(overrides))  # JSON is YAML
    if metrics is not None:
        (d / "metrics.json").write_text(metrics if isinstance(metrics, str) else json.dumps({**OK, **metrics}))
    return d


def plan(sweep: Path, jobs: int | None, swept: list[str], grid: bool = True) -> None:
    (sweep / ".sweep-plan.json").write_text(json.dumps({"jobs": jobs, "grid": grid, "swept": swept, "started": 0}))


def read_csv(sweep: Path) -> list[dict[str, str]]:
    with open(sweep / "results.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """Six planned jobs: ok, diverged, failed, killed (its config saved, no record), corrupt, and one never started."""
    d = tmp_path / "sweep"
    job(d, 0, ["model.lr=0.03", "resume=true"], {})
    job(d, 1, ["model.lr=100"], {"status": "diverged", **NO_RESULT, "diverged_epoch": 0})
    job(d, 2, ["model.lr=0.1"], {"status": "failed", **NO_RESULT, "error": "boom\n  at line 2"})
    killed = job(d, 3, ["model.lr=0.3"])
    (killed / ".hydra" / "config.yaml").write_text("model: {_target_: linreg.models.LinearRegression, lr: 0.3}\n")
    job(d, 4, ["model.lr=1"], '{"status": "great"}')
    plan(d, 6, ["model.lr"])
    return d


def test_a_row_per_planned_job_with_its_status_and_the_exit_status_says_which_failed(sweep, capsys):
    assert main([str(sweep)]) == 1
    out, err = capsys.readouterr()
    assert out == f"6 jobs: 1 ok, 1 diverged, 1 failed, 2 missing, 1 corrupt -> {sweep / 'results.md'}\n"
    assert err == (
        f"error: sweep {sweep}: 1 of 6 jobs failed: boom at line 2 (#2); 2 of 6 jobs did not finish: no metrics.json"
        " (jobs 3, 5); 1 of 6 jobs left a corrupt record: metrics.json: not a run record (no status ok, diverged,"
        " pruned or failed) (#4)\n"
    )
    rows = read_csv(sweep)
    assert [r["status"] for r in rows] == ["ok", "diverged", "failed", "missing", "corrupt", "missing"]
    assert float(rows[0]["train_mse"]) == 0.25 and float(rows[0]["gap"]) == 0.25 - 1e-4  # full precision
    assert json.loads(rows[0]["weights"]) == [1.5, -0.5, 0.9] and rows[0]["overrides"] == "model.lr=0.03"
    assert (rows[0]["deg"], rows[0]["delta"], rows[0]["bias"]) == ("1", "0.01", "True")
    assert rows[1]["diverged_epoch"] == "0" and rows[1]["gap"] == ""
    assert (rows[3]["model"], rows[3]["lr"]) == ("linear", "0.3")  # from the killed job's saved config
    assert rows[5]["dir"] == str((sweep / "5").resolve())
    md = (sweep / "results.md").read_text()
    assert "6 jobs: 1 ok, 1 diverged, 1 failed, 2 missing, 1 corrupt." in md
    assert "- **failed** #2: boom at line 2\n- **missing** jobs 3, 5: no metrics.json\n" in md
    assert "| 2 | manual | 1 | 0.01 | 0.03 | 10 | **failed** |" in md and "![mse.png](mse.png)" in md
    for name in linreg.results.PLOTS:
        with Image.open(sweep / name) as img:
            img.verify()


def test_a_swept_key_the_table_has_no_column_for_gets_one(tmp_path):
    d = tmp_path / "s"
    for j, seed in enumerate((1, 2)):
        job(d, j, [f"seed={seed}", "model.lr=0.03"], {"seed": seed})
    plan(d, 2, ["seed"])
    assert main([str(d)]) == 0
    md = (d / "results.md").read_text()  # else the rows of a seed sweep differ only in their numbers
    assert "| job | model | deg | delta | lr | batch_size | seed | status |" in md
    assert "| 1 | manual | 1 | 0.01 | 0.03 | 10 | 2 | ok |" in md


def test_jobs_failing_alike_are_one_group_and_distinct_errors_are_capped(tmp_path, capsys):
    d = tmp_path / "s"
    for i in range(48):
        error = "data.batch_size=0: must be a positive integer" if i < 16 else f"error {i % 5}" if i < 40 else None
        job(d, i, [f"model.lr={i}"], {"status": "failed", **NO_RESULT, "error": error} if error else {})
    plan(d, 48, ["model.lr"])
    assert main([str(d)]) == 1
    assert capsys.readouterr().err == (
        f"error: sweep {d}: 40 of 48 jobs failed: data.batch_size=0: must be a positive integer (jobs 0-15); "
        "error 1 (jobs 16, 21, 26, 31, 36); error 2 (jobs 17, 22, 27, 32, 37); 3 more in results.md\n"
    )
    assert (d / "results.md").read_text().count("- **failed** jobs") == 6  # the file has every error


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ('{"status": "ok", ', "metrics.json: JSONDecodeError: "),
        (json.dumps({**OK, "lr": "0.1"}), "metrics.json: lr is not a finite number"),
        (json.dumps({**OK, "train_mse": None}), "metrics.json: an ok run without train_mse"),
        ("dir", "metrics.json: not a regular file"),
        ("overrides", "overrides.yaml: not a list of overrides"),
        (json.dumps({**OK, "ols_mse": -1e308}), "metrics.json: ols_mse is not a finite number >= 0"),
        ("another run", "metrics.json: not the run of this job's .hydra/config.yaml"),
        ("link", "the job dir is a link"),
    ],
)
def test_a_record_that_cannot_be_trusted_is_a_corrupt_row_with_its_reason(tmp_path, capsys, text, reason):
    d = tmp_path / "s"
    special = ("dir", "overrides", "another run", "link")
    bad = job(d, 0, ["model.lr=0.1"], None if text in special else text)
    if text == "dir":
        (bad / "metrics.json").mkdir()
    if text == "overrides":
        (bad / ".hydra" / "overrides.yaml").write_text("model.lr: 3\n")
        (bad / "metrics.json").write_text(json.dumps(OK))
    if text == "another run":  # a record swapped in from a job of another config
        (bad / ".hydra" / "config.yaml").write_text("seed: 420\nmodel: {lr: 0.1}\n")
        (bad / "metrics.json").write_text(json.dumps({**OK, "config": {"seed": 420, "model": {"lr": 0.03}}}))
    if text == "link":  # another sweep's job, linked in
        other = job(tmp_path / "other", 0, ["model.lr=0.1"], {})
        bad.rename(tmp_path / "gone")
        bad.symlink_to(other)
    job(d, 1, ["model.lr=0.3"], {})
    plan(d, 2, ["model.lr"])
    assert main([str(d)]) == 1 and "Traceback" not in capsys.readouterr().err
    row = read_csv(d)[0]
    assert row["status"] == "corrupt" and row["error"].startswith(reason) and row["gap"] == ""


def test_what_cannot_be_written_or_drawn_is_named_and_the_rest_is_written(sweep, monkeypatch, capsys):
    def no_ink(*args):
        raise RuntimeError("no ink")

    (sweep / "results.csv").mkdir()
    (sweep / "mse.png").write_bytes(b"an older sweep's plot")
    monkeypatch.setattr(linreg.plots, "mse_figure", no_ink)
    assert main([str(sweep)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(
        f"error: sweep {sweep}: cannot write {sweep / 'results.csv'}: Is a directory; "
        f"could not make {sweep / 'mse.png'}: RuntimeError: no ink; 1 of 6 jobs failed"
    )
    assert (sweep / "results.md").is_file() and (sweep / "weights.png").is_file()
    assert not (sweep / "mse.png").exists()  # the older plot would pass for this sweep's
    assert not [p for p in sweep.iterdir() if p.name.endswith(".tmp")]


def test_a_table_that_cannot_be_written_is_not_pointed_to(sweep, monkeypatch, capsys):
    def read_only(*args, **kwargs):  # a read-only sweep dir (root writes anyway): neither replaced nor removed
        raise PermissionError(13, "Permission denied")

    (sweep / "results.md").write_text("an older sweep's table")
    write = linreg.results.write_atomic
    monkeypatch.setattr(
        linreg.results, "write_atomic", lambda p, d: read_only() if p.name == "results.md" else write(p, d)
    )
    monkeypatch.setattr(Path, "unlink", read_only)
    assert main([str(sweep)]) == 1
    out, err = capsys.readouterr()
    assert out == "6 jobs: 1 ok, 1 diverged, 1 failed, 2 missing, 1 corrupt\n"  # no `-> results.md`: it is not this one
    assert f"cannot write {sweep / 'results.md'}: Permission denied" in err


@pytest.mark.parametrize(
    ("make", "why"),
    [
        (lambda d: None, "no such directory"),
        (lambda d: d.write_text("x"), "not a directory"),
        (lambda d: d.mkdir(), "not a training sweep's dir (no sweep plan, nor a multirun.yaml of linreg.train)"),
        (lambda d: job(d, "2026-01-01_10-00-00", [], {}), "not a training sweep's dir"),  # outputs/runs: single runs
        (lambda d: job(d, 0, []).with_name("multirun.yaml").write_text("ckpt_path: x\n"), "not a training sweep's"),
    ],
)
def test_the_cli_refuses_what_is_no_sweep_dir_in_one_line_and_writes_nothing(tmp_path, capsys, make, why):
    d = tmp_path / "d"
    make(d)
    before = sorted(tmp_path.rglob("*"))
    assert main([str(d)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {d}: {why}")
    assert sorted(tmp_path.rglob("*")) == before


def test_the_cli_tables_a_sweep_killed_before_any_job_wrote_its_files(tmp_path, capsys):
    d = tmp_path / "sweep"
    for j in (0, 1):  # a vectorized group killed in its fit: its members' dirs hold only their locks
        (d / str(j)).mkdir(parents=True)
        (d / str(j) / ".lock").touch()
    plan(d, 2, ["model.lr"])
    assert main([str(d)]) == 1
    assert capsys.readouterr().out == f"2 jobs: 2 missing -> {d / 'results.md'}\n"


def test_the_cli_leaves_a_running_sweeps_table_to_it(sweep, capsys):
    from linreg.record import RunDirLock

    with RunDirLock(sweep, "hydra.sweep.dir", "another sweep"):  # as the sweep's process holds it for its life
        before = sorted(sweep.rglob("*"))
        assert main([str(sweep)]) == 2
        assert sorted(sweep.rglob("*")) == before and not (sweep / "results.md").exists()
    why = "a sweep is still running there (it holds .lock); its table is written when it ends"
    assert capsys.readouterr().err == f"error: {sweep}: {why}\n"


def test_an_optuna_sweep_keeps_every_trial_and_a_failed_sweep_exits_from_the_callback(tmp_path):
    d = tmp_path / "s"
    job(d, 0, ["model.lr=0.01"], {})
    job(d, 25, ["model.lr=0.02"], {"status": "failed", **NO_RESULT, "error": "bad"})  # past n_trials: a re-run trial
    plan(d, 20, ["model.lr"], grid=False)
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(d)}, "sweeper": {"n_trials": 20}}})
    with pytest.raises(SystemExit) as exit_:
        SweepResults().on_multirun_end(config)
    assert exit_.value.code == f"error: sweep {d}: 1 of 2 jobs failed: bad (#25)"
    assert [r["job"] for r in read_csv(d)] == ["0", "25"]


# ---------------------------------------------------------------- progress lines and the plan


def test_a_row_read_before_is_read_again_once_one_of_its_files_changes(sweep):
    late = job(sweep, 6, ["model.lr=2"])

    def rows() -> dict[str, tuple]:
        return {r["job"]: (r["status"], r["train_mse"]) for r in map(linreg.results.job_row, (sweep / "0", late))}

    assert rows() == {"0": ("ok", 0.25), "6": ("missing", None)}  # the progress lines' read: kept for the table
    record = sweep / "0" / "metrics.json"
    before = record.stat().st_mtime_ns
    record.write_text(record.read_text().replace("0.25", "0.75"))  # in place, the same size: an edit a moment later
    os.utime(record, ns=(before + 10**9, before + 10**9))
    (late / "metrics.json").write_text(json.dumps({**OK, "train_mse": 0.5}))  # its record, written since
    assert rows() == {"0": ("ok", 0.75), "6": ("ok", 0.5)}


def ret(overrides: list[str], status: JobStatus = JobStatus.COMPLETED, value: object = 0.25) -> JobReturn:
    r = JobReturn(overrides=overrides)
    r.status, r.return_value = status, value
    return r


def test_a_progress_line_names_the_swept_values_the_outcome_and_a_meaningful_eta(sweep):
    p = {"jobs": 48, "swept": ["model.lr"], "started": 1000.0}
    line = progress_line(3, p, sweep / "0", ret(["model.lr=0.03", "seed=1"]), now=1012.0)
    assert line == "[3/48 12s, ~3m00s left] model.lr=0.03: ok train_mse=0.25"
    assert progress_line(2, p, sweep / "0", ret([]), now=1012.0) == "[2/48 12s] defaults: ok train_mse=0.25"
    assert progress_line(3, p, sweep / "0", ret([]), now=1004.0).startswith("[3/48 4s] ")  # too soon to tell
    line = progress_line(5, p, sweep / "0", ret([]), now=1012.0, before=2)  # 2 kept by a resume: 3 ran in 12 s
    assert line.startswith("[5/48 12s, ~2m52s left] ")
    assert progress_line(1, p | {"started": 2e9}, sweep / "0", ret([])).endswith(" (done before)")  # kept on resume
    line = progress_line(3, p | {"jobs": None, "started": None}, sweep / "2", ret(["model.lr=0.1"]))
    assert line == "[3/?] model.lr=0.1: failed (boom at line 2) train_mse=n/a"
    failed = ret(["model.lr=0.1"], JobStatus.FAILED, ValueError("bad"))  # raised past the task: Hydra holds it
    assert progress_line(1, p, sweep / "5", failed, now=1000.0).endswith("failed (ValueError: bad) train_mse=n/a")
    assert [duration(s) for s in (45, 125, 1500, 3900)] == ["45s", "2m05s", "25m", "1h05m"]


def multirun_cfg(*overrides: str):
    """The config `python -m linreg.train -m OVERRIDES` starts its sweep with (compose() only does single runs)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        return loader.load_configuration("train", overrides=list(overrides), run_mode=RunMode.MULTIRUN)


@pytest.mark.parametrize(
    ("overrides", "jobs", "grid", "swept"),
    [
        (["sweep=tutorial"], 48, True, ["model", "data.deg", "data.delta", "model.lr", "data.batch_size"]),
        (["sweep=tutorial", "model.lr=0.1", "trainer.accelerator=cpu,gpu"], 32, True, None),
        (["model.lr=0.03,100", "data.batch_size=range(10,50,10)"], 8, True, ["model.lr", "data.batch_size"]),
        (["sweep=optuna"], 20, False, ["model.lr", "data.batch_size"]),
        (["sweep=optuna", "seed=1,2,3", "data.batch_size=10"], 20, False, ["model.lr", "seed"]),  # a list: a choice
        (["data.deg=1"], 1, True, []),
    ],
)
def test_the_plan_counts_the_jobs_of_a_grid_and_of_a_study(overrides, jobs, grid, swept):
    p = planned(multirun_cfg(*overrides))
    assert (p["jobs"], p["grid"]) == (jobs, grid) and (swept is None or p["swept"] == swept)


# ---------------------------------------------------------------- one real sweep


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    sweep = tmp_path_factory.mktemp("smoke") / "sweep"
    return sweep, run_cli("--multirun", "sweep=smoke", f"hydra.sweep.dir={sweep}")


def test_a_sweep_prints_its_plan_a_line_a_job_and_the_summary(smoke):
    sweep, proc = smoke
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line.split("] ", 1)[-1] for line in (proc.stdout + proc.stderr).splitlines()]
    assert lines[0] == f"sweep: 4 jobs -> {sweep}" and lines[-1] == f"sweep: 4 jobs: 4 ok -> {sweep / 'results.md'}"
    progress = (sweep / "progress.log").read_text().splitlines()
    assert [re.sub(r" [^\]]*\]", "]", p).split(" train_mse=")[0] for p in progress] == [
        "[1/4] model=manual model.lr=0.03: ok",
        "[2/4] model=manual model.lr=0.1: ok",
        "[3/4] model=linear model.lr=0.03: ok",
        "[4/4] model=linear model.lr=0.1: ok",
    ]
    assert all(p in proc.stdout + proc.stderr for p in progress)


def test_the_table_is_the_jobs_records_and_the_cli_rebuilds_it(smoke):
    sweep, _ = smoke
    rows = read_csv(sweep)
    for row in rows:
        record = json.loads((sweep / row["job"] / "metrics.json").read_text())
        assert (row["model"], float(row["lr"]), row["status"]) == (record["model"], record["lr"], record["status"])
        assert float(row["train_mse"]) == record["train_mse"] and json.loads(row["weights"]) == record["weights"]
    table = (sweep / "results.csv").read_text()
    (sweep / "results.csv").unlink()
    proc = run_cli("-m", "linreg.results", str(sweep))
    assert proc.returncode == 0 and proc.stdout == f"4 jobs: 4 ok -> {sweep / 'results.md'}\n", proc.stderr
    assert (sweep / "results.csv").read_text() == table


def test_a_progress_line_shows_sampled_numbers_at_6_digits(tmp_path):
    from hydra.core.utils import JobReturn, JobStatus

    from linreg.results import progress_line

    job(tmp_path, 0, ["model.lr=0.012345678901234567"], {})
    ret = JobReturn(overrides=["model.lr=0.012345678901234567"], status=JobStatus.COMPLETED, _return_value=0.1)
    line = progress_line(1, {"swept": ["model.lr"], "started": None, "jobs": 4}, tmp_path / "0", ret)
    assert line.startswith("[1/4] model.lr=0.0123457: ")


def test_a_config_holding_nan_is_the_row_of_its_own_record(make_cfg, tmp_path):
    from linreg.record import RunRecord

    cfg = make_cfg("logger.tensorboard.write_every_s=nan")  # a value a run takes: NaN equals nothing
    d = job(tmp_path / "s", 0, ["logger.tensorboard.write_every_s=nan"])
    (d / ".hydra" / "config.yaml").write_text(
        OmegaConf.to_yaml(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]))
    )
    RunRecord.of(cfg, "ok", train_mse=0.25, weights=[1.0, 2.0, 3.0], ols_mse=1e-4, epoch_mse=[0.25]).write(d)
    assert linreg.results.job_row(d)["status"] == "ok"
