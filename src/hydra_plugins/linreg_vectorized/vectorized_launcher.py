"""`hydra/launcher=vectorized`: the jobs of a sweep that differ only in numbers train as one stacked model.

Jobs with the same `linreg.stacked.group_key` train in groups within a memory budget, each in one `Trainer.fit`;
what Hydra's `run_job` does for a job is done for a member with what its kind shares made once. Other jobs run as
the basic launcher runs them. torch and Lightning are imported in `launch`, not with the plugin.
"""

import copy
import functools
import json
import logging
import math
import os
import re
import resource
import shutil
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.types import Override
from hydra.core.utils import JobReturn, JobRuntime, JobStatus, configure_log, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from hydra_plugins.linreg_sweeper.grid_sweeper import CachedConfigLoader, apply
from linreg import fastpath
from linreg.config import MODELS, ConfigError, check, plain
from linreg.record import RunDirBusy, RunDirLock, RunRecord, finished, refuse_other_runs, write_atomic

log = logging.getLogger(__name__)
job_log = logging.getLogger("linreg.train")  # a job's own lines, as `linreg.train.main` writes them
FILES_KEPT_FREE = 256  # open files left for torch, logs and TensorBoard beside a group's run-dir locks
BUDGET_SHARE = 4  # the default budget: 1/4 of the memory available at launch
PLAIN = re.compile(r"[A-Za-z_/][\w./=,+\-]*")  # strings YAML writes as they are, unless they read as another type
IMPLICIT = functools.partial(yaml.Dumper.resolve, yaml.Dumper, yaml.ScalarNode, implicit=(True, False))
SLOT = "linreg-slot-"  # a job's own value in its kind's `.hydra/*.yaml` text, until filled in
PER_JOB = ("overrides.task", "job.id", "job.num", "job.override_dirname", "runtime.output_dir")  # hydra.* by job


@dataclass
class Job:
    """One job: its number, its overrides parsed, its dir, and how it runs."""

    num: int
    kind: tuple[Any, ...]  # the composed config it shares with jobs of its kind
    parsed: list[Override]
    plain: list[Override]  # the values set on its kind's config
    out: Path | None = None  # its dir, once planned
    config: DictConfig | None = None  # its own copy of its Hydra config, when it runs as the basic launcher runs it
    cfg: dict[str, Any] | None = None  # its own config, resolved (plain data), when it trains in a group
    key: str | None = None  # its group
    refused: RunDirBusy | None = None  # its dir is another run's


class VectorizedLauncher(Launcher):
    """Trains a batch of jobs as stacked groups; every job keeps its own dir, record, logs and callbacks."""

    def __init__(self, memory_budget_gb: float | None = None, max_group_size: int | None = None) -> None:
        self.memory_budget_gb, self.max_group_size = memory_budget_gb, max_group_size

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        return self.launch_jobs([(initial_job_idx + i, list(o)) for i, o in enumerate(job_overrides)])

    def launch_jobs(self, numbered: list[tuple[int, list[str]]]) -> list[JobReturn]:
        """Plan the numbered jobs, run those that do not stack, and train the groups, here."""
        with fastpath.importing():  # before the jobs' configs: those are collected when done
            from linreg.stacked import train_group
        jobs, groups, returns = self.plan_all(numbered)
        for group in groups:
            with ExitStack() as locks:
                members = [job for job in group if self.lock(job, locks, returns)]
                try:
                    report = self.report(members)  # with linreg's Optuna sweeper: to each member's trial
                    results: list[Any] = train_group([job.cfg for job in members], report) if members else []
                except Exception as err:  # the group's fit failed: every member is a failed row
                    log.error("stacked fit failed: %s: %s", type(err).__name__, err)
                    results = [err] * len(members)
                for i, (job, result) in enumerate(zip(members, results)):
                    returns[job.num] = self.finish(job, result, first=i == 0)
                    job.cfg = None  # its record is written: what a long sweep holds per job is its return
            configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        HydraConfig.instance().cfg = self.sweep_config
        return [returns[job.num] for job in jobs]

    def plan_all(self, numbered: list[tuple[int, list[str]]]) -> tuple[list[Job], list[list[Job]], dict[int, Any]]:
        """Plan and group the jobs, and run those that do not stack as the basic launcher runs them (their returns)."""
        from linreg.results import read_plan

        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)  # no banners a group
        loader = self.hydra_context.config_loader  # the grid sweeper's (duck-typed: Hydra may load a plugin twice)
        self.loader = loader if hasattr(loader, "split") else CachedConfigLoader(loader)
        self.kinds: dict[tuple[Any, ...], DictConfig] = {}  # one composed config per kind of job
        self.held: dict[tuple[Any, ...], list[Override]] = {}  # the values a kind's config holds
        self.bases: dict[tuple[Any, ...], Any] = {}  # a kind's config less `hydra` and its sweep dir, if without `${`
        self.templates: dict[tuple[Any, ...], Any] = {}  # `.hydra/*.yaml` text of a kind, its jobs' values left out
        self.checked: set[tuple[Any, ...]] = set()  # kinds (and model classes) whose keys passed `check`
        self.swept = read_plan(Path(str(self.config.hydra.sweep.dir)))["swept"]  # what names a job's TensorBoard run
        self.sweep_config = HydraConfig.instance().cfg
        jobs = [self.plan(num, overrides) for num, overrides in numbered]
        groups = self.groups([job for job in jobs if job.key is not None])
        log.debug("%d jobs, %d stacked in %d groups", len(jobs), sum(map(len, groups)), len(groups))
        returns = {  # a job that does not stack: refused, or run alone
            job.num: self.alone(job) if job.refused is None else self.refuse(job, job.refused)
            for job in jobs
            if job.key is None
        }
        HydraConfig.instance().cfg = self.sweep_config
        return jobs, groups, returns

    def compose(self, job: Job) -> DictConfig:
        """The job's Hydra config: its kind's, with its values set in place (valid until the next job's)."""
        config = self.kinds.get(job.kind)
        if config is None:  # its kind's lines: its overrides less its values
            config = self.kinds[job.kind] = self.loader.load_sweep_config(self.config, list(job.kind[0]))
            self.held.pop(job.kind, None)
        if not apply(config, job.parsed, self.changed(job)):
            del self.kinds[job.kind], self.held[job.kind]  # a value that does not apply: Hydra composes (and says why)
            config = self.loader.inner.load_sweep_config(self.config, [str(o.input_line) for o in job.parsed])
        config.hydra.job.id, config.hydra.job.num = job.num, job.num  # keys Hydra's schema has: no `open_dict`
        if job.out is None:  # resolved once (`${hydra.job.num}`)
            job.out = Path(str(config.hydra.sweep.dir), str(config.hydra.sweep.subdir)).absolute()
        config.hydra.runtime.output_dir = str(job.out)
        HydraConfig.instance().cfg = config  # for its `${hydra:...}` values, as `run_job` sets it
        return config

    def changed(self, job: Job) -> list[Override]:
        """The job's values its kind's config does not hold yet (then it holds them all, or is composed anew)."""
        held = self.held.get(job.kind, ())
        self.held[job.kind] = job.plain
        return [o for o in job.plain if o not in held]

    def resolved(self, job: Job) -> dict[str, Any]:
        """The job's config less `hydra`, resolved; composed only where its kind's values or dir interpolate."""
        # Else it is its kind's with the job's values as the kind's config takes them (typed by the schema).
        config, base = self.kinds.get(job.kind), self.bases.get(job.kind)
        if config is not None and base is not None:
            data = copy.deepcopy(base[0])
            try:
                for o in self.changed(job):
                    OmegaConf.update(config, o.key_or_group, o.value(), merge=True)
                for o in job.plain:
                    *parents, leaf = o.key_or_group.split(".")
                    functools.reduce(dict.__getitem__, parents, data)[leaf] = value = raw(config, o.key_or_group)
                    if "${" in json.dumps(value, default=str):
                        raise ValueError("interpolates")
            except Exception:  # a value that does not apply (Hydra says why), or one that interpolates: composed
                self.held.pop(job.kind)  # it may hold some of them
                return plain(self.compose(job))
            job.out = Path(base[1], str(job.num)).absolute()
            return data
        config = self.compose(job)
        if job.kind not in self.bases:
            data = {k: raw(config, k) for k in config if k != "hydra"}
            sweep_dir = re.sub(r"\$\{now:[^}]*\}", "", raw(config, "hydra.sweep.dir"))  # `now`: the sweep's, cached
            free = "${" not in json.dumps(data, default=str) + sweep_dir
            free &= raw(config, "hydra.sweep.subdir") == "${hydra.job.num}"
            self.bases[job.kind] = (data, str(config.hydra.sweep.dir)) if free else None
        return plain(config)

    def plan(self, num: int, overrides: list[str]) -> Job:
        """Compose the job's config as the basic launcher does, and decide how it runs."""
        from linreg.stacked import group_key

        parsed, lines, values = self.loader.split(self.config, overrides)
        kind = (lines, tuple(o.key_or_group for o in values))
        job = Job(num, kind, parsed, values)
        try:
            cfg = self.resolved(job)  # plain data: it trains outside Hydra
            model = cfg.get("model")
            schema = (kind, model.get("_target_") if isinstance(model, dict) else None)  # a kind's keys, checked once
            check(cfg, schema=schema not in self.checked)
            self.checked.add(schema)
        except (ConfigError, OmegaConfBaseException):
            cfg = None  # its single run records why
        if cfg is None or cfg["model"]["_target_"] not in MODELS or (cfg["resume"] and finished(job.out, cfg)):
            job.config = copy.deepcopy(self.compose(job))  # a model class of one's own, or a finished job: alone
            return job
        try:
            refuse_other_runs(job.out, cfg)
            job.cfg, job.key = cfg, group_key(cfg)
        except RunDirBusy as err:
            job.refused, job.config = err, copy.deepcopy(self.compose(job))
        return job

    def report(self, members: list[Job]) -> Any:
        """With linreg's Optuna sweeper: `report(j, epoch, mse)` to member j's trial, as its ReportToStudy would."""
        if "pruner" not in self.config.hydra.sweeper or not members:
            return None
        from linreg.callbacks import ReportToStudy, prune

        study = ReportToStudy(self.compose(members[0]).hydra)  # the study and pruner a member's single run opens
        return lambda j, epoch, mse: prune(study.study, study.storage, members[j].num, epoch, mse)

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

    def budget(self, cfg: dict[str, Any]) -> float:
        """Bytes one group's data may take: the setting, or a share of the free host (and GPU) memory."""
        if self.memory_budget_gb is not None:
            return float(self.memory_budget_gb) * 2**30
        import psutil
        import torch

        free = [psutil.virtual_memory().available]
        if cfg["trainer"]["accelerator"] in ("gpu", "cuda", "auto") and torch.cuda.is_available():
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

    def alone(self, job: Job) -> JobReturn:
        """Hydra's `run_job`, as the basic launcher calls it: the job's dir, .hydra/, log and callbacks."""
        ret = run_job(self.task_function, job.config, "hydra.sweep.dir", "hydra.sweep.subdir", self.hydra_context)
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        return ret

    def finish(self, job: Job, result: Any, first: bool) -> JobReturn:
        """What `run_job` does for a job (its .hydra/, log and callbacks) around writing the member's results."""
        config = self.compose(job)
        self.job_logging(job, config, first)
        (job.out / ".hydra").mkdir(exist_ok=True)  # as `linreg.record.write_job_files` (hydra.output_subdir: null)
        for name, text in (
            *zip(("config.yaml", "hydra.yaml"), self.texts(job, config)),
            ("overrides.yaml", fastpath.to_yaml(OmegaConf.to_container(config.hydra.overrides.task))),
        ):
            write_atomic(job.out / ".hydra" / name, text.encode())
        return self.around(config, lambda: self.write(job, config, result))

    def around(self, config: DictConfig, task: Any) -> JobReturn:
        """The job's callbacks around its task, and its return, as `run_job` gives them."""
        callbacks = self.hydra_context.callbacks
        callbacks.on_job_start(config=config, task_function=self.task_function)
        ret = JobReturn(overrides=list(config.hydra.overrides.task), working_dir=os.getcwd())
        ret.task_name, ret.status = JobRuntime.instance().get("name"), JobStatus.COMPLETED
        ret.return_value = task()
        for handler in logging.getLogger().handlers:
            handler.flush()
        callbacks.on_job_end(config=config, job_return=ret)
        return ret

    def texts(self, job: Job, config: DictConfig) -> tuple[str, str]:
        """`.hydra/config.yaml` and `hydra.yaml` as Hydra writes them: its kind's text, the job's values dumped in."""
        keys = [o.key_or_group for o in job.plain] + [f"hydra.{k}" for k in PER_JOB]
        if job.kind not in self.templates:  # checked once against the whole dump, else the kind takes the slow path
            made, texts = template(config, keys), whole(config)
            self.templates[job.kind] = made if made and fill(made, config, keys) == texts else None
            return texts
        made = self.templates[job.kind]
        return whole(config) if made is None else fill(made, config, keys)

    def job_logging(self, job: Job, config: DictConfig, first: bool) -> None:
        """The job's log: Hydra's `job_logging` set up for a group's first member, its log files moved on after."""
        if first:
            configure_log(config.hydra.job_logging, config.hydra.verbose)
        else:
            root = logging.getLogger()
            for old in list(root.handlers):
                if isinstance(old, logging.FileHandler) and Path(old.baseFilename).parent == self.logged_in:
                    new = logging.FileHandler(job.out / Path(old.baseFilename).name, old.mode, old.encoding)
                    new.setLevel(old.level)
                    new.setFormatter(old.formatter)
                    root.removeHandler(old)
                    old.close()
                    root.addHandler(new)
        self.logged_in = job.out

    def write(self, job: Job, config: DictConfig, result: Any) -> float:
        """The member's logs and metrics.json, or the failed record of why it did not train; its train MSE."""
        from linreg.dashboard import run_label

        try:
            if isinstance(result, Exception):
                raise result
            drop_checkpoints(job.out)  # trained from scratch: an earlier attempt's checkpoint is not this model
            # The name its single run's TensorBoard run has (linreg.train.main): the swept keys' values.
            result.write(job.out, run_label(list(config.hydra.overrides.task), self.swept))
        except Exception as err:
            failed = RunRecord.failed(job.cfg, err)
            failed.write(job.out)
            job_log.error("job failed: %s", failed.error)
            return math.inf
        mse = result.record.train_mse
        return math.inf if mse is None else mse

    def refuse(self, job: Job, err: RunDirBusy) -> JobReturn:
        """A job whose dir holds another run: its error line and callbacks, and nothing written into that dir."""
        config = job.config or self.compose(job)  # its output_dir set: where its row is looked for
        HydraConfig.instance().cfg = config  # as `run_job` leaves it
        return self.around(config, lambda: job_log.error("job refused: %s", err) or math.inf)


def drop_checkpoints(out: Path) -> None:
    """Remove `out/checkpoints` (a stacked member writes none), never following a link."""
    ckpts = out / "checkpoints"
    if ckpts.is_dir() and not ckpts.is_symlink():
        shutil.rmtree(ckpts)  # unlinks the links inside, never their targets
    elif os.path.lexists(ckpts):
        ckpts.unlink()


def whole(config: DictConfig) -> tuple[str, str]:
    """`.hydra/config.yaml` and `hydra.yaml` dumped whole, as Hydra's `run_job` dumps them."""
    return (
        OmegaConf.to_yaml(OmegaConf.masked_copy(config, [k for k in config if k != "hydra"])),
        OmegaConf.to_yaml(OmegaConf.masked_copy(config, "hydra")),
    )


def template(config: DictConfig, keys: list[str]) -> tuple[list[list[str | int]], dict[int, str]] | None:
    """Both files' text with key i's entry as i, and each entry's text before its value; None if one is no entry."""
    # YAML's block mappings write an entry the same whatever its siblings: each job's entries fill the gaps.
    data = OmegaConf.to_container(config, resolve=False, enum_to_str=True)
    for i, key in enumerate(keys):
        *parents, leaf = key.split(".")
        node: Any = data
        for name in parents:
            node = node.get(name) if isinstance(node, dict) else None
        if not isinstance(node, dict) or leaf not in node:
            return None
        node[leaf] = f"{SLOT}{i}"  # a plain scalar: dumped as it is, on its key's line
    hydra = {"hydra": data.pop("hydra")}  # type: ignore[union-attr]
    pieces: list[list[str | int]] = []
    prefixes: dict[int, str] = {}
    for text in (fastpath.to_yaml(data), fastpath.to_yaml(hydra)):
        parts = re.split(rf"^([^\n]*?){SLOT}(\d+)\n", text, flags=re.M)  # text, (prefix, i, text)...
        prefixes.update((int(i), prefix) for prefix, i in zip(parts[1::3], parts[2::3]))
        pieces.append([p if n % 3 == 0 else int(p) for n, p in enumerate(parts) if n % 3 != 1])
    return pieces, prefixes


def fill(made: tuple[list[list[str | int]], dict[int, str]], config: DictConfig, keys: list[str]) -> tuple[str, str]:
    """The template's texts with each key's entry as the job's config has it (unresolved)."""
    pieces, prefixes = made
    entries = [entry(config, key, prefixes[i]) for i, key in enumerate(keys)]
    return tuple("".join(entries[p] if isinstance(p, int) else p for p in text) for text in pieces)


def raw(config: DictConfig, key: str) -> Any:
    """The value at the dotted key as the config holds it, unresolved (a container as plain data)."""
    *parents, leaf = key.split(".")
    node = functools.reduce(DictConfig.__getitem__, parents, config)
    [(_, value)] = node.items_ex(resolve=False, keys=[leaf])
    return OmegaConf.to_container(value, enum_to_str=True) if OmegaConf.is_config(value) else value


def entry(config: DictConfig, key: str, prefix: str) -> str:
    """The key's entry in its file (its line, or lines), its value as the config has it, unresolved."""
    value = raw(config, key)
    if (text := plain_text(value)) is not None:
        return f"{prefix}{text}\n"
    for name in reversed(key.split(".")):
        value = {name: value}
    return fastpath.to_yaml(value).split("\n", key.count("."))[-1]  # less its parents' lines


def plain_text(value: Any) -> str | None:
    """How YAML writes an int, or one of Hydra's per-job strings (a job id, dir or override); else None."""
    if type(value) is int:
        return str(value)
    if type(value) is str and value.isascii() and value.isdigit():  # a job id: quoted, as OmegaConf quotes numbers
        return f"'{value}'"
    if type(value) is str and ("/" in value or "=" in value) and PLAIN.fullmatch(value):
        return value if IMPLICIT(value) == "tag:yaml.org,2002:str" else None
    return None
