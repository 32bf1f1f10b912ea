"""Shared fixtures: configs composed as the CLI composes them, run dirs under tmp_path."""

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from linreg.train import CONFIG_DIR

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def make_cfg(tmp_path: Path) -> Callable[..., DictConfig]:
    """Compose `train.yaml` with overrides, its run dir in tmp_path, and register it with Hydra."""

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


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python -m linreg.train` (or another module given first as `-m X`) as a user would."""
    cmd = [sys.executable, *(args if args and args[0] == "-m" else ("-m", "linreg.train", *args))]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "HYDRA_FULL_ERROR")}
    return subprocess.run(cmd, cwd=cwd or REPO, capture_output=True, text=True, timeout=timeout, env=env)
