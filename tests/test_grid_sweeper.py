"""`hydra/sweeper=grid`: its cached compose equals Hydra's own; bad sweeps are refused before any job runs."""

import itertools

import pytest
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.types import RunMode
from omegaconf import OmegaConf

from hydra_plugins.linreg_sweeper.compose_cache import CachedConfigLoader
from linreg.train import CONFIG_DIR, job_config
from tests.conftest import run_cli

TUTORIAL_GRID = [
    list(job)
    for job in itertools.product(
        ["model=manual", "model=linear"],
        ["data.deg=1", "data.deg=2"],
        ["data.delta=0.01", "data.delta=2"],
        ["model.lr=0.003", "model.lr=0.03", "model.lr=0.1"],
        ["data.batch_size=10", "data.batch_size=100"],
    )
]
OTHER_JOBS = [
    ["experiment=deg2", "data.deg=3"],  # a command-line value beats a preset's, as in Hydra
    ["experiment=delta2", "model=linear", "model.init=zeros", "+extra=1"],
    ["data.w=[1.5,-2,0.5,3]", "logger=csv", "seed=7"],
    ["~resume", "trainer.max_epochs=1"],
    ["model.lr=0.1", "model=linear", "trainer=gpu"],  # group after value: order must not matter
    ["data.delta=0.5", "+hydra.job.env_set.FOO=bar"],
]


@pytest.fixture(scope="module")
def loaders():
    """Hydra's own config loader and the cached one over it, with the multirun's master config."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        hydra_loader = GlobalHydra.instance().hydra.config_loader
        master = hydra_loader.load_configuration("train", ["hydra.sweep.dir=/tmp/x"], run_mode=RunMode.MULTIRUN)
        yield hydra_loader, CachedConfigLoader(hydra_loader), master
    GlobalHydra.instance().clear()


@pytest.mark.parametrize("overrides", [TUTORIAL_GRID[0], TUTORIAL_GRID[-1], *OTHER_JOBS], ids=str)
def test_cached_compose_equals_hydras(loaders, overrides):
    hydra_loader, cached, master = loaders
    expected = hydra_loader.load_sweep_config(master, list(overrides))
    for _ in range(2):  # the first call composes, the second comes from the cache
        got = cached.load_sweep_config(master, list(overrides))
        assert OmegaConf.to_container(got) == OmegaConf.to_container(expected)
        assert job_config(got) == job_config(expected)  # resolved, as a job sees it


def test_tutorial_grid_composes_twice_and_equals_hydra_for_every_job(loaders):
    hydra_loader, _, master = loaders
    cached = CachedConfigLoader(hydra_loader)
    for overrides in TUTORIAL_GRID:
        got = cached.load_sweep_config(master, overrides)
        assert OmegaConf.to_container(got) == OmegaConf.to_container(hydra_loader.load_sweep_config(master, overrides))
    assert sorted(cached.composed) == [("model=linear",), ("model=manual",)]  # 2 composes for 48 jobs


def test_cached_configs_are_independent_copies(loaders):
    _, cached, master = loaders
    first = cached.load_sweep_config(master, ["model.lr=0.1"])
    first.model.lr = 5.0
    assert cached.load_sweep_config(master, ["model.lr=0.2"]).model.lr == 0.2
    assert cached.load_sweep_config(master, []).model.lr == 0.03


@pytest.mark.parametrize(
    ("sweep", "message"),
    [
        ("model=manual,nosuch", "Could not find 'model/nosuch'"),
        ("data.nokey=1,2", "Could not override 'data.nokey'"),
        ("+data.w=[2,-1,1],3", "Could not append to config"),  # the same key, a value of another kind
    ],
)
def test_a_bad_sweep_value_is_refused_before_any_job_runs(tmp_path, sweep, message):
    sweep_dir = tmp_path / "sweep"
    proc = run_cli("--multirun", f"hydra.sweep.dir={sweep_dir}", "data.num_examples=100", sweep)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert not list(sweep_dir.glob("*/metrics.json"))  # no job ran, not even the legal first one
