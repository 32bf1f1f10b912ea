"""A long sweep's launcher process does not grow with every job (benchmarks/sweep_memory.py, through the CLI)."""

import pytest

from benchmarks.sweep_memory import run_sweep

MIB = 1024  # rss.tsv holds KiB


@pytest.mark.system
def test_basic_launcher_stays_flat_over_1000_jobs(tmp_path):
    # ~80 s. Measured: +5.8 MiB from job 50 to 1,000 (6 KiB a job); Hydra's kept job configs were ~140 KiB a job.
    rss = run_sweep(tmp_path / "sweep", 1000)
    assert len(rss) == 1000
    assert rss[-1] - rss[49] < 20 * MIB, f"launcher RSS after job 50: {rss[49]} KiB, after job 1000: {rss[-1]} KiB"


@pytest.mark.system
def test_joblib_parent_stays_flat_over_200_jobs(tmp_path):
    rss = run_sweep(tmp_path / "sweep", 200, launcher="joblib", n_jobs=2)
    assert len(rss) == 200
    assert rss[-1] - rss[49] < 10 * MIB, f"launcher RSS after job 50: {rss[49]} KiB, after job 200: {rss[-1]} KiB"
