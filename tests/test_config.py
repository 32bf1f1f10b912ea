"""Bad input: Hydra refuses what the schema says, `check` what only the run can know; nothing is left behind."""

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import open_dict

from linreg.config import ConfigError, check
from tests.conftest import run_cli


@pytest.mark.parametrize(
    "override",
    ["trainer.max_epoch=5", "data.num_examples=abc", "model=lasso", "model.init=zeros", "seed=1,2"],
)
def test_hydra_refuses_what_the_schema_does_not_allow(make_cfg, override):
    with pytest.raises(ConfigCompositionException):
        make_cfg(override)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("+data.foo=1", "data.foo"),
        ("+foo=1", "foo"),
        ("model.lr=-1", "model.lr"),
        ("model.lr=inf", "model.lr"),
        ("data.num_examples=0", "data.num_examples"),
        ("data.batch_size=0", "data.batch_size"),
        ("data.deg=21", "data.deg"),
        ("data.delta=-1", "data.delta"),
        ("data.delta=3e38", "data.delta"),  # its noise would overflow float32
        ("data.w=[]", "data.w"),
        ("data.w=[1e39,1]", "data.w"),
        ("data.w=[1]", "data.w"),
        ("seed=-1", "seed"),
        ("seed=4294967296", "seed"),
        ("threads=0", "threads"),
        ("trainer.devices=2", "trainer.devices"),
        ("trainer.accelerator=tpu", "trainer.accelerator"),
        ("trainer.max_epochs=0", "trainer.max_epochs"),
        ("data.num_examples=100000000000000", "data.num_examples"),  # memory
        ("~data", "data"),
    ],
)
def test_check_names_the_key_the_schema_lets_through(make_cfg, override, key):
    with pytest.raises(ConfigError) as err:
        check(make_cfg(override))
    assert err.value.key == key


def test_a_group_that_is_no_mapping_is_refused(make_cfg):
    cfg = make_cfg()
    with open_dict(cfg):
        cfg.model = None  # an experiment's `model: null` composes: the schema's field is Any
    with pytest.raises(ConfigError, match="missing: choose an option") as err:
        check(cfg)
    assert err.value.key == "model"


def test_a_user_models_arguments_are_checked_by_building_it(make_cfg, tmp_path):
    from linreg.run import build_datamodule, build_model

    target = "model._target_=tests.user_classes.DecayedLinearRegression"
    cfg = make_cfg("model=linear", target, "+model.weight_decay=0.1")
    check(cfg)
    assert build_model(cfg, build_datamodule(cfg)).hparams.weight_decay == 0.1
    bad = make_cfg("model=linear", target, "+model.decay=0.1")  # not one of its arguments
    with pytest.raises(ConfigError, match="decay"):
        build_model(bad, build_datamodule(bad))


@pytest.mark.parametrize(
    ("args", "code", "says"),
    [
        (["trainer.max_epoch=5"], 1, "Key 'max_epoch' not in 'TrainerConfig'"),  # Hydra's own message
        (["model.lr=0"], 2, "error: model.lr=0.0: must be a finite number > 0"),  # ours: one line
    ],
)
def test_the_command_line_refuses_in_one_message_and_leaves_no_dir(tmp_path, args, code, says):
    proc = run_cli(*args, f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == code and says in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()
    if code == 2:
        assert proc.stderr.strip().count("\n") == 0


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_a_sweep_with_gpu_jobs_on_a_cpu_machine_is_refused_before_it_starts(tmp_path):
    proc = run_cli("--multirun", "trainer.accelerator=cpu,gpu", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert proc.returncode == 2 and "no GPU here" in proc.stderr and not (tmp_path / "sweep").exists()


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["model.lr=interval(0.1,1)"], "interval() needs hydra/sweeper=optuna"),
        (["hydra/launcher=vectorized", "hydra.launcher.memory_budget_gb=nan"], "memory_budget_gb=nan: must be"),
    ],
)
def test_a_refused_sweep_leaves_no_sweep_dir(tmp_path, args, says):
    proc = run_cli("--multirun", *args, f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert proc.returncode == 2 and says in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert not (tmp_path / "sweep").exists()
