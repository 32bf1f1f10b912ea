"""A config loader that composes a sweep job's config once per choice of config groups, on public Hydra APIs.

Hydra composes every job's config from the YAML files (the defaults list, every file, every merge). Jobs that
choose the same config groups differ only in plain `key=value` overrides, which Hydra applies to the composed
config with `OmegaConf.update(cfg, key, value, merge=True)`: here the rest is composed once by Hydra's own
loader, and each job gets a copy with its plain values applied the same way. Anything else (a group choice, a
`hydra.` key, `+`, `++`, `~`, a package, a list extension) is part of what Hydra composes. If applying a plain
value fails, the job is composed by Hydra instead, so its error (or result) is Hydra's own.
"""

import copy
import re
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from hydra.core.config_loader import ConfigLoader
from hydra.core.object_type import ObjectType
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

COMPOSED_KEPT = 32  # composed configs kept: a grid varies its first (group) keys slowest


def is_plain(override: Override) -> bool:
    """A `key=value` on a config key that Hydra applies after composing (before the group check)."""
    extends = getattr(override, "is_list_extend", None)  # hydra-core 1.4's `key=append(...)`
    return not (
        override.is_hydra_override()
        or override.package is not None
        or override.is_delete()
        or override.is_add()
        or override.is_force_add()
        or (extends is not None and extends())
    )


def overrides_dirname(task: Sequence[Override], options: DictConfig) -> str:
    """`hydra.job.override_dirname` as Hydra 1.3 writes it: sorted lines, keys in `exclude_keys` left out."""
    lines = sorted(str(o.input_line) for o in task if o.key_or_group not in options.exclude_keys)
    return re.sub("=", options.kv_sep, options.item_sep.join(lines))


class CachedConfigLoader(ConfigLoader):
    """Hydra's config loader whose `load_sweep_config` composes once per choice of config groups."""

    def __init__(self, loader: ConfigLoader) -> None:
        self.loader = loader
        self.composed: OrderedDict[tuple[str, ...], DictConfig] = OrderedDict()
        self.groups: dict[str, bool] = {}  # override key -> whether it names a config group

    def is_group(self, key: str, master: DictConfig) -> bool:
        """Whether `key` names a config group, with the search path Hydra uses for this config."""
        if key not in self.groups:
            parent, _, name = key.rpartition("/")
            options = self.loader.get_group_options(
                parent,
                results_filter=ObjectType.GROUP,
                config_name=master.hydra.job.config_name,
                overrides=OmegaConf.to_container(master.hydra.overrides.hydra, resolve=False),  # as typed
            )
            self.groups[key] = name in options
        return self.groups[key]

    def split(
        self, master: DictConfig, overrides: Sequence[str]
    ) -> tuple[list[Override], tuple[str, ...], list[Override]]:
        """A job's overrides parsed, the lines Hydra must compose, and the plain values applied to a copy."""
        parsed = OverridesParser.create().parse_overrides(list(overrides))
        plain = [is_plain(o) and not self.is_group(o.key_or_group, master) for o in parsed]
        composed = tuple(str(o.input_line) for o, p in zip(parsed, plain) if not p)
        return parsed, composed, [o for o, p in zip(parsed, plain) if p]

    def compose(self, master: DictConfig, lines: tuple[str, ...]) -> DictConfig:
        """Hydra's composition of these lines, kept for the next job that chooses the same."""
        if lines in self.composed:
            self.composed.move_to_end(lines)
        else:
            self.composed[lines] = self.loader.load_sweep_config(master, list(lines))
            if len(self.composed) > COMPOSED_KEPT:
                self.composed.popitem(last=False)
        return self.composed[lines]

    def load_sweep_config(self, master_config: DictConfig, sweep_overrides: list[str]) -> DictConfig:
        parsed, lines, values = self.split(master_config, sweep_overrides)
        cfg = copy.deepcopy(self.compose(master_config, lines))
        OmegaConf.copy_cache(from_config=master_config, to_config=cfg)  # the same ${now:} as the master
        try:
            for override in values:
                OmegaConf.update(cfg, override.key_or_group, override.value(), merge=True)
        except Exception:
            return self.loader.load_sweep_config(master_config, list(sweep_overrides))
        # What Hydra's compose records of the job's overrides.
        task = [o for o in parsed if not o.is_hydra_override()]
        with open_dict(cfg.hydra):
            cfg.hydra.overrides.task = [o.input_line for o in task]
            if not OmegaConf.is_interpolation(cfg.hydra.job, "override_dirname"):  # 1.4 resolves it from the task
                cfg.hydra.job.override_dirname = overrides_dirname(task, cfg.hydra.job.config.override_dirname)
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
