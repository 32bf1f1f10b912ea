"""`linreg.evaluate`: a checkpoint on held-out data, reading nothing but the checkpoint, refusing in one line."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from linreg.run import run
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A linear model trained on 200 samples for 2 epochs: its last.ckpt."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from linreg.train import CONFIG_DIR

    out = tmp_path_factory.mktemp("trained")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["model=linear", "data.num_examples=200", "trainer.max_epochs=2"])
    run(cfg, out)
    return out / "checkpoints" / "last.ckpt"


def evaluate(*args: str, cwd: Path | None = None):
    return run_cli("-m", "linreg.evaluate", *args, cwd=cwd)


def test_a_trained_model_is_as_good_on_held_out_data(trained, tmp_path):
    out = tmp_path / "eval"
    relative = trained.relative_to(trained.parents[2])  # from where it is launched, also with hydra.job.chdir
    proc = evaluate(
        f"ckpt_path={relative}",
        "num_examples=500",
        f"hydra.run.dir={out}",
        "hydra.job.chdir=true",
        cwd=trained.parents[2],
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads((out / "eval.json").read_text())
    assert result["data_seed"] == 421 and result["num_examples"] == 500 and result["model"] == "linear"
    assert result["heldout_mse"] == pytest.approx(result["train_mse"], rel=0.5)  # no overfitting: 3 weights
    assert result["train_mse"] == pytest.approx(
        json.loads((trained.parents[1] / "metrics.json").read_text())["train_mse"]
    )
    assert f"-> {out / 'eval.json'}" in proc.stdout


def forged(trained: Path, folder: Path, change: dict) -> Path:
    """A copy of the checkpoint whose saved config is changed."""
    state = torch.load(trained, weights_only=True)
    state["linreg_config"] = {**state["linreg_config"], **change}
    torch.save(state, folder / "last.ckpt")
    return folder / "last.ckpt"


def test_a_config_naming_other_code_is_refused_before_importing_it(trained, tmp_path):
    (tmp_path / "planted.py").write_text("open('RAN', 'w').write('x')\nclass M: pass\n")
    ckpt = forged(trained, tmp_path, {"model": {"_target_": "planted.M", "lr": 0.03}})
    proc = evaluate(f"ckpt_path={ckpt}", f"hydra.run.dir={tmp_path / 'eval'}", cwd=tmp_path)
    assert proc.returncode == 2 and "neither linreg's nor registered" in proc.stderr
    assert not (tmp_path / "RAN").exists() and not (tmp_path / "eval").exists()


@pytest.mark.parametrize(
    ("args", "says"),
    [([], "ckpt_path: required"), (["num_examples=0"], "error: num_examples=0: must be a positive integer")],
)
def test_bad_input_is_one_line_and_leaves_no_dir(trained, tmp_path, args, says):
    ckpt = [] if not args else [f"ckpt_path={trained}"]
    proc = evaluate(*ckpt, *args, f"hydra.run.dir={tmp_path / 'eval'}")
    assert proc.returncode == 2 and says in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert not (tmp_path / "eval").exists()


@pytest.mark.parametrize(
    ("given", "says"),
    [
        ({"ckpt_path": "/nonexistent.ckpt"}, "no such file"),
        ({"data_seed": 420}, "is the training seed"),
        ({"data_seed": -1}, "data_seed=-1: must be from 0"),
    ],
)
def test_bad_input_is_named_by_its_key_in_process(trained, given, says):
    from omegaconf import OmegaConf

    from linreg.config import ConfigError
    from linreg.evaluate import check_inputs

    cfg = OmegaConf.create({"ckpt_path": str(trained), "data_seed": None, "num_examples": None} | given)
    with pytest.raises(ConfigError, match=says):
        check_inputs(cfg)


def test_a_forged_seed_is_refused_in_process(trained, tmp_path):
    from linreg.config import ConfigError
    from linreg.evaluate import run_config

    for change in ({"seed": 7}, {"data": {"delta": -5}}):  # the DataModule's saved hyperparameters disagree
        with pytest.raises(ConfigError, match="disagrees with the data it was trained on"):
            run_config(forged(trained, tmp_path, change))


def test_help_shows_evaluates_own_options():
    proc = evaluate("--help")
    assert proc.returncode == 0 and "data_seed" in proc.stdout and "model:" not in proc.stdout


def test_a_dir_holding_a_training_run_or_a_sweep_is_refused(trained, tmp_path):
    from linreg.config import ConfigError
    from linreg.evaluate import own_eval_dir

    killed = tmp_path / "killed"  # a training run stopped before its first checkpoint: only .hydra/
    (killed / ".hydra").mkdir(parents=True)
    (killed / ".hydra" / "config.yaml").write_text("seed: 1\n")
    for out in (trained.parents[1], killed):
        with pytest.raises(ConfigError, match="holds a training run or a sweep; give the evaluation its own dir"):
            own_eval_dir(out, "hydra.run.dir")
    (killed / ".hydra" / "config.yaml").write_text("ckpt_path: x\n")  # an earlier evaluate's, failed or not
    own_eval_dir(killed, "hydra.run.dir")  # evaluated again
    with pytest.raises(ConfigError, match="give the evaluation its own dir"):  # not a sweep's, whose jobs it holds
        own_eval_dir(killed, "hydra.sweep.dir", sweep=True)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(ConfigError, match="holds files that are not a run's or a sweep's"):  # eval.json would join
        own_eval_dir(tmp_path / "notes", "hydra.run.dir")
    with pytest.raises(ConfigError, match="is inside .*, a run's or a sweep's dir"):  # a sweep's table would count it
        own_eval_dir(trained.parents[1] / "eval", "hydra.run.dir")


def test_an_evaluation_sweep_whose_jobs_would_share_a_dir_is_refused(tmp_path, capsys):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from linreg.evaluate import CheckInputs
    from linreg.train import CONFIG_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        given = [f"hydra.sweep.dir={tmp_path / 'ev'}", "hydra.sweep.subdir=same"]
        cfg = compose("evaluate", overrides=given, return_hydra_config=True)
    with pytest.raises(SystemExit):
        CheckInputs().on_multirun_start(cfg)
    assert "hydra.sweep.subdir='same': must give each job a dir of its own" in capsys.readouterr().err


def test_a_bad_swept_value_fails_its_job_and_the_others_run(trained, tmp_path):
    sweep = tmp_path / "ev"
    proc = evaluate("--multirun", f"ckpt_path={trained}", "data_seed=7,420,8", f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 1 and "error: job 1: data_seed=420: is the training seed" in proc.stderr
    assert proc.stderr.splitlines()[-1] == f"error: evaluation sweep {sweep}: #1 failed (see above)"
    assert [json.loads((sweep / j / "eval.json").read_text())["data_seed"] for j in "02"] == [7, 8]
    assert not (sweep / "1").exists()  # nothing left for the job that failed


THEIRS = "holds a training run or a sweep; give the evaluation its own dir"


@pytest.mark.parametrize(
    ("where", "refused", "why"),
    [
        (["hydra.run.dir={run}"], "hydra.run.dir='{run}'", THEIRS),
        (["--multirun", "hydra.sweep.dir={run}"], "hydra.sweep.dir='{run}'", THEIRS),  # before multirun.yaml
        (["--multirun", "hydra.sweep.dir={run.parent}"], "hydra.sweep.dir='{run.parent}'", "holds files that are not"),
    ],
)
def test_an_evaluation_into_a_training_runs_dir_is_refused_untouched(trained, tmp_path, where, refused, why):
    run = tmp_path / "runs" / "0"  # the third: job 0's dir would be the run
    shutil.copytree(trained.parents[1], run)
    before = sorted((p, p.read_bytes() if p.is_file() else None) for p in run.parent.rglob("*"))
    proc = evaluate(*(w.format(run=run) for w in where), f"ckpt_path={trained}")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"error: {refused.format(run=run)}: {why}") and len(proc.stderr.splitlines()) == 1
    assert sorted((p, p.read_bytes() if p.is_file() else None) for p in run.parent.rglob("*")) == before
