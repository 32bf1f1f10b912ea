"""results.py on hand-made sweep dirs: the table, bad records, write failures, the summary line, the planned count."""

import csv
import json
import os
import subprocess
from pathlib import Path

import pytest
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.utils import JobReturn, JobStatus
from hydra.types import RunMode
from omegaconf import OmegaConf
from PIL import Image

from linreg.results import collect, failure_message, job_ranges, planned_jobs, progress_line, summarize, timing
from linreg.train import CONFIG_DIR
from tests.conftest import run_cli

BASE = {
    "status": "ok", "model": "manual", "seed": 420, "data": {"deg": 1, "delta": 0.01}, "lr": 0.03,
    "batch_size": 10, "epochs": 1, "accelerator": "cpu", "train_mse": 0.5, "weights": [1.5, -0.5, 0.9],
    "true_weights": [2, -1, 1], "ols_mse": 1e-4, "steps": 10, "fit_seconds": 0.1, "diverged_epoch": None,
    "error": None,
}  # fmt: skip


def fake_job(sweep: Path, num: int, overrides: list[str], text: str | None = None, **metrics) -> Path:
    """A job dir as Hydra and `run` leave it: metrics.json from `metrics` (or raw `text`), none when neither."""
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(overrides), job / ".hydra" / "overrides.yaml")
    model = {"_target_": "linreg.models.ManualRegression", "lr": 0.03}
    cfg = {"seed": 420, "model": model, "data": {"deg": 1, "delta": 0.01, "batch_size": 10}}
    OmegaConf.save(OmegaConf.create(cfg), job / ".hydra" / "config.yaml")
    if metrics or text is not None:
        (job / "metrics.json").write_text(json.dumps({**BASE, **metrics}) if text is None else text)
    return job


def read_csv(sweep: Path) -> list[dict[str, str]]:
    with open(sweep / "results.csv") as f:
        return list(csv.DictReader(f))


def temp_files(sweep: Path) -> list[Path]:
    return [p for p in sweep.rglob("*") if p.name.endswith(".tmp")]


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """Four jobs: ok, diverged, failed, and one killed before it wrote metrics.json."""
    d = tmp_path / "sweep"
    fake_job(d, 0, ["model.lr=0.03", "seed=1"], train_mse=0.25)
    fake_job(d, 1, ["model.lr=100", "seed=1"], status="diverged", train_mse=None, weights=None, diverged_epoch=0)
    fake_job(d, 2, ["model.lr=0.1", "seed=1"], status="failed", train_mse=None, weights=None, error="boom\nline 2")
    fake_job(d, 10, ["model.lr=0.3", "seed=1"])
    return d


def test_rows_follow_job_numbers_and_mark_every_status(sweep):
    rows = collect(sweep)
    assert [r["job"] for r in rows] == ["0", "1", "2", "10"]
    assert [r["status"] for r in rows] == ["ok", "diverged", "failed", "missing"]
    assert rows[0]["gap"] == pytest.approx(0.25 - 1e-4)
    assert rows[2]["error"] == "boom line 2"  # one line
    assert rows[3]["lr"] == 0.03 and rows[3]["model"] == "manual"  # from the job's saved config


def test_failure_message_names_failed_and_unfinished_jobs_plainly(sweep):
    message = failure_message(sweep, collect(sweep))
    failed, unfinished = "1 of 4 jobs failed: boom line 2 (#2: model.lr=0.1)", "1 of 4 jobs did not finish"
    assert message == f"sweep {sweep}: {failed}; {unfinished}: #10 (no metrics.json)"


def test_jobs_failing_alike_are_one_short_group(tmp_path):
    d = tmp_path / "s"
    error = "data.batch_size=0: must be a positive integer"
    for i in range(48):
        bad = i < 16
        fields = {"status": "failed", "train_mse": None, "error": error} if bad else {}
        fake_job(d, i, [f"data.batch_size={0 if bad else 10}", f"model.lr={i}"], **(fields or {"status": "ok"}))
    proc = run_cli("-m", "linreg.results", str(d))
    assert proc.returncode == 1
    line = proc.stderr.strip()
    assert line == f"error: sweep {d}: 16 of 48 jobs failed: {error} (jobs 0-15)"
    assert len(line) - len(str(d)) < 200


def test_distinct_errors_are_capped_and_job_lists_shortened(tmp_path):
    d = tmp_path / "s"
    for i in range(40):
        fake_job(d, i, [f"model.lr={i}"], status="failed", train_mse=None, error=f"error {i % 5} " + "x" * 300)
    message = failure_message(d, collect(d))
    assert "40 of 40 jobs failed" in message and "2 more errors in results.md" in message
    assert "(jobs 0, 5, 10, 15, 20, 25, … (8 in all))" in message
    assert len(message) - len(str(d)) < 600  # three errors of 120 characters at most, not 40 of 300
    summarize(d)
    md = (d / "results.md").read_text()
    assert md.count("- **failed** jobs") == 5 and "x" * 300 in md  # the file has every error whole


def test_job_ranges():
    assert job_ranges(["0", "1", "2", "5", "7", "8"]) == "0-2, 5, 7-8"
    assert job_ranges(["3"]) == "3"
    assert job_ranges([str(i) for i in range(0, 40, 2)], limit=3) == "0, 2, 4, … (20 in all)"


def test_summarize_writes_csv_markdown_and_valid_pngs(sweep):
    rows, problems = summarize(sweep)
    assert problems == []
    rows = read_csv(sweep)
    assert [r["status"] for r in rows] == ["ok", "diverged", "failed", "missing"]
    assert float(rows[0]["train_mse"]) == 0.25 and json.loads(rows[0]["weights"]) == [1.5, -0.5, 0.9]
    assert rows[1]["train_mse"] == "" and rows[1]["diverged_epoch"] == "0"
    md = (sweep / "results.md").read_text()
    assert "4 jobs: 1 ok, 1 diverged, 1 failed, 1 missing." in md and "**failed**" in md
    assert "- **failed** #2: boom line 2" in md and "- diverged at epoch 0: #1" in md
    for name in ("mse.png", "weights.png"):
        with Image.open(sweep / name) as img:
            img.verify()
            assert img.format == "PNG"
    assert not temp_files(sweep)


def test_plots_survive_a_sweep_with_no_finished_job(tmp_path):
    d = tmp_path / "sweep"
    fake_job(d, 0, ["model.lr=0.1"], status="failed", train_mse=None, weights=None, error="x")
    assert summarize(d)[1] == []
    assert (d / "mse.png").stat().st_size > 0 and (d / "weights.png").stat().st_size > 0


def test_a_plot_that_cannot_be_drawn_costs_neither_the_table_nor_the_other_plot(sweep, monkeypatch):
    import linreg.plots

    def broken(*args):
        raise RuntimeError("no ink")

    (sweep / "mse.png").write_bytes(b"an older sweep's plot")
    monkeypatch.setattr(linreg.plots, "mse_figure", broken)
    rows, problems = summarize(sweep)
    assert problems == [f"could not make {sweep / 'mse.png'}: RuntimeError: no ink"]
    assert len(read_csv(sweep)) == 4 and (sweep / "results.md").exists() and (sweep / "weights.png").exists()
    assert not (sweep / "mse.png").exists()  # the older plot would pass for this sweep's
    assert "1 of 4 jobs failed" in failure_message(sweep, rows, problems)


def test_results_cli_rebuilds_and_exits_nonzero_naming_failed_jobs(sweep):
    proc = run_cli("-m", "linreg.results", str(sweep))
    assert proc.returncode == 1
    assert "boom line 2 (#2: model.lr=0.1)" in proc.stderr and "did not finish: #10 (no metrics.json)" in proc.stderr
    assert (sweep / "results.csv").exists() and (sweep / "results.md").exists()


def test_results_cli_exits_zero_for_ok_and_diverged(tmp_path):
    d = tmp_path / "sweep"
    fake_job(d, 0, ["model.lr=0.03"], status="ok")
    fake_job(d, 1, ["model.lr=100"], status="diverged", train_mse=None, weights=None, diverged_epoch=0)
    proc = run_cli("-m", "linreg.results", str(d))
    assert proc.returncode == 0, proc.stderr
    assert "2 jobs: 1 ok, 1 diverged" in proc.stdout


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: None, "no job dirs (not a sweep dir?)"),
        (lambda p: p.rmdir(), "no such directory"),
        (lambda p: (p.rmdir(), p.write_text("x")), "not a directory"),
    ],
)
def test_results_cli_refuses_what_is_no_sweep_dir(tmp_path, make, message):
    d = tmp_path / "d"
    d.mkdir()
    make(d)
    proc = run_cli("-m", "linreg.results", str(d))
    assert proc.returncode == 2 and proc.stderr == f"error: {d}: {message}\n"


# ---------------------------------------------------------------- records that cannot be trusted

OK_TEXT = json.dumps(BASE)
CORRUPT = {  # job -> (how its record is broken, the reason its row must give)
    "0": ("[1, 2]", "metrics.json: holds a list [1, 2], not an object"),
    "1": ("null", "metrics.json: holds null, not an object"),
    "2": (OK_TEXT[:40], "metrics.json: not valid JSON"),
    "3": (json.dumps({**BASE, "data": 5}), "metrics.json: data is a number 5, not an object"),
    "4": (json.dumps({**BASE, "lr": "0.1"}), 'metrics.json: lr is a string "0.1", not a finite number'),
    "5": (OK_TEXT.replace('"train_mse": 0.5', '"train_mse": 1e999'), "metrics.json: train_mse is a number inf"),
    "6": (OK_TEXT.replace('"train_mse": 0.5', '"train_mse": NaN'), "metrics.json: train_mse is a number nan"),
    "7": (json.dumps({**BASE, "weights": [1, "2", 3]}), "metrics.json: weights is a list"),
    "8": (json.dumps({**BASE, "status": "great"}), 'metrics.json: status is a string "great", not one of'),
    "9": (json.dumps({**BASE, "train_mse": None}), "metrics.json: train_mse is null, not a finite number"),
    "10": ("dir", "metrics.json: Is a directory"),
    "11": ("overrides", ".hydra/overrides.yaml: "),
    "12": ("config", ".hydra/config.yaml: "),
    "13": ("not a list", ".hydra/overrides.yaml: not a list of overrides"),
    "14": ("binary", "metrics.json: UnicodeDecodeError: "),
}


@pytest.fixture(scope="module")
def corrupt_sweep(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """One job per kind of broken record (and a good, a failed and a huge-number one), summarised by the CLI."""
    d = tmp_path_factory.mktemp("corrupt") / "sweep"
    for job, (text, _) in CORRUPT.items():
        special = text in ("dir", "overrides", "config", "not a list", "binary")
        path = fake_job(d, int(job), [f"model.lr={job}"], text=None if special else text)
        if text == "dir":
            (path / "metrics.json").mkdir()
        elif text == "overrides":
            (path / ".hydra" / "overrides.yaml").write_text("[unclosed, list\n")
            (path / "metrics.json").write_text(OK_TEXT)
        elif text == "config":
            (path / ".hydra" / "config.yaml").write_text("model: {name: manual\n")  # and no metrics.json
        elif text == "binary":
            (path / "metrics.json").write_bytes(b"\xff\xfe{")
        elif text == "not a list":
            (path / ".hydra" / "overrides.yaml").write_text("model.lr: 3\n")
            (path / "metrics.json").write_text(OK_TEXT)
    fake_job(d, 20, ["model.lr=0.5"], status="ok")
    # A failed job may record whatever bad value it was given: still a failed row, not a corrupt one.
    fake_job(d, 21, ["model.lr=abc"], status="failed", lr="abc", train_mse=None, weights=None, error="bad lr")
    fake_job(d, 22, ["data.batch_size=1e400"], status="failed", batch_size=10**400, train_mse=None, error="huge")
    return d, run_cli("-m", "linreg.results", str(d))


def test_corrupt_records_exit_1_in_one_line_without_a_traceback(corrupt_sweep):
    d, proc = corrupt_sweep
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert f"15 of {len(CORRUPT) + 3} jobs left a corrupt record" in proc.stderr
    assert "2 of 18 jobs failed: bad lr (#21: model.lr=abc); huge (#22: data.batch_size=1e400)" in proc.stderr
    with Image.open(d / "mse.png") as img:
        img.verify()


@pytest.mark.parametrize("job", list(CORRUPT))
def test_each_corrupt_record_is_a_corrupt_row_with_its_reason(corrupt_sweep, job):
    d, _ = corrupt_sweep
    row = next(r for r in read_csv(d) if r["job"] == job)
    assert row["status"] == "corrupt"
    assert row["error"].startswith(CORRUPT[job][1]), row["error"]
    assert row["gap"] == ""  # no result to rank


def test_good_and_failed_records_next_to_corrupt_ones_keep_their_status(corrupt_sweep):
    d, _ = corrupt_sweep
    rows = {r["job"]: r for r in read_csv(d)}
    assert rows["20"]["status"] == "ok" and float(rows["20"]["train_mse"]) == 0.5
    assert rows["21"]["status"] == "failed" and rows["21"]["lr"] == "abc"
    assert rows["22"]["status"] == "failed" and rows["22"]["batch_size"] == str(10**400)


# ---------------------------------------------------------------- the table cannot be written


def test_a_directory_where_the_table_goes_is_one_line_and_the_rest_is_written(sweep):
    (sweep / "results.csv").mkdir()
    proc = run_cli("-m", "linreg.results", str(sweep))
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"error: sweep {sweep}: cannot write {sweep / 'results.csv'}: Is a directory; ")
    assert len(proc.stderr.splitlines()) == 1
    assert (sweep / "results.md").is_file() and (sweep / "mse.png").is_file() and (sweep / "weights.png").is_file()
    assert not temp_files(sweep)


@pytest.fixture
def small_fs(tmp_path: Path):
    """A 1 MiB tmpfs at tmp_path/fs (root with mount rights only: chmod does not stop root)."""
    fs = tmp_path / "fs"
    fs.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(fs)]
    if os.geteuid() != 0 or subprocess.run(mount, capture_output=True).returncode:
        pytest.skip("needs root and the right to mount a tmpfs")
    yield fs
    subprocess.run(["umount", "-l", str(fs)], check=True)


def test_a_full_disk_is_one_line_naming_the_files_and_leaves_no_temp_files(small_fs):
    d = small_fs / "sweep"
    fake_job(d, 0, ["model.lr=0.03"], status="ok")
    fake_job(d, 1, ["model.lr=0.1"], status="ok")
    with open(small_fs / "filler", "wb", buffering=0) as f:  # fill the disk to the last byte
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    proc = run_cli("-m", "linreg.results", str(d))
    assert proc.returncode == 1
    names = ", ".join([str(d / "results.csv"), "results.md", "mse.png", "weights.png"])
    assert proc.stderr == f"error: sweep {d}: cannot write {names}: No space left on device\n"
    assert not temp_files(d) and not (d / "results.csv").exists()


def test_a_read_only_sweep_dir_is_one_line(small_fs):
    d = small_fs / "sweep"
    fake_job(d, 0, ["model.lr=0.03"], status="ok")
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    proc = run_cli("-m", "linreg.results", str(d))
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"error: sweep {d}: cannot write {d / 'results.csv'}, results.md")
    assert proc.stderr.endswith(": Read-only file system\n") and "Traceback" not in proc.stderr


# ---------------------------------------------------------------- progress lines


def job_return(overrides: list[str], status: JobStatus = JobStatus.COMPLETED, value: object = 0.5) -> JobReturn:
    ret = JobReturn(overrides=overrides)
    ret.status, ret.return_value = status, value
    return ret


def test_progress_line_shows_elapsed_time_and_what_is_left(sweep):
    plan = {"jobs": 48, "swept": ["model.lr"], "started": 1000.0}
    line = progress_line(3, plan, sweep / "0", job_return(["model.lr=0.03", "seed=1"]), now=1012.0)
    assert line == "[3/48 12s, ~3m00s left] model.lr=0.03: ok train_mse=0.25"
    assert timing(48, 48, 0.0, 125.0) == " 2m05s" and timing(1, 3, 0.0, 1200.0) == " 20m, ~40m left"
    assert timing(2, None, 0.0, 4000.0) == " 1h06m" and timing(1, 2, None, 5.0) == ""


def test_progress_line_of_a_sweep_without_overrides_says_defaults(sweep):
    line = progress_line(1, {"jobs": 1, "swept": [], "started": None}, sweep / "0", job_return([]))
    assert line == "[1/1] defaults: ok train_mse=0.25"


def test_progress_line_of_a_job_hydra_saw_fail_reads_the_public_return_value(tmp_path):
    ret = job_return(["model.lr=0.1"], JobStatus.FAILED, ValueError("bad"))
    line = progress_line(2, {"jobs": 2, "swept": ["model.lr"], "started": None}, tmp_path, ret)
    assert line == "[2/2] model.lr=0.1: failed (ValueError: bad) train_mse=n/a"


# ---------------------------------------------------------------- the planned job count


def multirun_cfg(*overrides: str):
    """The config `python -m linreg.train -m OVERRIDES` starts its sweep with (compose() only does single runs)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        return loader.load_configuration("train", overrides=list(overrides), run_mode=RunMode.MULTIRUN)


@pytest.mark.parametrize(
    ("overrides", "jobs", "swept"),
    [
        (["sweep=tutorial"], 48, ["model", "data.deg", "data.delta", "model.lr", "data.batch_size"]),
        (["sweep=tutorial", "trainer.accelerator=cpu,gpu"], 96, None),
        (["sweep=tutorial", "model.lr=0.1"], 16, ["model", "data.deg", "data.delta", "data.batch_size"]),
        (["sweep=smoke"], 4, ["model", "model.lr"]),
        (["model.lr=0.03,100", "data.batch_size=10,0"], 4, ["model.lr", "data.batch_size"]),
        (["data.batch_size=range(10,50,10)"], 4, ["data.batch_size"]),
        (["sweep=optuna"], 20, ["model.lr", "data.batch_size"]),
        (["data.deg=1"], 1, []),
        (["model=glob(*)"], None, []),  # a glob needs Hydra's config loader to expand: unknown, shown as k/?
    ],
)
def test_planned_jobs_counts_the_sweep(overrides, jobs, swept):
    n, keys = planned_jobs(multirun_cfg(*overrides))
    assert n == jobs
    if swept is not None:
        assert keys == swept


def test_only_the_planned_jobs_are_collected_when_the_count_is_known(tmp_path):
    from linreg.results import job_dirs

    for name in ("0", "1", "2", "3"):
        (tmp_path / name / ".hydra").mkdir(parents=True)
    assert [p.name for p in job_dirs(tmp_path, jobs=2)] == ["0", "1"]
    assert [p.name for p in job_dirs(tmp_path)] == ["0", "1", "2", "3"]
