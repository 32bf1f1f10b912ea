"""Checks a composed config before any work, so a bad value fails in one clear line."""

import difflib
import importlib
import inspect
import math
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

ACCELERATORS = ("cpu", "gpu", "cuda", "auto")
INITS = ("default", "zeros")
FLOAT32_MAX = 3.4028234663852886e38
INT64_MAX = 2**63 - 1
SEED_MAX = 2**32 - 1  # numpy's seed range, which Lightning's seed_everything also seeds
MAX_DEG = 20


class ConfigError(ValueError):
    """A bad config value: says the key, the value and what is allowed."""

    def __init__(self, key: str, value: Any, allowed: str) -> None:
        super().__init__(f"{key}={value!r}: {allowed}")
        self.key, self.value, self.allowed = key, value, allowed


def first_line(err: BaseException) -> str:
    """The first line of an error's message, terminal colours removed ("" when it has none)."""
    lines = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip().splitlines()
    return lines[0] if lines else ""


def is_int(v: Any) -> bool:
    """An int that is not a bool."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    """A finite int/float (not a bool)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:  # an int beyond float's range
        return False


def override_key(override: str) -> str:
    """The config key a command-line override sets: `x.y` for `x.y=1`, `+x.y=1`, `++x.y=1` and `~x.y`."""
    return override.split("=", 1)[0].lstrip("+~")


# ---------------------------------------------------------------- one check per kind of value

Check = Callable[[str, Any], None]


def int_in(low: int, high: int, allowed: str) -> Check:
    """An integer in [low, high]."""

    def check(key: str, v: Any) -> None:
        if not is_int(v) or not low <= v <= high:
            raise ConfigError(key, v, allowed)

    return check


positive_int = int_in(1, INT64_MAX, "must be a positive integer")


def number_in(low: float, low_open: bool, allowed: str) -> Check:
    """A finite number from `low` (exclusive when `low_open`) up to float32's largest."""

    def check(key: str, v: Any) -> None:
        if not is_number(v) or v < low or (low_open and v == low) or abs(v) > FLOAT32_MAX:
            raise ConfigError(key, v, allowed)

    return check


def boolean(key: str, v: Any) -> None:
    if not isinstance(v, bool):
        raise ConfigError(key, v, "must be true or false")


def optional_boolean(key: str, v: Any) -> None:
    if v is not None and not isinstance(v, bool):
        raise ConfigError(key, v, "must be true, false or null (automatic)")


def one_of(*choices: Any) -> Check:
    def check(key: str, v: Any) -> None:
        if v not in choices:
            raise ConfigError(key, v, f"must be one of {', '.join(map(str, choices))}")

    return check


def weights(key: str, v: Any) -> None:
    if not isinstance(v, list) or not v or not all(is_number(x) and abs(x) <= FLOAT32_MAX for x in v):
        raise ConfigError(key, v, "must be a non-empty list of finite numbers that fit float32, e.g. [2,-1,1]")


def one_device(key: str, v: Any) -> None:
    if not ((is_int(v) and v == 1) or v == [0]):  # not `v == 1`: true and 1.0 equal 1 too
        raise ConfigError(key, v, "must be 1: this project trains one small model on one device")


# The whole config a run reads: every key, and what it may hold. Anything else is refused.
DATA = {
    "num_examples": positive_int,
    "w": weights,
    "bias": boolean,
    "delta": number_in(0, False, "must be a finite number >= 0 (at most 3.4e38, float32)"),
    "deg": int_in(1, MAX_DEG, f"must be a positive integer (at most {MAX_DEG}: higher powers overflow float32)"),
    "batch_size": positive_int,
    "batches_per_call": positive_int,
}
TRAINER = {
    "accelerator": one_of(*ACCELERATORS),
    "devices": one_device,
    "max_epochs": positive_int,
    "deterministic": boolean,
    "enable_progress_bar": optional_boolean,
}


def any_value(key: str, v: Any) -> None:
    """A value its class checks itself (a name, a version)."""


# The project's arguments of the classes a `_target_` may name; other arguments are checked against the class.
REGRESSION = {
    "_target_": any_value,
    "lr": number_in(0, True, "must be a finite number > 0 (at most 3.4e38, float32)"),
    "log_every_sgd_steps": positive_int,
}
MODELS = {
    "linreg.models.ManualRegression": REGRESSION,
    "linreg.models.LinearRegression": {**REGRESSION, "init": one_of(*INITS)},
}
LOGGERS = {
    "linreg.dashboard.BufferedTensorBoardLogger": {
        "_target_": any_value,
        "name": any_value,
        "log_graph": boolean,
        "default_hp_metric": boolean,
        "fit_figure": boolean,
        "write_every_s": number_in(0, False, "must be a finite number >= 0"),
    },
    "lightning.pytorch.loggers.CSVLogger": {"_target_": any_value, "name": any_value, "version": any_value},
}
BASES = {"model": "linreg.models.RegressionModule", "logger": "lightning.pytorch.loggers.Logger"}
GIVEN = {"model": ("in_features", "bias"), "logger": ("save_dir",)}  # arguments a run passes: not config keys
MOVED = {  # keys of earlier versions, and where they went
    "trainer.steps_per_call": "data.batches_per_call",
    "trainer.log_every_n_steps": "model.log_every_sgd_steps",
    "model.name": "model._target_ (choose a model with model=manual or model=linear)",
}
TOP = {
    "seed": int_in(0, SEED_MAX, f"must be an integer from 0 to {SEED_MAX}"),
    "resume": boolean,
    "threads": int_in(1, 1024, "must be a positive integer (torch's intra-op threads for this run)"),
}
GROUPS = ("data", "model", "trainer", "logger")
OPTIONAL = {"trainer.enable_progress_bar"}  # keys that may be left out


def unknown_key(key: str, value: Any, known: list[str]) -> ConfigError:
    """`+data.foo=1`-style typos: refused, with the nearest valid key when there is one."""
    if key in MOVED:
        return ConfigError(key, value, f"this key is now {MOVED[key]}")
    prefix, _, name = key.rpartition(".")
    near = difflib.get_close_matches(name, known, n=1)
    hint = f"did you mean {prefix + '.' if prefix else ''}{near[0]}? " if near else ""
    return ConfigError(key, value, f"unknown key; {hint}(known here: {', '.join(known)})")


def check_mapping(prefix: str, got: Any, schema: dict[str, Check], option: str, required: bool = True) -> None:
    """Every key of `schema` present (unless not `required`: a class's defaults) and valid, and no other key."""
    if got is None:
        raise ConfigError(prefix, None, f"missing: choose a config group, e.g. {prefix}={option}")
    if not isinstance(got, dict):
        raise ConfigError(prefix, got, f"must be a config group, e.g. {prefix}={option}")
    for key, value in got.items():
        if key not in schema:
            raise unknown_key(f"{prefix}.{key}", value, list(schema))
    for key, check in schema.items():
        full = f"{prefix}.{key}"
        if key not in got:
            if full in OPTIONAL or not required:
                continue
            raise ConfigError(full, None, f"missing (conf/{prefix.split('.')[0]}/ sets it)")
        check(full, got[key])


def target_class(key: str, target: str) -> type:
    """The class a `_target_` names, imported; ConfigError unless it is one of the kind `key` needs."""
    module, _, name = target.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except Exception as err:  # the user's module failed to import, or has no such name: say why in its words
        raise ConfigError(f"{key}._target_", target, f"cannot be imported: {type(err).__name__}: {err}") from None
    base_module, _, base_name = BASES[key.split(".")[0]].rpartition(".")
    base = getattr(importlib.import_module(base_module), base_name)
    if not (isinstance(cls, type) and issubclass(cls, base) and cls is not base):
        raise ConfigError(f"{key}._target_", target, f"must name a subclass of {BASES[key.split('.')[0]]}")
    return cls


def accepted_arguments(cls: type) -> set[str]:
    """The keyword arguments a class's constructor takes, following `**kwargs` up its base classes."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" not in klass.__dict__:
            continue
        params = inspect.signature(klass.__dict__["__init__"]).parameters.values()
        names |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return names


def check_target(key: str, got: Any, known: dict[str, dict[str, Check]], option: str) -> None:
    """A `_target_` group: the project's arguments checked by table, any other against the class's constructor."""
    group = key.split(".")[0]
    if not isinstance(got, dict):
        what = "a logger (a mapping with a _target_) or null" if group == "logger" else "a config group"
        raise ConfigError(key, got, f"must be {what}, e.g. {group}={option}")
    target = got.get("_target_")
    if not isinstance(target, str) or "." not in target:
        raise ConfigError(f"{key}._target_", target, "must name a class, e.g. linreg.models.ManualRegression")
    for name in GIVEN[group]:
        if name in got:
            raise ConfigError(
                f"{key}.{name}", got[name], "is given by the run (from data and the run dir), not set here"
            )
    schema = known.get(target, {"_target_": any_value})
    ours = {k: v for k, v in got.items() if k in schema}
    check_mapping(key, ours, schema, option, required=group == "model")
    others = [k for k in got if k not in schema]
    if target in known and not others:
        return  # the project's own class with its own arguments: nothing to import (Lightning is slow to)
    accepted = accepted_arguments(target_class(key, target))
    for name in others:
        if name not in accepted:
            raise unknown_key(f"{key}.{name}", got[name], sorted(accepted - set(GIVEN[group])))


def check_logger(lcfg: Any) -> None:
    """`logger`: null (no logging), or loggers by name, each a `_target_` (or null: that one off)."""
    if lcfg is None:
        return
    if not isinstance(lcfg, dict):
        raise ConfigError("logger", lcfg, "must be a logger config (logger=tensorboard, csv, tensorboard_csv) or null")
    for key, value in lcfg.items():
        if value is not None:
            check_target(f"logger.{key}", value, LOGGERS, "tensorboard")


def plain(cfg: DictConfig) -> dict[str, Any]:
    """The run's config without `hydra`, resolved: one line naming the key whose interpolation fails."""
    try:
        return {k: resolved(cfg, k) for k in cfg if k != "hydra"}
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "config"
        raise ConfigError(key, raw_value(cfg, key), f"cannot be resolved: {one_line(err)}") from None


def resolved(cfg: DictConfig, key: str) -> Any:
    """One top-level value as plain Python, interpolations resolved against the whole config."""
    value = cfg[key]
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def raw_value(cfg: DictConfig, key: str) -> Any:
    """A key's value as written (an interpolation unresolved), or None."""
    value: Any = OmegaConf.to_container(cfg, resolve=False)
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def one_line(err: BaseException) -> str:
    """An OmegaConf error's first line (its message adds the full key and type on more lines)."""
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError on the first bad value; cheap, and runs before any data is made."""
    c = plain(cfg)
    for key, value in c.items():
        if key not in (*TOP, *GROUPS):
            raise unknown_key(key, value, [*TOP, *GROUPS])
    for key, check in TOP.items():
        if key not in c:
            raise ConfigError(key, None, "missing (conf/train.yaml sets it)")
        check(key, c[key])
    check_mapping("data", c.get("data"), DATA, "tutorial")
    if c.get("model") is None:
        raise ConfigError("model", None, "missing: choose a config group, e.g. model=manual")
    check_target("model", c["model"], MODELS, "manual")
    check_mapping("trainer", c.get("trainer"), TRAINER, "cpu")
    check_logger(c.get("logger"))
    d = c["data"]
    if d["bias"] and len(d["w"]) < 2:
        raise ConfigError("data.w", d["w"], "needs at least one feature weight and the intercept when data.bias=true")
    if c["trainer"]["accelerator"] in ("gpu", "cuda") and not _gpu_available():
        raise ConfigError("trainer.accelerator", c["trainer"]["accelerator"], "no GPU available; use trainer=cpu")
    _check_memory(d)


def _gpu_available() -> bool:
    import torch  # only here: torch takes seconds to import, and only a GPU run needs the answer

    return torch.cuda.is_available()


def _check_memory(d: dict[str, Any]) -> None:
    """Refuse data that would not fit, instead of letting the OS kill the process."""
    n_cols = len(d["w"]) + 2  # features (with the ones column) and the label
    # float32 data, plus the generator's intermediates: ~3 copies at peak
    needed = 3 * 4 * d["num_examples"] * n_cols
    available = psutil.virtual_memory().available
    if needed > available:
        raise ConfigError(
            "data.num_examples",
            d["num_examples"],
            f"needs about {needed / 2**30:.1f} GiB for the data, only {available / 2**30:.1f} GiB available",
        )


# ---------------------------------------------------------------- the launch: Hydra's own keys


def check_run_dir(key: str, value: Any) -> Path:
    """A run or sweep dir that can be made: a non-empty path whose nearest existing parent is a writable dir."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(key, value, "must be a non-empty path")
    path = Path(value).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(key, value, f"{existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(key, value, f"{existing} is not writable")
    return path


LAUNCH_KEYS = {
    "hydra.launcher.n_jobs": "must be a non-zero integer (joblib: -1 means one job per CPU)",
    "hydra.launcher.timeout_min": "must be a positive integer",
    "hydra.launcher.cpus_per_task": "must be a positive integer",
    "hydra.launcher.array_parallelism": "must be a positive integer",
    "hydra.sweeper.max_batch_size": "must be null or a positive integer",
    "hydra.sweeper.n_trials": "must be a positive integer",
    "hydra.launcher.max_group_size": "must be null or a positive integer",
}


def validate_launch(config: DictConfig) -> None:
    """The sweep's launcher and sweeper settings: checked before the first job."""
    check_run_dir("hydra.sweep.dir", OmegaConf.select(config, "hydra.sweep.dir"))
    for key, allowed in LAUNCH_KEYS.items():
        v = OmegaConf.select(config, key, default=None)
        if v is None:
            continue
        if not is_int(v) or v == 0 or (v < 0 and key != "hydra.launcher.n_jobs"):
            raise ConfigError(key, v, allowed)
    budget = OmegaConf.select(config, "hydra.launcher.memory_budget_gb", default=None)
    if budget is not None and not (is_number(budget) and budget > 0):
        raise ConfigError("hydra.launcher.memory_budget_gb", budget, "must be null or a number of GiB > 0")
    check_sweep_dir(config)


def check_sweep_dir(config: DictConfig) -> None:
    """A sweep dir that holds a sweep's runs is continued with resume=true, never run over."""
    if config.get("resume") is True:
        return
    sweep = Path(str(OmegaConf.select(config, "hydra.sweep.dir")))
    jobs = [p for p in sweep.iterdir() if p.is_dir()] if sweep.is_dir() else []
    if any((p / "metrics.json").exists() or (p / "checkpoints").exists() for p in jobs):
        allowed = "holds a sweep's runs; add resume=true to continue it, or use a new dir"
        raise ConfigError("hydra.sweep.dir", str(sweep), allowed)


def typed_overrides(config: DictConfig) -> list[str]:
    """The sweep's command-line overrides as typed (`${...}` left for each job), as Hydra hands them to a sweeper."""
    return [str(o) for o in OmegaConf.to_container(config.hydra.overrides.task, resolve=False)]  # type: ignore[union-attr]


def check_grid(config: DictConfig) -> None:
    """The grid sweeper's jobs, checked before the sweep writes anything (`grid_sweeper.check_jobs`)."""
    target = str(OmegaConf.select(config, "hydra.sweeper._target_", default="") or "")
    if target.endswith(".GridSweeper"):
        from hydra.core.global_hydra import GlobalHydra

        from hydra_plugins.linreg_sweeper.grid_sweeper import check_jobs

        check_jobs(config, GlobalHydra.instance().config_loader())


SLURM_HINT = 'start one and export its settings: scripts/slurm-local.sh start; eval "$(scripts/slurm-local.sh env)"'


def on_slurm(config: DictConfig) -> bool:
    """Whether the sweep's launcher submits its jobs to SLURM."""
    return "SlurmLauncher" in str(OmegaConf.select(config, "hydra.launcher._target_", default="") or "")


def check_slurm(config: DictConfig) -> None:
    """`hydra/launcher=slurm` needs a cluster that answers: say what is missing instead of sbatch's traceback."""
    if not on_slurm(config):
        return
    key = "hydra/launcher"
    if shutil.which("sbatch") is None or shutil.which("scontrol") is None:
        raise ConfigError(key, "slurm", "sbatch/scontrol not on PATH (scripts/slurm-local.sh install)")
    conf = os.environ.get("SLURM_CONF")
    if conf is None and not os.path.isfile("/etc/slurm/slurm.conf"):
        raise ConfigError(key, "slurm", f"SLURM_CONF is unset and there is no /etc/slurm/slurm.conf; {SLURM_HINT}")
    if conf is not None and not os.path.isfile(conf):
        raise ConfigError(key, "slurm", f"SLURM_CONF={conf} does not exist; {SLURM_HINT}")
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise ConfigError(key, "slurm", f"scontrol ping failed: {err}") from None
    if ping.returncode != 0 or "UP" not in ping.stdout:
        said = (ping.stdout + ping.stderr).strip().splitlines() or [f"exit {ping.returncode}"]
        raise ConfigError(key, "slurm", f"slurmctld does not answer ({said[0]}); {SLURM_HINT}")


def full_error() -> bool:
    """Hydra's rule: tracebacks only with HYDRA_FULL_ERROR=1."""
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def unresolved(err: OmegaConfBaseException, config: DictConfig) -> ConfigError:
    """A value of Hydra's own config that cannot be resolved (`hydra.sweep.subdir=${nope}`), as a ConfigError."""
    key = str(getattr(err, "full_key", None) or "hydra")
    parent, _, name = key.rpartition(".")
    node = OmegaConf.select(config, parent, throw_on_resolution_failure=False) if parent else config
    raw = OmegaConf.to_container(node, resolve=False).get(name) if isinstance(node, DictConfig) else None
    return ConfigError(key, raw, f"cannot be resolved: {first_line(err)}")


def refuse(err: ConfigError) -> None:
    """One line on stderr and exit 2 (a SystemExit passes through Hydra's callback guard)."""
    print(f"error: {err}", file=sys.stderr)
    raise SystemExit(2)


NEW_RUN_DIRS: set[Path] = set()  # run (or sweep) dirs this process will create: only those may be removed again
HYDRA_FILES = (".hydra", "train.log", "evaluate.log", ".lock")  # what Hydra (and the run's lock) put there first


def note_if_new(path: Path) -> None:
    """Note a run or sweep dir Hydra is about to make: only such a dir may be removed again."""
    if not path.exists():
        NEW_RUN_DIRS.add(path.absolute())


def remove_if_created(out: Path) -> None:
    """Remove a run dir this process created, if it holds only what Hydra wrote: bad input leaves nothing behind.

    A sweep's job dir counts as created when the sweep dir was (a job in another process never removes one).
    """
    made = out.absolute() in NEW_RUN_DIRS or out.absolute().parent in NEW_RUN_DIRS
    if made and out.is_dir() and all(p.name in HYDRA_FILES for p in out.iterdir()):
        shutil.rmtree(out, ignore_errors=True)


class CheckConfig(Callback):
    """Refuses bad input before Hydra makes a run dir, so a bad command line leaves nothing behind."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if full_error():
            return  # run() validates again and raises, so Hydra prints the traceback
        from linreg.record import refuse_other_runs

        try:
            validate(config)
            run_dir = check_run_dir("hydra.run.dir", OmegaConf.select(config, "hydra.run.dir"))
            if run_dir.is_dir():
                refuse_other_runs(run_dir, config)  # before Hydra rewrites the .hydra/ of a run it must keep
        except ConfigError as err:
            refuse(err)
        except OmegaConfBaseException as err:  # `hydra.run.dir=${nope}`: Hydra would warn, then trace back
            refuse(unresolved(err, config))
        note_if_new(run_dir)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # Values swept per job are each job's to check (a bad one is a failed row); the rest fail here, once.
        try:
            validate_launch(config)
            validate(config)
            check_slurm(config)
            check_grid(config)
        except (ConfigError, OmegaConfBaseException) as err:
            if full_error():
                raise SystemExit(f"error: {err}") from err
            refuse(err if isinstance(err, ConfigError) else unresolved(err, config))
        # Jobs in this machine's worker processes (joblib, submitit_local) end when this process is gone;
        # SLURM's jobs are the cluster's, and outlive the sweep that submitted them.
        if on_slurm(config):
            os.environ.pop("LINREG_SWEEP_PID", None)
        else:
            os.environ["LINREG_SWEEP_PID"] = str(os.getpid())
