"""The command line, checked before Hydra composes it: a mistyped key or option is one line and exit 2.

Hydra refuses these itself, but in a paragraph and with exit 1, and a sweep has by then written its first
files. Here the overrides are parsed, every value given to a config group is looked up among its options,
and the config is composed once with Hydra's compose API, leaving out the swept values as Hydra's multirun
does (the grid's jobs are checked by the config check when the sweep starts, `config.check_grid`). Hydra's
error becomes one line that names the key. Hydra's own flags (`--help`, `--cfg`, ...) and HYDRA_FULL_ERROR=1
go to Hydra.
"""

import sys
from collections.abc import Callable

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from linreg.config import ConfigError, first_line, full_error, override_key, refuse, unknown_key

RUN_FLAGS = ("-m", "--multirun", "-r", "--run")  # flags that leave the overrides for Hydra to compose
COMPOSE_ERRORS = (HydraException, OmegaConfBaseException, ValueError, KeyError)  # KeyError: env_copy of no var


def parse(lines: list[str]) -> list[Override]:
    """The overrides, parsed as Hydra will; a line Hydra cannot read is refused naming its key."""
    parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())  # glob() lists options
    overrides = []
    for line in lines:
        try:
            overrides += parser.parse_overrides([line])
        except HydraException as err:
            why = f"Hydra cannot read this value ({first_line(err)}); see hydra.cc's override grammar"
            raise ConfigError(override_key(line), line.partition("=")[2], why) from None
    return overrides


def group_values(override: Override) -> list[str]:
    """The options an override names for its group: each of a list sweep's; none for a glob, list or path."""
    if override.is_delete() or (override.is_sweep_override() and not override.is_discrete_sweep()):
        return []
    values = list(override.sweep_iterator()) if override.is_sweep_override() else [override.value()]
    # A list (`model=[a,b]`), a mapping (`model={lr:0.05}`) or a nested option (`experiment=sub/x`): for compose.
    return [v for v in values if isinstance(v, str) and "/" not in v]


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
        if not (override.is_delete() or override.is_sweep_override()) and override.value() is None:
            raise ConfigError(group, "null", f"to leave a config group out, write ~{group}")
        names = group_values(override)
        unknown = [v for v in names if v not in options]
        if unknown:  # `hydra.searchpath=[…]` may add options: look again on the search path the command line sets
            paths = [line for line in lines if line.startswith("hydra.")]
            options = loader.get_group_options(group, config_name=config_name, overrides=paths)
            unknown = [v for v in unknown if v not in options]
        if unknown:
            raise ConfigError(group, unknown[0], f"one of {', '.join(options)}")


def composed(config_name: str, lines: list[str]) -> DictConfig:
    """The config these lines give, with `hydra`; Hydra's error as one ConfigError."""
    try:
        return compose(config_name, overrides=lines, return_hydra_config=True)
    except COMPOSE_ERRORS as err:
        raise compose_error(err, config_name, lines) from None


def known_keys(config_name: str, lines: list[str], key: str) -> list[str]:
    """The keys beside `key` in the config composed without the lines that set it."""
    parent = key.rpartition(".")[0]
    others = [line for line in lines if override_key(line) != key]
    try:
        cfg = compose(config_name, overrides=others, return_hydra_config=True)
    except COMPOSE_ERRORS:
        return []
    node = OmegaConf.select(cfg, parent) if parent else cfg
    return [str(k) for k in node] if isinstance(node, DictConfig) else []


def mentioned(line: str, text: str) -> bool:
    """Whether Hydra's error text is about this override line (by its text, its key, or its group/option)."""
    key, value = override_key(line), line.partition("=")[2]
    marks = (line.lstrip("+~"), f"'{key}'", f"'{key}/{value}'", f"for {key}", f"'{key}/")
    return any(mark in text for mark in marks)


def compose_error(err: Exception, config_name: str, lines: list[str]) -> ConfigError:
    """Hydra's composition error for these lines as one line naming the key."""
    cause = err.__cause__
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and cause.full_key:  # `trainer.max_epoch=5`
        key = str(cause.full_key)  # the first key missing: the line may set one below it (`a.b.c=1`, no `a.b`)
        line = next((line for line in lines if f"{override_key(line)}.".startswith(f"{key}.")), None)
        key, value = (override_key(line), line.partition("=")[2]) if line else (key, None)
        known = known_keys(config_name, lines, key)
        if not known:  # a mapping with no keys of its own yet, such as `hydra.job.env_set`
            return ConfigError(key, value, f"not in the config; +{key}={value} adds it")
        return unknown_key(key, value, known)
    text = str(err)
    line = next((line for line in lines if mentioned(line, text)), None)
    if line is None:
        return ConfigError("overrides", " ".join(lines), first_line(err) or type(err).__name__)
    key, value = override_key(line), line.partition("=")[2]
    if "Could not append to config" in text:  # `+seed=5`
        return ConfigError(key, value, f"is in the config already: set it with {key}={value} (+ adds a new key)")
    why = first_line(err) or type(err).__name__
    return ConfigError(key, value, f"{why} ({first_line(cause)})" if cause and first_line(cause) else why)


def check_hydra_not_swept(overrides: list[Override]) -> None:
    """Hydra composes its own config once for a whole sweep: `hydra.*` values and groups cannot be swept."""
    for override in overrides:
        if override.is_sweep_override() and override.is_hydra_override():
            key, _, value = (override.input_line or "").partition("=")
            key = key.lstrip("+~")
            why = "Hydra's own settings cannot be swept: run one sweep per value"
            if key.startswith("hydra.sweeper.params."):  # an Optuna search space, which goes by its own key
                why = f"give it as {key.removeprefix('hydra.sweeper.params.')}={value} (with hydra/sweeper=optuna)"
            raise ConfigError(key, value, why)


def check_command_line(args: list[str], config_dir: str, config_name: str) -> None:
    """Raise ConfigError for a command line that Hydra would refuse when composing it."""
    if not args or full_error() or any(a.startswith("-") and a not in RUN_FLAGS for a in args):
        return
    multirun = any(a in ("-m", "--multirun") for a in args)
    with initialize_config_dir(config_dir=config_dir, version_base="1.3", job_name=config_name):
        overrides = parse([a for a in args if a not in RUN_FLAGS])
        check_hydra_not_swept(overrides)
        fixed = [o.input_line or "" for o in overrides if not o.is_sweep_override()]  # swept: each job's to check
        check_groups(overrides, config_name, fixed)
        cfg = composed(config_name, fixed)  # as Hydra composes a sweep's config: without the swept values
        swept = [o.input_line or "" for o in overrides if o.is_sweep_override()]
        multirun = multirun or OmegaConf.select(cfg, "hydra.mode") == RunMode.MULTIRUN  # a preset may set it
        if swept and not multirun:
            why = "is a sweep: add -m (--multirun) for a job per value, or write a list as [a,b]"
            raise ConfigError(override_key(swept[0]), swept[0].partition("=")[2], why)


def entry(main: Callable[[], object], config_dir: str, config_name: str) -> None:
    """Run a Hydra `main` once its command line is checked: a bad one is one line on stderr, exit 2."""
    try:
        check_command_line(sys.argv[1:], config_dir, config_name)
    except ConfigError as err:
        refuse(err)
    main()
