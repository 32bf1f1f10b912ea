"""One console for every launcher and sweeper: a header, a line per job, a footer (issue 20), numbers at 6 digits.

All are `system` tests (`make test-all`): the basic and joblib consoles of `make test` are test_results.py's and
test_launchers.py's.
"""

import re

import pytest

from tests.conftest import SMALL, run_cli

GRID = ["model.lr=0.01,0.03,0.1"]  # 3 jobs
SWEEPS = {
    "basic": GRID,
    "joblib": [*GRID, "hydra/launcher=joblib"],  # n_jobs: joblib's default, a worker per core
    "submitit_local": [*GRID, "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10"],
    "vectorized": [*GRID, "hydra/launcher=vectorized"],
    "optuna": ["sweep=optuna", "hydra.sweeper.n_trials=3"],
    "hydra_basic_sweeper": [*GRID, "hydra/sweeper=basic"],  # Hydra's own sweeper: its header from SweepResults
}


def sig_digits(number: str) -> int:
    """Significant digits of a number as printed: `0.0484142` has 6."""
    return len(number.split("e")[0].replace("-", "").replace(".", "").lstrip("0"))


@pytest.mark.system  # a whole sweep per launcher
@pytest.mark.parametrize("name", list(SWEEPS))
def test_a_sweep_prints_a_header_a_line_a_job_and_a_footer(tmp_path, name):
    sweep = tmp_path / "sweep"
    proc = run_cli("--multirun", *SWEEPS[name], *SMALL, f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    # Without Hydra's `[time][logger][level] - ` prefix.
    lines = [re.sub(r"^(\[[^\]]*\]){2,3}( -)? ", "", line) for line in (proc.stdout + proc.stderr).splitlines()]
    kinds = {
        "header": f"sweep: 3 jobs -> {re.escape(str(sweep))}",
        "job": r"\[\d/3 [^\]]+\] \S+( \S+)*: ok train_mse=\S+",
        "best": r"best trial \d: \S+ with .+",  # what an Optuna search answers
        "footer": f"sweep: 3 jobs: 3 ok -> {re.escape(str(sweep / 'results.md'))}",
    }
    shape = [next((k for k, pattern in kinds.items() if re.fullmatch(pattern, line)), line) for line in lines]
    assert shape == ["header", "job", "job", "job", *["best"] * (name == "optuna"), "footer"]
    numbers = [n for line in lines[1:-1] for n in re.findall(r"[=:] ?(-?\d+\.\d+(?:e-?\d+)?)", line)]
    assert numbers and all(sig_digits(n) <= 6 for n in numbers), numbers
