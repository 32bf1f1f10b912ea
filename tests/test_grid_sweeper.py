"""`hydra/sweeper=grid`: Hydra's basic sweeper's jobs and numbers, a cached compose equal to Hydra's own, bad sweeps
refused before any job runs, returns that keep no configs."""

import importlib
import itertools
import json
import pickle
from pathlib import Path

import pytest
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import ConfigCompositionException
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, RunMode
from omegaconf import OmegaConf

from hydra_plugins.linreg_sweeper import grid_sweeper
from hydra_plugins.linreg_sweeper.grid_sweeper import CachedConfigLoader
from tests.conftest import REPO, run_cli

SMALL = ["data.num_examples=100", "trainer.max_epochs=1"]
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
JOBS = [  # jobs of every kind the cache must compose as Hydra does
    TUTORIAL_GRID[0],
    TUTORIAL_GRID[-1],
    ["experiment=deg2", "data.deg=3"],  # a command-line value beats a preset's, as in Hydra
    ["experiment=delta2", "model=linear", "model.init=zeros", "+extra=1"],
    ["data.w=[1.5,-2,0.5,3]", "logger=csv", "seed=7"],
    ["model.lr=0.1", "model=linear", "trainer=gpu"],  # a group after a value: the order must not matter
    ["data.delta=0.5", "+hydra.job.env_set.FOO=bar"],
    ["++resume=true", "data.delta=${data.deg}"],
    ["data.nokey=1"],  # Hydra refuses it: the cache must give Hydra's own error
]
GRIDS = {  # command lines of a multirun: the grid sweeper must plan exactly what Hydra's basic sweeper plans
    "range, sort, choice, glob, a key twice": [
        "seed=range(2)",
        "model.lr=sort(0.3,0.1)",
        "data.deg=2",
        "model=glob(*)",
        "data.deg=1,3",
        "logger=choice(csv)",
    ],
    "batches": ["sweep=smoke", "data.deg=1,2", "hydra.sweeper.max_batch_size=3"],
}


@pytest.fixture(scope="module")
def hydra_loader():
    """Hydra's own config loader, as the CLI makes it."""
    from linreg.train import CONFIG_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        yield GlobalHydra.instance().hydra.config_loader
    GlobalHydra.instance().clear()


def master(hydra_loader, *overrides: str):
    """The multirun's own config, as Hydra composes it before a sweep."""
    return hydra_loader.load_configuration("train", ["hydra.sweep.dir=/tmp/x", *overrides], run_mode=RunMode.MULTIRUN)


class RecordingLauncher(Launcher):
    """Records each launch (first job number, the jobs' overrides) and returns a completed job for each."""

    def __init__(self) -> None:
        self.launches: list[tuple[int, list[list[str]]]] = []

    def setup(self, **kwargs) -> None:
        pass

    def launch(self, job_overrides, initial_job_idx):
        self.launches.append((initial_job_idx, [list(o) for o in job_overrides]))
        return [JobReturn(overrides=list(o), status=JobStatus.COMPLETED, _return_value=0.0) for o in job_overrides]


def planned_launches(hydra_loader, sweeper: str, args: list[str]) -> list[tuple[int, list[list[str]]]]:
    """What a sweeper (instantiated as Hydra's multirun does) hands its launcher for this command line."""
    config = master(hydra_loader, *args, f"hydra/sweeper={sweeper}")
    sweeper_obj = Plugins.instance().instantiate_sweeper(
        hydra_context=HydraContext(config_loader=hydra_loader, callbacks=None), task_function=None, config=config
    )
    assert type(sweeper_obj).__name__ == {"basic": "BasicSweeper", "grid": "GridSweeper"}[sweeper]
    sweeper_obj.launcher = recorder = RecordingLauncher()
    sweeper_obj.sweep(arguments=list(config.hydra.overrides.task))
    return recorder.launches


@pytest.mark.parametrize("args", list(GRIDS.values()), ids=list(GRIDS))
def test_jobs_order_and_numbers_equal_hydras_basic_sweeper(hydra_loader, args):
    got = planned_launches(hydra_loader, "grid", args)
    assert got == planned_launches(hydra_loader, "basic", args)
    assert sum(len(jobs) for _, jobs in got) > 1


def test_the_tutorial_preset_is_its_48_jobs_in_hydras_order(hydra_loader):
    expected = [(0, [[*job, "sweep=tutorial"] for job in TUTORIAL_GRID])]  # Hydra's order: the last key fastest
    assert planned_launches(hydra_loader, "grid", ["sweep=tutorial"]) == expected


def composed(loader, config, job):
    """A job's config as a container, or the error Hydra's composition gave."""
    try:
        return OmegaConf.to_container(loader.load_sweep_config(config, list(job)))
    except ConfigCompositionException as err:
        return str(err)


def test_cached_compose_equals_hydras_for_every_kind_of_job(hydra_loader):
    config = master(hydra_loader)
    cached = CachedConfigLoader(hydra_loader)
    for job in JOBS:
        expected = composed(hydra_loader, config, job)
        assert composed(cached, config, job) == expected, job  # composed by Hydra, once
        assert composed(cached, config, job) == expected, job  # a copy of the composition, values applied
    for job in TUTORIAL_GRID:
        cached.load_sweep_config(config, job)
    assert {("model=manual",), ("model=linear",)} <= set(cached.composed)  # 2 compositions for 48 jobs
    # A copy per job: changing one job's config changes no other.
    cached.load_sweep_config(config, ["model.lr=0.1"]).model.lr = 5.0
    assert cached.load_sweep_config(config, []).model.lr == 0.03


def test_the_cache_keeps_a_bounded_number_of_compositions(hydra_loader, monkeypatch):
    monkeypatch.setattr(grid_sweeper, "KEPT", 2)
    cached, config = CachedConfigLoader(hydra_loader), master(hydra_loader)
    for job in (["model=manual"], ["model=linear"], ["logger=csv"], ["model=manual"]):
        cached.load_sweep_config(config, job)
    assert list(cached.composed) == [("logger=csv",), ("model=manual",)]


def test_a_group_option_found_through_hydra_searchpath_is_composed_as_a_group(hydra_loader, tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "fancy.yaml").write_text(
        "defaults:\n  - /schema/model@_here_: linear\n_target_: linreg.models.LinearRegression\nlr: 0.5\n"
    )
    config = master(hydra_loader, f"hydra.searchpath=[file://{tmp_path}]")
    cached = CachedConfigLoader(hydra_loader)
    for job in (["model=fancy", "model.lr=0.2"], ["model=fancy", "model.lr=0.3"], ["model.lr=0.1"]):
        assert composed(cached, config, job) == composed(hydra_loader, config, job)
    assert sorted(cached.composed) == [(), ("model=fancy",)]


def test_a_bad_job_in_a_later_batch_is_refused_before_the_first_batch_launches(hydra_loader):
    with pytest.raises(ConfigCompositionException, match="model/nosuch"):
        planned_launches(hydra_loader, "grid", ["model=manual,nosuch", "hydra.sweeper.max_batch_size=1"])


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["model=glob(nosuch*)"], "error: model='glob(nosuch*)': matches nothing"),
        (["seed=range(0,3,0)"], "error: seed='range(0,3,0)': range() arg 3 must not be zero"),
        (["data.delta=range(0.0,1.0,0.0)"], "error: data.delta='range(0.0,1.0,0.0)': Invalid range values"),
        (["hydra.sweeper.max_batch_size=0"], "error: hydra.sweeper.max_batch_size=0: must be a positive integer"),
    ],
)
def test_a_sweep_without_jobs_or_batches_is_refused_in_one_line(hydra_loader, capsys, args, line):
    with pytest.raises(SystemExit) as exit:
        planned_launches(hydra_loader, "grid", ["model=manual", *args])
    assert exit.value.code == 2 and capsys.readouterr().err.startswith(line)


def test_an_interval_is_refused_in_one_line_before_any_job_runs(tmp_path):
    proc = run_cli("--multirun", f"hydra.sweep.dir={tmp_path / 'sweep'}", *SMALL, "model.lr=interval(0.01,0.1)")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith("error: model.lr='interval(0.01,0.1)': a grid takes a,b,c, range() or glob()")
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "sweep" / "0").exists()
    assert proc.stdout == ""  # no `sweep: N jobs -> DIR` for a sweep that never starts


@pytest.fixture(scope="module")
def globbed_sweep(tmp_path_factory) -> Path:
    """4 jobs, each with its own interpolation, glob and dir named by its overrides: composed by the cache."""
    sweep = tmp_path_factory.mktemp("grid") / "sweep"
    proc = run_cli("--multirun", f"hydra.sweep.dir={sweep}", *SMALL, "~logger", "model=glob(*)", "seed=10,20",
                   "data.batch_size=${seed}", "hydra.sweep.subdir=${hydra.job.override_dirname}")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    return sweep


def test_each_job_resolves_its_own_interpolations_globs_and_dir(globbed_sweep):
    runs = {p.parent.name: json.loads(p.read_text()) for p in globbed_sweep.glob("*/metrics.json")}
    assert sorted((r["model"], r["seed"], r["batch_size"]) for r in runs.values()) == [
        ("linear", 10, 10), ("linear", 20, 20), ("manual", 10, 10), ("manual", 20, 20)
    ]  # fmt: skip
    assert all(f"model={r['model']},seed={r['seed']}," in name for name, r in runs.items())  # override_dirname


class HeardCallbacks:
    """Stands in for Hydra's callbacks: records what `on_job_end` saw of the job's return."""

    def __init__(self) -> None:
        self.heard: list[tuple[bool, bool]] = []
        self.started = 0

    def on_job_start(self, **kwargs) -> None:
        self.started += 1

    def on_job_end(self, config, job_return, **kwargs) -> None:
        self.heard.append((job_return.cfg is not None, job_return.hydra_cfg is not None))


def test_a_return_lets_go_of_its_configs_after_the_callbacks_heard_them():
    # joblib and submitit pickle them; Hydra's plugin scan may have imported the module anew since this one's import.
    light = importlib.import_module("hydra_plugins.linreg_sweeper.grid_sweeper").LightReturns
    callbacks = pickle.loads(pickle.dumps(light(HeardCallbacks())))
    ret = JobReturn(overrides=["a=1"], cfg=OmegaConf.create({"a": 1}), hydra_cfg=OmegaConf.create({"hydra": {}}))
    ret.status, ret.return_value = JobStatus.COMPLETED, 0.5
    callbacks.on_job_start(config=None, task_function=None)
    callbacks.on_job_end(config=None, job_return=ret)
    assert callbacks.inner.heard == [(True, True)] and callbacks.inner.started == 1
    assert ret.cfg is None and ret.hydra_cfg is None and ret.return_value == 0.5


def test_the_sweepers_use_no_hydra_internals():
    sources = sorted((REPO / "src" / "hydra_plugins").glob("linreg_*sweeper/*.py"))
    assert len(sources) >= 4 and not [p.name for p in sources if "hydra._internal" in p.read_text()]
