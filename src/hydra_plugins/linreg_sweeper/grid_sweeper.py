"""`hydra/sweeper=grid`: Hydra's basic grid sweeper, made cheap per job and able to skip finished jobs.

- Hydra composes every job's config from the YAML files twice (once to check the batch, once to launch it),
  ~0.2 s each here: more than a small job trains. Jobs that choose the same config groups differ only in
  plain `key=value` overrides, so the groups are composed once and the values applied to a copy, as Hydra
  itself applies them after composing.
- With `resume=true` and the basic launcher, a job whose dir already holds a finished metrics.json of the
  same config is not launched at all; the callbacks still hear of it (progress line, results table), and
  job numbers stay as planned. A parallel launcher gets the whole batch (one pool, one array job), and its
  finished jobs return at once from `linreg.train.run`'s own check.
"""

import copy
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra._internal.config_loader_impl import ConfigLoaderImpl, get_overrides_dirname
from hydra._internal.core_plugins.basic_launcher import BasicLauncher
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_loader import ConfigLoader
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, RunMode, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)


class CachedConfigLoader(ConfigLoader):
    """Hydra's config loader with `load_sweep_config` composed once per choice of config groups."""

    def __init__(self, loader: ConfigLoader) -> None:
        self.loader = loader
        self.composed: dict[tuple[str, ...], DictConfig] = {}
        self.group_keys: dict[str, bool] = {}  # override key -> whether it names a config group
        self.parsed: dict[tuple[str, ...], list[Override]] = {}  # Hydra's parser takes ~5 ms a job

    def selects_config(self, override: Override) -> bool:
        """Whether an override changes the defaults list (a group choice, a hydra key): it needs a compose."""
        repository = getattr(self.loader, "repository", None)
        if repository is None or override.is_hydra_override() or override.package is not None:
            return True
        key = override.key_or_group
        if key not in self.group_keys:
            self.group_keys[key] = repository.group_exists(key)
        return self.group_keys[key]

    def split(self, sweep_overrides: Sequence[str]) -> tuple[list[Override], tuple[str, ...], list[Override]]:
        """A job's overrides parsed, and split into those that select configs and plain `key=value` ones."""
        key = tuple(sweep_overrides)
        if key not in self.parsed:
            self.parsed[key] = OverridesParser.create().parse_overrides(list(sweep_overrides))
        parsed = self.parsed[key]
        selecting = [self.selects_config(o) for o in parsed]
        groups = tuple(o.input_line for o, sel in zip(parsed, selecting) if sel)
        return parsed, groups, [o for o, sel in zip(parsed, selecting) if not sel]

    def load_sweep_config(self, master_config: DictConfig, sweep_overrides: list[str]) -> DictConfig:
        if master_config.hydra.searchpath:
            # Groups found through hydra.searchpath exist only in the repository Hydra builds per compose,
            # so they cannot be told from plain keys here: compose every job, as Hydra does.
            return self.loader.load_sweep_config(master_config, list(sweep_overrides))
        parsed, groups, values = self.split(sweep_overrides)
        if groups not in self.composed:
            self.composed[groups] = self.loader.load_sweep_config(master_config, list(groups))
        cfg = copy.deepcopy(self.composed[groups])
        OmegaConf.copy_cache(from_config=master_config, to_config=cfg)  # the same ${now:} as the master
        # What Hydra's compose does with the value overrides and with the job's override list.
        ConfigLoaderImpl._apply_overrides_to_config(values, cfg)
        task = [o for o in parsed if not o.is_hydra_override()]
        with open_dict(cfg.hydra):
            cfg.hydra.overrides.task = [o.input_line for o in task]
            dirname = cfg.hydra.job.config.override_dirname
            cfg.hydra.job.override_dirname = get_overrides_dirname(
                overrides=task,
                kv_sep=dirname.kv_sep,
                item_sep=dirname.item_sep,
                exclude_keys=dirname.exclude_keys,
            )
        return cfg

    # Everything else is Hydra's own.
    def load_configuration(
        self, config_name: str | None, overrides: list[str], run_mode: RunMode, **kwargs: Any
    ) -> DictConfig:
        return self.loader.load_configuration(config_name, overrides, run_mode, **kwargs)

    def get_search_path(self) -> Any:
        return self.loader.get_search_path()

    def get_sources(self) -> Any:
        return self.loader.get_sources()

    def list_groups(self, parent_name: str) -> list[str]:
        return self.loader.list_groups(parent_name)

    def get_group_options(self, *args: Any, **kwargs: Any) -> list[str]:
        return self.loader.get_group_options(*args, **kwargs)

    def compute_defaults_list(self, *args: Any, **kwargs: Any) -> Any:
        return self.loader.compute_defaults_list(*args, **kwargs)


class SkipFinished(Launcher):
    """Launches the jobs of a batch that have no finished result yet, under their planned job numbers."""

    def __init__(self, launcher: Launcher, hydra_context: HydraContext, master_config: DictConfig) -> None:
        self.launcher, self.hydra_context, self.master_config = launcher, hydra_context, master_config

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.launcher.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def finished(self, overrides: Sequence[str], num: int) -> JobReturn | None:
        """A stand-in return for a job that already finished with this config (resume=true), else None."""
        from linreg.config import override_key
        from linreg.train import finished_metrics

        if not self.master_config.get("resume") and not any(override_key(o) == "resume" for o in overrides):
            return None  # the common case, decided without composing the job's config
        cfg = self.hydra_context.config_loader.load_sweep_config(self.master_config, list(overrides))
        if not cfg.get("resume"):
            return None
        with open_dict(cfg.hydra):
            cfg.hydra.job.id, cfg.hydra.job.num = num, num  # as the launchers set them
            out = Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir)
            cfg.hydra.runtime.output_dir = str(out.resolve())
        metrics = finished_metrics(out, cfg)
        if metrics is None:
            return None
        task_cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
        ret = JobReturn(overrides=list(overrides), cfg=task_cfg, hydra_cfg=cfg, working_dir=str(out))
        mse = metrics["train_mse"]
        ret.status, ret.return_value = JobStatus.COMPLETED, math.inf if mse is None else mse  # as train.main
        # The callbacks hear of it as of any job (progress line); its files stay as the first run left them.
        self.hydra_context.callbacks.on_job_end(config=cfg, job_return=ret)
        return ret

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        if not isinstance(self.launcher, BasicLauncher):
            # A parallel launcher (joblib, submitit) runs a batch as one pool or one array job; split into
            # runs of unfinished jobs it would wait for each in turn. Launched whole, its finished jobs
            # return at once from run()'s own check.
            return self.launcher.launch(job_overrides, initial_job_idx=initial_job_idx)
        returns: list[JobReturn | None] = [self.finished(o, initial_job_idx + i) for i, o in enumerate(job_overrides)]
        skipped = sum(r is not None for r in returns)
        if skipped:
            log.info(f"resume: {skipped} of {len(job_overrides)} jobs already finished; launching the rest")
        # Each run of consecutive unfinished jobs is one launch, so the job numbers stay the planned ones.
        i = 0
        while i < len(returns):
            if returns[i] is not None:
                i += 1
                continue
            end = next((j for j in range(i, len(returns)) if returns[j] is not None), len(returns))
            returns[i:end] = self.launcher.launch(job_overrides[i:end], initial_job_idx=initial_job_idx + i)
            i = end
        return returns  # type: ignore[return-value]


class GridSweeper(BasicSweeper):
    """Hydra's basic sweeper with configs composed once per group choice and finished jobs skipped on resume."""

    def validate_batch_is_legal(self, batch: Sequence[Sequence[str]]) -> None:
        """Compose one job for each choice of groups and set of keys: what decides whether a config composes."""
        # Hydra composes every job here, before launching any. Whether a job's config composes depends on
        # the configs its groups select, the keys it sets and the kinds of values (a `+key=` on an existing
        # key is refused unless it merges a list or dict): one job per such kind is the same check. Bad
        # values are linreg.config's to refuse, per job.
        assert self.hydra_context is not None and self.config is not None
        loader = self.hydra_context.config_loader
        assert isinstance(loader, CachedConfigLoader)
        kinds: dict[tuple[Any, ...], Sequence[str]] = {}
        for overrides in batch:
            _, groups, values = loader.split(overrides)
            shape = tuple(sorted((o.input_line.partition("=")[0], type(o.value()).__name__) for o in values))
            kinds.setdefault((groups, shape), overrides)
        super().validate_batch_is_legal(list(kinds.values()))

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        cached = HydraContext(
            config_loader=CachedConfigLoader(hydra_context.config_loader), callbacks=hydra_context.callbacks
        )
        super().setup(hydra_context=cached, task_function=task_function, config=config)
        assert self.launcher is not None
        self.launcher = SkipFinished(self.launcher, cached, config)
