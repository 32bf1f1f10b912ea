"""results.py on hand-made sweep dirs: the table, the plots, `python -m linreg.results`, the planned job count."""

import csv
import json
from pathlib import Path

import pytest
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.types import RunMode
from omegaconf import OmegaConf
from PIL import Image

from linreg.results import collect, failure_message, planned_jobs, summarize
from linreg.train import CONFIG_DIR
from tests.conftest import run_cli


def fake_job(sweep: Path, num: int, overrides: list[str], **metrics) -> Path:
    """A job dir as Hydra and `run` leave it (metrics.json only when `metrics` is given)."""
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(overrides), job / ".hydra" / "overrides.yaml")
    cfg = {"seed": 420, "model": {"name": "manual", "lr": 0.03}, "data": {"deg": 1, "delta": 0.01, "batch_size": 10}}
    OmegaConf.save(OmegaConf.create(cfg), job / ".hydra" / "config.yaml")
    if metrics:
        base = {
            "status": "ok", "model": "manual", "seed": 420, "data": {"deg": 1, "delta": 0.01}, "lr": 0.03,
            "batch_size": 10, "epochs": 1, "accelerator": "cpu", "train_mse": 0.5, "weights": [1.5, -0.5, 0.9],
            "true_weights": [2, -1, 1], "ols_mse": 1e-4, "steps": 10, "fit_seconds": 0.1, "diverged_epoch": None,
            "error": None,
        }  # fmt: skip
        (job / "metrics.json").write_text(json.dumps({**base, **metrics}))
    return job


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


def test_failure_message_is_one_line_naming_failed_and_missing_jobs(sweep):
    message = failure_message(sweep, collect(sweep))
    assert "\n" not in message
    assert "2 of 4 jobs failed" in message
    assert "#2 [model.lr=0.1] failed: boom line 2" in message
    assert "#10 [model.lr=0.3] missing" in message
    assert "#0" not in message and "#1 " not in message


def test_summarize_writes_csv_markdown_and_valid_pngs(sweep):
    summarize(sweep)
    with open(sweep / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["status"] for r in rows] == ["ok", "diverged", "failed", "missing"]
    assert float(rows[0]["train_mse"]) == 0.25 and json.loads(rows[0]["weights"]) == [1.5, -0.5, 0.9]
    assert rows[1]["train_mse"] == "" and rows[1]["diverged_epoch"] == "0"
    md = (sweep / "results.md").read_text()
    assert "4 jobs: 1 ok, 1 diverged, 1 failed, 1 missing." in md and "**failed**" in md
    for name in ("mse.png", "weights.png"):
        with Image.open(sweep / name) as img:
            img.verify()
            assert img.format == "PNG"
    assert not list(sweep.glob(".*.tmp"))  # atomic writes leave no temp files


def test_plots_survive_a_sweep_with_no_finished_job(tmp_path):
    d = tmp_path / "sweep"
    fake_job(d, 0, ["model.lr=0.1"], status="failed", train_mse=None, weights=None, error="x")
    summarize(d)
    assert (d / "mse.png").stat().st_size > 0 and (d / "weights.png").stat().st_size > 0


def test_results_cli_rebuilds_and_exits_nonzero_naming_failed_jobs(sweep):
    proc = run_cli("-m", "linreg.results", str(sweep))
    assert proc.returncode == 1
    assert "#2 [model.lr=0.1] failed" in proc.stderr and "#10 [model.lr=0.3] missing" in proc.stderr
    assert (sweep / "results.csv").exists() and (sweep / "results.md").exists()


def test_results_cli_exits_zero_for_ok_and_diverged(tmp_path):
    d = tmp_path / "sweep"
    fake_job(d, 0, ["model.lr=0.03"], status="ok")
    fake_job(d, 1, ["model.lr=100"], status="diverged", train_mse=None, weights=None, diverged_epoch=0)
    proc = run_cli("-m", "linreg.results", str(d))
    assert proc.returncode == 0, proc.stderr
    assert "2 jobs: 1 ok, 1 diverged" in proc.stdout


def test_results_cli_rejects_a_dir_without_jobs(tmp_path):
    proc = run_cli("-m", "linreg.results", str(tmp_path))
    assert proc.returncode == 2 and "no job dirs" in proc.stderr


def multirun_cfg(*overrides: str):
    """The config `python -m linreg.train -m OVERRIDES` starts its sweep with (compose() only does single runs)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        return loader.load_configuration("train", overrides=list(overrides), run_mode=RunMode.MULTIRUN)


@pytest.mark.parametrize(
    ("overrides", "jobs"),
    [
        (["sweep=tutorial"], 48),
        (["sweep=tutorial", "trainer.accelerator=cpu,gpu"], 96),
        (["sweep=tutorial", "model.lr=0.1"], 16),  # the command line replaces a preset's values
        (["sweep=smoke"], 4),
        (["model.lr=0.03,100", "data.batch_size=10,0"], 4),
        (["sweep=optuna"], 20),
    ],
)
def test_planned_jobs_counts_the_sweep(overrides, jobs):
    cfg = multirun_cfg(*overrides)
    n, swept = planned_jobs(cfg)
    assert n == jobs
    assert "model.lr" in swept


def test_only_the_planned_jobs_are_collected_when_the_count_is_known(tmp_path):
    from linreg.results import job_dirs

    for name in ("0", "1", "2", "3"):
        (tmp_path / name / ".hydra").mkdir(parents=True)
    assert [p.name for p in job_dirs(tmp_path, jobs=2)] == ["0", "1"]
    assert [p.name for p in job_dirs(tmp_path)] == ["0", "1", "2", "3"]
