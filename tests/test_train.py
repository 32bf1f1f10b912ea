"""`run(cfg)` and the CLI: metrics.json, the tutorial's bands, presets, any number of features."""

import json
from pathlib import Path

import pytest

from linreg.train import CONFIG_DIR, run
from tests.conftest import run_cli

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


@pytest.mark.parametrize("preset", sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("*.yaml")))
def test_every_experiment_preset_composes(make_cfg, preset):
    cfg = make_cfg(f"experiment={preset}")
    assert cfg.model.name in ("manual", "linear") and cfg.data.num_examples > 0


def test_the_cli_runs_end_to_end_and_writes_metrics(tmp_path):
    out = tmp_path / "cli"
    proc = run_cli("model=linear", "data.num_examples=200", "trainer.max_epochs=1", f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model"] == "linear" and metrics["epochs"] == 1 and metrics["steps"] == 20
    assert "linear: status=ok" in proc.stdout
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


def test_reproduction_prints_the_table(tmp_path):
    proc = run_cli("-m", "linreg.reproduce", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    for name in ("tutorial_manual", "tutorial_linear", "deg2", "delta2"):
        row = next(line for line in lines if line.startswith(name))
        assert row.rstrip().endswith("yes")
    assert "10.1555" in proc.stdout and "4.0763" in proc.stdout
    assert len(list((tmp_path / "outputs" / "reproduce").glob("*/*/metrics.json"))) == 4
