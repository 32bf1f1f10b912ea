"""The Hydra callback that refuses bad input (exit 2) before a run or sweep dir is touched; a sweep owns its dir."""

import _thread
import contextlib
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Any, NoReturn

from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from linreg.config import (
    LAUNCHER,
    NEW_DIRS,
    ConfigError,
    DataConfig,
    TrainConfig,
    TrainerConfig,
    check,
    gpu_available,
    override_key,
    refusing,
    within,
)
from linreg.record import WRITING, RunDirLock, read_or_none, refuse_other_runs, room, write_json


def one_report_per_write_error() -> None:
    """A failed write (a full disk) is reported once, by the run that made it, not by a log handler or a thread."""
    logging.raiseExceptions = False  # the documented switch: a log line that cannot be written is dropped
    previous = threading.excepthook  # whatever hook is set now (pytest's, a library's) still gets the rest

    def quiet_write_errors(args: threading.ExceptHookArgs) -> None:
        # TensorBoard's writer thread hands its error (a full disk, a bad flush_secs) to the run at its next write.
        if not (issubclass(args.exc_type, OSError) or type(args.thread).__module__.startswith("tensorboard.")):
            previous(args)

    if getattr(previous, "__name__", "") != "quiet_write_errors":  # once: a sweep's jobs call it again
        threading.excepthook = quiet_write_errors


class CheckConfig(Callback):
    """Bad input refused in one line (exit 2) before Hydra makes a run dir or a sweep starts its first job."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        one_report_per_write_error()
        HydraConfig.instance().set_config(config)  # as `run_job` does later: `${hydra:...}` values resolve now
        with refusing(callback=True):
            check(config)
            if OmegaConf.select(config, "hydra.sweeper.params"):  # `sweep=tutorial` without -m: one run, silently
                raise ConfigError("sweep", None, "a sweep preset: add -m (--multirun) to run its jobs")
            out = makeable(config, "hydra.run.dir")
            log = f"{config.hydra.job.name}.log"  # Hydra's, made before the run's lock (a run killed that early)
            own_dir(out, "hydra.run.dir", ("metrics.json", ".hydra", ".lock", log), (".sweep.json", "eval.json"))
            refuse_other_runs(out, config)  # before Hydra rewrites a kept run's .hydra/

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # Values a sweep varies are each job's to check (a bad one is a failed row); the rest fail here, once.
        one_report_per_write_error()
        with refusing(callback=True):
            slurm = "Slurm" in config.hydra.launcher._target_
            defaults = OmegaConf.create(asdict(TrainConfig(data=DataConfig(), trainer=TrainerConfig())))
            check(OmegaConf.merge(defaults, sweep_values(config)))
            if slurm:
                check_slurm()
            else:  # SLURM's nodes may have a GPU
                check_swept_devices(config)
            within(LAUNCHER, OmegaConf.to_container(config.hydra.launcher, resolve=True), prefix="hydra.launcher.")
            OmegaConf.to_container(config.hydra.sweeper, resolve=True)  # as Hydra makes it, next: `${oc.env:X}`
            own_sweep_dir(config, makeable(config, "hydra.sweep.dir"))
        # Workers on this machine (joblib, submitit_local) end when this process is gone; SLURM's outlive it.
        os.environ["LINREG_SWEEP_PID"] = "" if slurm else str(os.getpid())
        sweep_dir = Path(str(config.hydra.sweep.dir)).absolute()  # jobs may change the cwd (hydra.job.chdir)
        for signum in STOP_SIGNALS:
            signal.signal(signum, lambda signum, _: end_sweep(sweep_dir, signum))
        # Ctrl-C reaches the process group: this process takes it, workers end with it (EndWithSweep; 3.11: not always).
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})  # inherited by each thread and process started
        threading.Thread(target=lambda: _thread.interrupt_main(signal.sigwait({signal.SIGINT})), daemon=True).start()


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def stopped_by(signum: int) -> str:
    """The signal as the line a stopped run or sweep ends with names it: `SIGTERM`, `SIGINT (Ctrl-C)`."""
    return "SIGINT (Ctrl-C)" if signum == signal.SIGINT else signal.Signals(signum).name


def end_sweep(sweep_dir: Path, signum: int) -> NoReturn:
    """A SIGTERM or Ctrl-C to a sweep's process, in a fit or not: the table of what finished, one line, exit 1."""
    from linreg.results import stopped  # imported already, by its callback

    for ignored in STOP_SIGNALS:  # a second Ctrl-C while the table is written: no second table, no traceback
        signal.signal(ignored, signal.SIG_IGN)
    try:  # whatever fails here (stderr a closed pipe), the sweep ends: an error would go to the code interrupted
        with contextlib.suppress(Exception):
            print(stopped(sweep_dir, f"by {stopped_by(signum)}"), file=sys.stderr, flush=True)
        logging.shutdown()
        for tmp in list(WRITING):  # what the interrupted write had begun: its own cleanup will not run
            tmp.unlink(missing_ok=True)
    finally:
        os._exit(1)  # not an exception: unwinding what it interrupted half-way (a config being set) can raise anew


SWEEP_LOCKS: list[RunDirLock] = []  # the sweep dir's lock, held by the sweep's process until it exits


def makeable(config: DictConfig, key: str) -> Path:
    """The run or sweep dir, made now (a refusal removes it again) with room for a run; else one line naming `key`."""
    try:
        path = Path(str(OmegaConf.select(config, key, throw_on_missing=True))).resolve()  # `x/..` is where it leads
    except (OmegaConfBaseException, RuntimeError, OSError) as err:  # `hydra.run.dir=${nope}`, a loop of links
        raise ConfigError(key, None, f"cannot be resolved: {str(err).splitlines()[0]}") from None
    if missing := [p for p in (path, *path.parents) if not p.exists()]:
        NEW_DIRS.add(missing[-1])  # the outermost dir made now: a refusal removes its parents made with it too
    try:
        path.mkdir(parents=True, exist_ok=True)
        if not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as err:
        raise ConfigError(key, str(path), f"cannot be made or written: {err.strerror}") from None
    room(path, key)
    return path


def separate_job_dirs(config: DictConfig) -> None:
    """`hydra.sweep.subdir` must give every job a dir of its own, one level below the sweep dir."""
    subdir = str(OmegaConf.to_container(config.hydra.sweep).get("subdir"))  # as typed: `${hydra.job.num}`
    named = OmegaConf.to_container(config.hydra.job.config.override_dirname)  # exclude_keys, kv_sep, item_sep
    excluded = named.get("exclude_keys") or []
    hidden = "override_dirname" in subdir and set(excluded) - {"resume"}
    jobs = [re.sub(r"\$\{hydra\.job\.(num|id|override_dirname)\}", job, subdir) for job in "01"]
    names = [os.path.normpath(re.sub(r"\$\{[^}]*\}", "x", name)) for name in jobs]  # two jobs' dirs, all else fixed
    if names[0] == names[1] or any(os.sep in n or n.startswith("..") for n in names) or hidden:
        why = "must give each job a dir of its own, one level down: ${hydra.job.num}, ${hydra.job.id}, "
        raise ConfigError("hydra.sweep.subdir", subdir, why + "${hydra.job.override_dirname} (exclude_keys: [resume])")
    if "override_dirname" in subdir:  # a `/` in what names the dir nests job dirs, or leaves the sweep dir (`../`)
        params = OmegaConf.to_container(config.hydra.sweeper).get("params") or {}
        typed = [*OmegaConf.to_container(config.hydra.overrides.task), *(f"{k}={v}" for k, v in params.items())]
        kept = [o for o in typed if override_key(o) not in excluded]
        for given in [named.get("kv_sep"), named.get("item_sep"), *kept]:
            if "/" in str(given):
                why = f"{given!r} holds '/', which would nest job dirs or leave the sweep dir; use ${{hydra.job.num}}"
                raise ConfigError("hydra.sweep.subdir", subdir, why)
        # Equal overrides share a dir: a value listed twice, a point Optuna draws again, `resume=true,false` (excluded).
        for line in typed:
            try:
                o = OverridesParser.create().parse_overrides([line])[0]
                values = list(o.sweep_string_iterator()) if o.is_discrete_sweep() else []
            except Exception:  # a glob of groups, or what the sweeper refuses itself
                continue
            again = o.is_sweep_override() and ("n_trials" in config.hydra.sweeper or line not in kept)
            if len(set(values)) < len(values) or again:
                why = f"{line!r}: two jobs could get one dir (a value twice, or Optuna's); use ${{hydra.job.num}}"
                raise ConfigError("hydra.sweep.subdir", subdir, why)


def own_sweep_dir(config: DictConfig, sweep_dir: Path) -> None:
    """One owner per sweep dir: a lock for the sweep's life, and `.sweep.json`, what the sweep is."""
    separate_job_dirs(config)
    if "${now:" in (subdir := str(OmegaConf.to_container(config.hydra.sweep).get("subdir"))):  # as typed
        why = "must name a job's dir the same in every run (resume): no ${now:}"
        raise ConfigError("hydra.sweep.subdir", subdir, why)
    own_dir(sweep_dir, "hydra.sweep.dir", (".sweep.json",), ("metrics.json", "checkpoints", ".hydra", "eval.json"))
    SWEEP_LOCKS.append(RunDirLock(sweep_dir, "hydra.sweep.dir", "another sweep").__enter__())
    sweeper, typed = OmegaConf.to_container(config.hydra.sweeper), OmegaConf.to_container(config.hydra.overrides.task)
    wanted = {  # as typed: sweeper, overrides less resume, params, study, and the config its jobs start from
        "sweeper": sweeper.get("_target_"),
        "overrides": sorted(o for o in typed if override_key(o) != "resume"),
        "params": sweeper.get("params"),
        "study": [sweeper.get("study_name"), sweeper.get("storage")],
        "config": {k: v for k, v in OmegaConf.to_container(config).items() if k not in ("hydra", "resume")},
    }
    saved = read_or_none(sweep_dir / ".sweep.json")  # None when missing too
    has_runs = any((p / "metrics.json").exists() or (p / "checkpoints").exists() for p in sweep_dir.iterdir())
    if has_runs and not config.get("resume"):
        raise ConfigError("hydra.sweep.dir", str(sweep_dir), "holds a sweep's runs; resume=true continues it")
    if has_runs and saved != wanted:
        why = f"holds another sweep ({' '.join((saved or {}).get('overrides') or ['?'])}); use a new dir"
        if isinstance(saved, dict) and saved.get("overrides") == wanted["overrides"]:
            why = "holds this sweep run on another config (a config file changed); use a new dir"
        raise ConfigError("hydra.sweep.dir", str(sweep_dir), why)
    write_json(sweep_dir / ".sweep.json", wanted)


def own_dir(path: Path, key: str, signs: tuple[str, ...], theirs: tuple[str, ...]) -> None:
    """A dir outside others, holding none of `theirs` (another kind's), and new, empty or with one of its `signs`."""
    for where in path.parents:  # inside a run or sweep, however deep, their tables and dashboards would count it
        run = all(os.path.lexists(where / n) for n in ("metrics.json", ".hydra/config.yaml"))  # by what linreg writes
        if run or any(os.path.lexists(where / n) for n in (".sweep.json", "checkpoints/config.json")):
            raise ConfigError(key, str(path), f"is inside {where}, a run's or a sweep's dir; use a dir of its own")
    if found := [n for n in theirs if os.path.lexists(path / n)]:
        why = f"holds {found[0]}: a dir of another kind (a run, a sweep or an evaluation); use a new dir"
        raise ConfigError(key, str(path), why)
    if not any(os.path.lexists(path / n) for n in signs) and any(p.name != ".lock" for p in path.iterdir()):
        raise ConfigError(key, str(path), "holds files that are not a run's or a sweep's; use a new dir")


def sweep_values(node: DictConfig) -> dict[str, Any]:
    """The sweep's config resolved, less `hydra` and what only a job resolves (`${hydra:job.num}`; its job checks)."""
    kept: dict[str, Any] = {}
    for key in [k for k in node if k != "hydra"]:
        with contextlib.suppress(OmegaConfBaseException):
            value = node[key]  # resolved, and converted to its schema's type (`${oc.env:X}` for a float)
            value = sweep_values(value) if isinstance(value, DictConfig) else value
            kept[key] = OmegaConf.to_container(value, resolve=True) if isinstance(value, ListConfig) else value
    return kept


def check_swept_devices(config: DictConfig) -> None:
    """A sweep with GPU jobs on a machine without one is refused before its first job."""
    typed = [str(o) for o in OmegaConf.to_container(config.hydra.overrides.task)]
    for o in OverridesParser.create(GlobalHydra.instance().config_loader()).parse_overrides(typed):  # glob() too
        if override_key(o.get_key_element()) in ("trainer", "trainer.accelerator"):
            values = list(o.sweep_string_iterator()) if o.is_discrete_sweep() else [o.get_value_element_as_str()]
            if set(values) & {"gpu", "cuda"} and not gpu_available():
                raise ConfigError(o.get_key_element(), ",".join(values), "no GPU here: its GPU jobs cannot run")


def check_slurm() -> None:
    """`hydra/launcher=slurm` needs a cluster that answers: one line instead of sbatch's traceback."""
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
