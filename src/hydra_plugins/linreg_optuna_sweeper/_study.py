"""The Optuna sweeper's work: the search space, a study in a database, trials asked, launched and told in batches."""

import contextlib
import datetime
import itertools
import logging
import math
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep, Transformer
from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.utils import get_method, instantiate
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.pruners import BasePruner
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError, OperationalError

from hydra_plugins.linreg_sweeper.grid_sweeper import Proxy
from linreg.config import ConfigError, first_line, is_number
from linreg.record import finished, write_atomic
from linreg.results import announce, launch_failed, stopped, summarize

log = logging.getLogger(__name__)
SWEEP_DIR = "sweep_dir"  # user attr: the sweep dir a trial runs in (a resume re-runs its own unfinished ones)
NOT_RUN = "not_run"  # user attr: why a trial asked in a race between sweeps sharing a study was failed unrun
ORPHAN = datetime.timedelta(seconds=30)  # a trial still unnamed this long after its ask was left by a killed sweep
PLAIN = re.compile(r"[A-Za-z_][\w.\-/]*")  # a string Hydra reads back, unquoted, as that same string
KEYWORDS = {"true", "false", "null", "nan", "inf"}  # unquoted, Hydra reads these as bool, null or float
Job = tuple[int, list[str]]  # trial number (= job number) and the job's overrides


def as_override_value(value: Any) -> str:
    """A sampled value written so that Hydra's parser reads back the same value and type."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str) and not (PLAIN.fullmatch(value) and value.lower() not in KEYWORDS):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return str(value)


@dataclass
class Space:
    """Optuna's distributions of the swept keys, the choices that stand for lists or dicts, the fixed overrides."""

    distributions: dict[str, BaseDistribution]
    texts: dict[str, set[str]]  # key -> Hydra's text of each list or dict choice (Optuna holds only scalars)
    fixed: list[str]
    given: dict[str, str]  # key -> its sweep as the user wrote it, for errors

    def overrides(self, params: dict[str, Any]) -> list[str]:
        """A trial's job overrides: its sampled params, then the fixed overrides."""
        texts = self.texts
        return [f"{k}={v if v in texts.get(k, ()) else as_override_value(v)}" for k, v in params.items()] + self.fixed


def distribution(o: Override) -> tuple[BaseDistribution, set[str]]:
    """A sweep's distribution (hydra-optuna-sweeper's: a range's stop is Optuna's high), and its list choices."""
    sweep = o.value()
    if isinstance(sweep, ChoiceSweep) or (isinstance(sweep, RangeSweep) and sweep.shuffle):
        values = [(x, Transformer.encode(x)) for x in o.sweep_iterator()]  # a list or dict as Hydra's text of it
        choices = [v for _, v in values]  # a shuffled range's in order: a study refuses another order later
        choices = choices if isinstance(sweep, ChoiceSweep) else sorted(choices)
        return CategoricalDistribution(choices), {v for x, v in values if isinstance(x, (list, dict))}
    if isinstance(sweep, RangeSweep):
        floats = any(isinstance(v, float) for v in (sweep.start, sweep.stop, sweep.step))
        kind = FloatDistribution if floats else IntDistribution
        made = kind(sweep.start, sweep.stop, step=sweep.step)
    elif isinstance(sweep, IntervalSweep):
        kind = IntDistribution if isinstance(sweep.start, int) and isinstance(sweep.end, int) else FloatDistribution
        made = kind(sweep.start, sweep.end, log="log" in sweep.tags)
    else:
        raise ValueError("a sweep must be choice, range or interval")
    if not all(is_number(v) for v in (made.low, made.high, made.step or 1, made.high - made.low)):  # else overflows
        raise ValueError("its bounds and step must be finite numbers")
    return made, set()


def parse(line: str, key: str, value: str) -> Override:
    """One override parsed by Hydra's parser; a syntax error names the key and value."""
    try:
        return OverridesParser.create().parse_overrides([line])[0]
    except Exception as err:  # Hydra's OverrideParseException, or an error building the sweep
        raise ConfigError(key, value, f"not a Hydra override: {err}") from None


def search_space(params: dict[str, str], arguments: Sequence[str]) -> Space:
    """The sweeper's `params`, then the command line's overrides (which win), as a Space."""
    parsed = [parse(f"{k}={v}", f"hydra.sweeper.params.{k}", v) for k, v in params.items()]
    parsed += [parse(line, line, line) for line in arguments]
    space = Space({}, {}, [], {})
    fixed: dict[str, str] = {}
    for o in parsed:
        key = o.get_key_element()
        space.distributions.pop(key, None)
        fixed.pop(key, None)
        if not o.is_sweep_override():
            fixed[key] = str(o.input_line)
            continue
        space.given[key] = str(o.input_line).partition("=")[2]
        try:
            space.distributions[key], space.texts[key] = distribution(o)
        except (ValueError, ArithmeticError) as err:  # Optuna refuses a bound (low > high, log 0), a step; a glob
            raise ConfigError(key, space.given[key], str(err)) from None
    space.fixed = list(fixed.values())
    return space


class Sampler(Proxy):
    """The sampler, noting the trial it begins; if seeded, made anew per trial, seeded `seed + trial number`."""

    def __init__(self, config: dict[str, Any], seed: int | None) -> None:
        super().__init__(make("sampler", config, BaseSampler, **({} if seed is None else {"seed": seed})))
        self.config, self.seed, self.trial = config, seed, None

    def before_trial(self, study: Any, trial: Any) -> None:
        self.trial = trial.number  # Optuna's first call once it has made a trial: the one a failed ask leaves
        if self.seed is not None:
            self.inner = make("sampler", self.config, BaseSampler, seed=self.seed + trial.number)
        self.inner.before_trial(study, trial)

    def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
        self.inner.after_trial(NoStop(study), trial, state, values)  # the sweep stops at n_trials itself


class NoStop(Proxy):
    """A study whose `stop` does nothing: a grid or brute-force sampler calls it once its space is used up."""

    def stop(self) -> None:
        """Nothing: Optuna's stop works only inside `optimize`, which the sweeper does not use."""


def make(key: str, config: dict[str, Any], base: type, **given: Any) -> Any:
    """The object `hydra.sweeper.<key>` configures (with `given` arguments), an instance of `base`."""
    try:
        made = instantiate(config, **given)
    except Exception as err:
        raise ConfigError(f"hydra.sweeper.{key}", config.get("_target_"), f"cannot be made: {err}") from None
    if not isinstance(made, base):
        raise ConfigError(f"hydra.sweeper.{key}", config.get("_target_"), f"must name an optuna.{key}s class")
    return made


def counted(trials: Iterable[FrozenTrial]) -> int:
    """Trials toward n_trials: all but the failed ones never launched (not handed to a sweep dir, or NOT_RUN)."""
    return sum(
        (SWEEP_DIR in t.user_attrs and NOT_RUN not in t.user_attrs) or t.state != TrialState.FAIL for t in trials
    )


def settled(study: optuna.Study) -> list[FrozenTrial]:
    """The study's trials, once those a killed sweep left unnamed (asked, never launched) are failed."""
    now = datetime.datetime.now()  # Optuna stamps trials with this machine's local time
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if SWEEP_DIR not in t.user_attrs and now - t.datetime_start >= ORPHAN:
            log.warning(f"trial {t.number} was left unlaunched by a killed sweep: marked failed, not counted")
            study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
    return study.get_trials(deepcopy=False)


def outcome(ret: JobReturn, direction: str) -> tuple[float | None, str]:
    """What to tell Optuna of a job: its number (the worst one if not finite: diverged), or None and why."""
    try:
        value = ret.return_value  # raises the job's own exception when it failed
    except Exception as err:
        return None, " ".join(f"{type(err).__name__}: {err}".split())
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None, f"returned {value!r}, not a number"
    return objective(number, direction), ""


def objective(value: float | None, direction: str) -> float:
    """A job's train MSE as Optuna is told it: the worst value when there is none or it is not finite (diverged)."""
    if value is not None and math.isfinite(value):
        return value
    return math.inf if direction == "minimize" else -math.inf


def shown(url: str) -> str:
    """A storage URL without its password, for logs and files."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy can parse: it is refused when opened
        return url


class StudySweep:
    """Asks Optuna for `n_jobs` trials at a time, runs them as Hydra jobs, tells Optuna their values."""

    def __init__(self, config: DictConfig, launcher: Launcher, keys: Any) -> None:  # keys: an OptunaConfig
        self.config, self.launcher = config, launcher
        for key, ok in (("n_trials", keys.n_trials > 0), ("n_jobs", keys.n_jobs > 0)):
            if not ok:  # the types are Hydra's to refuse (OptunaConfig); the ranges are ours
                raise ConfigError(f"hydra.sweeper.{key}", getattr(keys, key), "must be a positive integer")
        if not 0 <= keys.max_failure_rate <= 1:
            raise ConfigError("hydra.sweeper.max_failure_rate", keys.max_failure_rate, "must be from 0 to 1")
        self.n_trials, self.n_jobs, self.max_failure_rate = keys.n_trials, keys.n_jobs, keys.max_failure_rate
        self.direction = getattr(keys.direction, "name", keys.direction)  # Hydra's scan may load Direction twice
        self.sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
        self.storage = keys.storage or f"sqlite:///{self.sweep_dir / 'optuna.db'}"
        self.study_name = keys.study_name or "linreg"
        self.params = {str(k): str(v) for k, v in (keys.params or {}).items()}
        self.sampler_config = dict(keys.sampler)
        self.seed = self.sampler_config.pop("seed", None)
        if keys.pruner is not None:
            make("pruner", keys.pruner, BasePruner)  # each job makes its own; a bad one is refused here, once
        try:  # a function called with the config and each new trial
            self.extend = None if keys.custom_search_space is None else get_method(keys.custom_search_space)
        except Exception:
            why = "must name a function, pkg.mod.fn"
            raise ConfigError("hydra.sweeper.custom_search_space", keys.custom_search_space, why) from None
        self.resume = OmegaConf.select(config, "resume", default=False) is True
        self.asked: dict[int, optuna.Trial] = {}  # the trials asked for the batch being launched
        # Optuna's lines in Hydra's format (and log file); alembic >= 1.18 announces its plugins at INFO.
        optuna.logging.disable_default_handler()
        optuna.logging.enable_propagation()
        optuna.logging.set_verbosity(logging.WARNING)  # "A new study created": the sweep's header says where it is
        logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)

    def open_study(self) -> optuna.Study:
        """The study in its database (made if new); a bad URL, or a study made for the other direction, refused."""
        sampler = Sampler(self.sampler_config, self.seed)  # made here: a bad sampler is refused before any trial
        self.sweep_dir.mkdir(parents=True, exist_ok=True)  # the default database's and the results' place
        # Sweeps sharing a SQLite file wait for each other's writes (SQLite's own wait is 5 s).
        engine = {"connect_args": {"timeout": 120}} if self.storage.startswith("sqlite:") else {}
        for attempt in range(5):  # sweeps started at once on a new database race to make its tables
            try:
                storage = optuna.storages.RDBStorage(self.storage, engine_kwargs=engine)
                break
            except Exception as err:  # a bad URL at once; a race's loser again, to find the tables made
                if attempt == 4 or not isinstance(err, (IntegrityError, OperationalError)):
                    why = f"cannot be opened: {first_line(err) or type(err).__name__}"
                    raise ConfigError("hydra.sweeper.storage", shown(self.storage), why) from None
                time.sleep(0.2 * (attempt + 1))
        study = optuna.create_study(
            storage=storage, study_name=self.study_name, sampler=sampler, direction=self.direction, load_if_exists=True
        )
        if study.direction.name.lower() != self.direction:
            where = f"study {self.study_name!r} in {shown(self.storage)}"
            raise ConfigError("hydra.sweeper.direction", self.direction, f"{where} was made to {study.direction.name}")
        return study

    def sweep(self, arguments: list[str]) -> None:
        """Re-run this dir's trials a kill left running, then ask, run and tell until the study has `n_trials`."""
        space = search_space(self.params, arguments)
        study = self.open_study()
        trials = settled(study)
        held = {k: d for t in trials for k, d in t.distributions.items()}  # Optuna refuses another for a key at ask
        for key in sorted(held.keys() & space.distributions.keys()):
            try:
                optuna.distributions.check_distribution_compatibility(held[key], space.distributions[key])
            except ValueError as err:
                why = f"study {self.study_name!r} in {shown(self.storage)} searched {held[key]}: {err}"
                raise ConfigError(key, space.given[key], why) from None
        there = counted(trials)
        if there:  # a study this sweep goes on with (of a new one, the sweep's header says enough)
            log.info(f"Optuna study {self.study_name!r} in {shown(self.storage)}: {there} of {self.n_trials} there")
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        mine = [t for t in running if t.user_attrs.get(SWEEP_DIR) == str(self.sweep_dir)]  # one sweep per dir
        if mine and not self.resume:
            left = f"trials {', '.join(str(t.number) for t in mine)} of {self.sweep_dir} were left running by a kill"
            raise ConfigError("resume", False, f"{left}: add resume=true to run them again and go on")
        stale = [(t.number, space.overrides(t.params)) for t in mine]
        announce(Path(str(self.config.hydra.sweep.dir)), self.n_trials, done=there - len(stale))  # the rest run now
        try:
            for start in range(0, len(stale), self.n_jobs):  # in their own dirs, from their checkpoints
                self.run_batch(study, stale[start : start + self.n_jobs])
            while jobs := self.ask(study, space):
                self.run_batch(study, jobs)
        except optuna.exceptions.StorageInternalError as err:  # past SQLite's 120 s wait, or a full disk
            self.fail_running(study)
            with contextlib.suppress(Exception):
                log.info(f"sweep: {summarize(self.sweep_dir)[0]}")
            why = first_line(err.__cause__ or err) or type(err).__name__
            where = f"hydra.sweeper.storage={shown(self.storage)}"
            raise SystemExit(f"error: {where}: the study's database failed ({why}); resume=true goes on") from None
        except OSError as err:  # a write under the sweep dir failed outside a job (a full disk): no traceback
            self.fail_running(study)
            raise SystemExit(stopped(self.sweep_dir, err)) from None
        self.write_results(study)

    def fail_running(self, study: optuna.Study) -> None:
        """This sweep's trials still RUNNING marked failed, if the study answers (a resume asks for new ones)."""
        with contextlib.suppress(Exception):
            for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                if t.user_attrs.get(SWEEP_DIR) == str(self.sweep_dir):
                    study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)

    def ask(self, study: optuna.Study, space: Space) -> list[Job]:
        """Up to `n_jobs` new trials, as many as the study still lacks (sweeps sharing it ask too)."""
        jobs: list[Job] = []
        self.asked.clear()
        while len(jobs) < self.n_jobs and counted(settled(study)) < self.n_trials:
            study.sampler.trial = None
            try:
                trial = study.ask(space.distributions)
            except optuna.exceptions.StorageInternalError:
                raise  # the database's failure: the sweep's to report
            except Exception as err:  # a sampler that cannot draw the space (BruteForceSampler of an interval)
                if study.sampler.trial is not None:  # no trial left RUNNING (told even if the sampler raises again)
                    with contextlib.suppress(Exception):
                        study.tell(study.sampler.trial, state=TrialState.FAIL, skip_if_finished=True)
                why = f"cannot draw the search space: {type(err).__name__}: {err}"
                raise ConfigError("hydra.sweeper.sampler", self.sampler_config.get("_target_"), why) from None
            if counted(t for t in study.get_trials(deepcopy=False) if t.number < trial.number) >= self.n_trials:
                trial.set_user_attr(NOT_RUN, f"another sweep filled the study to n_trials={self.n_trials} first")
                study.tell(trial, state=TrialState.FAIL)
                break
            try:
                if self.extend is not None:
                    self.extend(self.config, trial)
            except Exception as err:  # the user's function: its error in one line, and no trial left RUNNING
                study.tell(trial, state=TrialState.FAIL)
                why = f"raised {type(err).__name__}: {err}"
                raise ConfigError("hydra.sweeper.custom_search_space", self.extend.__qualname__, why) from None
            trial.set_user_attr(SWEEP_DIR, str(self.sweep_dir))  # last: a named trial has all its params
            jobs.append((trial.number, space.overrides(trial.params)))
            self.asked[trial.number] = trial
        return jobs

    def settle_launched(self, study: optuna.Study, jobs: list[Job], err: Exception) -> None:
        """After a launch raised: finished trials told, unbegun ones failed uncounted, the rest left for resume=true."""
        for number, _ in jobs:
            out = self.sweep_dir / str(number)
            if (record := finished(out)) is not None:  # a pruned one's trial is told already
                study.tell(number, objective(record.train_mse, self.direction), skip_if_finished=True)
            elif not out.exists() and number in self.asked:  # no trial: the study still lacks it
                self.asked[number].set_user_attr(NOT_RUN, f"its launch failed: {type(err).__name__}")
                study.tell(number, state=TrialState.FAIL, skip_if_finished=True)

    def run_batch(self, study: optuna.Study, jobs: list[Job]) -> None:
        """Launch a batch (job number = trial number) and tell Optuna each result; too many failures end the sweep."""
        returns: list[JobReturn] = []
        for _, run in itertools.groupby(enumerate(jobs), key=lambda p: p[1][0] - p[0]):  # consecutive numbers
            run_jobs = [job for _, job in run]
            try:
                returns += self.launcher.launch([o for _, o in run_jobs], initial_job_idx=run_jobs[0][0])
            except optuna.exceptions.StorageInternalError:
                raise  # the database's failure (a vectorized launch reports to it): the sweep's to report
            except Exception as err:  # outside a job: a dead worker, a timeout, a setting the launcher refuses
                self.settle_launched(study, jobs, err)
                launch_failed(self.sweep_dir, err)
        failures, pruned = [], {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.PRUNED,))}
        for (number, _), ret in zip(jobs, returns):
            value, why = outcome(ret, self.direction)
            if number in pruned:  # its job told the study itself (linreg.callbacks.prune)
                continue
            if value is None:  # no result at all: a failed trial, which counts but teaches the sampler nothing
                log.warning(f"trial {number} failed: {why}")
                study.tell(number, state=TrialState.FAIL, skip_if_finished=True)
                failures.append((ret, why))
            else:
                study.tell(number, value, skip_if_finished=True)
        if failures and len(failures) / len(jobs) > self.max_failure_rate:
            log.error(f"{len(failures)} of {len(jobs)} jobs failed, max_failure_rate={self.max_failure_rate}")
            _ = failures[0][0].return_value  # raises the job's own error, as Hydra's sweepers do
            raise RuntimeError(f"trial job failed: {failures[0][1]}")

    def write_results(self, study: optuna.Study) -> None:
        """`optimization_results.yaml` in the sweep dir: the best trial's params and value, and where the study is."""
        trials = study.get_trials(deepcopy=False)
        best = study.best_trial if any(t.state == TrialState.COMPLETE for t in trials) else None
        results = {
            "name": "optuna",
            "study_name": self.study_name,
            "storage": shown(self.storage),
            "n_trials": counted(trials),
            "n_complete": sum(t.state == TrialState.COMPLETE for t in trials),
            "best_trial": best.number if best else None,
            "best_params": best.params if best else {},
            "best_value": best.value if best else None,
        }
        params = best.params.items() if best else ()  # shown at 6 significant digits, as the progress lines
        chosen = " ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in params)
        log.info(f"best trial {best.number}: {best.value:.6g} with {chosen}" if best else "no trial completed")
        write_atomic(self.sweep_dir / "optimization_results.yaml", OmegaConf.to_yaml(results).encode())
