"""`python -m linreg.evaluate ckpt_path=...`: a trained run's held-out and training MSE, bad checkpoints refused."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from linreg.data import RegressionDataModule
from linreg.models import squared_loss
from tests.conftest import REPO, run_cli

SMALL = ("data.num_examples=200", "trainer.max_epochs=1")
EVAL_KEYS = {
    "ckpt_path", "model", "seed", "data_seed", "num_examples", "train_num_examples", "heldout_mse", "train_mse",
    "heldout_ols_mse", "train_ols_mse", "weights", "true_weights", "data",
}  # fmt: skip


def train(run_dir: Path, *overrides: str) -> Path:
    """Train a run with the CLI; return its checkpoint."""
    proc = run_cli(*overrides, f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr
    return run_dir / "checkpoints" / "last.ckpt"


def evaluate(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`python -m linreg.evaluate ARGS` as a user runs it (warnings not silenced: the console must be quiet)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "HYDRA_FULL_ERROR")}
    cmd = [sys.executable, "-m", "linreg.evaluate", *args]
    return subprocess.run(cmd, cwd=cwd or REPO, capture_output=True, text=True, timeout=300, env=env)


def evaluated(ckpt: Path, out: Path, *args: str) -> dict:
    """Evaluate `ckpt` into `out`; check the console; return eval.json."""
    proc = evaluate(f"ckpt_path={ckpt}", f"hydra.run.dir={out}", *args)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # no banners, tips or warnings
    result = json.loads((out / "eval.json").read_text())
    assert proc.stdout.splitlines() == [
        f"eval: {result['model']} heldout_mse={result['heldout_mse']:.6g} train_mse={result['train_mse']:.6g}"
        f" (ckpt {ckpt}; {out / 'eval.json'})"
    ]
    return result


def mse_on(result: dict, seed: int, num_examples: int) -> tuple[float, float]:
    """The MSE of eval.json's weights on the run's generator at `seed`, and that data's least-squares floor."""
    d = result["data"]
    dm = RegressionDataModule(num_examples, d["w"], d["bias"], d["delta"], d["deg"], seed=seed)
    dm.setup()
    x, y = dm.full_data()
    return squared_loss(x @ torch.tensor(result["weights"]).reshape(-1, 1), y).item(), dm.ols_mse()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One run per model at the tutorial's defaults (1000 samples, 3 epochs), and a small deg=2 run."""
    root = tmp_path_factory.mktemp("runs")
    return {
        "manual": train(root / "manual", "model=manual"),
        "linear": train(root / "linear", "model=linear"),
        "deg2": train(root / "deg2", "model=linear", "data.deg=2", *SMALL),
    }


@pytest.mark.slow
@pytest.mark.parametrize("model", ["manual", "linear"])
def test_a_trained_run_is_as_good_on_held_out_data(runs, tmp_path, model):
    ckpt = runs[model]
    result = evaluated(ckpt, tmp_path / "eval")
    metrics = json.loads((ckpt.parents[1] / "metrics.json").read_text())
    assert EVAL_KEYS <= result.keys()
    assert (result["model"], result["ckpt_path"], result["weights"]) == (model, str(ckpt), metrics["weights"])
    # The same weights on the same data, by the same float32 operations: the very number training logged.
    assert result["train_mse"] == metrics["train_mse"]
    assert result["train_ols_mse"] == metrics["ols_mse"]
    # Fresh data from the generator: another seed, the training seed + 1 by default.
    assert (result["seed"], result["data_seed"], result["num_examples"], result["train_num_examples"]) == (
        420,
        421,
        1000,
        1000,
    )
    assert result["heldout_ols_mse"] != result["train_ols_mse"]
    heldout_mse, heldout_ols = mse_on(result, 421, 1000)
    assert result["heldout_mse"] == pytest.approx(heldout_mse, rel=1e-5)
    assert result["heldout_ols_mse"] == pytest.approx(heldout_ols, rel=1e-9)
    # A fitted linear model generalises: held-out MSE near its training MSE, both at the noise level.
    assert 5e-5 < result["heldout_mse"] < 2e-4 and 5e-5 < result["train_mse"] < 2e-4
    assert result["heldout_mse"] == pytest.approx(result["train_mse"], rel=0.3)
    assert result["heldout_mse"] >= result["heldout_ols_mse"]


@pytest.mark.slow
def test_data_seed_and_num_examples_choose_the_held_out_set(runs, tmp_path):
    result = evaluated(runs["manual"], tmp_path / "eval", "data_seed=7", "num_examples=300")
    assert (result["data_seed"], result["num_examples"], result["train_num_examples"]) == (7, 300, 1000)
    heldout_mse, heldout_ols = mse_on(result, 7, 300)
    assert result["heldout_mse"] == pytest.approx(heldout_mse, rel=1e-5)
    assert result["heldout_ols_mse"] == pytest.approx(heldout_ols, rel=1e-9)
    default = evaluated(runs["manual"], tmp_path / "default")
    assert result["train_mse"] == default["train_mse"] and result["heldout_mse"] != default["heldout_mse"]


@pytest.mark.slow
def test_a_linear_model_of_squared_features_stays_near_mse_10(runs, tmp_path):
    result = evaluated(runs["deg2"], tmp_path / "eval")
    metrics = json.loads((runs["deg2"].parents[1] / "metrics.json").read_text())
    assert result["train_mse"] == metrics["train_mse"]
    assert 5 < result["heldout_mse"] < 20 and 5 < result["train_mse"] < 20
    assert result["heldout_ols_mse"] > 5  # no linear model does better on x^2


@pytest.mark.slow
def test_runs_from_another_directory_into_outputs_eval(runs, tmp_path):
    rel = Path(os.path.relpath(runs["linear"], tmp_path))
    proc = evaluate(f"ckpt_path={rel}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (out,) = (tmp_path / "outputs" / "eval").iterdir()
    result = json.loads((out / "eval.json").read_text())
    assert result["ckpt_path"] == str(runs["linear"].resolve()) and result["model"] == "linear"
    assert proc.stdout.startswith("eval: linear heldout_mse=")


def bad_inputs(tmp: Path, good: Path) -> dict[str, tuple[list[str], str, str]]:
    """Command lines that must be refused: args, the key named, and a phrase of the reason."""
    run = tmp / "run" / "checkpoints"
    run.mkdir(parents=True)
    config = (good.parent / "config.json").read_text()

    def ckpt(name: str, data: bytes, config_text: str | None = config) -> str:
        d = tmp / name / "checkpoints"
        d.mkdir(parents=True)
        (d / "last.ckpt").write_bytes(data)
        if config_text is not None:
            (d / "config.json").write_text(config_text)
        return str(d / "last.ckpt")

    real = good.read_bytes()
    other = json.loads(config)
    other["model"] = {"_target_": "linreg.models.LinearRegression", "lr": 0.03, "init": "default"}
    torch.save({"state_dict": {}, "hyper_parameters": {"x": Path("/")}}, tmp / "object.ckpt")
    (tmp / "config.json").write_text(config)
    return {
        "none given": ([], "ckpt_path", "required"),
        "missing file": ([f"ckpt_path={tmp / 'nope.ckpt'}"], "ckpt_path", "no such file"),
        "a directory": ([f"ckpt_path={good.parents[1]}"], "ckpt_path", f"ckpt_path={good}"),
        "empty": ([f"ckpt_path={ckpt('empty', b'')}"], "ckpt_path", "not a loadable checkpoint"),
        "truncated": ([f"ckpt_path={ckpt('cut', real[: len(real) // 2])}"], "ckpt_path", "not a loadable"),
        "random bytes": (
            [f"ckpt_path={ckpt('random', random.Random(0).randbytes(4096))}"],
            "ckpt_path",
            "not a loadable",
        ),
        "pickled object": ([f"ckpt_path={tmp / 'object.ckpt'}"], "ckpt_path", "holds a pathlib.PosixPath object"),
        "no config.json": ([f"ckpt_path={ckpt('alone', real, None)}"], "ckpt_path", "no config.json beside it"),
        "config.json garbage": ([f"ckpt_path={ckpt('garbled', real, '{')}"], "ckpt_path", "unreadable"),
        "config.json a list": ([f"ckpt_path={ckpt('list', real, '[]')}"], "ckpt_path", "not a run's config"),
        "other model": ([f"ckpt_path={ckpt('other', real, json.dumps(other))}"], "ckpt_path", "linear model"),
        "data_seed bad": ([f"ckpt_path={good}", "data_seed=-1"], "data_seed", "integer >= 0"),
        "data_seed is training's": ([f"ckpt_path={good}", "data_seed=420"], "data_seed", "training seed"),
        "num_examples bad": ([f"ckpt_path={good}", "num_examples=0"], "num_examples", "positive integer"),
    }


@pytest.mark.slow
def test_bad_input_is_one_line_exit_2_and_leaves_no_run_dir(runs, tmp_path):
    cases = bad_inputs(tmp_path / "inputs", runs["manual"])
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    for name, (args, key, reason) in cases.items():
        proc = evaluate(*args, cwd=cwd)
        assert proc.returncode == 2, (name, proc.stderr)
        lines = proc.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {key}="), (name, proc.stderr)
        assert reason in lines[0], (name, lines[0])
        assert proc.stdout == "", name
        assert list(cwd.iterdir()) == [], name  # Hydra's run dir (outputs/eval/<time>) was never made


def test_a_refused_checkpoint_keeps_an_explicit_run_dir_unmade(tmp_path):
    out = tmp_path / "eval"
    proc = evaluate(f"ckpt_path={tmp_path / 'missing.ckpt'}", f"hydra.run.dir={out}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ckpt_path=") and not out.exists()


def test_a_refused_sweep_job_removes_only_a_dir_it_made(runs, tmp_path):
    # A sweep has no on_run_start: the job itself refuses, after Hydra made its dir.
    args = ["-m", f"ckpt_path={runs['manual']}", "data_seed=-1"]
    proc = evaluate(*args, f"hydra.sweep.dir={tmp_path / 'new'}")
    assert proc.returncode == 2 and proc.stderr.startswith("error: data_seed=-1"), proc.stderr
    assert not (tmp_path / "new" / "0").exists()
    kept = tmp_path / "old" / "0"
    kept.mkdir(parents=True)
    (kept / "evaluate.log").write_text("an earlier job's log\n")
    proc = evaluate(*args, f"hydra.sweep.dir={tmp_path / 'old'}")
    assert proc.returncode == 2 and proc.stderr.startswith("error: data_seed=-1"), proc.stderr
    assert (kept / "evaluate.log").read_text().startswith("an earlier job's log")  # there before: not removed


def console_script() -> Path:
    """The installed `linreg-evaluate` beside this Python (skip the test without it)."""
    script = Path(sys.executable).with_name("linreg-evaluate")
    if not script.exists():
        pytest.skip("linreg-evaluate not installed (pip install -e .)")
    return script


def test_the_console_script_refuses_a_missing_checkpoint(tmp_path):
    proc = subprocess.run(
        [console_script(), f"ckpt_path={tmp_path / 'x.ckpt'}"], cwd=tmp_path, capture_output=True, text=True
    )
    assert proc.returncode == 2 and proc.stderr.startswith("error: ckpt_path=") and "no such file" in proc.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_the_console_script_evaluates(runs, tmp_path):
    out = tmp_path / "eval"
    args = [console_script(), f"ckpt_path={runs['manual']}", f"hydra.run.dir={out}"]
    proc = subprocess.run(args, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "eval.json").read_text())["model"] == "manual"
