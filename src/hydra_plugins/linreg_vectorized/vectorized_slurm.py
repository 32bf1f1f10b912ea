"""`hydra/launcher=vectorized_slurm`: the vectorized launcher's stacked groups as the tasks of one SLURM array.

This process plans the jobs and runs those that do not stack; each group is a task (hydra-submitit-launcher's
`submitit_slurm` keys) that trains it on its node as the local launcher does. A task that dies leaves its members
`missing` rows, which `resume=true` trains again.
"""

import logging
import math
from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf, SlurmQueueConf
from omegaconf import OmegaConf

from hydra_plugins.linreg_vectorized.vectorized_launcher import BUDGET_SHARE, VectorizedLauncher

log = logging.getLogger(__name__)


@dataclass
class VectorizedSlurmConf(SlurmQueueConf):
    """hydra-submitit-launcher's SLURM keys and the vectorized launcher's."""

    _target_: str = "hydra_plugins.linreg_vectorized.vectorized_slurm.VectorizedSlurmLauncher"
    memory_budget_gb: float | None = None
    max_group_size: int | None = None


ConfigStore.instance().store(group="schema/launcher", name="vectorized_slurm", node=VectorizedSlurmConf)


class VectorizedSlurmLauncher(VectorizedLauncher):
    """The vectorized launcher with each group trained by a task of one SLURM array job."""

    def __init__(self, memory_budget_gb: float | None = None, max_group_size: int | None = None, **params: Any):
        super().__init__(memory_budget_gb, max_group_size)
        self.params = {k: OmegaConf.to_container(v) if OmegaConf.is_config(v) else v for k, v in params.items()}

    def budget(self, cfg: Any) -> float:
        """A share of the task's memory (`mem_gb`), not of this machine's, unless the budget is set."""
        if self.memory_budget_gb is None and self.params.get("mem_gb"):
            return self.params["mem_gb"] * 2**30 / BUDGET_SHARE
        return super().budget(cfg)

    def launch_jobs(self, numbered: list[tuple[int, list[str]]]) -> list[JobReturn]:
        """Plan the numbered jobs, run those that do not stack, and submit each group as a task of one array job."""
        import submitit

        from linreg.results import jobs_label, one_line

        given = dict(numbered)  # a job's overrides as the sweeper gave them
        jobs, groups, returns = self.plan_all(numbered)
        # The task plans its jobs again: nothing of this process's to pickle.
        self.kinds, self.held, self.bases, self.templates = {}, {}, {}, {}
        params = {k: v for k, v in self.params.items() if k not in ("submitit_folder", "max_num_timeout")}
        folder, timeouts = self.params["submitit_folder"], self.params["max_num_timeout"]
        executor = submitit.AutoExecutor(cluster="slurm", folder=folder, slurm_max_num_timeout=timeouts)
        base = set(OmegaConf.structured(BaseQueueConf).keys())  # as hydra-submitit-launcher names them
        executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
        with executor.batch():  # one array job, a task a group
            state = Singleton.get_state()  # Hydra's singletons, as hydra-submitit-launcher hands them to a job
            tasks = [executor.submit(self.task, [(j.num, given[j.num]) for j in g], state) for g in groups]
        if tasks:
            log.info(
                "%d jobs in %d groups: array job %s", sum(map(len, groups)), len(groups), tasks[0].job_id.split("_")[0]
            )
        for group, task in zip(groups, tasks):
            try:
                returns.update(zip([j.num for j in group], task.result()))
            except Exception as err:  # killed or out of time: its members are missing rows until resume=true
                jobs_of = jobs_label([str(job.num) for job in group])
                log.error("array task %s (%s) ended without results: %s", task.job_id, jobs_of, one_line(err)[:300])
                for job in group:
                    returns[job.num] = JobReturn(overrides=given[job.num])
                    returns[job.num].status, returns[job.num].return_value = JobStatus.COMPLETED, math.inf
        return [returns[job.num] for job in jobs]

    def task(self, numbered: list[tuple[int, list[str]]], state: dict[Any, Any]) -> list[JobReturn]:
        """One array task: its group planned again and trained on the node, as the local launcher does."""
        Singleton.set_state(state)
        return super().launch_jobs(numbered)
