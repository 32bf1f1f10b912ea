"""hydra/sweeper=optuna: the search space, the study in SQLite, resume, shared studies, failed jobs, the dashboard."""

import datetime
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import warnings
from pathlib import Path

import optuna
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext
from omegaconf import OmegaConf
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from hydra_plugins.linreg_optuna_sweeper import _study
from hydra_plugins.linreg_optuna_sweeper._study import StudySweep, as_override_value, counted, search_space
from hydra_plugins.linreg_optuna_sweeper.optuna_sweeper import OptunaConfig
from linreg.config import ConfigError
from tests.conftest import REPO, run_cli
from tests.test_sweep import check_rows_match_metrics, read_csv

optuna.logging.set_verbosity(optuna.logging.WARNING)
SMALL = ["data.num_examples=100", "trainer.max_epochs=1"]
SLOWER = ["data.num_examples=2000", "trainer.max_epochs=5"]  # ~0.5 s a trial: time to kill a sweep mid-way


def db_url(sweep: Path) -> str:
    return f"sqlite:///{sweep / 'optuna.db'}"


def trials_of(url: str, study: str = "linreg") -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=study, storage=url).get_trials()


def complete(trials: list[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    return [t for t in trials if t.state == TrialState.COMPLETE]


def check_trials_are_job_dirs(sweep: Path, trials: list[optuna.trial.FrozenTrial]) -> None:
    """Each trial ran in the job dir of its number, with its params, and told the job's train_mse."""
    for t in trials:
        m = json.loads((sweep / str(t.number) / "metrics.json").read_text())
        assert (m["lr"], m["batch_size"]) == (t.params["model.lr"], t.params["data.batch_size"])
        assert t.value == (math.inf if m["train_mse"] is None else m["train_mse"])


def optuna_sweep(sweep: Path, *args: str) -> list[str]:
    """Command-line args of a `sweep=optuna` multirun into `sweep`."""
    return ["--multirun", "sweep=optuna", f"hydra.sweep.dir={sweep}", *args]


# ---------------------------------------------------------------- the search space


def test_params_grammar_becomes_optuna_distributions():
    params = {
        "model.lr": "tag(log, interval(0.001, 0.3))",
        "data.batch_size": "choice(10, 20, 50, 100)",
        "trainer.max_epochs": "range(1, 5)",
        "data.delta": "range(0.5, 2.0, 0.5)",
        "data.deg": "int(interval(1, 3))",
        "model.log_every_sgd_steps": "tag(log, int(interval(1, 64)))",
        "data.num_examples": "shuffle(range(100, 300, 100))",
        "data.w": "choice([1,2],[1,2,3])",
        "seed": "7",
    }
    space = search_space(params, ["model=manual,linear", "data.batch_size=10"])
    assert space.distributions == {
        "model.lr": FloatDistribution(0.001, 0.3, log=True),
        "trainer.max_epochs": IntDistribution(1, 5),  # as hydra-optuna-sweeper: range's stop is Optuna's high
        "data.delta": FloatDistribution(0.5, 2.0, step=0.5),
        "data.deg": IntDistribution(1, 3),
        "model.log_every_sgd_steps": IntDistribution(1, 64, log=True),
        "data.num_examples": CategoricalDistribution([100, 200]),  # a shuffled range is Hydra's list of values
        "data.w": CategoricalDistribution(["[1,2]", "[1,2,3]"]),  # Optuna holds scalars: Hydra's text of a list
        "model": CategoricalDistribution(["manual", "linear"]),
    }
    assert space.fixed == ["seed=7", "data.batch_size=10"]  # the command line's value replaces the preset's sweep
    # A list reaches the job as a list (issue 19), a string as a string.
    lines = space.overrides({"data.w": "[1,2]", "model": "manual"})
    assert [o.value() for o in OverridesParser.create().parse_overrides(lines)] == [[1, 2], "manual", 7, 10]


@pytest.mark.parametrize("value", ["a b", "true", "10", "x,y", "it's", "[1,2]", "manual", None, True, 0.1, 3, 1e-05])
def test_sampled_values_are_read_back_by_hydra_as_the_same_value(value):
    (override,) = OverridesParser.create().parse_overrides([f"k={as_override_value(value)}"])
    assert override.value() == value and type(override.value()) is type(value)


# ---------------------------------------------------------------- the sweep, in-process


class ScriptedLauncher(Launcher):
    """Returns a JobReturn per job from `outcome(lr)`: how a job of the real launchers can end."""

    def __init__(self, outcome=lambda lr: (JobStatus.COMPLETED, lr / 10)) -> None:
        self.outcome, self.launched = outcome, []

    def setup(self, **kwargs) -> None:
        pass

    def launch(self, job_overrides, initial_job_idx):
        returns = []
        for i, overrides in enumerate(job_overrides):
            self.launched.append(initial_job_idx + i)
            lr = float(dict(o.split("=", 1) for o in overrides)["model.lr"])
            ret = JobReturn(overrides=list(overrides))
            ret.status, ret.return_value = self.outcome(lr)
            returns.append(ret)
        return returns


def study_sweep(sweep: Path, launcher: Launcher, resume: bool = False, **keys) -> StudySweep:
    """The sweeper's work on a launcher of our own (4 trials of lr 1..4 by default, 2 at a time)."""
    seeded = {"_target_": "optuna.samplers.TPESampler", "seed": 3}  # draws lr 2, 3, 4, 1
    keys = {"n_trials": 4, "n_jobs": 2, "params": {"model.lr": "choice(1, 2, 3, 4)"}, "sampler": seeded, **keys}
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}, "resume": resume})
    return StudySweep(config, launcher, OptunaConfig(**keys))


@pytest.mark.parametrize(
    ("keys", "args", "message"),
    [
        ({"n_trials": 0}, [], "hydra.sweeper.n_trials=0: must be a positive integer"),
        ({"max_failure_rate": 2}, [], "hydra.sweeper.max_failure_rate=2: must be from 0 to 1"),
        ({"storage": "nope"}, [], "hydra.sweeper.storage='nope': cannot be opened"),
        ({}, ["model.lr=interval(1,0)"], "model.lr='interval(1,0)': "),
        ({}, ["model.lr=interval(nan,1)"], "model.lr='interval(nan,1)': its bounds and step must be finite"),
        ({}, ["model.lr=interval(-1e308,1e308)"], "model.lr='interval(-1e308,1e308)': its bounds and step must"),
        ({}, ["model.lr=range(0.001,0.3,1e-30)"], "model.lr='range(0.001,0.3,1e-30)': "),  # Optuna's decimal error
        ({"params": {"lr": "interval("}}, [], "hydra.sweeper.params.lr='interval(': not a Hydra override"),
        ({"sampler": {"_target_": "optuna.Nope"}}, [], "hydra.sweeper.sampler='optuna.Nope': cannot be made"),
        ({"pruner": {"_target_": "optuna.samplers.RandomSampler"}}, [], "hydra.sweeper.pruner='optuna.samplers"),
        ({"custom_search_space": "nope"}, [], "hydra.sweeper.custom_search_space='nope': must name a function"),
    ],
)
def test_bad_sweeper_values_are_config_errors_before_any_trial(tmp_path, keys, args, message):
    launcher = ScriptedLauncher()
    with pytest.raises(ConfigError) as err:
        study_sweep(tmp_path, launcher, **keys).sweep(args)
    assert str(err.value).startswith(message) and launcher.launched == []


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["hydra.sweeper.n_trials=0"], 2, "error: hydra.sweeper.n_trials=0: must be a positive integer\n"),
        (["hydra.sweeper.direction=up"], 1, "Invalid value 'up', expected one of [minimize, maximize]"),
        (["hydra/sweeper/pruner=median", "hydra.sweeper.pruner.warmup=2"], 1, "Key 'warmup' is not in struct"),
    ],
)
def test_a_bad_sweeper_value_on_the_command_line_is_refused_without_a_traceback(tmp_path, args, code, message):
    """Hydra refuses what the schema types (its message, exit 1); our checks the rest (one line, exit 2)."""
    proc = run_cli(*optuna_sweep(tmp_path / "sweep", *args, *SMALL))
    assert proc.returncode == code and message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not (tmp_path / "sweep").exists()
    assert proc.stdout == ""  # no `sweep: N jobs -> DIR` for a sweep that never starts
    if code == 2:
        assert proc.stderr.count("\n") == 1


def test_failed_and_diverged_jobs_are_trials_and_the_study_goes_on(tmp_path):
    def outcome(lr):  # lr 2 raised past train.main, lr 3 returned no number, lr 4 diverged (inf)
        return {2: (JobStatus.FAILED, ValueError("boom")), 3: (JobStatus.COMPLETED, None)}.get(
            lr, (JobStatus.COMPLETED, math.inf if lr == 4 else lr / 10)
        )

    launcher = ScriptedLauncher(outcome)
    study_sweep(tmp_path, launcher, max_failure_rate=1.0).sweep([])
    trials = trials_of(db_url(tmp_path))
    assert launcher.launched == [0, 1, 2, 3] and {t.params["model.lr"] for t in trials} == {1, 2, 3, 4}
    for t in trials:
        lr = t.params["model.lr"]
        assert t.state == (TrialState.FAIL if lr in (2, 3) else TrialState.COMPLETE)
        assert t.value == {1: 0.1, 4: math.inf}.get(lr)
    best = OmegaConf.load(tmp_path / "optimization_results.yaml")
    done = complete(trials)
    assert (best.n_trials, best.n_complete, best.best_value) == (4, len(done), min(t.value for t in done))


def test_failed_jobs_beyond_max_failure_rate_end_the_sweep_with_their_error(tmp_path):
    launcher = ScriptedLauncher(lambda lr: (JobStatus.FAILED, RuntimeError(f"boom {lr}")))
    with pytest.raises(RuntimeError, match="boom"):
        study_sweep(tmp_path, launcher, max_failure_rate=0.0).sweep([])
    assert launcher.launched == [0, 1]  # the first batch, then no more
    assert [t.state for t in trials_of(db_url(tmp_path))] == [TrialState.FAIL, TrialState.FAIL]


def test_a_killed_sweeps_trials_run_again_only_with_resume_and_the_study_goes_on(tmp_path):
    keys = {"params": {"model.lr": "interval(1, 4)"}, "sampler": {"_target_": "optuna.samplers.TPESampler", "seed": 1}}
    study_sweep(tmp_path, ScriptedLauncher(), n_trials=2, **keys).sweep([])
    study = optuna.load_study(study_name="linreg", storage=db_url(tmp_path))
    trial = study.ask({"model.lr": FloatDistribution(1, 4)})
    trial.set_user_attr("sweep_dir", str(tmp_path.resolve()))  # as a kill leaves trial 2: running
    with pytest.raises(ConfigError, match="trials 2 of .* were left running by a kill: add resume=true"):
        study_sweep(tmp_path, ScriptedLauncher(), n_trials=4, **keys).sweep([])
    launcher = ScriptedLauncher()
    study_sweep(tmp_path, launcher, resume=True, n_trials=4, **keys).sweep([])
    trials = trials_of(db_url(tmp_path))
    assert launcher.launched == [2, 3]  # trial 2 again in its own job dir, then one more to n_trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    assert len({t.params["model.lr"] for t in trials}) == 4  # the seeded sampler does not repeat its points


def test_sweeps_sharing_a_study_fill_it_to_n_trials_in_their_own_dirs(tmp_path):
    keys = {"storage": db_url(tmp_path), "study_name": "shared", "n_jobs": 1}
    keys["sampler"] = {"_target_": "optuna.samplers.RandomSampler", "seed": 0}
    first, second = ScriptedLauncher(), ScriptedLauncher()
    study_sweep(tmp_path / "a", first, n_trials=2, params={"model.lr": "interval(1, 4)"}, **keys).sweep([])
    study_sweep(tmp_path / "b", second, n_trials=3, params={"model.lr": "interval(1, 4)"}, **keys).sweep([])
    trials = trials_of(db_url(tmp_path), "shared")
    assert (first.launched, second.launched) == ([0, 1], [2])
    assert [t.user_attrs["sweep_dir"] for t in trials] == [str((tmp_path / d).resolve()) for d in "aab"]
    assert len({t.params["model.lr"] for t in trials}) == 3  # the same seed, yet no point repeated
    with pytest.raises(ConfigError, match="was made to MINIMIZE"):
        study_sweep(tmp_path / "c", ScriptedLauncher(), direction="maximize", **keys).sweep([])


def test_a_trial_a_kill_left_unlaunched_is_failed_and_asked_again(tmp_path, monkeypatch):
    monkeypatch.setattr(_study, "ORPHAN", datetime.timedelta(0))
    optuna.create_study(study_name="linreg", storage=db_url(tmp_path)).ask()  # killed before it was named
    launcher = ScriptedLauncher()
    study_sweep(tmp_path, launcher).sweep([])
    trials = trials_of(db_url(tmp_path))
    assert trials[0].state == TrialState.FAIL  # not counted toward n_trials=4
    assert [t.number for t in complete(trials)] == launcher.launched == [1, 2, 3, 4]


def test_a_template_hparams_search_config_carries_over(tmp_path):
    """A lightning-hydra-template `hparams_search` file (less its `_target_` line) configures the sweeper."""
    from linreg.train import CONFIG_DIR

    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "lht.yaml").write_text(
        "# @package _global_\n"
        "defaults:\n  - override /hydra/sweeper: optuna\n"
        "hydra:\n  mode: MULTIRUN\n  sweeper:\n"
        "    storage: null\n    study_name: null\n    n_jobs: 1\n    direction: minimize\n    n_trials: 3\n"
        "    sampler:\n      _target_: optuna.samplers.TPESampler\n      seed: 1234\n      n_startup_trials: 2\n"
        "    params:\n      model.lr: interval(0.01, 0.1)\n      data.batch_size: choice(32, 64, 128, 256)\n"
    )
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        overrides = [f"hydra.searchpath=[file://{tmp_path}]", "sweep=lht", f"hydra.sweep.dir={tmp_path / 'out'}"]
        config = compose("train", overrides=overrides, return_hydra_config=True)
        context = HydraContext(config_loader=GlobalHydra.instance().config_loader(), callbacks=None)
        sweeper = Plugins.instance().instantiate_sweeper(hydra_context=context, task_function=None, config=config)
    GlobalHydra.instance().clear()
    sweeper.study.launcher = launcher = ScriptedLauncher()
    sweeper.sweep([])
    trials = complete(trials_of(db_url(tmp_path / "out")))
    assert launcher.launched == [0, 1, 2] and len(trials) == 3
    assert all(
        0.01 <= t.params["model.lr"] <= 0.1 and t.params["data.batch_size"] in (32, 64, 128, 256) for t in trials
    )


# ---------------------------------------------------------------- through the CLI


@pytest.fixture(scope="module")
def cli_sweep(tmp_path_factory) -> Path:
    """`sweep=optuna`, 3 trials, with a choice of lists (issue 19)."""
    sweep = tmp_path_factory.mktemp("optuna") / "sweep"
    proc = run_cli(*optuna_sweep(sweep, "hydra.sweeper.n_trials=3", *SMALL, "data.w=choice([2,-1],[2,-1,1])"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "setup plugin" not in proc.stdout + proc.stderr  # alembic's start-up lines are gone
    return sweep


def test_the_study_is_in_the_sweep_dir_and_each_trial_is_its_job(cli_sweep):
    rows = check_rows_match_metrics(cli_sweep, 3)
    trials = trials_of(db_url(cli_sweep))  # study 'linreg' in <sweep dir>/optuna.db
    assert [t.number for t in complete(trials)] == [0, 1, 2]
    check_trials_are_job_dirs(cli_sweep, trials)
    best = OmegaConf.load(cli_sweep / "optimization_results.yaml")
    assert best.best_value == min(float(r["train_mse"]) for r in rows)
    assert best.best_params["model.lr"] == float(rows[best.best_trial]["lr"])
    assert best.study_name == "linreg" and best.storage == db_url(cli_sweep)


def test_a_choice_of_lists_reaches_each_job_as_a_list(cli_sweep):
    for t in trials_of(db_url(cli_sweep)):
        m = json.loads((cli_sweep / str(t.number) / "metrics.json").read_text())
        assert m["data"]["w"] == json.loads(t.params["data.w"]) and len(m["weights"]) == len(m["data"]["w"])


PRUNED_SWEEP = [  # lr 0.3, 0.0001, 0.3 (seeds 2, 3, 4): the slow one is worse than the median after epoch 1
    "hydra/sweeper/pruner=median",
    "hydra.sweeper.pruner.n_startup_trials=1",
    "hydra.sweeper.sampler._target_=optuna.samplers.RandomSampler",
    "hydra.sweeper.sampler.seed=2",
    "model.lr=choice(0.3,0.0001)",
    "data.batch_size=10",
    "data.num_examples=100",
    "trainer.max_epochs=3",
]


@pytest.fixture(scope="module")
def pruned_sweep(tmp_path_factory) -> tuple[Path, dict[str, tuple[str, int]]]:
    """3 trials with the median pruner; then a kill leaves trial 3 running, and a resume runs it to n_trials=4."""
    sweep = tmp_path_factory.mktemp("pruned") / "sweep"
    proc = run_cli(*optuna_sweep(sweep, "hydra.sweeper.n_trials=3", *PRUNED_SWEEP))
    assert proc.returncode == 0, proc.stderr[-2000:]
    before = finished_jobs(sweep)
    study = optuna.load_study(study_name="linreg", storage=db_url(sweep))
    study.enqueue_trial({"model.lr": 0.0001})
    study.ask({"model.lr": CategoricalDistribution([0.3, 0.0001])}).set_user_attr("sweep_dir", str(sweep.resolve()))
    proc = run_cli(*optuna_sweep(sweep, "hydra.sweeper.n_trials=4", "resume=true", *PRUNED_SWEEP))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return sweep, before


def test_a_pruned_trial_stops_at_its_epoch_is_a_row_and_counts(pruned_sweep):
    sweep, before = pruned_sweep
    trials = trials_of(db_url(sweep))
    assert [(t.params["model.lr"], t.state) for t in trials[:3]] == [
        (0.3, TrialState.COMPLETE),
        (0.0001, TrialState.PRUNED),
        (0.3, TrialState.COMPLETE),
    ]
    m = json.loads(before["1"][0])
    assert (m["status"], m["pruned_epoch"], len(m["epoch_mse"]), m["steps"]) == ("pruned", 1, 1, 10)  # 100 / 10
    assert trials[1].intermediate_values == {1: m["train_mse"]} and trials[1].value == m["train_mse"]
    assert trials[0].intermediate_values == dict(enumerate(json.loads(before["0"][0])["epoch_mse"], start=1))
    rows = check_rows_match_metrics(sweep, 4)
    assert [r["status"] for r in rows] == ["ok", "pruned", "ok", "pruned"]
    assert "| pruned at epoch 1 |" in (sweep / "results.md").read_text()


def test_a_resume_keeps_pruned_trials_and_prunes_the_one_it_reruns(pruned_sweep):
    sweep, before = pruned_sweep
    trials = trials_of(db_url(sweep))
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.PRUNED] * 2  # n_trials=4, pruned counted
    assert {job: finished_jobs(sweep)[job] for job in before} == before  # kept, not re-run
    assert json.loads((sweep / "3" / "metrics.json").read_text())["status"] == "pruned"
    assert OmegaConf.load(sweep / "optimization_results.yaml").n_trials == 4


def test_make_optuna_dashboard_refuses_a_dir_without_a_study(tmp_path):
    cmd = ["make", "-s", "-o", ".venv/.installed", "optuna-dashboard", f"SWEEP={tmp_path}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and f"error: SWEEP='{tmp_path}': no optuna.db there" in proc.stderr


# ---------------------------------------------------------------- system: kills, parallel sweeps, a server


def wait_until_mid_way(sweep: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    """Poll the study until 2 or more trials are complete and a running one's job has started."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the sweep ended before it could be killed"
        try:
            trials = trials_of(db_url(sweep))
        except Exception:  # no database or no study yet
            trials = []
        running = [t for t in trials if t.state == TrialState.RUNNING and (sweep / str(t.number)).is_dir()]
        if len(complete(trials)) >= 2 and running:
            return
        time.sleep(0.05)
    raise AssertionError(f"the sweep was not mid-way after {timeout} s")


def finished_jobs(sweep: Path) -> dict[str, tuple[str, int]]:
    """Job dir -> (metrics.json text, its mtime in ns) for every job that left a metrics.json."""
    return {p.parent.name: (p.read_text(), p.stat().st_mtime_ns) for p in sweep.glob("*/metrics.json")}


@pytest.mark.system
def test_killed_sweep_resumes_to_n_trials_in_their_own_job_dirs(tmp_path):
    sweep, url = tmp_path / "sweep", db_url(tmp_path / "sweep")
    args = optuna_sweep(sweep, "hydra.sweeper.n_trials=6", "hydra.sweeper.n_jobs=2", *SLOWER)
    cmd = [sys.executable, "-m", "linreg.train", *args]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        wait_until_mid_way(sweep, proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the sweep and any job process it started
        proc.wait()
    before = finished_jobs(sweep)
    refused = run_cli(*args)  # the same command without resume=true will not touch them
    assert refused.returncode == 2 and "resume=true" in refused.stderr, refused.stderr[-2000:]
    proc2 = run_cli(*args, "resume=true")
    assert proc2.returncode == 0, proc2.stderr[-2000:]
    ranks = [int(k) for k in re.findall(r"\[(\d+)/6 ", proc2.stdout)]  # the trials done before count on
    assert ranks == list(range(7 - len(ranks), 7)) and len(ranks) < 6, proc2.stdout
    trials = trials_of(url)
    assert [(t.number, t.state) for t in trials] == [(i, TrialState.COMPLETE) for i in range(6)]
    check_trials_are_job_dirs(sweep, trials)
    assert len({t.params["model.lr"] for t in trials}) == 6  # the resumed sampler does not repeat earlier points
    after = finished_jobs(sweep)
    assert {job: after[job] for job in before} == before  # finished jobs were neither re-run nor overwritten
    check_rows_match_metrics(sweep, 6)


@pytest.mark.system
def test_two_sweeps_at_once_on_one_storage_fill_one_study(tmp_path):
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    sweeps = [tmp_path / "a", tmp_path / "b"]
    shared = ["hydra.sweeper.n_trials=6", f"hydra.sweeper.storage={url}", "hydra.sweeper.study_name=shared", *SLOWER]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "linreg.train", *optuna_sweep(s, *shared)],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for s in sweeps
    ]
    errors = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for e in errors]
    trials = trials_of(url, "shared")
    done = complete(trials)
    assert len(done) == 6 and len({t.params["model.lr"] for t in done}) == 6
    extra = [t for t in trials if t.state != TrialState.COMPLETE]  # a race between asks: failed, never run
    assert len(extra) <= len(sweeps) and all(t.state == TrialState.FAIL and "not_run" in t.user_attrs for t in extra)
    for s in sweeps:
        mine = [t for t in done if t.user_attrs["sweep_dir"] == str(s.resolve())]
        assert mine, f"{s} ran no trial"
        check_trials_are_job_dirs(s, mine)
        assert [int(r["job"]) for r in read_csv(s)] == sorted(t.number for t in mine)


@pytest.mark.system
def test_joblib_launcher_runs_the_trials_of_a_batch_in_parallel(tmp_path):
    sweep = tmp_path / "sweep"
    launcher = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]
    proc = run_cli(*optuna_sweep(sweep, *launcher, "hydra.sweeper.n_trials=4", "hydra.sweeper.n_jobs=2", *SMALL))
    assert proc.returncode == 0, proc.stderr[-2000:]
    trials = trials_of(db_url(sweep))
    assert [(t.number, t.state) for t in trials] == [(i, TrialState.COMPLETE) for i in range(4)]
    check_trials_are_job_dirs(sweep, trials)
    assert all(t.intermediate_values == {1: t.value} for t in trials)  # each worker reported to the study itself


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, timeout: float = 60) -> dict:
    """GET a JSON document, retrying while the server starts."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                return json.loads(resp.read())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.mark.system
def test_make_optuna_dashboard_serves_the_sweeps_study(cli_sweep):
    port = free_port()
    # -o: use the .venv as it is (make would reinstall it when requirements.txt is newer than its stamp)
    cmd = ["make", "-s", "-o", ".venv/.installed", "optuna-dashboard", f"SWEEP={cli_sweep}", f"PORT={port}"]
    server = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        studies = get_json(f"http://127.0.0.1:{port}/api/studies")["study_summaries"]
        assert [(s["study_name"], s["directions"]) for s in studies] == [("linreg", ["minimize"])]
        detail = get_json(f"http://127.0.0.1:{port}/api/studies/{studies[0]['study_id']}")
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # make and the dashboard it runs, by the pid started here
        server.wait(timeout=30)
    assert [t["values"] for t in detail["trials"]] == [[t.value] for t in trials_of(db_url(cli_sweep))]
    assert {p["name"] for p in detail["trials"][0]["params"]} == {"model.lr", "data.batch_size", "data.w"}


def test_a_database_that_fails_mid_sweep_leaves_no_trial_running(tmp_path):
    calls = []

    def outcome(lr):  # the second batch's tell meets a database that no longer answers (a lock, a full disk)
        calls.append(lr)
        if len(calls) == 3:
            raise optuna.exceptions.StorageInternalError("database is locked")
        return JobStatus.COMPLETED, lr / 10

    sweep = study_sweep(tmp_path / "s", ScriptedLauncher(outcome))
    with pytest.raises(SystemExit, match="the study's database failed \\(database is locked\\); resume=true"):
        sweep.sweep([])
    states = [t.state.name for t in trials_of(f"sqlite:///{tmp_path / 's' / 'optuna.db'}", "linreg")]
    assert states.count("COMPLETE") == 2 and "RUNNING" not in states


# ---------------------------------------------------------------- edge cases users met


def test_a_launch_that_raises_is_one_line_and_leaves_no_trial_running(tmp_path):
    """A setting the launcher refuses (as a dead worker or a timeout, it raises in `launch`): refused, study settled."""
    url = db_url(tmp_path)  # outside the sweep dir, which the refusal removes
    args = ["hydra/launcher=joblib", "hydra.launcher.prefer=nope", f"hydra.sweeper.storage={url}", *SMALL]
    proc = run_cli(*optuna_sweep(tmp_path / "sweep", *args))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.splitlines()[-1].startswith("error: hydra.launcher: ValueError: ")
    assert not (tmp_path / "sweep").exists() and [t.state for t in trials_of(url)] == [TrialState.FAIL]
    assert counted(trials_of(url)) == 0  # its job never began: the study still lacks all its trials


@pytest.mark.parametrize("changed", ["choice(1, 2)", "interval(1, 4)"])
def test_a_shared_study_refuses_another_search_space_before_any_trial(tmp_path, changed):
    keys = {"storage": db_url(tmp_path), "n_trials": 2}
    study_sweep(tmp_path / "a", ScriptedLauncher(), **keys).sweep([])
    launcher = ScriptedLauncher()
    with pytest.raises(ConfigError, match=rf"^model.lr='{re.escape(changed)}': study 'linreg' in .* searched Categ"):
        study_sweep(tmp_path / "b", launcher, **keys).sweep([f"model.lr={changed}"])
    assert launcher.launched == [] and [t.state for t in trials_of(db_url(tmp_path))] == [TrialState.COMPLETE] * 2


def test_a_sampler_that_cannot_draw_the_space_is_refused_and_its_trial_failed(tmp_path):
    brute = {"_target_": "optuna.samplers.BruteForceSampler"}  # needs a step for a float interval
    launcher = ScriptedLauncher()
    with pytest.raises(ConfigError, match="^hydra.sweeper.sampler='optuna.samplers.BruteForceSampler': cannot draw"):
        study_sweep(tmp_path, launcher, sampler=brute).sweep(["model.lr=interval(1, 4)"])
    assert launcher.launched == [] and [t.state for t in trials_of(db_url(tmp_path))] == [TrialState.FAIL]


def test_a_sampler_whose_space_is_used_up_goes_on_to_n_trials(tmp_path):
    brute = {"_target_": "optuna.samplers.BruteForceSampler"}  # 4 points, 6 trials: it would stop the study
    study_sweep(tmp_path, ScriptedLauncher(), sampler=brute, n_trials=6).sweep([])
    assert [t.state for t in trials_of(db_url(tmp_path))] == [TrialState.COMPLETE] * 6


def test_params_given_whole_to_the_plain_sweeper_compose_or_get_hydras_hint():
    """`hydra/sweeper=optuna` (no preset) takes its search space as one dict override, added as Hydra adds keys."""
    from hydra.errors import ConfigCompositionException

    from linreg.train import CONFIG_DIR

    params = 'hydra.sweeper.params={model.lr:"tag(log, interval(0.01, 0.1))"}'
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        config = compose("train", overrides=["hydra/sweeper=optuna", f"+{params}"], return_hydra_config=True)
        with pytest.raises(ConfigCompositionException, match=re.escape(f"To append to your config use +{params}")):
            compose("train", overrides=["hydra/sweeper=optuna", params], return_hydra_config=True)
    GlobalHydra.instance().clear()
    assert config.hydra.sweeper.params == {"model.lr": "tag(log, interval(0.01, 0.1))"}


def test_an_epoch_reported_again_is_kept_as_first_reported_without_a_warning(tmp_path):
    """A resumed vectorized sweep retrains a member from its start: its trial already holds those epochs."""
    from linreg.callbacks import prune

    study = optuna.create_study(study_name="linreg", storage=db_url(tmp_path))
    number = study.ask().number
    prune(study, study._storage, number, 1, 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not prune(study, study._storage, number, 1, 0.7)
    assert study.trials[number].intermediate_values == {1: 0.5}


@pytest.mark.system
def test_a_dead_worker_keeps_the_finished_trials_and_resume_completes_the_study(tmp_path):
    sweep, env = tmp_path / "sweep", {**os.environ, "PYTHONPATH": str(REPO)}  # tests.user_classes for the workers
    logger = ["logger=csv", "logger.csv._target_=tests.user_classes.SigkillCSVLogger"]  # job 1's worker dies, once
    joblib = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "hydra.sweeper.n_jobs=2"]
    args = optuna_sweep(sweep, "hydra.sweeper.n_trials=2", *joblib, *logger, *SMALL)
    proc = run_cli(*args, env=env)
    assert proc.returncode == 1 and "stopped: its launcher failed: TerminatedWorkerError" in proc.stderr
    assert [t.state for t in trials_of(db_url(sweep))] == [TrialState.COMPLETE, TrialState.RUNNING]
    again = run_cli(*args, "resume=true", env=env)
    assert again.returncode == 0, again.stderr[-2000:]
    assert [t.state for t in trials_of(db_url(sweep))] == [TrialState.COMPLETE] * 2
