"""hydra/sweeper=optuna: the study in SQLite, resume after a kill, shared studies, failed jobs, the dashboard."""

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.launcher import Launcher
from omegaconf import OmegaConf
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from hydra_plugins.linreg_optuna_sweeper._impl import OptunaSweeperImpl
from hydra_plugins.linreg_optuna_sweeper._space import as_override_value, search_space
from tests.conftest import REPO, run_cli
from tests.test_sweep import SMALL, check_rows_match_metrics, read_csv

optuna.logging.set_verbosity(optuna.logging.WARNING)
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
        "seed": "7",
    }
    space, fixed = search_space(params, ["model=manual,linear", "data.batch_size=10"])
    assert space == {
        "model.lr": FloatDistribution(0.001, 0.3, log=True),
        "trainer.max_epochs": IntDistribution(1, 5),  # as hydra-optuna-sweeper: range's stop is Optuna's high
        "data.delta": FloatDistribution(0.5, 2.0, step=0.5),
        "data.deg": IntDistribution(1, 3),
        "model.log_every_sgd_steps": IntDistribution(1, 64, log=True),
        "data.num_examples": CategoricalDistribution([100, 200]),  # a shuffled range is Hydra's list of values
        "model": CategoricalDistribution(["manual", "linear"]),
    }
    assert fixed == ["seed=7", "data.batch_size=10"]  # the command line's value replaces the preset's sweep


@pytest.mark.parametrize("value", ["a b", "true", "10", "x,y", "it's", "manual", None, True, 0.1, 3, 1e-05])
def test_sampled_values_are_read_back_by_hydra_as_the_same_value(value):
    (override,) = OverridesParser.create().parse_overrides([f"k={as_override_value(value)}"])
    assert override.value() == value and type(override.value()) is type(value)


# ---------------------------------------------------------------- the CLI


def test_optuna_preset_keeps_its_study_in_sqlite(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli(*optuna_sweep(sweep, "hydra.sweeper.n_trials=3", *SMALL, "data.deg=2"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "setup plugin" not in proc.stdout + proc.stderr  # alembic's start-up lines are gone
    rows = check_rows_match_metrics(sweep, 3)
    assert all(r["deg"] == "2" for r in rows) and len({r["lr"] for r in rows}) == 3
    trials = trials_of(db_url(sweep))  # study 'linreg' in <sweep dir>/optuna.db
    assert [t.number for t in complete(trials)] == [0, 1, 2]
    check_trials_are_job_dirs(sweep, trials)
    best = OmegaConf.load(sweep / "optimization_results.yaml")
    assert best.best_value == min(float(r["train_mse"]) for r in rows)
    assert best.best_params["model.lr"] == float(rows[best.best_trial]["lr"])
    assert best.study_name == "linreg" and best.storage == db_url(sweep)


def test_a_template_hparams_search_config_carries_over(tmp_path):
    """A lightning-hydra-template `hparams_search` file (less its `_target_` line) runs unchanged as a preset."""
    (tmp_path / "conf" / "sweep").mkdir(parents=True)
    (tmp_path / "conf" / "sweep" / "lht.yaml").write_text(
        "# @package _global_\n"
        "defaults:\n  - override /hydra/sweeper: optuna\n"
        "hydra:\n  mode: MULTIRUN\n  sweeper:\n"
        "    storage: null\n    study_name: null\n    n_jobs: 1\n    direction: minimize\n    n_trials: 3\n"
        "    sampler:\n      _target_: optuna.samplers.TPESampler\n      seed: 1234\n      n_startup_trials: 2\n"
        "    params:\n      model.lr: interval(0.01, 0.1)\n      data.batch_size: choice(32, 64, 128, 256)\n"
    )
    sweep = tmp_path / "sweep"
    searchpath = f"hydra.searchpath=[file://{tmp_path / 'conf'}]"
    proc = run_cli(searchpath, "sweep=lht", f"hydra.sweep.dir={sweep}", *SMALL)  # no -m: the file says MULTIRUN
    assert proc.returncode == 0, proc.stderr[-2000:]
    trials = complete(trials_of(db_url(sweep)))
    assert len(trials) == 3 and all(0.01 <= t.params["model.lr"] <= 0.1 for t in trials)
    assert {t.params["data.batch_size"] for t in trials} <= {32, 64, 128, 256}
    check_trials_are_job_dirs(sweep, trials)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("hydra.sweeper.n_trials=0", "error: hydra.sweeper.n_trials=0: must be a positive integer"),
        ("hydra.sweeper.direction=up", "error: hydra.sweeper.direction='up': must be minimize or maximize"),
        ("hydra.sweeper.max_failure_rate=2", "error: hydra.sweeper.max_failure_rate=2: must be a number from 0 to 1"),
        ("hydra.sweeper.storage=nope", "error: hydra.sweeper.storage='nope': cannot be opened"),
        ("model.lr=interval(1,0)", "error: model.lr='interval(1,0)': "),
        ("+hydra.sweeper.params.lr='interval('", "error: hydra.sweeper.params.lr='interval(': not a Hydra override"),
        ("hydra.sweeper.sampler._target_=optuna.Nope", "error: hydra.sweeper.sampler='optuna.Nope': cannot be made"),
    ],
)
def test_bad_sweeper_values_fail_in_one_line(tmp_path, override, message):
    proc = run_cli(*optuna_sweep(tmp_path / "sweep", override, *SMALL))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith(message) and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "sweep" / "0").exists()  # no trial ran


# ---------------------------------------------------------------- resume after a kill


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


@pytest.mark.slow
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
    killed = trials_of(url)
    assert len(complete(killed)) < 6 and any(t.state == TrialState.RUNNING for t in killed)

    refused = run_cli(*args)  # the same command without resume=true will not touch them
    assert refused.returncode == 2 and "add resume=true" in refused.stderr, refused.stderr[-2000:]

    proc2 = run_cli(*args, "resume=true")
    assert proc2.returncode == 0, proc2.stderr[-2000:]
    trials = trials_of(url)
    assert [(t.number, t.state) for t in trials] == [(i, TrialState.COMPLETE) for i in range(6)]
    check_trials_are_job_dirs(sweep, trials)
    assert len({t.params["model.lr"] for t in trials}) == 6  # the resumed sampler does not repeat earlier points
    after = finished_jobs(sweep)
    assert sorted(after, key=int) == [str(i) for i in range(6)]
    assert {job: after[job] for job in before} == before  # finished jobs were neither re-run nor overwritten
    check_rows_match_metrics(sweep, 6)  # the table covers every trial

    table = (sweep / "results.csv").read_text()
    again = run_cli(*args, "resume=true")  # a finished study returns at once, with its table
    assert again.returncode == 0, again.stderr[-2000:]
    assert "Launching" not in again.stdout + again.stderr
    assert len(trials_of(url)) == 6 and (sweep / "results.csv").read_text() == table


# ---------------------------------------------------------------- a shared study


@pytest.mark.slow
def test_two_sweeps_on_one_storage_fill_one_study(tmp_path):
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
        )
        for s in sweeps
    ]
    errors = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for e in errors]
    trials = trials_of(url, "shared")
    done = complete(trials)
    assert len(done) == 6
    extra = [
        t for t in trials if t.state != TrialState.COMPLETE
    ]  # a race between the sweeps' asks: told failed, never run
    assert len(extra) <= len(sweeps) and all(t.state == TrialState.FAIL and "not_run" in t.user_attrs for t in extra)
    assert len({t.params["model.lr"] for t in done}) == 6  # the two sweeps draw different points
    for s in sweeps:
        mine = [t for t in done if t.user_attrs["sweep_dir"] == str(s.resolve())]
        assert mine, f"{s} ran no trial"
        assert sorted(p.parent.name for p in s.glob("*/metrics.json")) == sorted(str(t.number) for t in mine)
        check_trials_are_job_dirs(s, mine)
        assert [int(r["job"]) for r in read_csv(s)] == sorted(t.number for t in mine)


# ---------------------------------------------------------------- launchers and failed jobs


@pytest.mark.slow
def test_joblib_launcher_runs_the_trials_of_a_batch_in_parallel(tmp_path):
    sweep = tmp_path / "sweep"
    launcher = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]
    proc = run_cli(*optuna_sweep(sweep, *launcher, "hydra.sweeper.n_trials=4", "hydra.sweeper.n_jobs=2", *SMALL))
    assert proc.returncode == 0, proc.stderr[-2000:]
    trials = trials_of(db_url(sweep))
    assert [(t.number, t.state) for t in trials] == [(i, TrialState.COMPLETE) for i in range(4)]
    check_trials_are_job_dirs(sweep, trials)
    check_rows_match_metrics(sweep, 4)


def test_diverged_jobs_score_inf_and_the_study_goes_on(tmp_path):
    sweep = tmp_path / "sweep"
    # The command line's values replace the preset's params: lr=100 diverges; seed 420's 6 trials draw both lrs.
    lrs = ["model.lr=choice(100, 0.03)", "data.batch_size=10"]
    proc = run_cli(*optuna_sweep(sweep, *lrs, "hydra.sweeper.n_trials=6", *SMALL))
    assert proc.returncode == 0, proc.stderr[-2000:]
    trials = trials_of(db_url(sweep))
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 6
    assert {t.params["model.lr"] for t in trials} == {100, 0.03}
    assert all((t.value == math.inf) == (t.params["model.lr"] == 100) for t in trials)
    assert {r["status"] for r in read_csv(sweep)} == {"ok", "diverged"}
    assert OmegaConf.load(sweep / "optimization_results.yaml").best_params["model.lr"] == 0.03


class ScriptedLauncher(Launcher):
    """Returns a JobReturn per job from `outcome(lr)`: how a job of the real launchers can end."""

    def __init__(self, outcome) -> None:
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


def scripted_sweep(tmp_path: Path, outcome, max_failure_rate: float) -> tuple[OptunaSweeperImpl, ScriptedLauncher]:
    impl = OptunaSweeperImpl(
        n_trials=4, n_jobs=2, max_failure_rate=max_failure_rate, params={"model.lr": "choice(1, 2, 3, 4)"}
    )
    launcher = ScriptedLauncher(outcome)
    impl.use(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}, "resume": False}), launcher)
    return impl, launcher


def test_a_failed_job_return_is_a_failed_trial_and_the_study_goes_on(tmp_path):
    def outcome(lr):  # lr 2 raised past train.main (e.g. Hydra's job set-up), lr 3 returned no number
        return {2: (JobStatus.FAILED, RuntimeError("boom")), 3: (JobStatus.COMPLETED, None)}.get(
            lr, (JobStatus.COMPLETED, lr / 10)
        )

    impl, launcher = scripted_sweep(tmp_path, outcome, max_failure_rate=1.0)
    impl.sweep([])
    trials = trials_of(db_url(tmp_path))
    assert launcher.launched == [0, 1, 2, 3] and len(trials) == 4
    for t in trials:
        lr = t.params["model.lr"]
        assert t.state == (TrialState.FAIL if lr in (2, 3) else TrialState.COMPLETE)
        assert t.value == (None if lr in (2, 3) else lr / 10)


def test_failed_jobs_beyond_max_failure_rate_end_the_sweep_with_their_error(tmp_path):
    impl, launcher = scripted_sweep(tmp_path, lambda lr: (JobStatus.FAILED, RuntimeError(f"boom {lr}")), 0.0)
    with pytest.raises(RuntimeError, match="boom"):
        impl.sweep([])
    assert launcher.launched == [0, 1]  # the first batch, then no more
    assert [t.state for t in trials_of(db_url(tmp_path))] == [TrialState.FAIL, TrialState.FAIL]


def test_a_trial_a_kill_left_unlaunched_is_failed_and_asked_again(tmp_path, monkeypatch):
    import hydra_plugins.linreg_optuna_sweeper._impl as impl_module

    monkeypatch.setattr(impl_module, "ORPHAN_GRACE_S", 0.0)
    study = optuna.create_study(study_name="linreg", storage=db_url(tmp_path))
    study.ask()  # killed between Optuna's ask and naming the trial's sweep dir: it never ran
    impl, launcher = scripted_sweep(tmp_path, lambda lr: (JobStatus.COMPLETED, lr / 10), 0.0)
    impl.sweep([])
    trials = trials_of(db_url(tmp_path))
    assert trials[0].state == TrialState.FAIL  # not counted toward n_trials=4
    assert [t.number for t in complete(trials)] == launcher.launched == [1, 2, 3, 4]


# ---------------------------------------------------------------- optuna-dashboard


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


def test_make_optuna_dashboard_serves_the_sweeps_study(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli(*optuna_sweep(sweep, "hydra.sweeper.n_trials=2", *SMALL))
    assert proc.returncode == 0, proc.stderr[-2000:]
    port = free_port()
    # -o: use the .venv as it is (make would reinstall it when requirements.txt is newer than its stamp)
    cmd = ["make", "-s", "-o", ".venv/.installed", "optuna-dashboard", f"SWEEP={sweep}", f"PORT={port}"]
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
    trials = trials_of(db_url(sweep))
    assert [t["number"] for t in detail["trials"]] == [0, 1]
    assert [t["values"] for t in detail["trials"]] == [[t.value] for t in trials]
    assert {p["name"] for p in detail["trials"][0]["params"]} == {"model.lr", "data.batch_size"}


def test_make_optuna_dashboard_refuses_a_dir_without_a_study(tmp_path):
    cmd = ["make", "-s", "-o", ".venv/.installed", "optuna-dashboard", f"SWEEP={tmp_path}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and f"error: SWEEP='{tmp_path}': no optuna.db there" in proc.stderr
