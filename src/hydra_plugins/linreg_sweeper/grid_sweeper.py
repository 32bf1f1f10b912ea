"""`hydra/sweeper=grid`: Hydra's basic sweeper (same jobs, order, numbers, `params`, `max_batch_size`), each job's
config composed once per choice of config groups, then a copy with its plain `key=value` overrides applied as Hydra
applies them (`OmegaConf.update(cfg, key, value, merge=True)`); a value that does not apply is composed by Hydra."""

import copy
import itertools
import re
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.config_loader import ConfigLoader
from hydra.core.object_type import ObjectType
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn
from hydra.errors import HydraException
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from linreg.config import ConfigError, is_int, override_key, refusing
from linreg.record import write_atomic
from linreg.results import announce, launch_failed

Plain = list[Override]  # a job's plain `key=value` overrides
KEPT = 32  # composed configs kept: a grid varies its first (group) keys slowest


def grid_jobs(overrides: Sequence[Override]) -> list[list[str]]:
    """Every job's overrides, in the order of Hydra's basic sweeper (a later value of a key takes its place)."""
    choices: dict[str, list[str]] = {}
    for o in overrides:
        key, typed = o.get_key_element(), str(o.input_line).partition("=")[2]
        if not o.is_sweep_override():
            choices[key] = [f"{key}={o.get_value_element_as_str()}"]
        elif o.is_discrete_sweep():
            try:
                choices[key] = [f"{key}={value}" for value in o.sweep_string_iterator()]
            except (ValueError, HydraException) as err:  # a range's step of 0 (Python's and Hydra's float range)
                raise ConfigError(key, typed, str(err)) from None
            if not choices[key]:
                raise ConfigError(key, typed, "matches nothing: the grid has no jobs")
        else:
            why = "a grid takes a,b,c, range() or glob(); interval() needs hydra/sweeper=optuna"
            raise ConfigError(override_key(key), typed, why)
    return [list(job) for job in itertools.product(*choices.values())]


def is_plain(o: Override) -> bool:
    """A `key=value` that Hydra applies after composing (no `hydra.` key, package, `+`, `++`, `~` or mapping)."""
    # A mapping merges into what is there: set on a config a job of its kind changed before, it would keep its keys.
    special = o.is_hydra_override() or o.package is not None or o.is_delete() or o.is_add() or o.is_force_add()
    return not special and not isinstance(o.value(), dict)


class Proxy:
    """Stands in for Hydra's `inner` object: what a subclass does not define is the inner object's."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        if name == "inner":  # unpickling (joblib, submitit) looks attributes up before __dict__ is filled
            raise AttributeError(name)
        return getattr(self.inner, name)


class CachedConfigLoader(Proxy):
    """Hydra's config loader whose `load_sweep_config` composes once per choice of config groups."""

    def __init__(self, loader: ConfigLoader) -> None:
        super().__init__(loader)
        self.composed: OrderedDict[tuple[str, ...], DictConfig] = OrderedDict()
        self.options: dict[str, list[str]] = {}  # config group path -> its options ("" for the top level)
        self.parsed: dict[str, Override] = {}  # override line -> parsed: a grid's lines repeat from job to job

    def is_group(self, key: str, master: DictConfig) -> bool:
        """Whether `key` names a config group, with the search path Hydra uses for this config."""
        parent, _, name = key.rpartition("/")
        if parent not in self.options:  # each listing costs a scan of the search path
            typed: Any = OmegaConf.to_container(master.hydra.overrides.hydra, resolve=False)  # as typed
            options = self.inner.get_group_options(parent, ObjectType.GROUP, master.hydra.job.config_name, typed)
            self.options[parent] = options
        return name in self.options[parent]

    def split(self, master: DictConfig, overrides: Sequence[str]) -> tuple[list[Override], tuple[str, ...], Plain]:
        """A job's overrides parsed, the lines Hydra must compose, and the plain values applied to a copy."""
        new = [line for line in dict.fromkeys(overrides) if line not in self.parsed]
        self.parsed.update(zip(new, OverridesParser.create().parse_overrides(new)))
        parsed = [self.parsed[line] for line in overrides]
        plain = [o for o in parsed if is_plain(o) and not self.is_group(o.key_or_group, master)]
        return parsed, tuple(str(o.input_line) for o in parsed if o not in plain), plain

    def load_sweep_config(self, master_config: DictConfig, sweep_overrides: list[str]) -> DictConfig:
        parsed, lines, plain = self.split(master_config, sweep_overrides)
        if lines not in self.composed:
            self.composed[lines] = self.inner.load_sweep_config(master_config, list(lines))
            if len(self.composed) > KEPT:
                self.composed.popitem(last=False)
        self.composed.move_to_end(lines)
        cfg = copy.deepcopy(self.composed[lines])
        OmegaConf.copy_cache(from_config=master_config, to_config=cfg)  # the same ${now:} as the master
        if not apply(cfg, parsed, plain):
            return self.inner.load_sweep_config(master_config, sweep_overrides)  # Hydra's own error (or result)
        return cfg


def apply(cfg: DictConfig, parsed: list[Override], plain: Plain) -> bool:
    """A job's plain values and its overrides' record set on a config of its kind, in place; False if one fails."""
    try:
        for o in plain:
            OmegaConf.update(cfg, o.key_or_group, o.value(), merge=True)
    except Exception:
        return False
    task = [o for o in parsed if not o.is_hydra_override()]
    options = cfg.hydra.job.config.override_dirname  # as Hydra 1.3 records them
    dirname = sorted(str(o.input_line) for o in task if o.key_or_group not in options.exclude_keys)
    # Existing keys (Hydra's schema has them): set without `open_dict`, whose flag change walks the whole subtree.
    lines, node = [o.input_line for o in task], cfg.hydra.overrides.task
    if len(node) != len(lines):
        cfg.hydra.overrides.task = lines
    else:  # a job's changed lines only: a new list costs ~10x more
        for i, (old, new) in enumerate(zip(OmegaConf.to_container(node), lines)):  # as typed, unresolved
            if old != new:
                node[i] = new
    cfg.hydra.job.override_dirname = re.sub("=", options.kv_sep, options.item_sep.join(dirname))
    return True


class LightReturns(Proxy):
    """Hydra's callbacks, after whose `on_job_end` a job's return lets go of the configs a whole sweep would keep."""

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        self.inner.on_job_end(config=config, job_return=job_return, **kwargs)
        job_return.cfg = job_return.hydra_cfg = None


class GridSweeper(Sweeper):
    """Hydra's basic grid sweeper with cached composition; see the module docstring."""

    def __init__(self, max_batch_size: int | None = None, params: dict[str, str] | None = None) -> None:
        self.max_batch_size = max_batch_size
        self.params = dict(params or {})

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.loader = CachedConfigLoader(hydra_context.config_loader)
        self.config = config
        context = HydraContext(config_loader=self.loader, callbacks=LightReturns(hydra_context.callbacks))
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> list[Sequence[JobReturn]]:
        """Run the grid batch by batch; a bad sweep is refused in one line before any job runs."""
        with refusing():
            jobs = self.plan(arguments)
        size = self.max_batch_size or len(jobs)
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        try:  # atomically, as every file the project writes
            write_atomic(sweep_dir / "multirun.yaml", OmegaConf.to_yaml(self.config).encode())
        except OSError as err:
            raise SystemExit(f"error: cannot write {sweep_dir / 'multirun.yaml'}: {err.strerror or err}") from None
        announce(sweep_dir, len(jobs))
        returns = []
        for first in range(0, len(jobs), size):
            try:
                results = self.launcher.launch(jobs[first : first + size], initial_job_idx=first)
            except Exception as err:  # outside a job: a full disk, a dead worker, a setting the launcher refuses
                launch_failed(sweep_dir, err)
            for result in results:
                _ = result.return_value  # re-raises a failed job's error, as Hydra's sweeper does
            returns.append(results)
        return returns

    def plan(self, arguments: list[str]) -> list[list[str]]:
        """Every job's overrides, once one job per kind has composed: if these compose, every job does."""
        if self.max_batch_size is not None and not (is_int(self.max_batch_size) and self.max_batch_size > 0):
            raise ConfigError("hydra.sweeper.max_batch_size", self.max_batch_size, "must be a positive integer or null")
        lines = [f"{key}={value}" for key, value in self.params.items()] + list(arguments)
        overrides = OverridesParser.create(config_loader=self.loader).parse_overrides(lines)  # glob() lists groups
        jobs = grid_jobs(overrides)
        # Whether a job composes depends on what Hydra composes and on the keys and kinds of its plain values.
        kinds: dict[Any, list[str]] = {}
        for job in jobs:
            _, composed, plain = self.loader.split(self.config, job)
            kinds.setdefault((composed, tuple((o.key_or_group, type(o.value())) for o in plain)), job)
        for job in kinds.values():
            self.loader.load_sweep_config(self.config, job)
        return jobs
