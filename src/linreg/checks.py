"""The Hydra callback that refuses bad input in one line (exit 2) before a run dir or a sweep dir is touched.

It also makes a sweep the one owner of its sweep dir (a lock for its life, and a record of what it is).
Kept out of `linreg.train`: under `python -m linreg.train` that module is `__main__`, and Hydra imports a
callback's module anew.
"""

import logging
import os
import re
import shutil
import subprocess
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from linreg.config import (
    ConfigError,
    DataConfig,
    TrainConfig,
    TrainerConfig,
    check,
    finite,
    gpu_available,
    is_int,
    note_new,
    override_key,
    refusing,
    within,
)
from linreg.record import RunDirLock, read_or_none, refuse_other_runs, room, write_json


def one_report_per_write_error() -> None:
    """A failed write (a full disk) is reported once, by the run that made it: no traceback from a log file's
    handler or from TensorBoard's writer thread (which hands the same error to the run at its next flush)."""
    logging.raiseExceptions = False  # the documented switch: a log line that cannot be written is dropped
    if not getattr(threading.excepthook, "linreg", False):
        default = threading.excepthook

        def hook(args: threading.ExceptHookArgs) -> None:
            if not issubclass(args.exc_type, OSError):
                default(args)

        hook.linreg = True  # type: ignore[attr-defined]
        threading.excepthook = hook


class CheckConfig(Callback):
    """Bad input refused in one line (exit 2) before Hydra makes a run dir or a sweep starts its first job."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        one_report_per_write_error()
        HydraConfig.instance().set_config(config)  # as `run_job` does later: `${hydra:...}` values resolve now
        with refusing():
            check(config)
            if OmegaConf.select(config, "hydra.sweeper.params"):  # `sweep=tutorial` without -m: one run, silently
                raise ConfigError("sweep", None, "a sweep preset: add -m (--multirun) to run its jobs")
            out = makeable(config, "hydra.run.dir")
            room(out, "hydra.run.dir")
            refuse_other_runs(out, config)  # before Hydra rewrites the .hydra/ of a run it must keep

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # Values a sweep varies are each job's to check (a bad one is a failed row); the rest fail here, once.
        one_report_per_write_error()
        with refusing():
            defaults = {k: getattr(TrainConfig, k) for k in ("seed", "resume", "threads")}
            defaults |= {"data": asdict(DataConfig()), "trainer": asdict(TrainerConfig())}
            check(OmegaConf.merge(OmegaConf.create(defaults), sweep_values(config)))
            check_slurm(config)
            check_swept_devices(config)
            check_launcher(config)
            sweep_dir = makeable(config, "hydra.sweep.dir")
            room(sweep_dir, "hydra.sweep.dir")
            own_sweep_dir(config, sweep_dir)
        # Workers on this machine (joblib, submitit_local) end when this process is gone; SLURM's outlive it.
        os.environ["LINREG_SWEEP_PID"] = "" if on_slurm(config) else str(os.getpid())


SWEEP_LOCKS: list[RunDirLock] = []  # the sweep dir's lock, held by the sweep's process until it exits
JOB_DIRS = ("${hydra.job.num}", "${hydra.job.id}", "${hydra.job.override_dirname}")


def resolved(config: DictConfig, key: str) -> str:
    """A Hydra dir setting, resolved; a ConfigError naming it when it cannot be (`hydra.run.dir=${nope}`)."""
    try:
        return str(OmegaConf.select(config, key, throw_on_missing=True))
    except OmegaConfBaseException as err:
        raise ConfigError(key, None, f"cannot be resolved: {str(err).splitlines()[0]}") from None


def makeable(config: DictConfig, key: str) -> Path:
    """The run or sweep dir, made now (and noted: a refusal removes it again); one line when it cannot be."""
    path = Path(resolved(config, key)).absolute()
    note_new(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        if not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as err:
        raise ConfigError(key, str(path), f"cannot be made or written: {err.strerror}") from None
    return path


def separate_job_dirs(config: DictConfig) -> None:
    """`hydra.sweep.subdir` must give every job a dir of its own, one level below the sweep dir."""
    subdir = str(OmegaConf.to_container(config.hydra.sweep, resolve=False).get("subdir"))
    dirname = OmegaConf.to_container(config.hydra.job.config.override_dirname, resolve=False)
    hidden = [k for k in dirname.get("exclude_keys") or [] if k != "resume"] if "override_dirname" in subdir else []
    names = []
    for job in ("0", "1"):  # two jobs' names, whatever else the setting holds
        name = re.sub(r"\$\{hydra\.job\.(num|id|override_dirname)\}", job, subdir)
        names.append(os.path.normpath(re.sub(r"\$\{[^}]*\}", "x", name)))
    if names[0] == names[1] or any(os.sep in n or n.startswith("..") for n in names) or hidden:
        why = f"must give each job a dir of its own, one level down: {', '.join(JOB_DIRS)} (exclude_keys: [resume])"
        raise ConfigError("hydra.sweep.subdir", subdir, why)


def sweep_identity(config: DictConfig) -> dict[str, Any]:
    """What a sweep is: its sweeper, its overrides as typed (less resume), its params, its study, and the config
    its jobs start from (a changed config file is another sweep too)."""
    sweeper = OmegaConf.to_container(config.hydra.sweeper, resolve=False)
    typed = OmegaConf.to_container(config.hydra.overrides.task, resolve=False)
    composed = {k: v for k, v in OmegaConf.to_container(config, resolve=False).items() if k not in ("hydra", "resume")}
    return {
        "sweeper": sweeper.get("_target_"),
        "overrides": sorted(o for o in typed if override_key(o) != "resume"),
        "params": sweeper.get("params"),
        "study": [sweeper.get("study_name"), sweeper.get("storage")],
        "config": composed,
    }


def own_sweep_dir(config: DictConfig, sweep_dir: Path) -> None:
    """One owner per sweep dir: a lock for the sweep's life, and the dir records which sweep it holds."""
    separate_job_dirs(config)
    for where, what in ((sweep_dir, "is a run's dir"), (sweep_dir.parent, "is inside a run's or a sweep's dir")):
        names = ("metrics.json", "checkpoints", ".hydra") + ((".sweep.json",) if where != sweep_dir else ())
        if any(os.path.lexists(where / n) for n in names):
            raise ConfigError("hydra.sweep.dir", str(sweep_dir), f"{what}; use a dir of its own")
    SWEEP_LOCKS.append(RunDirLock(sweep_dir, "hydra.sweep.dir", "another sweep").__enter__())
    wanted, path = sweep_identity(config), sweep_dir / ".sweep.json"
    saved = read_or_none(path) if os.path.lexists(path) else None
    has_runs = any((p / "metrics.json").exists() or (p / "checkpoints").exists() for p in sweep_dir.iterdir())
    if has_runs and not config.get("resume"):
        raise ConfigError("hydra.sweep.dir", str(sweep_dir), "holds a sweep's runs; resume=true continues it")
    if has_runs and saved != wanted:
        why = f"holds another sweep ({' '.join((saved or {}).get('overrides') or ['?'])}); use a new dir"
        if isinstance(saved, dict) and saved.get("overrides") == wanted["overrides"]:
            why = "holds this sweep run on another config (a config file changed); use a new dir"
        raise ConfigError("hydra.sweep.dir", str(sweep_dir), why)
    write_json(path, wanted)


def sweep_values(node: DictConfig) -> dict[str, Any]:
    """The sweep's config resolved, less `hydra` and values only a job can resolve (`${hydra:job.num}`): each job
    checks those (a value left out is checked here at the schema's default)."""
    kept: dict[str, Any] = {}
    for key in node:
        if key == "hydra":
            continue
        try:
            value = node[key]  # resolved, and converted to its schema's type (`${oc.env:X}` for a float)
            kept[key] = sweep_values(value) if isinstance(value, DictConfig) else plain_value(value)
        except OmegaConfBaseException:
            continue
    return kept


def plain_value(value: Any) -> Any:
    """A resolved leaf or list as plain data."""
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def check_swept_devices(config: DictConfig) -> None:
    """A sweep with GPU jobs on a machine without one is refused before its first job (SLURM's nodes may have one)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    typed = [str(o) for o in OmegaConf.to_container(config.hydra.overrides.task, resolve=False)]
    for o in OverridesParser.create().parse_overrides(typed):
        if override_key(o.get_key_element()) in ("trainer", "trainer.accelerator") and not on_slurm(config):
            values = list(o.sweep_string_iterator()) if o.is_discrete_sweep() else [o.get_value_element_as_str()]
            if set(values) & {"gpu", "cuda"} and not gpu_available():
                raise ConfigError(o.get_key_element(), ",".join(values), "no GPU here: its GPU jobs cannot run")


def on_slurm(config: DictConfig) -> bool:
    """Whether the sweep's launcher submits its jobs to SLURM."""
    return "Slurm" in str(OmegaConf.select(config, "hydra.launcher._target_", default="") or "")


LAUNCHER = {  # launcher settings their plugins take unchecked (a traceback at the first job): key -> (test, why)
    "n_jobs": (lambda v: is_int(v) and v != 0, "must be a non-zero integer (joblib: -1 is one worker per core)"),
    "memory_budget_gb": (lambda v: v is None or (finite(v) and v > 0), "must be a number > 0, or null"),
    "max_group_size": (lambda v: v is None or (is_int(v) and v > 0), "must be a positive integer, or null"),
}


def check_launcher(config: DictConfig) -> None:
    """The launcher's numbers, one line naming the key (`config.within`, as `check` takes the run's)."""
    launcher = OmegaConf.to_container(config.hydra.launcher, resolve=True) if "launcher" in config.hydra else {}
    within(LAUNCHER, launcher, prefix="hydra.launcher.")


def check_slurm(config: DictConfig) -> None:
    """`hydra/launcher=slurm` needs a cluster that answers: one line instead of sbatch's traceback."""
    if not on_slurm(config):
        return
    hint = 'start one: scripts/slurm-local.sh start; eval "$(scripts/slurm-local.sh env)"'
    if shutil.which("sbatch") is None or shutil.which("scontrol") is None:
        raise ConfigError("hydra/launcher", "slurm", f"sbatch/scontrol not on PATH; {hint}")
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise ConfigError("hydra/launcher", "slurm", f"scontrol ping failed: {err}") from None
    if ping.returncode != 0 or "UP" not in ping.stdout:
        said = (ping.stdout + ping.stderr).strip().splitlines() or [f"exit {ping.returncode}"]
        raise ConfigError("hydra/launcher", "slurm", f"slurmctld does not answer ({said[0]}); {hint}")
