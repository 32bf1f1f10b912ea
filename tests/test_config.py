"""Bad input through the real CLI: one line naming the key, a non-zero exit, no traceback, no files."""

import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from linreg.config import ConfigError, validate
from tests.conftest import REPO, run_cli

# (overrides, the key the message must name, a phrase of what is allowed)
BAD_INPUT = {
    "batch_size_zero": (["data.batch_size=0"], "data.batch_size", "positive integer"),
    "batch_size_float": (["data.batch_size=2.5"], "data.batch_size", "positive integer"),
    "batch_size_text": (["data.batch_size=ten"], "data.batch_size", "positive integer"),
    "lr_zero": (["model.lr=0"], "model.lr", "> 0"),
    "lr_negative": (["model.lr=-0.1"], "model.lr", "> 0"),
    "lr_inf": (["model.lr=inf"], "model.lr", "finite"),
    "lr_nan": (["model.lr=nan"], "model.lr", "finite"),
    "lr_text": (["model.lr=fast"], "model.lr", "finite number"),
    "num_examples_zero": (["data.num_examples=0"], "data.num_examples", "positive integer"),
    "deg_zero": (["data.deg=0"], "data.deg", "positive integer"),
    "deg_fraction": (["data.deg=1.5"], "data.deg", "positive integer"),
    "delta_negative": (["data.delta=-1"], "data.delta", ">= 0"),
    "w_empty": (["data.w=[]"], "data.w", "non-empty list"),
    "w_text": (["data.w=[2,a,1]"], "data.w", "finite numbers"),
    "bias_text": (["data.bias=maybe"], "data.bias", "true or false"),
    "max_epochs_zero": (["trainer.max_epochs=0"], "trainer.max_epochs", "positive integer"),
    "seed_negative": (["seed=-1"], "seed", "integer from 0"),
    "seed_too_big": (["seed=100000000000000"], "seed", "integer from 0 to 4294967295"),
    "batch_size_beyond_int64": (["data.batch_size=99999999999999999999999"], "data.batch_size", "positive integer"),
    "w_overflows_float32": (["data.w=[1e39,1]"], "data.w", "fit float32"),
    "delta_overflows_float32": (["data.delta=1e39"], "data.delta", "float32"),
    "deg_too_high": (["data.deg=1000"], "data.deg", "at most 20"),
    "lr_overflows_float32": (["model.lr=1e39"], "model.lr", "float32"),
    "unknown_data_key": (["+data.foo=1"], "data.foo", "unknown key"),
    "unknown_model_key": (["+model.momentum=0.9"], "model.momentum", "unknown key"),
    "typo_in_trainer": (["+trainer.max_epoch=5"], "trainer.max_epoch", "did you mean trainer.max_epochs?"),
    "typo_at_top": (["+sede=5"], "sede", "did you mean seed?"),
    "init_on_manual": (["+model.init=zeros"], "model.init", "unknown key"),
    "deterministic_text": (["trainer.deterministic=maybe"], "trainer.deterministic", "true or false"),
    "csv_logger_value": (["+logger.csv=5"], "logger.csv", "a logger (a mapping with a _target_) or null"),
    "devices_zero": (["trainer.devices=0"], "trainer.devices", "one device"),
    "devices_text": (["trainer.devices=abc"], "trainer.devices", "one device"),
    "devices_two": (["trainer.devices=2"], "trainer.devices", "one device"),
    "no_data_group": (["~data"], "data", "choose a config group, e.g. data=tutorial"),
    "no_model_group": (["~model"], "model", "choose a config group, e.g. model=manual"),
    "bad_interpolation": (["model.lr=${data.foo}"], "model.lr", "cannot be resolved"),
    "threads_zero": (["threads=0"], "threads", "positive integer"),
    "init_unknown": (["model=linear", "model.init=random"], "model.init", "default, zeros"),
    "too_much_data": (["data.num_examples=100000000000"], "data.num_examples", "GiB"),
    # Refused before Hydra composes the config (linreg.cli): Hydra's own message would be a paragraph, exit 1.
    "unknown_model_choice": (["model=lasso"], "model", "one of linear, manual"),
    "launcher_typo": (["hydra/launcher=jobib"], "hydra/launcher", "one of basic, joblib,"),
    "typo_without_plus": (["trainer.max_epoch=5"], "trainer.max_epoch", "did you mean trainer.max_epochs?"),
    "hydra_key_typo": (["hydra.sweep.dri=x"], "hydra.sweep.dri", "did you mean hydra.sweep.dir?"),
    "old_key_without_plus": (["trainer.steps_per_call=5"], "trainer.steps_per_call", "now data.batches_per_call"),
    "plus_on_a_key_there": (["+seed=3"], "seed", "set it with seed=3"),
    "sweep_without_m": (["seed=1,2"], "seed", "add -m (--multirun)"),
    "unreadable_value": (["model.lr=["], "model.lr", "Hydra cannot read this value"),
    "group_null": (["logger=null"], "logger", "write ~logger"),
    "new_key_in_a_mapping": (["hydra.job.env_set.X=1"], "hydra.job.env_set.X", "+hydra.job.env_set.X=1 adds it"),
}
if not torch.cuda.is_available():
    BAD_INPUT["gpu_without_gpu"] = (["trainer=gpu"], "trainer.accelerator", "no GPU available; use trainer=cpu")
    BAD_INPUT["accelerator_gpu_without_gpu"] = (["trainer.accelerator=gpu"], "trainer.accelerator", "no GPU")


def _run(run_dir: Path, overrides: list[str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    cmd = [sys.executable, "-m", "linreg.train", *overrides, f"hydra.run.dir={run_dir}"]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    """Every bad-input case through the CLI, two at a time (each pays the import cost)."""
    base = tmp_path_factory.mktemp("bad")
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(_run, base / name, ov) for name, (ov, _, _) in BAD_INPUT.items()}
        return {name: (base / name, f.result()) for name, f in futures.items()}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_fails_in_one_clear_line(cli_results, case):
    _, key, allowed = BAD_INPUT[case]
    run_dir, proc = cli_results[case]
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: {key}=") and allowed in lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not run_dir.exists()  # nothing half-written


def test_bad_input_keeps_a_run_dir_that_was_there(tmp_path):
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    proc = _run(keep, ["seed=-1"])
    assert proc.returncode == 2 and proc.stderr.startswith("error: seed=")
    assert [p.name for p in keep.iterdir()] == ["notes.txt"]


def test_an_empty_run_dir_is_refused_and_the_working_dir_kept(tmp_path):
    (tmp_path / "mine.txt").write_text("mine")
    cmd = [sys.executable, "-m", "linreg.train", "hydra.run.dir="]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: hydra.run.dir='': must be a non-empty path"
    assert (tmp_path / "mine.txt").read_text() == "mine" and [p.name for p in tmp_path.iterdir()] == ["mine.txt"]


def test_a_run_dir_under_a_file_is_refused_in_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    proc = _run(tmp_path / "file" / "run", [])
    assert proc.returncode == 2 and "is not a directory" in proc.stderr and len(proc.stderr.splitlines()) == 1
    assert (tmp_path / "file").read_text() == "x"


def test_full_error_zero_is_not_set(tmp_path):
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    cmd = [sys.executable, "-m", "linreg.train", "data.batch_size=0", f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("hydra/launcher=joblib hydra.launcher.n_jobs=0", "hydra.launcher.n_jobs"),
        ("hydra.sweeper.max_batch_size=0", "hydra.sweeper.max_batch_size"),
        ("model.lr=-1", "model.lr"),
        ("model.lr=interval(0.01,0.1)", "model.lr"),  # the grid cannot list it (Optuna's sweeper can)
        ("model=manual,lasso", "model"),  # one bad value of a group: before Hydra starts the sweep
        ("trainer.max_epochz=2", "trainer.max_epochz"),
        ("hydra/launcher=joblib hydra.launcher.n_jobs=abc", "hydra.launcher.n_jobs"),  # Hydra's own type check
        ("hydra.launcher.n_jobs=1,2", "hydra.launcher.n_jobs"),  # Hydra's own settings are not swept
        ("model=glob(x*)", "model"),  # a grid of no jobs
        ("hydra.sweep.subdir=${nope}", "hydra.sweep.subdir"),  # the job dirs cannot be named
    ],
)
def test_bad_sweep_settings_are_refused_before_any_job(tmp_path, override, key):
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "linreg.train", "-m", *override.split(), "seed=1,2", f"hydra.sweep.dir={sweep}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"error: {key}=") and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert not sweep.exists() or not any(p.is_dir() for p in sweep.iterdir())


def test_full_error_shows_the_traceback(tmp_path):
    env = {**os.environ, "HYDRA_FULL_ERROR": "1"}
    cmd = [sys.executable, "-m", "linreg.train", "data.batch_size=0", f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "ConfigError" in proc.stderr


def test_batch_larger_than_the_data_is_one_batch(make_cfg):
    validate(make_cfg("data.num_examples=5", "data.batch_size=50"))


@pytest.mark.parametrize(
    "override",
    [
        "data.w=[3]",
        "model._target_=lasso",
        "data.batches_per_call=0",
        "resume=1",
        "logger.tensorboard.write_every_s=-1",
        "logger.tensorboard.write_every_s=soon",
        "logger.tensorboard.fit_figure=maybe",
        "logger.tensorboard=off",
    ],
)
def test_more_bad_values_are_caught_before_any_work(make_cfg, override):
    key = override.lstrip("~").split("=")[0]
    with pytest.raises(ConfigError, match=f"^{re.escape(key)}="):  # the message starts with the key
        validate(make_cfg(override))


@pytest.mark.parametrize(
    ("override", "says"),
    [
        ("+trainer.steps_per_call=5", "now data.batches_per_call"),
        ("+trainer.log_every_n_steps=5", "now model.log_every_sgd_steps"),
        ("model._target_=linreg.models.Lasso", "cannot be imported: AttributeError"),
        ("model._target_=nowhere.Model", "cannot be imported: ModuleNotFoundError"),
        ("model._target_=collections.OrderedDict", "must name a subclass of linreg.models.RegressionModule"),
        ("model._target_=os.path.join", "must name a subclass of linreg.models.RegressionModule"),
        ("model._target_=linreg.models.RegressionModule", "must name a subclass"),
        ("+model.in_features=3", "is given by the run"),
        ("logger.tensorboard._target_=lasso", "must name a class"),
        ("+logger.x={_target_:collections.OrderedDict}", "must name a subclass of lightning.pytorch.loggers.Logger"),
        ("logger.tensorboard._target_=lightning.pytorch.loggers.TensorBoardLogger", "fit_figure=True: unknown key"),
        ("+model.lrr=1", "did you mean model.lr?"),
        ("model._target_=tests.user_classes.DecayedLinearRegression", "model.log_every_sgd_steps=50: unknown key"),
    ],
)
def test_moved_keys_and_bad_targets_say_so(make_cfg, override, says):
    with pytest.raises(ConfigError, match=re.escape(says)):
        validate(make_cfg(override))


def test_a_class_of_yours_takes_the_arguments_its_constructor_takes(make_cfg):
    user = "model=linear", "model._target_=tests.user_classes.DecayedLinearRegression"
    validate(make_cfg(*user, "~model.log_every_sgd_steps", "~model.init", "+model.weight_decay=0.1"))
    validate(
        make_cfg("logger=tensorboard_csv", "+logger.csv.flush_logs_every_n_steps=10", "+logger.tensorboard.prefix=a")
    )


def test_a_model_of_yours_trains_from_the_command_line(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli(
        "model=linear", "model._target_=tests.user_classes.DecayedLinearRegression", "~model.log_every_sgd_steps",
        "~model.init", "+model.weight_decay=0.01", "data.num_examples=100", "trainer.max_epochs=1",
        f"hydra.run.dir={run_dir}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "ok" and metrics["model"] == "decayedlinear" and metrics["steps"] == 10
