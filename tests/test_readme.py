"""The README's commands stay true: its single runs train, its sweeps compose, its make targets exist."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cli

README = (REPO / "README.md").read_text()
BLOCKS = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
COMMANDS = [line.split("  #")[0].strip() for block in BLOCKS for line in block.splitlines() if line.strip()]
SMALL = ["data.num_examples=100", "trainer.max_epochs=1"]


def train_args(command: str) -> list[str] | None:
    """The overrides of a README line that runs linreg.train (its console script too), if it is one."""
    for prefix in (".venv/bin/python -m linreg.train", ".venv/bin/linreg-train"):
        if command.startswith(prefix) and "<" not in command and not command.endswith("\\"):
            args = shlex.split(command[len(prefix) :])
            return ["--multirun" if a == "-m" else a for a in args]  # run_cli reads a leading -m as a module
    return None


SINGLE = [c for c in COMMANDS if (a := train_args(c)) is not None and "--multirun" not in a]
SWEEPS = [c for c in COMMANDS if (a := train_args(c)) is not None and "--multirun" in a]


def test_the_readme_shows_runs_and_sweeps():
    assert len(SINGLE) >= 5 and len(SWEEPS) >= 4 and "make run" in COMMANDS and "make test" in COMMANDS


@pytest.mark.slow
@pytest.mark.parametrize("command", SINGLE)
def test_every_single_run_in_the_readme_trains(tmp_path, command):
    proc = run_cli(*train_args(command), *SMALL, f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "status=ok" in proc.stdout


@pytest.mark.parametrize("command", SWEEPS)
def test_every_sweep_in_the_readme_composes_for_each_value(command):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from linreg.train import CONFIG_DIR

    args = [a for a in train_args(command) if a != "--multirun"]
    # Each sweep on its own: every value it names must compose (a group option that exists, a key); a few each.
    parsed = OverridesParser.create().parse_overrides(args)
    choices = [
        (
            o.get_key_element(),
            list(o.sweep_string_iterator())[:3] if o.is_sweep_override() else [o.get_value_element_as_str()],
        )
        for o in parsed
    ]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        for i, (key, values) in enumerate(choices):
            for value in values:
                overrides = [f"{k}={v[0]}" for k, v in choices[:i] + choices[i + 1 :]] + [f"{key}={value}"]
                compose("train", overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize("target", sorted({c.split()[1] for c in COMMANDS if c.startswith("make ")}))
def test_every_make_target_in_the_readme_exists(target):
    proc = subprocess.run(["make", "-n", target], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_the_help_names_the_groups_and_the_keys(tmp_path):
    cmd = [sys.executable, "-m", "linreg.train", "--help"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0 and "tutorial" in proc.stdout
    assert all(word in proc.stdout for word in ("model: linear, manual", "model.lr", "data.batch_size", "sweep:"))
    assert not Path(tmp_path / "outputs").exists()
