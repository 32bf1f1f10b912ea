"""`python -m linreg.train [overrides]`: Hydra's entry for one run or a sweep's job (the work is `linreg.run`)."""

import logging
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from linreg.config import ConfigError, check, full_error, gpu_available, refuse
from linreg.record import NEW_DIRS, RunDirBusy, RunRecord, created_here, read_or_none, refuse_other_runs, write_json

log = logging.getLogger("linreg.train")
CONFIG_DIR = str(Path(__file__).resolve().parent / "conf")  # conf/ of the checkout, or its copy in the wheel


class CheckConfig(Callback):
    """Bad input refused in one line (exit 2) before Hydra makes a run dir or a sweep starts its first job."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            check(config)
            out = Path(str(config.hydra.run.dir))
            if out.is_dir():
                refuse_other_runs(out, config)  # before Hydra rewrites the .hydra/ of a run it must keep
        except (ConfigError, OmegaConfBaseException) as err:
            if full_error():
                raise SystemExit(f"error: {err}") from err
            refuse(err)
        if not out.exists():
            NEW_DIRS.add(out.absolute())

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # Values a sweep varies are each job's to check (a bad one is a failed row); the rest fail here, once.
        try:
            check(OmegaConf.create(without_job_values(OmegaConf.to_container(config, resolve=False))))
            check_slurm(config)
            check_swept_devices(config)
        except (ConfigError, OmegaConfBaseException) as err:
            if full_error():
                raise SystemExit(f"error: {err}") from err
            refuse(err)
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if not sweep_dir.exists():
            NEW_DIRS.add(sweep_dir.absolute())
        try:
            own_sweep_dir(config, sweep_dir)
        except ConfigError as err:
            refuse(err)
        # Workers on this machine (joblib, submitit_local) end when this process is gone; SLURM's outlive it.
        os.environ["LINREG_SWEEP_PID"] = "" if on_slurm(config) else str(os.getpid())


SWEEP_LOCKS: list[Any] = []  # the sweep dir's lock, held by the sweep's process until it exits
JOB_DIRS = ("${hydra.job.num}", "${hydra.job.id}", "${hydra.job.override_dirname}")


def sweep_identity(config: DictConfig) -> dict[str, Any]:
    """What a sweep is: its sweeper, its overrides as typed (less resume), its params, its study."""
    sweeper = OmegaConf.to_container(config.hydra.sweeper, resolve=False)
    typed = OmegaConf.to_container(config.hydra.overrides.task, resolve=False)
    return {
        "sweeper": sweeper.get("_target_"),
        "overrides": sorted(o for o in typed if o.split("=", 1)[0].lstrip("+~") != "resume"),
        "params": sweeper.get("params"),
        "study": [sweeper.get("study_name"), sweeper.get("storage")],
    }


def own_sweep_dir(config: DictConfig, sweep_dir: Path) -> None:
    """One owner per sweep dir: a lock for the sweep's life, and the dir records which sweep it holds."""
    import fcntl

    subdir = str(OmegaConf.to_container(config.hydra.sweep, resolve=False).get("subdir"))
    if not any(part in subdir for part in JOB_DIRS):
        why = f"must separate the jobs: use one of {', '.join(JOB_DIRS)} in it"
        raise ConfigError("hydra.sweep.subdir", subdir, why)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    lock = open(sweep_dir / ".sweep.lock", "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise ConfigError("hydra.sweep.dir", str(sweep_dir), "another sweep is using it") from None
    SWEEP_LOCKS.append(lock)
    wanted, path = sweep_identity(config), sweep_dir / ".sweep.json"
    saved = read_or_none(path) if os.path.lexists(path) else None
    has_runs = any((p / "metrics.json").exists() or (p / "checkpoints").exists() for p in sweep_dir.iterdir())
    if has_runs and not config.get("resume"):
        raise ConfigError("hydra.sweep.dir", str(sweep_dir), "holds a sweep's runs; resume=true continues it")
    if has_runs and saved != wanted:
        why = f"holds another sweep ({' '.join((saved or {}).get('overrides') or ['?'])}); use a new dir"
        raise ConfigError("hydra.sweep.dir", str(sweep_dir), why)
    write_json(path, wanted)


def without_job_values(node: Any) -> Any:
    """The sweep's config less `hydra` and values only a job can resolve (`${hydra:job.num}`): each job checks those."""
    if isinstance(node, dict):
        kept = {k: v for k, v in node.items() if k != "hydra" and (isinstance(v, dict) or "${hydra:" not in str(v))}
        return {k: without_job_values(v) for k, v in kept.items()}
    return node


def check_swept_devices(config: DictConfig) -> None:
    """A sweep with GPU jobs on a machine without one is refused before its first job (SLURM's nodes may have one)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    typed = [str(o) for o in OmegaConf.to_container(config.hydra.overrides.task, resolve=False)]
    for o in OverridesParser.create().parse_overrides(typed):
        if o.get_key_element().lstrip("+~") in ("trainer", "trainer.accelerator") and not on_slurm(config):
            values = list(o.sweep_string_iterator()) if o.is_discrete_sweep() else [o.get_value_element_as_str()]
            if set(values) & {"gpu", "cuda"} and not gpu_available():
                raise ConfigError(o.get_key_element(), ",".join(values), "no GPU here: its GPU jobs cannot run")


def on_slurm(config: DictConfig) -> bool:
    """Whether the sweep's launcher submits its jobs to SLURM."""
    return "Slurm" in str(OmegaConf.select(config, "hydra.launcher._target_", default="") or "")


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


def result_line(r: RunRecord) -> str:
    """`manual: status=ok train_mse=0.000101 weights=[2.0006, -0.9999, 1.0007]`."""
    weights = "[" + ", ".join("nan" if v is None else f"{v:.4f}" for v in r.weights) + "]" if r.weights else "n/a"
    text = f"{r.model}: status={r.status} train_mse={'n/a' if r.train_mse is None else f'{r.train_mse:.6g}'}"
    if r.status == "diverged":
        text += f" (diverged in epoch {r.diverged_epoch + 1} of {r.epochs})"
    return f"{text} weights={weights}"


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float:
    """One run, or one job of a sweep: its train MSE (inf without one) for the sweeper."""
    from linreg.callbacks import SweepGone
    from linreg.dashboard import run_label
    from linreg.results import read_plan
    from linreg.run import run

    hc = HydraConfig.get()
    sweep = hc.mode == RunMode.MULTIRUN
    out = Path(hc.runtime.output_dir)
    try:
        swept = read_plan(Path(hc.sweep.dir))["swept"] if sweep else None  # a sweep's runs are named by what varies
        record = run(cfg, out, label=run_label(hc.overrides.task, swept), progress=not sweep, in_sweep=sweep)
    except SweepGone as err:  # nobody is left to report to: end the worker too (its checkpoint stays for a resume)
        log.warning("job ended: %s", err)
        logging.shutdown()
        os._exit(0)
    except Exception as err:
        if full_error() and not sweep:
            raise
        if isinstance(err, RunDirBusy):  # the dir is another run's: nothing is written there
            return refused(err, sweep)
        if isinstance(err, OSError):  # a full disk, a read-only dir
            print(f"error: cannot write {err.filename or out}: {err.strerror or err}", file=sys.stderr)
            sys.exit(1)
        if isinstance(err, ConfigError) and not sweep:
            if created_here(out):
                shutil.rmtree(out, ignore_errors=True)
            refuse(err)
        failed = RunRecord.failed(cfg, err)
        try:
            failed.write(out)
        except OSError as write_err:
            log.error("could not record the failure in %s: %s", out, write_err)
        if not sweep:
            raise
        log.error("job failed: %s", failed.error)  # in a sweep a failed job is a row, not the end of it
        return math.inf
    if not sweep:
        print(result_line(record))
        print(f"run dir: {out}")
    return math.inf if record.train_mse is None else record.train_mse


def refused(err: RunDirBusy, sweep: bool) -> float:
    """A job whose dir is another run's: one error line in a sweep (a missing row), exit 2 for a single run."""
    if not sweep:
        refuse(err)
    log.error("job refused: %s", err)
    return math.inf


if __name__ == "__main__":
    main()
