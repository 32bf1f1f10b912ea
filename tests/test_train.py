"""`run(cfg)` and the CLI: metrics.json, the tutorial's bands, presets, any number of features."""

import gc
import json
import os
import pickle
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path

import cloudpickle
import pytest
import torch

import linreg.train
from linreg.data import RegressionDataModule
from linreg.stack import import_training_stack
from linreg.train import CONFIG_DIR, run
from tests.conftest import REPO, run_cli

METRIC_KEYS = {
    "status", "model", "seed", "data", "lr", "batch_size", "epochs", "accelerator", "epoch_mse", "train_mse",
    "weights", "true_weights", "ols_mse", "steps", "fit_seconds", "error",
}  # fmt: skip


@pytest.mark.parametrize("model", ["manual", "linear"])
def test_run_reproduces_the_tutorial_at_the_defaults(make_cfg, tmp_path, model):
    metrics = run(make_cfg(f"model={model}"))
    assert METRIC_KEYS <= metrics.keys()
    assert metrics["status"] == "ok" and metrics["error"] is None
    assert metrics["weights"] == pytest.approx([2, -1, 1], abs=0.01)
    assert metrics["true_weights"] == [2, -1, 1]
    assert len(metrics["epoch_mse"]) == 3 and metrics["train_mse"] == metrics["epoch_mse"][-1]
    assert 5e-5 < metrics["train_mse"] < 2e-4
    assert metrics["ols_mse"] <= metrics["train_mse"]
    assert metrics["steps"] == 300 and metrics["fit_seconds"] > 0
    on_disk = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert on_disk == metrics


@pytest.mark.parametrize(("experiment", "low", "high"), [("deg2", 9.9, 10.9), ("delta2", 3.9, 4.25)])
def test_the_limits_of_a_linear_model(make_cfg, experiment, low, high):
    metrics = run(make_cfg(f"experiment={experiment}"))
    assert low <= metrics["train_mse"] <= high
    assert metrics["ols_mse"] <= metrics["train_mse"]


def test_any_number_of_features(make_cfg):
    for model in ("manual", "linear"):
        metrics = run(make_cfg(f"model={model}", "data.w=[1.5,-2,0.5,3]", "trainer.max_epochs=5"))
        assert metrics["weights"] == pytest.approx([1.5, -2, 0.5, 3], abs=0.01)
    metrics = run(make_cfg("model=manual", "data.w=[1.5,-2]", "data.bias=false"))
    assert metrics["weights"] == pytest.approx([1.5, -2], abs=0.01)


# experiment preset -> (model, deg, delta): the tutorial's four experiments
PRESETS = {
    "tutorial_manual": ("manual", 1, 0.01),
    "tutorial_linear": ("linear", 1, 0.01),
    "deg2": ("linear", 2, 0.01),
    "delta2": ("linear", 1, 2),
}


@pytest.mark.parametrize("preset", sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("*.yaml")))
def test_every_experiment_preset_composes(make_cfg, preset):
    cfg = make_cfg(f"experiment={preset}")
    expected = PRESETS[preset]
    assert (cfg.model.name, cfg.data.deg, cfg.data.delta) == expected
    assert (cfg.data.num_examples, cfg.data.batch_size, cfg.model.lr, cfg.trainer.max_epochs) == (1000, 10, 0.03, 3)


def test_the_cli_runs_end_to_end_and_writes_metrics(tmp_path):
    out = tmp_path / "cli"
    proc = run_cli("model=linear", "data.num_examples=200", "trainer.max_epochs=1", f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model"] == "linear" and metrics["epochs"] == 1 and metrics["steps"] == 20
    assert "linear: status=ok" in proc.stdout
    assert list((out / "tensorboard").rglob("events.out.tfevents.*"))


def test_reproduction_prints_the_table(tmp_path):
    proc = run_cli("-m", "linreg.reproduce", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    for name in ("tutorial_manual", "tutorial_linear", "deg2", "delta2"):
        row = next(line for line in lines if line.startswith(name))
        assert row.rstrip().endswith("yes")
    assert "10.1555" in proc.stdout and "4.0763" in proc.stdout
    assert len(list((tmp_path / "outputs" / "reproduce").glob("*/*/metrics.json"))) == 4


def test_same_config_gives_bit_identical_numbers(make_cfg, tmp_path):
    a = run(make_cfg("model=linear", "data.num_examples=300", run_dir=tmp_path / "a"))
    b = run(make_cfg("model=linear", "data.num_examples=300", run_dir=tmp_path / "b"))
    a.pop("fit_seconds"), b.pop("fit_seconds")
    assert a == b  # exact equality: every float bit for bit


def test_finished_runs_leave_their_data_to_the_gc(make_cfg, tmp_path, monkeypatch):
    # The imports are frozen out of the GC once per process: a freeze after a job had made its objects
    # would keep that job's data (a Trainer/DataModule cycle) for the life of a sweep's process.
    made: list[weakref.ref] = []
    setup = RegressionDataModule.setup

    def tracked_setup(self: RegressionDataModule, stage: str | None = None) -> None:
        if not any(ref() is self for ref in made):  # run() and Trainer.fit both call setup
            made.append(weakref.ref(self))
        setup(self, stage)

    monkeypatch.setattr(RegressionDataModule, "setup", tracked_setup)
    for i in range(3):
        run(make_cfg("data.num_examples=100", "trainer.max_epochs=1", run_dir=tmp_path / str(i)))
    gc.collect()
    assert len(made) == 3 and [ref() for ref in made] == [None, None, None]


def test_runs_pickled_by_value_freeze_the_imports_once(make_cfg, tmp_path, monkeypatch):
    # Run as `python -m linreg.train`, train.py is __main__, and joblib and submitit pickle `run` by value for
    # every job, with fresh copies of its globals: "once per process" must hold across those copies, or each
    # job of a worker would freeze the jobs before it (and their data) for the worker's life.
    freezes: list[int] = []
    monkeypatch.setattr(gc, "freeze", lambda: freezes.append(1))
    import_training_stack.cache_clear()  # as in a fresh worker
    cloudpickle.register_pickle_by_value(linreg.train)
    try:
        jobs = [pickle.loads(cloudpickle.dumps(linreg.train.run)) for _ in range(2)]
    finally:
        cloudpickle.unregister_pickle_by_value(linreg.train)
    for i, job in enumerate(jobs):
        job(make_cfg("data.num_examples=100", "trainer.max_epochs=1", run_dir=tmp_path / str(i)))
    assert freezes == [1]


def test_a_deterministic_run_goes_without_torchs_nan_fill(make_cfg):
    # The fill costs ~12% of a step and no bits (tests/test_models.py compares the weights with and without it).
    torch.utils.deterministic.fill_uninitialized_memory = True
    run(make_cfg("data.num_examples=100", "trainer.max_epochs=1"))
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.utils.deterministic.fill_uninitialized_memory is False


def test_a_diverging_run_is_an_outcome_not_a_crash(make_cfg):
    metrics = run(make_cfg("model=linear", "model.lr=100", "data.num_examples=200"))
    assert metrics["status"] == "diverged" and metrics["diverged_epoch"] == 0
    assert metrics["train_mse"] is None and metrics["epoch_mse"] == [None]  # never a NaN reported as a result
    assert metrics["error"] is None


def test_resume_returns_a_finished_run_without_training(make_cfg, tmp_path):
    first = run(make_cfg("data.num_examples=200", "trainer.max_epochs=1"))
    mtime = (tmp_path / "run" / "metrics.json").stat().st_mtime_ns
    again = run(make_cfg("data.num_examples=200", "trainer.max_epochs=1", "resume=true"))
    assert again == first and (tmp_path / "run" / "metrics.json").stat().st_mtime_ns == mtime
    # more epochs with resume=true: not finished, so it continues from the 1-epoch checkpoint
    more = run(make_cfg("data.num_examples=200", "trainer.max_epochs=2", "resume=true"))
    assert more["epochs"] == 2 and more["epoch_mse"][0] == first["epoch_mse"][0] and more["steps"] == 40


def test_resume_never_continues_a_checkpoint_of_another_config(make_cfg, tmp_path):
    first = run(make_cfg("data.num_examples=200", "trainer.max_epochs=2"))
    (tmp_path / "run" / "metrics.json").unlink()  # as if killed after its last checkpoint
    other = run(make_cfg("data.num_examples=200", "trainer.max_epochs=2", "model.lr=0.001", "resume=true"))
    fresh = run(make_cfg("data.num_examples=200", "trainer.max_epochs=2", "model.lr=0.001", run_dir=tmp_path / "new"))
    assert other["steps"] == 40 and other["epoch_mse"] == fresh["epoch_mse"] != first["epoch_mse"]
    assert other["weights"] == fresh["weights"]


def test_write_json_atomic_never_leaves_a_truncated_file(tmp_path, monkeypatch):
    from linreg import train

    path = tmp_path / "metrics.json"
    train.write_json_atomic(path, {"status": "ok", "train_mse": 1.0})

    def crash(self, data):
        with open(self, "wb") as f:
            f.write(data[:10])  # half the bytes, then the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_bytes", crash)
    with pytest.raises(KeyboardInterrupt):
        train.write_json_atomic(path, {"status": "ok", "train_mse": 2.0})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"status": "ok", "train_mse": 1.0}
    assert [p.name for p in tmp_path.glob("*.json")] == ["metrics.json"]


def test_sigkill_mid_run_then_resume_matches_an_uninterrupted_run(tmp_path):
    args = ["model=linear", "data.num_examples=10000", "trainer.max_epochs=3", "~logger"]
    whole = tmp_path / "whole"
    assert run_cli(*args, f"hydra.run.dir={whole}").returncode == 0
    expected = json.loads((whole / "metrics.json").read_text())

    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "linreg.train", *args, f"hydra.run.dir={killed}"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not (killed / "checkpoints" / "last.ckpt").exists() and proc.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (killed / "metrics.json").exists(), "the run finished before it could be killed"

    resumed = run_cli(*args, "resume=true", f"hydra.run.dir={killed}")
    assert resumed.returncode == 0, resumed.stderr
    got = json.loads((killed / "metrics.json").read_text())
    assert got["weights"] == pytest.approx(expected["weights"], abs=1e-6)
    assert got["epoch_mse"] == pytest.approx(expected["epoch_mse"], rel=1e-6)
    assert got["steps"] == expected["steps"] == 3 * 1000


def test_resuming_a_diverged_run_from_its_checkpoint_stays_diverged(make_cfg, tmp_path):
    args = ("model=linear", "model.lr=100", "data.num_examples=100", "trainer.max_epochs=3")
    first = run(make_cfg(*args))
    (tmp_path / "run" / "metrics.json").unlink()  # only last.ckpt is left
    again = run(make_cfg(*args, "resume=true"))
    assert first["status"] == again["status"] == "diverged"
    assert again["diverged_epoch"] == first["diverged_epoch"] == 0 and again["steps"] == first["steps"] == 10
