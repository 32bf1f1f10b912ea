"""`hydra/launcher=vectorized`: the jobs of a sweep that differ only in numbers train as one stacked model.

Jobs that stack (same `linreg.stacked.group_key`) train in groups split by a memory budget and `max_group_size`,
each in one `Trainer.fit` under its members' run-dir locks; then Hydra's `run_job` sets each member up as the
basic launcher does, around a task that writes its logs and metrics.json. Any other job (a value a run refuses,
one finished before with resume=true, a model class of one's own) runs as the basic launcher runs it; a job whose
dir holds another run is a row, with nothing written there. torch and Lightning are imported in `launch`.
"""

import logging
import math
import resource
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus, configure_log, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from omegaconf.errors import OmegaConfBaseException

from linreg.config import MODELS, ConfigError, check, plain
from linreg.record import RunDirBusy, RunDirLock, RunRecord, finished, refuse_other_runs, write_job_files

log = logging.getLogger(__name__)
job_log = logging.getLogger("linreg.train")  # a job's own lines, as `linreg.train.main` writes them
FILES_KEPT_FREE = 256  # open files left for torch, logs and TensorBoard beside a group's run-dir locks
BUDGET_SHARE = 4  # the default budget: 1/4 of the memory available at launch


@dataclass
class Job:
    """One job: its number, its config as Hydra composed it, its dir, and how it runs."""

    num: int
    config: DictConfig
    out: Path
    cfg: DictConfig | None = None  # its own config, resolved, when it trains in a group
    key: str | None = None  # its group
    refused: RunDirBusy | None = None  # its dir is another run's


class VectorizedLauncher(Launcher):
    """Trains a batch of jobs as stacked groups; every job keeps its own dir, record, logs and callbacks."""

    def __init__(self, memory_budget_gb: float | None = None, max_group_size: int | None = None) -> None:
        self.memory_budget_gb, self.max_group_size = memory_budget_gb, max_group_size

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from linreg.stacked import train_group

        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)  # no banners a group
        jobs = [self.plan(initial_job_idx + i, list(o)) for i, o in enumerate(job_overrides)]
        groups = self.groups([job for job in jobs if job.key is not None])
        log.debug("%d jobs, %d stacked in %d groups", len(jobs), sum(map(len, groups)), len(groups))
        returns: dict[int, JobReturn] = {}
        for job in jobs:
            if job.refused is not None:
                returns[job.num] = self.refuse(job, job.refused)
            elif job.key is None:
                returns[job.num] = self.run(job, self.task_function)
        for group in groups:
            with ExitStack() as locks:
                members = [job for job in group if self.lock(job, locks, returns)]
                try:
                    results: list[Any] = train_group([job.cfg for job in members]) if members else []
                except Exception as err:  # the group's fit failed: every member is a failed row
                    log.error("stacked fit failed: %s: %s", type(err).__name__, err)
                    results = [err] * len(members)
                for job, result in zip(members, results):
                    returns[job.num] = self.run(job, member_task(result))
        return [returns[job.num] for job in jobs]

    def plan(self, num: int, overrides: list[str]) -> Job:
        """Compose the job's config as the basic launcher does, and decide how it runs."""
        from linreg.stacked import group_key

        config = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(config):
            config.hydra.job.id, config.hydra.job.num = num, num
        job = Job(num, config, Path(str(config.hydra.sweep.dir), str(config.hydra.sweep.subdir)).absolute())
        HydraConfig.instance().set_config(config)  # for its `${hydra:...}` values (`run_job` sets it again later)
        try:
            check(config)
            cfg = OmegaConf.create(plain(config))  # plain data, to train outside Hydra
        except (ConfigError, OmegaConfBaseException):
            return job  # its single run records why
        if cfg.model._target_ not in MODELS or (cfg.resume and finished(job.out, cfg) is not None):
            return job  # a model class of one's own trains alone; a finished job is kept by its single run
        try:
            refuse_other_runs(job.out, cfg)
        except RunDirBusy as err:
            job.refused = err
            return job
        job.cfg, job.key = cfg, group_key(cfg)
        return job

    def groups(self, jobs: list[Job]) -> list[list[Job]]:
        """Jobs with the same key, in the order of each key's first job, in chunks within the budget and sizes."""
        from linreg.stacked import member_bytes

        by_key: dict[Any, list[Job]] = {}
        for job in jobs:
            by_key.setdefault(job.key, []).append(job)
        # A member holds its run dir's lock, an open file, while its group trains (a limit of -1: none).
        files = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        most = min(self.max_group_size or math.inf, math.inf if files < 0 else files - FILES_KEPT_FREE)
        groups = []
        for members in by_key.values():
            cfg = members[0].cfg
            size = max(1, int(min(self.budget(cfg) // member_bytes(cfg), most)))  # one member over budget: alone
            groups += [members[i : i + size] for i in range(0, len(members), size)]
        return groups

    def budget(self, cfg: DictConfig) -> float:
        """Bytes one group's data may take: the setting, or a share of the free host (and GPU) memory."""
        if self.memory_budget_gb is not None:
            return float(self.memory_budget_gb) * 2**30
        import psutil
        import torch

        free = [psutil.virtual_memory().available]
        if cfg.trainer.accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
            free.append(torch.cuda.mem_get_info()[0])
        return min(free) / BUDGET_SHARE

    def lock(self, job: Job, locks: ExitStack, returns: dict[int, JobReturn]) -> bool:
        """Take the member's run-dir lock for its group's life; a dir another run took since is a refused row."""
        job.out.mkdir(parents=True, exist_ok=True)
        try:
            locks.enter_context(RunDirLock(job.out))
            refuse_other_runs(job.out, job.cfg, lock_held=True)
        except RunDirBusy as err:
            returns[job.num] = self.refuse(job, err)
            return False
        return True

    def run(self, job: Job, task: TaskFunction) -> JobReturn:
        """Hydra's `run_job`, as the basic launcher calls it: the job's dir, .hydra/, log and callbacks."""
        ret = run_job(task, job.config, "hydra.sweep.dir", "hydra.sweep.subdir", self.hydra_context)
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        return ret

    def refuse(self, job: Job, err: RunDirBusy) -> JobReturn:
        """A job whose dir holds another run: its error line and callbacks, and nothing written into that dir."""
        config, callbacks = job.config, self.hydra_context.callbacks
        with read_write(config.hydra.runtime), open_dict(config.hydra.runtime):
            config.hydra.runtime.output_dir = str(job.out)  # where its row is looked for (and has no metrics.json)
        HydraConfig.instance().set_config(config)  # as `run_job` leaves it
        callbacks.on_job_start(config=config, task_function=self.task_function)
        job_log.error("job refused: %s", err)
        ret = JobReturn(overrides=OmegaConf.to_container(config.hydra.overrides.task), status=JobStatus.COMPLETED)
        ret.return_value = math.inf
        callbacks.on_job_end(config=config, job_return=ret)
        return ret


def member_task(result: Any) -> TaskFunction:
    """The task of a group member: its logs and metrics.json, or the failed record of why it did not train."""

    def task(cfg: DictConfig) -> float:
        from linreg.dashboard import run_label
        from linreg.results import read_plan

        hc = HydraConfig.get()
        out = Path(hc.runtime.output_dir)
        try:
            write_job_files(out, cfg)  # .hydra/, as `linreg.run` writes it for a single run
            if isinstance(result, Exception):
                raise result
            # The name its single run's TensorBoard run has (linreg.train.main): the swept keys' values.
            result.write(out, run_label(hc.overrides.task, read_plan(Path(hc.sweep.dir))["swept"]))
        except Exception as err:
            failed = RunRecord.failed(cfg, err)
            failed.write(out)
            job_log.error("job failed: %s", failed.error)
            return math.inf
        mse = result.record.train_mse
        return math.inf if mse is None else mse

    return task
