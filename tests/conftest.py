"""Shared fixtures: the CLI as a user runs it, configs composed as the CLI composes them, and one small run and
one smoke sweep that are made once and only read by the tests that share them.

`make test` runs `pytest -m "not system"`; `make test-all` runs the `system` tests (a SLURM cluster, a wheel
install, memory over a long sweep, real servers, big sweeps).
"""

import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

REPO = Path(__file__).resolve().parents[1]
SMALL = ("data.num_examples=100", "trainer.max_epochs=1")  # 10 steps: a whole run is mostly start-up


def run_cli(
    *args: str, cwd: Path | None = None, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run `python -m linreg.train ARGS` (or another module, given first as `-m X`) as a user would."""
    cmd = [sys.executable, *(args if args and args[0] == "-m" else ("-m", "linreg.train", *args))]
    base = os.environ if env is None else env
    # The user's plain console: no warnings filter or full tracebacks that the test process may have set.
    env = {k: v for k, v in base.items() if k not in ("PYTHONWARNINGS", "HYDRA_FULL_ERROR")}
    return subprocess.run(cmd, cwd=cwd or REPO, capture_output=True, text=True, timeout=timeout, env=env)


@dataclass(frozen=True)
class Ran:
    """What one CLI call left: its output dir (run or sweep dir) and the finished process."""

    dir: Path
    proc: subprocess.CompletedProcess


def run_ok(out: Path, *args: str) -> Ran:
    """`run_cli(*args)` that must exit 0 (else the fixture errors with the tail of stderr)."""
    proc = run_cli(*args)
    assert proc.returncode == 0, f"{' '.join(args)}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
    return Ran(out, proc)


@pytest.fixture(scope="session")
def single_run(tmp_path_factory: pytest.TempPathFactory) -> Ran:
    """One small run through the CLI at the defaults (manual model, TensorBoard), trained once per session.

    For tests that only read what a run leaves (metrics.json, checkpoints, TensorBoard events, train.log,
    the console): they must not change it. A test that resumes, damages or retrains a run makes its own.
    """
    out = tmp_path_factory.mktemp("single_run") / "run"
    return run_ok(out, *SMALL, f"hydra.run.dir={out}")


@pytest.fixture(scope="module")
def smoke_sweep(tmp_path_factory: pytest.TempPathFactory) -> Ran:
    """`-m sweep=smoke` with the basic launcher (4 jobs: manual/linear x lr 0.03/0.1, 100 samples, 1 epoch).

    Once per test module: tests in one module may read it and, in order, change it (resume, remove a job).
    """
    out = tmp_path_factory.mktemp("smoke_sweep") / "sweep"
    return run_ok(out, "--multirun", "sweep=smoke", f"hydra.sweep.dir={out}")


@pytest.fixture
def make_cfg(tmp_path: Path) -> Callable[..., DictConfig]:
    """Compose `train.yaml` with overrides, its run dir in tmp_path, and register it with Hydra."""
    from linreg.train import CONFIG_DIR  # here, not at the top: a broken linreg fails its tests, not collection

    made: list[Path] = []

    def _make(*overrides: str, run_dir: Path | None = None) -> DictConfig:
        # A fresh dir per config (run, run-1, ...): a dir that holds a finished run is not trained into again.
        if run_dir is None:
            run_dir = tmp_path / ("run" if not made else f"run-{len(made)}")
            made.append(run_dir)
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose(
                "train",
                overrides=[f"hydra.run.dir={run_dir}", *overrides],
                return_hydra_config=True,
            )
        HydraConfig.instance().set_config(cfg)
        return cfg

    return _make


@pytest.fixture
def small_disk(tmp_path: Path) -> Callable[[str], Path]:
    """A tmpfs of the given size (e.g. `2300k`) under tmp_path, unmounted after; skips unless it can be mounted."""
    mounted: list[Path] = []

    def _mount(size: str) -> Path:
        disk = tmp_path / f"disk{len(mounted)}"
        disk.mkdir()
        if os.geteuid() != 0:
            pytest.skip("mounting a small disk needs root")
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)], capture_output=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
        mounted.append(disk)
        return disk

    yield _mount
    for disk in mounted:
        subprocess.run(["umount", "-l", str(disk)], check=False)
