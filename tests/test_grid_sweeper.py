"""`hydra/sweeper=grid`: Hydra's basic sweeper's jobs and numbers, its cached compose equals Hydra's own,
bad sweeps are refused before any job runs, resume launches only what is missing, returns keep no configs."""

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

from hydra_plugins.linreg_sweeper import compose_cache
from hydra_plugins.linreg_sweeper.compose_cache import CachedConfigLoader
from hydra_plugins.linreg_sweeper.grid_sweeper import GridSweeper, LightReturns, unfinished_runs
from linreg.record import job_config
from linreg.train import CONFIG_DIR
from tests.conftest import REPO, run_cli

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
    ["++resume=true", "data.bias=${data.delta}"],
]
GRIDS = {  # command lines of a multirun: the grid sweeper must plan exactly what Hydra's basic sweeper plans
    "tutorial": ["sweep=tutorial"],
    "tutorial, values replaced": ["sweep=tutorial", "model.lr=0.1", "data.deg=3,1"],
    "hand grid": ["model=manual,linear", "model.lr=0.01,0.03", "data.deg=1,2"],
    "range, sort, choice": ["seed=range(3)", "model.lr=sort(0.3,0.1,0.2)", "+extra=choice(a,b)"],
    "a key twice, a delete": ["data.deg=2", "model=linear,manual", "data.deg=1,3", "~resume"],
    "glob": ["sweep=smoke", "logger=glob(tensor*)"],
    "batches": ["sweep=tutorial", "hydra.sweeper.max_batch_size=7"],
}
SMALL = ["data.num_examples=100", "trainer.max_epochs=1"]


@pytest.fixture(scope="module")
def hydra_loader():
    """Hydra's own config loader, as the CLI makes it."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        yield GlobalHydra.instance().hydra.config_loader
    GlobalHydra.instance().clear()


@pytest.fixture(scope="module")
def loaders(hydra_loader):
    """Hydra's own config loader and the cached one over it, with the multirun's master config."""
    master = hydra_loader.load_configuration("train", ["hydra.sweep.dir=/tmp/x"], run_mode=RunMode.MULTIRUN)
    return hydra_loader, CachedConfigLoader(hydra_loader), master


class RecordingLauncher(Launcher):
    """Records each launch (first job number, the jobs' overrides) and returns a completed job for each."""

    def __init__(self) -> None:
        self.launches: list[tuple[int, list[list[str]]]] = []

    def setup(self, **kwargs) -> None:
        pass

    def launch(self, job_overrides, initial_job_idx):
        self.launches.append((initial_job_idx, [list(o) for o in job_overrides]))
        return [JobReturn(overrides=list(o), status=JobStatus.COMPLETED, _return_value=0.0) for o in job_overrides]


def planned_launches(hydra_loader, tmp_path: Path, sweeper: str, args: list[str]) -> list[tuple[int, list[list[str]]]]:
    """What a sweeper (instantiated as Hydra's multirun does) hands its launcher for this command line."""
    overrides = [f"hydra.sweep.dir={tmp_path / sweeper}", *args, f"hydra/sweeper={sweeper}"]
    master = hydra_loader.load_configuration("train", overrides, run_mode=RunMode.MULTIRUN)
    sweeper_obj = Plugins.instance().instantiate_sweeper(
        hydra_context=HydraContext(config_loader=hydra_loader, callbacks=None),
        task_function=lambda cfg: None,
        config=master,
    )
    assert type(sweeper_obj).__name__ == {"basic": "BasicSweeper", "grid": "GridSweeper"}[sweeper]
    sweeper_obj.launcher = recorder = RecordingLauncher()
    sweeper_obj.sweep(arguments=list(master.hydra.overrides.task))
    return recorder.launches


@pytest.mark.parametrize("args", list(GRIDS.values()), ids=list(GRIDS))
def test_jobs_order_and_numbers_equal_hydras_basic_sweeper(hydra_loader, tmp_path, args):
    expected = planned_launches(hydra_loader, tmp_path, "basic", args)
    got = planned_launches(hydra_loader, tmp_path, "grid", args)
    assert got == expected
    assert sum(len(jobs) for _, jobs in got) > 1


def test_tutorial_preset_is_48_jobs_in_hydras_order(hydra_loader, tmp_path):
    ((first, jobs),) = planned_launches(hydra_loader, tmp_path, "grid", ["sweep=tutorial"])
    assert first == 0 and jobs == [[*job, "sweep=tutorial"] for job in TUTORIAL_GRID]


def test_max_batch_size_must_be_positive(hydra_loader, tmp_path):
    with pytest.raises(Exception, match="max_batch_size=0"):
        planned_launches(hydra_loader, tmp_path, "grid", ["model=manual,linear", "hydra.sweeper.max_batch_size=0"])


def test_cache_must_be_a_bool():
    with pytest.raises(Exception, match="hydra.sweeper.cache='yes'"):
        GridSweeper(cache="yes")


def test_a_bad_job_in_a_later_batch_is_refused_before_the_first_batch_launches(hydra_loader, tmp_path):
    args = ["model=manual,nosuch", "hydra.sweeper.max_batch_size=1"]
    overrides = [f"hydra.sweep.dir={tmp_path}", *args]
    master = hydra_loader.load_configuration("train", overrides, run_mode=RunMode.MULTIRUN)
    sweeper = GridSweeper(max_batch_size=1)
    sweeper.setup(hydra_context=HydraContext(hydra_loader, None), task_function=lambda cfg: None, config=master)
    sweeper.launcher = recorder = RecordingLauncher()
    with pytest.raises(ConfigCompositionException, match="model/nosuch"):
        sweeper.sweep(arguments=list(master.hydra.overrides.task))
    assert recorder.launches == []


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


def test_only_plain_key_values_are_applied_to_a_copy(loaders):
    _, cached, master = loaders
    lines = ["model=linear", "model.lr=0.1", "~resume", "+extra=1", "++seed=3", "hydra.job.chdir=false", "data.w=[1,2]"]
    _, composed, values = cached.split(master, lines)
    assert composed == ("model=linear", "~resume", "+extra=1", "++seed=3", "hydra.job.chdir=false")
    assert [o.key_or_group for o in values] == ["model.lr", "data.w"]


def test_a_plain_value_hydra_refuses_gets_hydras_own_error(loaders):
    hydra_loader, cached, master = loaders
    with pytest.raises(ConfigCompositionException) as hydras:
        hydra_loader.load_sweep_config(master, ["data.nokey=1"])
    with pytest.raises(ConfigCompositionException) as ours:
        cached.load_sweep_config(master, ["data.nokey=1"])
    assert str(ours.value) == str(hydras.value)


def test_a_group_option_found_through_hydra_searchpath_composes_as_hydras(hydra_loader, tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "fancy.yaml").write_text("_target_: linreg.models.LinearRegression\nlr: 0.5\ninit: zeros\n")
    overrides = ["hydra.sweep.dir=/tmp/x", f"hydra.searchpath=[file://{tmp_path}]"]
    master = hydra_loader.load_configuration("train", overrides, run_mode=RunMode.MULTIRUN)
    cached = CachedConfigLoader(hydra_loader)
    for job in (["model=fancy", "model.lr=0.2"], ["model=fancy", "model.lr=0.3"], ["model.lr=0.1"]):
        expected = hydra_loader.load_sweep_config(master, job)
        assert OmegaConf.to_container(cached.load_sweep_config(master, job)) == OmegaConf.to_container(expected)
    assert sorted(cached.composed) == [(), ("model=fancy",)]


def test_cached_configs_are_independent_copies(loaders):
    _, cached, master = loaders
    first = cached.load_sweep_config(master, ["model.lr=0.1"])
    first.model.lr = 5.0
    assert cached.load_sweep_config(master, ["model.lr=0.2"]).model.lr == 0.2
    assert cached.load_sweep_config(master, []).model.lr == 0.03


def test_the_cache_keeps_a_bounded_number_of_compositions(loaders, monkeypatch):
    hydra_loader, _, master = loaders
    monkeypatch.setattr(compose_cache, "COMPOSED_KEPT", 2)
    cached = CachedConfigLoader(hydra_loader)
    for lines in (["model=manual"], ["model=linear"], ["logger=csv"], ["model=manual"]):
        got = cached.load_sweep_config(master, lines)
        assert OmegaConf.to_container(got) == OmegaConf.to_container(hydra_loader.load_sweep_config(master, lines))
    assert list(cached.composed) == [("logger=csv",), ("model=manual",)]


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
    callbacks = LightReturns(HeardCallbacks())
    ret = JobReturn(overrides=["a=1"], cfg=OmegaConf.create({"a": 1}), hydra_cfg=OmegaConf.create({"hydra": {}}))
    ret.status, ret.return_value = JobStatus.COMPLETED, 0.5
    callbacks.on_job_start(config=None, task_function=None)
    callbacks.on_job_end(config=None, job_return=ret)
    assert callbacks.callbacks.heard == [(True, True)] and callbacks.callbacks.started == 1
    assert ret.cfg is None and ret.hydra_cfg is None
    assert ret.overrides == ["a=1"] and ret.status == JobStatus.COMPLETED and ret.return_value == 0.5


def test_light_returns_travel_to_worker_processes():
    # Hydra's plugin scan may have imported the module anew: pickle needs the class now in sys.modules.
    light = importlib.import_module("hydra_plugins.linreg_sweeper.grid_sweeper").LightReturns
    copy = pickle.loads(pickle.dumps(light(HeardCallbacks())))  # joblib and submitit pickle the context
    copy.on_job_start()
    assert copy.callbacks.started == 1


@pytest.mark.parametrize(
    ("finished", "in_process", "runs"),
    [
        ([True, False, False, True, False], True, [(1, 3), (4, 5)]),
        ([True, False, False, True, False], False, [(1, 5)]),
        ([False, False], True, [(0, 2)]),
        ([True, True], False, []),
    ],
)
def test_what_is_launched_of_a_batch(finished, in_process, runs):
    assert unfinished_runs(finished, in_process) == runs


def test_the_sweeper_uses_no_hydra_internals():
    sources = sorted((REPO / "src" / "hydra_plugins" / "linreg_sweeper").rglob("*.py"))
    assert sources and not [p.name for p in sources if "hydra._internal" in p.read_text()]


@pytest.mark.parametrize(
    ("sweep", "message"),
    [
        ("model=manual,nosuch", "error: model='nosuch': one of linear, manual"),  # linreg.cli, before Hydra
        ("data.nokey=1,2", "error: data.nokey='1': unknown key"),  # the config check, before the sweep starts
        ("+data.w=[2,-1,1],3", "error: data.w='3': is in the config already"),  # a value of another kind
        ("~resume=false,true", "Could not delete from config"),  # a delete's value is checked per value
    ],
)
def test_a_bad_sweep_value_is_refused_before_any_job_runs(tmp_path, sweep, message):
    sweep_dir = tmp_path / "sweep"
    proc = run_cli("--multirun", f"hydra.sweep.dir={sweep_dir}", "data.num_examples=100", *sweep.split())
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith("error: ") and message in proc.stderr
    assert not sweep_dir.exists()  # nothing written: no plan, no progress log, no job dir


def test_each_job_resolves_its_own_interpolations_and_globs(tmp_path):
    sweep_dir = tmp_path / "sweep"
    small = ["data.num_examples=100", "trainer.max_epochs=1", "~logger"]
    proc = run_cli("--multirun", f"hydra.sweep.dir={sweep_dir}", *small, "model=glob(*)", "seed=10,20",
                   "data.batch_size=${seed}", "hydra.sweep.subdir=${hydra.job.override_dirname}")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = [json.loads(p.read_text()) for p in sorted(sweep_dir.glob("*/metrics.json"))]
    assert sorted((r["model"], r["seed"], r["batch_size"]) for r in runs) == [
        ("linear", 10, 10), ("linear", 20, 20), ("manual", 10, 10), ("manual", 20, 20)
    ]  # fmt: skip
    assert all("seed=" in p.parent.name for p in sweep_dir.glob("*/metrics.json"))  # the subdir as asked


def test_a_preset_may_make_a_run_a_sweep_without_m(tmp_path):
    sweep_dir = tmp_path / "sweep"
    proc = run_cli("hydra.mode=MULTIRUN", "seed=1,2", f"hydra.sweep.dir={sweep_dir}", "data.num_examples=100",
                   "trainer.max_epochs=1", "~logger")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(list(sweep_dir.glob("*/metrics.json"))) == 2


def snapshot(job_dir: Path) -> dict[str, tuple[int, bytes]]:
    """Every file of a job dir with its modification time and bytes."""
    return {
        str(p.relative_to(job_dir)): (p.stat().st_mtime_ns, p.read_bytes()) for p in job_dir.rglob("*") if p.is_file()
    }


def sweep_cli(sweep: Path, *extra: str):
    """The 4-job sweep of these tests: two models, two learning rates."""
    return run_cli("--multirun", f"hydra.sweep.dir={sweep}", *SMALL, "model=manual,linear", "model.lr=0.03,0.1", *extra)


@pytest.fixture
def finished_sweep(tmp_path) -> Path:
    sweep = tmp_path / "sweep"
    proc = sweep_cli(sweep)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return sweep


@pytest.mark.slow
def test_resume_of_a_finished_sweep_launches_nothing_and_touches_no_job_file(finished_sweep):
    before = {j: snapshot(finished_sweep / j) for j in "0123"}
    proc = sweep_cli(finished_sweep, "resume=true")
    assert proc.returncode == 0, proc.stderr[-2000:]
    output = proc.stdout + proc.stderr
    assert "resume: all 4 jobs already finished" in output
    assert "launching" not in output.lower()
    assert {j: snapshot(finished_sweep / j) for j in "0123"} == before
    assert (finished_sweep / "progress.log").read_text().count("(done before)") == 4


@pytest.mark.slow
def test_interrupted_sweep_runs_only_the_missing_job_under_its_number(finished_sweep):
    kept = {j: snapshot(finished_sweep / j) for j in "013"}
    lost = json.loads((finished_sweep / "2" / "metrics.json").read_text())
    for path in sorted((finished_sweep / "2").rglob("*"), reverse=True):  # as if killed before job 2 started
        path.rmdir() if path.is_dir() else path.unlink()
    proc = sweep_cli(finished_sweep, "resume=true")
    assert proc.returncode == 0, proc.stderr[-2000:]
    output = proc.stdout + proc.stderr
    assert "resume: 3 of 4 jobs already finished; launching 1" in output
    assert {j: snapshot(finished_sweep / j) for j in "013"} == kept
    redone = json.loads((finished_sweep / "2" / "metrics.json").read_text())
    assert (redone["model"], redone["lr"]) == ("linear", 0.03)
    assert redone["weights"] == lost["weights"]
    progress = (finished_sweep / "progress.log").read_text()
    assert progress.count("(done before)") == 3 and "model=linear model.lr=0.03: ok" in progress


@pytest.mark.slow
def test_a_parallel_launcher_gets_only_the_span_of_unfinished_jobs(finished_sweep):
    kept = {j: snapshot(finished_sweep / j) for j in "03"}
    for job in "12":
        (finished_sweep / job / "metrics.json").unlink()
    proc = sweep_cli(finished_sweep, "resume=true", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    output = proc.stdout + proc.stderr
    assert "resume: 2 of 4 jobs already finished; launching 2" in output
    assert {j: snapshot(finished_sweep / j) for j in "03"} == kept  # a launched job's .hydra/ would be rewritten
    launched = [j for j in "0123" if "resume" in (finished_sweep / j / ".hydra" / "overrides.yaml").read_text()]
    assert launched == ["1", "2"]
    assert all((finished_sweep / job / "metrics.json").exists() for job in "12")
    progress = (finished_sweep / "progress.log").read_text().splitlines()
    assert len(progress) == 4 and sorted(line.split("]")[0].split()[0] for line in progress) == [
        "[1/4",
        "[2/4",
        "[3/4",
        "[4/4",
    ]  # every job once


@pytest.mark.slow
def test_a_finished_job_inside_a_launched_span_is_heard_of_once(finished_sweep):
    for job in "02":
        (finished_sweep / job / "metrics.json").unlink()
    proc = sweep_cli(finished_sweep, "resume=true", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    progress = (finished_sweep / "progress.log").read_text().splitlines()
    assert len(progress) == 4, progress  # job 1 runs inside the span (and returns at once): one line, not two


def test_a_preset_whose_params_interpolate_resumes_to_the_same_jobs(tmp_path):
    (tmp_path / "conf" / "sweep").mkdir(parents=True)
    (tmp_path / "conf" / "sweep" / "interp.yaml").write_text(
        "# @package _global_\nhydra:\n  sweeper:\n    params:\n      seed: 10,20\n      data.batch_size: ${seed}\n"
    )
    sweep_dir = tmp_path / "sweep"
    args = [f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "sweep=interp", f"hydra.sweep.dir={sweep_dir}",
            "data.num_examples=100", "trainer.max_epochs=1", "~logger"]  # fmt: skip
    proc = run_cli("--multirun", *args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    again = run_cli("--multirun", *args, "resume=true")  # the config check plans the jobs the sweeper ran
    assert again.returncode == 0, again.stderr[-2000:]
    assert (again.stdout + again.stderr).count("(done before)") == 2
