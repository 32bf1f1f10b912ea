"""The Optuna sweeper's work: a study in a database, asked and told in batches run by Hydra's launcher."""

import datetime
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import optuna
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from hydra.utils import get_method, instantiate
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler
from optuna.study import Study, StudyDirection
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError, OperationalError

from linreg.config import ConfigError
from linreg.record import write_atomic

from ._space import SeedPerTrial, search_space, trial_overrides

log = logging.getLogger(__name__)

DEFAULT_STUDY = "linreg"
DB_FILE = "optuna.db"  # the default storage, in the sweep dir
SWEEP_DIR_ATTR = "sweep_dir"  # user attr: which sweep dir a trial runs in (a resume re-runs its own only)
NOT_RUN_ATTR = "not_run"  # user attr: why a trial asked in a race between sweeps was failed unrun
RESULTS_FILE = "optimization_results.yaml"
STORAGE_ATTEMPTS = 5
# A live sweep names its new trial (SWEEP_DIR_ATTR) moments after asking; one still unnamed this long after it
# was made was left by a killed sweep (with margin for clocks of machines sharing a study).
ORPHAN_GRACE_S = 30.0
Job = tuple[int, list[str]]  # trial number (= job number) and the job's overrides


def positive_int(key: str, value: Any) -> int:
    """A positive int (not a bool), or a ConfigError naming the key."""
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(key, value, "must be a positive integer")
    return value


def check_direction(direction: Any) -> str:
    """`minimize` or `maximize` (a list of one, as hydra-optuna-sweeper also took)."""
    value = list(direction) if isinstance(direction, Sequence) and not isinstance(direction, str) else direction
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if not isinstance(value, str) or value.lower() not in ("minimize", "maximize"):
        raise ConfigError("hydra.sweeper.direction", value, "must be minimize or maximize (a job returns one number)")
    return value.lower()


def check_rate(value: Any) -> float:
    """A failure rate in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ConfigError("hydra.sweeper.max_failure_rate", value, "must be a number from 0 to 1")
    return float(value)


def plain(value: Any) -> Any:
    """A config node as plain Python data (resolved); anything else as it is."""
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def shown_url(url: str) -> str:
    """A storage URL without its password, for logs and files."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy can parse: it is refused when opened
        return url


def engine_kwargs(url: str) -> dict[str, Any]:
    """SQLAlchemy engine options for a storage URL; a SQLite file's folder is made first."""
    if not url.startswith("sqlite:"):
        return {}
    path = make_url(url).database
    if path and path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    # Sweeps sharing one SQLite file wait for each other's writes instead of failing after SQLite's 5 s.
    return {"connect_args": {"timeout": 120}}


def job_error(ret: JobReturn) -> str:
    """One line on why a job has no result."""
    try:
        value = ret.return_value  # raises the job's own exception when it failed
    except Exception as err:
        return " ".join(f"{type(err).__name__}: {err}".split())
    return f"returned {value!r}, not a number"


def job_value(ret: JobReturn, direction: str) -> float | None:
    """What to tell Optuna for a finished job: its number, the worst one if not finite; None if it has none."""
    if ret.status != JobStatus.COMPLETED:
        return None
    try:
        value = float(ret.return_value)
    except (TypeError, ValueError):
        return None
    if math.isfinite(value):
        return value
    # linreg's jobs return inf for a diverged or failed run: a bad score for these params, whichever the direction.
    return math.inf if direction == "minimize" else -math.inf


def unnamed(trial: FrozenTrial) -> bool:
    """A running trial without a sweep dir: being asked by a live sweep, or left so by a killed one."""
    return trial.state == TrialState.RUNNING and SWEEP_DIR_ATTR not in trial.user_attrs


def never_ran(trial: FrozenTrial) -> bool:
    """A failed trial that was never launched (no sweep dir): it does not count toward n_trials."""
    return trial.state == TrialState.FAIL and SWEEP_DIR_ATTR not in trial.user_attrs


def counted(trials: Iterable[FrozenTrial]) -> int:
    """Trials toward n_trials: finished, running or waiting ones, less those that never ran."""
    return sum(1 for t in trials if not never_ran(t))


def age_s(trial: FrozenTrial) -> float:
    """Seconds since the trial was made (Optuna stamps it with this machine's local time)."""
    start = trial.datetime_start or datetime.datetime.now()
    return (datetime.datetime.now() - start).total_seconds()


def consecutive_runs(jobs: Sequence[Job]) -> list[list[Job]]:
    """Jobs split into runs of consecutive trial numbers: one launch each keeps job number = trial number."""
    runs: list[list[Job]] = []
    for job in jobs:
        if runs and runs[-1][-1][0] + 1 == job[0]:
            runs[-1].append(job)
        else:
            runs.append([job])
    return runs


class OptunaSweeperImpl:
    """Asks Optuna for `n_jobs` trials at a time, runs them as Hydra jobs, tells Optuna their values."""

    def __init__(
        self,
        sampler: Any = None,
        direction: Any = "minimize",
        storage: Any = None,
        study_name: Any = None,
        n_trials: Any = 20,
        n_jobs: Any = 1,
        max_failure_rate: Any = 0.0,
        params: Any = None,
        custom_search_space: Any = None,
        search_space: Any = None,
    ) -> None:
        if search_space is not None:
            raise ConfigError("hydra.sweeper.search_space", "...", "was replaced by hydra.sweeper.params in Hydra 1.2")
        self.sampler_config = plain(sampler) or {"_target_": "optuna.samplers.TPESampler"}
        if not isinstance(self.sampler_config, dict):
            raise ConfigError("hydra.sweeper.sampler", self.sampler_config, "must be a mapping with a _target_")
        self.direction = check_direction(plain(direction))
        if storage is not None and not isinstance(storage, str):
            raise ConfigError("hydra.sweeper.storage", storage, "must be a SQLAlchemy URL or null")
        self.storage_url: str | None = storage
        if study_name is not None and (not isinstance(study_name, str) or not study_name):
            raise ConfigError("hydra.sweeper.study_name", study_name, "must be a non-empty string or null")
        self.study_name = study_name or DEFAULT_STUDY
        self.n_trials = positive_int("hydra.sweeper.n_trials", n_trials)
        self.n_jobs = positive_int("hydra.sweeper.n_jobs", n_jobs)
        self.max_failure_rate = check_rate(max_failure_rate)
        self.params = {str(k): str(v) for k, v in (plain(params) or {}).items()}
        self.extend = self.search_space_extender(custom_search_space)
        self.config: DictConfig | None = None
        self.launcher: Launcher | None = None

    @staticmethod
    def search_space_extender(path: Any) -> Callable[[DictConfig, optuna.Trial], None] | None:
        """The `custom_search_space` function (called with the config and each new trial), if one is named."""
        if path is None:
            return None
        try:
            return get_method(str(path))
        except Exception:
            raise ConfigError("hydra.sweeper.custom_search_space", path, "must name a function, pkg.mod.fn") from None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        """Make the configured launcher (basic, joblib, submitit, ...) and keep the config."""
        launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )
        self.use(config, launcher)

    def use(self, config: DictConfig, launcher: Launcher) -> None:
        """Run trials with this launcher for this sweep config; Optuna and alembic log through Hydra's logging."""
        self.config, self.launcher = config, launcher
        self.sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
        self.storage_url = self.storage_url or f"sqlite:///{self.sweep_dir / DB_FILE}"
        self.resume = OmegaConf.select(config, "resume", default=False) is True
        # One console format: Optuna's own handler would print its lines apart from Hydra's (and its log file).
        optuna.logging.disable_default_handler()
        optuna.logging.enable_propagation()
        # alembic >= 1.18 announces each of its autogenerate plugins at INFO when alembic.command is imported.
        logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)

    # ------------------------------------------------------------ the study

    def make_sampler(self) -> BaseSampler:
        """The configured sampler; a seeded one is seeded per trial (see SeedPerTrial)."""
        config = dict(self.sampler_config)
        seed = config.pop("seed", None)

        def make(trial_seed: int | None) -> BaseSampler:
            try:
                sampler = instantiate(config) if trial_seed is None else instantiate(config, seed=trial_seed)
            except Exception as err:
                raise ConfigError("hydra.sweeper.sampler", config.get("_target_"), f"cannot be made: {err}") from None
            if not isinstance(sampler, BaseSampler):
                raise ConfigError("hydra.sweeper.sampler", config.get("_target_"), "must be an optuna.samplers class")
            return sampler

        return make(None) if seed is None else SeedPerTrial(make, seed)

    def open_storage(self) -> optuna.storages.RDBStorage:
        """The study's database (created on first use); a bad URL or path is a ConfigError."""
        assert self.storage_url is not None
        url = self.storage_url
        for attempt in range(STORAGE_ATTEMPTS):
            try:
                return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs(url))
            except (IntegrityError, OperationalError) as err:
                # Sweeps started at once on a new database race to make its tables and schema version; the
                # loser finds them made when it tries again.
                error = err
                time.sleep(0.2 * (attempt + 1))
            except Exception as err:
                error = err
                break
        text = str(error).strip()
        first_line = text.splitlines()[0] if text else type(error).__name__
        raise ConfigError("hydra.sweeper.storage", shown_url(url), f"cannot be opened: {first_line}")

    def open_study(self) -> Study:
        """The study `study_name` in the storage, made if new; one that optimises the other way is refused."""
        study = optuna.create_study(
            storage=self.open_storage(),
            study_name=self.study_name,
            sampler=self.make_sampler(),
            direction=self.direction,
            load_if_exists=True,
        )
        if study.direction != StudyDirection[self.direction.upper()]:
            where = f"study {self.study_name!r} in {shown_url(str(self.storage_url))}"
            raise ConfigError("hydra.sweeper.direction", self.direction, f"{where} was made to {study.direction.name}")
        return study

    def interrupted(self, study: Study) -> list[FrozenTrial]:
        """Trials of this sweep dir still marked running: a killed sweep left them (one sweep per dir)."""
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        return [t for t in running if t.user_attrs.get(SWEEP_DIR_ATTR) == str(self.sweep_dir)]

    def settled_trials(self, study: Study) -> list[FrozenTrial]:
        """The study's trials, once those a killed sweep left unnamed (never launched) are marked failed."""
        trials = study.get_trials(deepcopy=False)
        dead = [t for t in trials if unnamed(t) and age_s(t) >= ORPHAN_GRACE_S]
        for t in dead:
            log.warning(f"trial {t.number} was left unlaunched by a killed sweep: marked failed, not counted")
            study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
        return study.get_trials(deepcopy=False) if dead else trials

    # ------------------------------------------------------------ the sweep

    def sweep(self, arguments: list[str]) -> None:
        """Resume this dir's interrupted trials, then ask, run and tell until the study has `n_trials` trials."""
        assert self.config is not None
        space, fixed = search_space(self.params, arguments)
        study = self.open_study()
        log.info(
            f"Optuna study {self.study_name!r} in {shown_url(str(self.storage_url))}: "
            f"{counted(self.settled_trials(study))} of {self.n_trials} trials there"
        )
        stale = self.interrupted(study)
        if stale and not self.resume:
            numbers = ", ".join(str(t.number) for t in stale)
            left = f"trials {numbers} of {self.sweep_dir} were left running by a killed sweep"
            raise ConfigError("resume", False, f"{left}: add resume=true to run them again and go on")
        self.rerun(study, stale, fixed)
        while jobs := self.ask(study, space, fixed):
            self.run_batch(study, jobs)
        self.write_results(study)

    def rerun(self, study: Study, stale: list[FrozenTrial], fixed: list[str]) -> None:
        """Run a killed sweep's unfinished trials again, under their own numbers (their dirs, their checkpoints)."""
        if stale:
            log.info(f"resume: running trials {', '.join(str(t.number) for t in stale)} again (left by a kill)")
        jobs = [(t.number, trial_overrides(t.params, fixed)) for t in stale]
        for start in range(0, len(jobs), self.n_jobs):
            self.run_batch(study, jobs[start : start + self.n_jobs])

    def ask(self, study: Study, space: dict[str, BaseDistribution], fixed: list[str]) -> list[Job]:
        """Up to `n_jobs` new trials, as many as the study still lacks (other sweeps may share it)."""
        jobs: list[Job] = []
        while len(jobs) < self.n_jobs:
            trials = self.settled_trials(study)  # again before each ask: a sweep sharing the study may have asked
            if counted(trials) >= self.n_trials:
                young = [age_s(t) for t in trials if unnamed(t)]
                if jobs or not young:
                    break
                # An unnamed trial holds the last places: another sweep names it within moments, or it is dead.
                time.sleep(ORPHAN_GRACE_S - max(young) + 0.1)
                continue
            trial = study.ask(space)
            if counted(t for t in study.get_trials(deepcopy=False) if t.number < trial.number) >= self.n_trials:
                log.info(f"trial {trial.number}: the study already has {self.n_trials} trials; not run")
                trial.set_user_attr(NOT_RUN_ATTR, f"another sweep filled the study to n_trials={self.n_trials} first")
                study.tell(trial, state=TrialState.FAIL)
                break
            if self.extend is not None:
                self.extend(self.config, trial)
            # Named last: a trial with a sweep dir has all its params, and only a named trial is ever launched.
            trial.set_user_attr(SWEEP_DIR_ATTR, str(self.sweep_dir))
            jobs.append((trial.number, trial_overrides(trial.params, fixed)))
        return jobs

    def launch(self, jobs: list[Job]) -> list[JobReturn]:
        """Run the jobs through the configured launcher, each in the job dir of its trial number."""
        assert self.launcher is not None
        returns: list[JobReturn] = []
        for run in consecutive_runs(jobs):
            returns += self.launcher.launch([overrides for _, overrides in run], initial_job_idx=run[0][0])
        return returns

    def run_batch(self, study: Study, jobs: list[Job]) -> None:
        """Launch a batch and tell Optuna each result; too many failed jobs end the sweep."""
        failures: list[JobReturn] = []
        for (number, _), ret in zip(jobs, self.launch(jobs)):
            value = job_value(ret, self.direction)
            if value is None:
                # No result at all (the job raised past train.main, or returned no number): Optuna's own record
                # of that is a failed trial, which the sampler does not learn from; it counts toward n_trials.
                log.warning(f"trial {number} failed: {job_error(ret)}")
                study.tell(number, state=TrialState.FAIL, skip_if_finished=True)
                failures.append(ret)
            else:
                study.tell(number, value, skip_if_finished=True)
        if failures and len(failures) / len(jobs) > self.max_failure_rate:
            log.error(f"{len(failures)} of {len(jobs)} jobs failed, max_failure_rate={self.max_failure_rate}")
            _ = failures[0].return_value  # raises the job's own error, as Hydra's sweepers do
            raise RuntimeError(f"trial job failed: {job_error(failures[0])}")

    def write_results(self, study: Study) -> None:
        """`optimization_results.yaml` in the sweep dir: the best trial's params and value, and where the study is."""
        trials = study.get_trials(deepcopy=False)
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        best = study.best_trial if complete else None
        results = {
            "name": "optuna",
            "study_name": self.study_name,
            "storage": shown_url(str(self.storage_url)),
            "n_trials": counted(trials),
            "n_complete": len(complete),
            "best_trial": best.number if best else None,
            "best_params": best.params if best else {},
            "best_value": best.value if best else None,
        }
        if best:
            log.info(f"Best trial {best.number}: value {best.value} with {best.params}")
        else:
            log.warning("no trial completed: no best params")
        write_atomic(self.sweep_dir / RESULTS_FILE, OmegaConf.to_yaml(OmegaConf.create(results)).encode())
