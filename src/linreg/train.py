"""`python -m linreg.train [overrides]`: Hydra's entry for one run or a sweep's job (the work is `linreg.run`)."""

import logging
import math
import os
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import NoReturn

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from linreg import fastpath
from linreg.checks import one_report_per_write_error, stopped_by
from linreg.config import CONFIG_DIR, ConfigError, full_error, refuse
from linreg.record import RunDirBusy, RunRecord, shown, sweep_dir_of, write_job_files
from linreg.results import read_plan, stopped

log = logging.getLogger("linreg.train")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float:
    """One run, or one job of a sweep: its train MSE (inf without one) for the sweeper."""
    hc = HydraConfig.get()
    out = Path(hc.runtime.output_dir)
    if hc.mode == RunMode.MULTIRUN:  # the sweep's process ends the sweep on a SIGTERM or Ctrl-C (checks.end_sweep)
        if os.environ.get("LINREG_SWEEP_PID") not in (None, "", str(os.getpid())):  # a worker (joblib, submitit):
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # its Ctrl-C ends the job with the sweep (EndWithSweep)
        return job(cfg, hc, out)
    kept = {signum: signal.signal(signum, stop_run) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        mse = job(cfg, hc, out)
    except Stopped:
        stopped_run(out)
    for signum, handler in kept.items():  # done: Hydra's last steps as Python has them
        signal.signal(signum, handler)
    return mse


class Stopped(BaseException):
    """A single run's SIGTERM or Ctrl-C outside its fit. Not a KeyboardInterrupt: Lightning would `sys.exit(1)`."""


STOPPED_BY: list[int] = []  # the signal that stopped a single run (Lightning's SIGTERMException does not say)


def stop_run(signum: int, frame: FrameType | None) -> None:
    """A single run's SIGTERM or Ctrl-C: in its fit, Lightning's (it stops after its step), else at once."""
    lightning = signal.getsignal(signal.SIGTERM)  # while it fits, Lightning's: it calls this one after its own
    if lightning is stop_run:  # not in the fit
        STOPPED_BY.append(signum)
        raise Stopped
    if signum == signal.SIGINT and not STOPPED_BY:  # a Ctrl-C in the fit, as a SIGTERM (not again from Lightning's)
        STOPPED_BY.append(signum)
        lightning(signum, frame)


def stopped_run(out: Path) -> NoReturn:
    """A single run stopped by SIGTERM or Ctrl-C: one line, exit 143 or 130 (128 + the signal)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C again: the line still comes, once
    signum = STOPPED_BY[0] if STOPPED_BY else signal.SIGTERM
    print(f"error: {out}: stopped by {stopped_by(signum)}; resume=true continues it", file=sys.stderr)
    sys.exit(128 + signum)


def job(cfg: DictConfig, hc: DictConfig, out: Path) -> float:
    """The run or job itself."""
    with fastpath.importing():  # Lightning's seconds of imports
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        from linreg.callbacks import SweepGone
        from linreg.dashboard import run_label
        from linreg.run import run
    one_report_per_write_error()  # in a sweep's worker process too
    # Lightning's "Received SIGTERM" line, twice (its own handler, then Hydra's): the stop's own line says it.
    connector = logging.getLogger("lightning.pytorch.trainer.connectors.signal_connector")
    if not connector.filters:
        connector.addFilter(lambda record: "Received SIG" not in record.getMessage())
    sweep = hc.mode == RunMode.MULTIRUN
    try:
        swept = read_plan(sweep_dir_of(hc))["swept"] if sweep else None  # a sweep's runs are named by what varies
        r = run(cfg, out, label=run_label(hc.overrides.task, swept), progress=not sweep, in_sweep=sweep)
    except SIGTERMException:  # Lightning stops at the next step and would exit 0: the run is not done
        if sweep:  # a worker (joblib, submitit): the table of what finished, one line (the sweep's process: end_sweep)
            raise SystemExit(stopped(sweep_dir_of(hc), f"job {out} stopped by SIGTERM")) from None
        stopped_run(out)
    except SweepGone as err:  # nobody is left to report to: end the worker too (its checkpoint stays for a resume)
        log.warning("job ended: %s", err)
        logging.shutdown()
        os._exit(0)
    except Exception as err:
        if full_error() and not sweep:
            raise
        if isinstance(err, RunDirBusy) and sweep:  # the dir is another run's: nothing is written there
            log.error("job refused: %s", err)
            return math.inf
        if isinstance(err, ConfigError) and not sweep:  # RunDirBusy too
            refuse(err)
        if isinstance(err, OSError) and not sweep:  # a full disk, a read-only dir
            print(f"error: cannot write {err.filename or out}: {err.strerror or err}", file=sys.stderr)
            sys.exit(1)
        failed = RunRecord.failed(cfg, err)
        try:
            write_job_files(out, cfg)
            failed.write(out)
        except OSError as write_err:
            log.error("could not record the failure in %s: %s", out, write_err)
        if not sweep:
            raise
        log.error("job failed: %s", failed.error)  # in a sweep a failed job is a row, not the end of it
        return math.inf
    if not sweep:
        mse = "n/a" if r.train_mse is None else f"{r.train_mse:.6g}"
        diverged = f" (diverged in epoch {r.diverged_epoch + 1} of {r.epochs})" if r.status == "diverged" else ""
        weights = f"[{shown(r.weights)}]" if r.weights else "n/a"
        print(f"{r.model}: status={r.status} train_mse={mse}{diverged} weights={weights}")  # weights=[2.0006, ...]
        print(f"run dir: {out}")
    return math.inf if r.train_mse is None else r.train_mse


if __name__ == "__main__":
    main()
