"""`hydra/sweeper=grid`: Hydra's basic grid sweeper on public plugin APIs, cheap per job, able to skip finished jobs.

- The same jobs, in the same order, under the same numbers as Hydra's basic sweeper (`hydra/sweeper=basic`),
  with its `params` and `max_batch_size`.
- Configs are composed once per choice of config groups (`compose_cache.py`), unless `cache: false`.
- With `resume=true`, a job whose dir already holds a finished metrics.json of the same config is not launched;
  the callbacks still hear of it (progress line, results table), and job numbers stay as planned. The basic
  launcher gets each run of consecutive unfinished jobs; a parallel launcher (joblib, submitit) gets the span
  from the first unfinished job to the last as one pool or array job, whose finished jobs return at once from
  `linreg.train.run`'s own check. A resume whose grid no longer matches the jobs' dirs (a job's dir holds another
  config's run) is refused by the config check before the sweep writes anything (`check_jobs`).
- A job's return keeps its status and value but not its configs once the callbacks have heard of it, so a
  long sweep's launcher does not grow with every job.
"""

import itertools
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra.core.config_loader import ConfigLoader
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import HydraException
from hydra.plugins.launcher import Launcher
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from omegaconf.errors import OmegaConfBaseException

from hydra_plugins.linreg_sweeper.compose_cache import CachedConfigLoader

log = logging.getLogger(__name__)


def grid_jobs(overrides: Sequence[Override]) -> list[list[str]]:
    """Every job's overrides, in the order of Hydra's basic sweeper: a later value of a key takes its first place."""
    choices: dict[str, list[str]] = {}
    for override in overrides:
        key = override.get_key_element()
        if not override.is_sweep_override():
            choices[key] = [f"{key}={override.get_value_element_as_str()}"]
        elif override.is_discrete_sweep():
            choices[key] = [f"{key}={value}" for value in override.sweep_string_iterator()]
        else:
            from linreg.config import ConfigError, override_key

            value = (override.input_line or "").partition("=")[2]  # a sweep has no str of its own
            allowed = "a grid sweeps values a,b,c, range() or glob(); interval() needs hydra/sweeper=optuna"
            raise ConfigError(override_key(key), value, allowed)
    return [list(job) for job in itertools.product(*choices.values())]


def batches(jobs: list[list[str]], size: int | None) -> list[list[list[str]]]:
    """The jobs in batches of `size` (None: one batch), as Hydra's `max_batch_size`."""
    if size is None:
        return [jobs]
    if size <= 0:
        raise HydraException(f"hydra.sweeper.max_batch_size={size}: must be a positive integer or null")
    return [jobs[start : start + size] for start in range(0, len(jobs), size)]


def unfinished_runs(finished: Sequence[bool], in_process: bool) -> list[tuple[int, int]]:
    """The `(start, end)` slices of a batch to launch: each run of unfinished jobs, or (parallel) one span of them."""
    todo = [i for i, done in enumerate(finished) if not done]
    if not todo:
        return []
    if not in_process:
        return [(todo[0], todo[-1] + 1)]  # one pool or array job; the finished ones inside return at once
    runs = [[todo[0], todo[0] + 1]]
    for i in todo[1:]:
        if i == runs[-1][1]:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return [(start, end) for start, end in runs]


def planned_jobs(params: dict[str, Any], arguments: Sequence[str], loader: ConfigLoader) -> list[list[str]]:
    """Every job's overrides, as `GridSweeper.sweep` runs them: the sweeper's `params`, then the command line's."""
    lines = [f"{key}={value}" for key, value in params.items()] + list(arguments)
    parser = OverridesParser.create(config_loader=loader)  # glob() lists groups
    return grid_jobs(parser.parse_overrides(lines))


@contextmanager
def job_config(loader: ConfigLoader, config: DictConfig, overrides: Sequence[str], num: int) -> Iterator[DictConfig]:
    """Job `num`'s config, numbered and placed as its launcher will, seen by HydraConfig as during the job."""
    cfg = loader.load_sweep_config(config, list(overrides))
    with open_dict(cfg.hydra):
        cfg.hydra.job.id, cfg.hydra.job.num = str(num), num  # as the basic launcher sets them
    out = Path(str(OmegaConf.select(cfg, "hydra.sweep.dir"))) / str(OmegaConf.select(cfg, "hydra.sweep.subdir"))
    with read_write(cfg.hydra.runtime), open_dict(cfg.hydra.runtime):
        cfg.hydra.runtime.output_dir = str(out.resolve())
    hydra_config = HydraConfig.instance()
    previous = hydra_config.cfg
    hydra_config.set_config(cfg)  # what a callback sees during a job, as Hydra's run_job sets it
    try:
        yield cfg
    finally:
        hydra_config.cfg = previous


def one_job_per_kind(planner: CachedConfigLoader, config: DictConfig, jobs: Sequence[Sequence[str]]) -> list[list[str]]:
    """One job per choice of groups and set of plain keys and value kinds: if these compose, every job does."""
    # Whether a config composes depends on what Hydra composes (groups, hydra keys, +/++/~ lines), the keys
    # plain values set, and their kinds (a list where a number was): one job per such kind is the same check.
    kinds: dict[tuple[Any, ...], list[str]] = {}
    for overrides in jobs:
        _, composed, values = planner.split(config, overrides)
        shape = tuple((o.key_or_group, type(o.value()).__name__) for o in values)
        kinds.setdefault((composed, shape), list(overrides))
    return list(kinds.values())


def check_jobs(config: DictConfig, loader: ConfigLoader) -> None:
    """Before the sweep writes anything: a ConfigError unless every job composes and, with resume=true, each
    job's dir holds nothing but its own runs (a changed grid would mix old runs into the new table)."""
    from linreg.cli import COMPOSE_ERRORS, compose_error
    from linreg.config import ConfigError, first_line, typed_overrides

    node = OmegaConf.select(config, "hydra.sweeper.params")
    typed = typed_overrides(config)
    try:  # resolved, as Hydra instantiates the sweeper with them; the command line as typed, as Hydra passes it
        params = OmegaConf.to_container(node, resolve=True) if node is not None else {}
        jobs = planned_jobs(params, typed, loader)  # type: ignore[arg-type]
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError("overrides", " ".join(typed), first_line(err)) from None
    if not jobs:  # a glob or range that matches nothing
        parser = OverridesParser.create(config_loader=loader)
        empty = [o for o in parser.parse_overrides(typed) if o.is_discrete_sweep()]
        empty = [o for o in empty if not list(o.sweep_string_iterator())] or empty
        key, _, value = ((empty[0].input_line or "") if empty else "overrides=").partition("=")
        raise ConfigError(key.lstrip("+~"), value, "gives no jobs: it matches nothing")
    hydra_lines = [str(o) for o in OmegaConf.to_container(config.hydra.overrides.hydra, resolve=False)]  # type: ignore[union-attr]
    planner = CachedConfigLoader(loader)
    if OmegaConf.select(config, "hydra.sweeper.cache") is False:
        loader_for_jobs: ConfigLoader = loader  # composed by Hydra from the YAML files, as asked
    else:
        loader_for_jobs = planner
    for overrides in one_job_per_kind(planner, config, jobs):
        try:
            with job_config(loader_for_jobs, config, overrides, 0):  # its dir resolves too
                pass
        except COMPOSE_ERRORS as err:
            if str(getattr(err, "full_key", "")).startswith("hydra."):
                raise  # the job's dir does not resolve: the config check names that key (`config.unresolved`)
            raise compose_error(err, str(config.hydra.job.config_name), [*hydra_lines, *overrides]) from None
    if config.get("resume") is True:
        refuse_changed_jobs(config, loader_for_jobs, jobs)


def refuse_changed_jobs(config: DictConfig, loader: ConfigLoader, jobs: list[list[str]]) -> None:
    """A ConfigError when a job's dir holds a run of another config (resume=true with a changed grid).

    The job itself would refuse its dir only after Hydra had rewritten that dir's `.hydra/`, and the table would
    show the old run as the new job's.
    """
    from linreg.config import ConfigError, override_key
    from linreg.record import RunDirBusy, finished_metrics, identity_overrides, refuse_other_runs

    values: dict[str, set[str]] = {}
    for override in itertools.chain.from_iterable(jobs):
        values.setdefault(override_key(override), set()).add(override)
    for num, overrides in enumerate(jobs):
        with job_config(loader, config, overrides, num) as cfg:
            out = Path(cfg.hydra.runtime.output_dir)
            if not cfg.get("resume") or not out.is_dir() or finished_metrics(out, cfg) is not None:
                continue
            try:
                refuse_other_runs(out, cfg, check_lock=False)  # a live worker's lock: that job's own row says so
            except RunDirBusy as err:
                named = [o for o in identity_overrides(overrides) if len(values[override_key(o)]) > 1]
                job = f"job {num} ({' '.join(named or identity_overrides(overrides)) or 'defaults'})"
                if err.key != "hydra.run.dir":
                    raise ConfigError(err.key, err.value, f"{job}: {err.allowed}") from None
                why = f"{job}: its dir {err.allowed} (resume needs the grid the sweep was made with)"
                raise ConfigError("hydra.sweep.dir", str(config.hydra.sweep.dir), why) from None


class LightReturns:
    """Hydra's callbacks, after whose `on_job_end` a job's return lets go of the job's two configs."""

    def __init__(self, callbacks: Any) -> None:
        self.callbacks = callbacks

    def __getattr__(self, name: str) -> Any:
        if name == "callbacks":  # unpickling (joblib, submitit) looks attributes up before __dict__ is filled
            raise AttributeError(name)
        return getattr(self.callbacks, name)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        self.callbacks.on_job_end(config=config, job_return=job_return, **kwargs)
        # The launcher keeps every return of a batch and the sweeper every batch's: configs would add up.
        job_return.cfg = job_return.hydra_cfg = None


class GridSweeper(Sweeper):
    """Hydra's basic grid (same jobs, numbers, params, batches), composed cheaply, skipping finished jobs on resume."""

    def __init__(self, max_batch_size: int | None = None, params: dict[str, str] | None = None, cache: bool = True):
        if not isinstance(cache, bool):
            raise HydraException(f"hydra.sweeper.cache={cache!r}: must be true or false")
        self.max_batch_size = max_batch_size
        self.params = dict(params or {})
        self.cache = cache
        self.hydra_context: HydraContext | None = None
        self.config: DictConfig | None = None
        self.launcher: Launcher | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        loader = CachedConfigLoader(hydra_context.config_loader) if self.cache else hydra_context.config_loader
        self.hydra_context = HydraContext(config_loader=loader, callbacks=LightReturns(hydra_context.callbacks))
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=self.hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> list[Sequence[JobReturn]]:
        """Run the grid batch by batch, as Hydra's basic sweeper; the jobs' returns, per batch."""
        assert self.hydra_context is not None and self.config is not None and self.launcher is not None
        jobs = planned_jobs(self.params, arguments, self.hydra_context.config_loader)
        planned = batches(jobs, self.max_batch_size)
        self.validate_batch_is_legal(jobs)  # every batch at once: a bad last batch fails before the first runs
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        returns: list[Sequence[JobReturn]] = []
        first = 0
        for batch in planned:
            results = self.launch(batch, first)
            for result in results:
                _ = result.return_value  # re-raises a failed job's error, as Hydra's sweeper does
            first += len(batch)
            returns.append(results)
        return returns

    def validate_batch_is_legal(self, batch: Sequence[Sequence[str]]) -> None:
        """Compose one job per kind (`one_job_per_kind`) before any job runs."""
        assert self.hydra_context is not None and self.config is not None
        for overrides in one_job_per_kind(self.planner(), self.config, batch):
            self.hydra_context.config_loader.load_sweep_config(self.config, overrides)

    def planner(self) -> CachedConfigLoader:
        """The cached loader (or one over Hydra's, composing nothing) that splits a job's overrides."""
        assert self.hydra_context is not None
        loader = self.hydra_context.config_loader
        return loader if isinstance(loader, CachedConfigLoader) else CachedConfigLoader(loader)

    def in_process(self) -> bool:
        """Whether the launcher is Hydra's basic one, running the jobs one after another in this process."""
        assert self.config is not None
        return OmegaConf.select(self.config, "hydra.runtime.choices", default={}).get("hydra/launcher") == "basic"

    def launch(self, batch: Sequence[Sequence[str]], first: int) -> list[JobReturn]:
        """Launch a batch's unfinished jobs under their planned numbers; stand-in returns for the finished ones."""
        assert self.launcher is not None
        found = [self.finished(o, first + i) for i, o in enumerate(batch)]
        returns: list[JobReturn | None] = [ret for ret, _ in found]
        runs = unfinished_runs([r is not None for r in returns], self.in_process())
        launched = sum(end - start for start, end in runs)
        if launched == 0 and batch:
            log.info(f"resume: all {len(batch)} jobs already finished")
        elif launched < len(batch):
            log.info(f"resume: {len(batch) - launched} of {len(batch)} jobs already finished; launching {launched}")
        inside = {i for start, end in runs for i in range(start, end)}
        for i, (ret, cfg) in enumerate(found):
            if ret is not None and i not in inside:
                # The callbacks hear of it as of any job (progress line); its files stay as the first run left them.
                # A finished job inside a launched span is heard of from its own (quick) launch instead.
                self.hydra_context.callbacks.on_job_end(config=cfg, job_return=ret)
        for start, end in runs:
            returns[start:end] = self.launcher.launch(batch[start:end], initial_job_idx=first + start)
        return returns  # type: ignore[return-value]

    def finished(self, overrides: Sequence[str], num: int) -> tuple[JobReturn | None, DictConfig | None]:
        """A stand-in return (and the job's config) for a job that already finished with this config (resume=true)."""
        from linreg.config import override_key
        from linreg.record import finished_metrics

        assert self.hydra_context is not None and self.config is not None
        if not self.config.get("resume") and not any(override_key(o) == "resume" for o in overrides):
            return None, None  # the common case, decided without composing the job's config
        with job_config(self.hydra_context.config_loader, self.config, overrides, num) as cfg:
            if not cfg.get("resume"):
                return None, None
            metrics = finished_metrics(Path(cfg.hydra.runtime.output_dir), cfg)
            return (None, None) if metrics is None else (self.stand_in(cfg, metrics), cfg)

    @staticmethod
    def stand_in(cfg: DictConfig, metrics: dict[str, Any]) -> JobReturn:
        """The JobReturn Hydra's run_job would give for this finished job, with `linreg.train.main`'s value."""
        task_cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
        ret = JobReturn(
            overrides=list(cfg.hydra.overrides.task),
            cfg=task_cfg,
            hydra_cfg=OmegaConf.masked_copy(cfg, ["hydra"]),
            working_dir=str(cfg.hydra.runtime.output_dir) if cfg.hydra.job.chdir else str(Path.cwd()),
            task_name=cfg.hydra.job.name,
        )
        from linreg.record import sweep_value

        ret.status, ret.return_value = JobStatus.COMPLETED, sweep_value(metrics["train_mse"])  # as linreg.train.main
        return ret
