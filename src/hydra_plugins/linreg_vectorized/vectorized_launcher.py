"""`hydra/launcher=vectorized`: the jobs of a batch trained in groups, each group one stacked model.

Jobs whose configs differ only in stackable numbers (`linreg.stacked.STACKED_KEYS`) form a group, split to
fit a memory budget, and train in one `Trainer.fit` of `linreg.stacked.StackedRegression`. Then every job is
set up as Hydra's basic launcher sets it up (`hydra.core.utils.run_job`: job dir, `.hydra/*.yaml`, job
logging, `on_job_start`/`on_job_end`), with a task function that writes the job's precomputed record and
logs. A job that fails validation is a failed row; a finished one is skipped on `resume=true`.

Imports of torch and Lightning wait for `launch`: Hydra imports every plugin module at start-up.
"""

import logging
import math
import os
import resource
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import (
    JobReturn,
    JobRuntime,
    JobStatus,
    configure_log,
    env_override,
    filter_overrides,
    setup_globals,
)
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

log = logging.getLogger(__name__)
FILES_KEPT_FREE = 256  # open files left for torch, logs and TensorBoard beside a group's run-dir locks
BUDGET_SHARE = 4  # the default budget: 1/4 of the memory available at launch (the data is copied once more)


@dataclass
class Job:
    """One job of the batch: its number, overrides, full config, resolved task config and dir."""

    num: int
    overrides: list[str]
    config: DictConfig
    cfg: DictConfig | None
    out: Path
    task: Callable[[DictConfig], Any] | None = None  # set when the job needs no training
    key: str | None = None  # its group
    refused: bool = False  # its dir is another run's: nothing is written there, not even .hydra/


class VectorizedLauncher(Launcher):
    """Trains a batch of jobs as stacked groups; every job keeps its own dir, record, logs and callbacks."""

    def __init__(self, memory_budget_gb: float | None = None, max_group_size: int | None = None) -> None:
        self.memory_budget_gb, self.max_group_size = memory_budget_gb, max_group_size
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import linreg.stacked  # noqa: F401  (Lightning and the stacked model: imported before the first group's clock)

        assert self.config is not None and self.hydra_context is not None
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        jobs = [self.plan(initial_job_idx + i, list(o)) for i, o in enumerate(job_overrides)]
        groups = self.groups([j for j in jobs if j.task is None])
        log.info(f"Launching {len(jobs)} jobs as {len(groups)} stacked group{'' if len(groups) == 1 else 's'}")
        returns: dict[int, JobReturn] = {}
        for job in jobs:
            if job.task is not None:  # failed validation, refused or done before: no training
                returns[job.num] = self.finish(job, job.task)
        for group in groups:
            self.sweep_logging()  # a group's lines are the sweep's, not the last job's log file
            with ExitStack() as locks:
                members = self.lock(group, locks, returns)
                for job, task in zip(members, self.train(members) if members else []):
                    returns[job.num] = self.finish(job, task)
        self.sweep_logging()
        return [returns[j.num] for j in jobs]

    def lock(self, group: list[Job], locks: ExitStack, returns: dict[int, JobReturn]) -> list[Job]:
        """Take each member's run-dir lock, held in `locks` while the group trains and writes its records.

        A member whose dir another run took since it was planned is a refused row and leaves the group.
        """
        from linreg.record import RunDirBusy
        from linreg.train import RunDirLock

        members = []
        for job in group:
            job.out.mkdir(parents=True, exist_ok=True)
            try:
                locks.enter_context(RunDirLock(job.out))
            except RunDirBusy as err:
                job.refused = True
                returns[job.num] = self.finish(job, refused_task(err))
                continue
            # Looked at again under the lock: another run may have used the dir since the job was planned.
            if (task := self.no_training(job, check_lock=False)) is not None:
                returns[job.num] = self.finish(job, task)
                continue
            members.append(job)
        return members

    def sweep_logging(self) -> None:
        """Hydra's own logging, as the basic launcher sets it between jobs."""
        assert self.config is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)

    # ------------------------------------------------------------ planning

    def plan(self, num: int, overrides: list[str]) -> Job:
        """Compose the job's config and decide what it needs: training in a group, or a record at once."""
        from linreg.config import ConfigError, validate

        assert self.config is not None and self.hydra_context is not None
        log.info(f"\t#{num} : {' '.join(filter_overrides(overrides))}")
        config = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(config):
            config.hydra.job.id, config.hydra.job.num = str(num), num  # as the basic launcher sets them
        # Only a config that reads Hydra's job state (${hydra:job.num}) needs it set: setting it copies the config.
        previous, needs_hydra = HydraConfig.instance().cfg, uses_hydra_resolver(config)
        if needs_hydra:
            HydraConfig.instance().set_config(config)
        try:
            out = (Path(str(config.hydra.sweep.dir)) / str(config.hydra.sweep.subdir)).absolute()
            job = Job(num, overrides, config, None, out)
            try:
                validate(config)
                job.cfg = task_config(config)
            except ConfigError as err:
                job.task = failed_task(err)
                return job
            job.task, job.key = self.triage(job)
            return job
        finally:
            if needs_hydra:
                HydraConfig.instance().cfg = previous

    def triage(self, job: Job) -> tuple[Callable[[DictConfig], Any] | None, str | None]:
        """A finished job (resume) or a dir holding another run needs no training; the rest get a group key."""
        from linreg.stacked import group_key

        assert job.cfg is not None
        task = self.no_training(job, check_lock=True)
        return (task, None) if task is not None else (None, group_key(job.cfg))

    @staticmethod
    def no_training(job: Job, check_lock: bool) -> Callable[[DictConfig], Any] | None:
        """The task of a job that must not train (finished before with resume=true, or its dir another run's)."""
        from linreg.record import RunDirBusy, finished_metrics, refuse_other_runs

        assert job.cfg is not None
        if job.cfg.resume and (done := finished_metrics(job.out, job.cfg)) is not None:
            return done_task(done)
        try:
            refuse_other_runs(job.out, job.cfg, check_lock=check_lock)
        except RunDirBusy as err:
            job.refused = True
            return refused_task(err)
        return None

    def groups(self, jobs: list[Job]) -> list[list[Job]]:
        """Jobs with the same key, in order of their first job, split to fit the memory budget."""
        from linreg.stacked import member_bytes, split_groups

        by_key: dict[str, list[int]] = {}
        for i, job in enumerate(jobs):
            assert job.key is not None
            by_key.setdefault(job.key, []).append(i)
        max_size = self.max_group_size
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft != resource.RLIM_INFINITY:  # a member holds its run dir's lock (an open file) while its group trains
            room = max(1, soft - FILES_KEPT_FREE)
            if len(jobs) > room and (max_size is None or max_size > room):
                log.info(f"groups of at most {room} members: the open-file limit is {soft} (ulimit -n)")
            max_size = min(max_size or room, room)
        out = []
        for members in by_key.values():
            first = jobs[members[0]].cfg
            assert first is not None
            budget = self.budget(str(first.trainer.accelerator))
            for chunk in split_groups(members, member_bytes(first), budget, max_size):
                out.append([jobs[i] for i in chunk])
        return out

    def budget(self, accelerator: str) -> int:
        """Bytes one group's data may take: the setting, or a share of the free host (and GPU) memory."""
        if self.memory_budget_gb is not None:
            return int(float(self.memory_budget_gb) * 2**30)
        import psutil

        budget = psutil.virtual_memory().available // BUDGET_SHARE
        if accelerator in ("gpu", "cuda", "auto"):
            import torch

            if torch.cuda.is_available():
                budget = min(budget, torch.cuda.mem_get_info()[0] // BUDGET_SHARE)
        return int(budget)

    # ------------------------------------------------------------ training and records

    def train(self, group: list[Job]) -> list[Callable[[DictConfig], Any]]:
        """Train one group; a task per member that writes its record (or its failure)."""
        import warnings

        from linreg.stacked import train_group
        from linreg.train import NOISE

        cfgs = [j.cfg for j in group]
        log.info(f"training jobs #{group[0].num}..#{group[-1].num} as one model ({len(group)} members)")
        try:
            with warnings.catch_warnings(), quiet_lightning():
                for message in NOISE:
                    warnings.filterwarnings("ignore", message=message)
                results = train_group(cfgs)  # type: ignore[arg-type]
        except Exception as err:  # the whole group's fit failed: every member is a failed row
            log.error(f"stacked fit failed: {type(err).__name__}: {err}")
            return [failed_task(err) for _ in group]
        return [failed_task(r) if isinstance(r, Exception) else record_task(job, r) for job, r in zip(group, results)]

    def finish(self, job: Job, task: Callable[[DictConfig], Any]) -> JobReturn:
        """Set the job up as Hydra's `run_job` does and run `task` as its task function.

        `run_job` itself deep-copies the whole config four times a job (~25 ms here, more than a group member
        trains): the job's config is this launcher's own fresh copy, so it is set up in place.
        """
        assert self.config is not None and self.hydra_context is not None
        config, out = job.config, job.out
        with read_write(config.hydra.runtime), open_dict(config.hydra.runtime):
            config.hydra.runtime.output_dir = str(out)
        previous, cwd = HydraConfig.instance().cfg, os.getcwd()
        HydraConfig.instance().set_config(config)
        try:
            out.mkdir(parents=True, exist_ok=True)
            if config.hydra.job.chdir:
                os.chdir(out)
            if not job.refused:  # a refused job's line goes to the sweep's log, not the other run's
                configure_log(config.hydra.job_logging, config.hydra.verbose)
            task_cfg = OmegaConf.masked_copy(config, [k for k in config if k != "hydra"])
            hydra_cfg = HydraConfig.instance().cfg
            ret = JobReturn(overrides=list(config.hydra.overrides.task), cfg=task_cfg, hydra_cfg=hydra_cfg)
            ret.working_dir = os.getcwd()
            if config.hydra.output_subdir is not None and not job.refused:
                save_job_configs(out / str(config.hydra.output_subdir), task_cfg, hydra_cfg, ret.overrides)
            with env_override(config.hydra.job.env_set):
                self.hydra_context.callbacks.on_job_start(config=config, task_function=task)
                try:
                    ret.return_value, ret.status = task(task_cfg), JobStatus.COMPLETED
                except Exception as err:
                    ret.return_value, ret.status = err, JobStatus.FAILED
            ret.task_name = JobRuntime.instance().get("name")
            self.hydra_context.callbacks.on_job_end(config=config, job_return=ret)
            return ret
        finally:
            HydraConfig.instance().cfg = previous
            os.chdir(cwd)


def save_job_configs(folder: Path, task_cfg: DictConfig, hydra_cfg: Any, overrides: list[str]) -> None:
    """`.hydra/config.yaml`, `hydra.yaml` and `overrides.yaml`, as `run_job` writes them (unresolved)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, node in (("config.yaml", task_cfg), ("hydra.yaml", hydra_cfg), ("overrides.yaml", overrides)):
        (folder / name).write_text(to_yaml(node), encoding="utf-8")


def to_yaml(node: Any) -> str:
    """`OmegaConf.to_yaml` through libyaml's C emitter when there is one: the same document, ~5x faster."""
    if not OmegaConf.is_config(node):
        return yaml.dump(node, default_flow_style=False, allow_unicode=True)
    if not getattr(yaml, "__with_libyaml__", False):
        return OmegaConf.to_yaml(node)
    plain = OmegaConf.to_container(node, resolve=False, enum_to_str=True)
    return yaml.dump(plain, Dumper=yaml.CSafeDumper, default_flow_style=False, allow_unicode=True, sort_keys=False)


def task_config(config: DictConfig) -> DictConfig:
    """The job's config without `hydra`, resolved (the members train with no Hydra state set)."""
    from linreg.config import plain

    return OmegaConf.create(plain(config))


def uses_hydra_resolver(config: DictConfig) -> bool:
    """Whether the job's own config (not `hydra`) holds a `${hydra:...}` interpolation."""
    task = OmegaConf.masked_copy(config, [k for k in config if k != "hydra"])
    return "${hydra:" in str(OmegaConf.to_container(task, resolve=False))


@contextmanager
def quiet_lightning() -> Iterator[None]:
    """Lightning's banners (GPU available, ...) once per group would read as noise: WARNING and up only."""
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


def record_task(job: Job, result: Any) -> Callable[[DictConfig], Any]:
    """The task of a trained member: its TensorBoard run, then metrics.json (the mark of a finished job)."""

    def task(cfg: DictConfig) -> float:
        from linreg.dashboard import run_label
        from linreg.record import RunRecord, sweep_value, write_failure
        from linreg.results import read_plan
        from linreg.stacked import write_member_logs

        hc = HydraConfig.get()
        label = run_label(hc.overrides.task, read_plan(Path(hc.sweep.dir))["swept"])
        try:
            write_member_logs(job.cfg, job.out, label, result)  # type: ignore[arg-type]
            result.record.write(job.out)
        except Exception as err:
            write_failure(job.out, RunRecord.failed(cfg, err))
            logging.getLogger("linreg.train").error(f"job failed: {err}")
            return math.inf
        return sweep_value(result.record.train_mse)

    return task


def failed_task(error: BaseException) -> Callable[[DictConfig], Any]:
    """The task of a job that cannot train: a failed record, as `linreg.train.main` writes in a sweep."""

    def task(cfg: DictConfig) -> float:
        from linreg.record import RunRecord, write_failure
        from linreg.train import output_dir

        failed = RunRecord.failed(cfg, error)
        write_failure(output_dir(), failed)
        logging.getLogger("linreg.train").error(f"job failed: {failed.error}")
        return math.inf

    return task


def refused_task(error: BaseException) -> Callable[[DictConfig], Any]:
    """The task of a job whose dir holds another run: nothing is written there."""

    def task(cfg: DictConfig) -> float:
        logging.getLogger("linreg.train").error(f"job refused: {error}")
        return math.inf

    return task


def done_task(metrics: dict[str, Any]) -> Callable[[DictConfig], Any]:
    """The task of a job that finished before (resume=true): its files stay as they are."""

    def task(cfg: DictConfig) -> float:
        logging.getLogger("linreg.train").info("resume: already finished with this config; nothing to train")
        from linreg.record import sweep_value

        return sweep_value(metrics["train_mse"])

    return task
