"""The command line, checked before Hydra composes it: a mistyped key or option is one line and exit 2.

Hydra refuses these itself, but in a paragraph and with exit 1, and a sweep has by then written its first
files. Here the overrides are parsed and composed once with Hydra's compose API (sweeps at their first value),
every value of a config group is looked up among its options, and Hydra's error becomes one line that names
the key and what is allowed. Hydra's own flags (`--help`, `--cfg`, ...) and HYDRA_FULL_ERROR=1 go to Hydra.
"""

import sys
from collections.abc import Callable

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from linreg.config import ConfigError, full_error, override_key, refuse, unknown_key

RUN_FLAGS = ("-m", "--multirun", "-r", "--run")  # flags that leave the overrides for Hydra to compose


def first_line(err: BaseException) -> str:
    """The first line of an error's message."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def parse(lines: list[str]) -> list[Override]:
    """The overrides, parsed as Hydra will; a line Hydra cannot read is refused naming its key."""
    parser = OverridesParser.create()
    overrides = []
    for line in lines:
        try:
            overrides += parser.parse_overrides([line])
        except HydraException as err:
            why = f"Hydra cannot read this value ({first_line(err)}); see hydra.cc's override grammar"
            raise ConfigError(override_key(line), line.partition("=")[2], why) from None
    return overrides


def values(override: Override) -> list[str]:
    """The values an override gives its key: each of a list sweep's, none for a range of numbers or a glob."""
    if override.is_discrete_sweep():
        return [str(v) for v in override.sweep_string_iterator()]
    if override.is_sweep_override() or override.is_delete():
        return []
    return [override.get_value_element_as_str()]


def check_groups(overrides: list[Override], config_name: str, lines: list[str]) -> None:
    """Every value given to a config group (`model=…`, `hydra/launcher=…`) is one of its options."""
    loader = GlobalHydra.instance().config_loader()
    for override in overrides:
        group = override.get_key_element().lstrip("+~")
        if "." in group or override.package is not None:
            continue
        options = loader.get_group_options(group)
        if not options:
            continue  # not a group
        unknown = [v for v in values(override) if v not in options and v != "null"]
        if unknown:  # `hydra.searchpath=[…]` may add options: look again on the search path the command line sets
            paths = [line for line in lines if line.startswith("hydra.")]
            options = loader.get_group_options(group, config_name=config_name, overrides=paths)
            unknown = [v for v in unknown if v not in options]
        if unknown:
            raise ConfigError(group, unknown[0], f"one of {', '.join(options)}")


def one_job(overrides: list[Override], multirun: bool) -> list[str]:
    """The lines of the sweep's first job (the overrides themselves without -m, where a sweep is refused)."""
    lines = []
    for override in overrides:
        line = override.input_line or ""
        if override.is_sweep_override():
            key = line.partition("=")[0]
            if not multirun:
                why = "is a sweep: add -m (--multirun) for a job per value, or write a list as [a,b]"
                raise ConfigError(override_key(line), line.partition("=")[2], why)
            first = values(override)
            if not first:
                continue  # a range or glob: the sweeper checks it
            line = f"{key}={first[0]}"
        lines.append(line)
    return lines


def known_keys(config_name: str, lines: list[str], key: str) -> list[str]:
    """The keys beside `key` in the config composed without the lines that set it."""
    parent = key.rpartition(".")[0]
    others = [line for line in lines if override_key(line) != key]
    try:
        cfg = compose(config_name, overrides=others, return_hydra_config=True)
    except (HydraException, OmegaConfBaseException):
        return []
    node = OmegaConf.select(cfg, parent) if parent else cfg
    return [str(k) for k in node] if isinstance(node, DictConfig) else []


def compose_error(err: Exception, config_name: str, lines: list[str]) -> ConfigError:
    """Hydra's composition error as one line naming the key."""
    cause = err.__cause__
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and cause.full_key:  # `trainer.max_epoch=5`
        key = str(cause.full_key)
        value = next((line.partition("=")[2] for line in lines if override_key(line) == key), None)
        return unknown_key(key, value, known_keys(config_name, lines, key))
    line = next((line for line in lines if f"'{override_key(line)}'" in str(err)), " ".join(lines))
    key, value = override_key(line), line.partition("=")[2]
    if "Could not append to config" in str(err):  # `+seed=5`
        return ConfigError(key, value, f"is in the config already: set it with {key}={value} (+ adds a new key)")
    return ConfigError(key, value, first_line(err))


def check_command_line(args: list[str], config_dir: str, config_name: str) -> None:
    """Raise ConfigError for a command line that Hydra would refuse when composing it."""
    if not args or full_error() or any(a.startswith("-") and a not in RUN_FLAGS for a in args):
        return
    multirun = any(a in ("-m", "--multirun") for a in args)
    overrides = parse([a for a in args if a not in RUN_FLAGS])
    with initialize_config_dir(config_dir=config_dir, version_base="1.3", job_name=config_name):
        lines = one_job(overrides, multirun)
        check_groups(overrides, config_name, lines)
        try:
            compose(config_name, overrides=lines, return_hydra_config=True)
        except (HydraException, OmegaConfBaseException) as err:
            raise compose_error(err, config_name, lines) from None


def entry(main: Callable[[], object], config_dir: str, config_name: str) -> None:
    """Run a Hydra `main` once its command line is checked: a bad one is one line on stderr, exit 2."""
    try:
        check_command_line(sys.argv[1:], config_dir, config_name)
    except ConfigError as err:
        refuse(err)
    main()
