"""Lightning callbacks of a run beyond the dashboards: the saved config, epoch lines, a killed sweep, Optuna trials."""

import logging
import math
import os
import select
import warnings
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig

from linreg.record import sweep_dir_of, write_json

log = logging.getLogger("linreg.train")


class SweepGone(RuntimeError):
    """The sweep that started this job was killed: the job ends and leaves its checkpoint for a resume."""


class SaveRunConfig(L.Callback):
    """The run's config in `checkpoints/config.json` (what a resume must match) and in every checkpoint (evaluate's)."""

    def __init__(self, out: Path, config: dict[str, Any]) -> None:
        self.out, self.config = out, config

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        (self.out / "checkpoints").mkdir(exist_ok=True)  # not at set-up: Lightning warns of a dir that is not empty
        write_json(self.out / "checkpoints" / "config.json", self.config)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint["linreg_config"] = self.config


class EpochLines(L.Callback):
    """The tutorial's `epoch 1, loss 0.000122` after each epoch: the full-data MSE."""

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch_mse = pl_module.epoch_mse
        if epoch_mse and not trainer.sanity_checking:
            log.info("epoch %d, loss %f", len(epoch_mse), epoch_mse[-1])


class EndWithSweep(L.Callback):
    """Ends a sweep's worker job once the sweep's process is gone (a resume will redo it)."""

    def __init__(self, sweep_pid: int) -> None:
        self.sweep_pid, self.pidfd, self.poller, self.gone = sweep_pid, -1, None, False
        self.parent = os.getppid()  # without a pidfd, a parent that changes says so too (a reused pid would not)
        try:  # a pidfd sees the sweep exit even if its pid is reused; the parent may be init or submitit's already
            self.pidfd = os.pidfd_open(sweep_pid)
            self.poller = select.poll()  # not select(): that refuses fds past 1024
            self.poller.register(self.pidfd, select.POLLIN)  # readable once the process has exited
        except ProcessLookupError:
            self.gone = True  # killed already: the first check ends the job
        except (AttributeError, OSError):
            pass  # no pidfd here (not Linux): ask by pid instead

    def check(self) -> None:
        """Raise `SweepGone` once the sweep's process has exited."""
        if self.poller is not None:
            self.gone = bool(self.poller.poll(0))
        elif not self.gone:
            try:
                os.kill(self.sweep_pid, 0)
            except OSError as err:  # a PermissionError: alive, and somebody else's
                self.gone = isinstance(err, ProcessLookupError)
            self.gone = self.gone or os.getppid() != self.parent
        if self.gone:
            raise SweepGone(f"the sweep's process (pid {self.sweep_pid}) is gone")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.check()

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.check()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.poller is not None:
            os.close(self.pidfd)
            self.poller = None


def prune(study: Any, storage: Any, number: int, epoch: int, value: float) -> bool:
    """Report trial `number`'s `value` at `epoch` to its study; if the study's pruner stops it, mark it PRUNED."""
    from optuna.trial import Trial, TrialState

    trial_id = storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study.study_name), number)
    trial = Trial(study, trial_id)
    with warnings.catch_warnings():  # a retrained member's epochs are its trial's already: Optuna keeps the first
        warnings.filterwarnings("ignore", "The reported value is ignored", UserWarning)
        trial.report(value, epoch)
    if not trial.should_prune():
        return False
    study.tell(number, state=TrialState.PRUNED, skip_if_finished=True)  # its value: the last one reported
    return True


class ReportToStudy(L.Callback):
    """An Optuna trial (number = job number): its train/mse each epoch to the study, which may prune it."""

    def __init__(self, hc: DictConfig) -> None:
        import optuna

        # The study found from the job's Hydra config as the sweeper finds it: any launcher works.
        url = hc.sweeper.storage or f"sqlite:///{sweep_dir_of(hc).resolve() / 'optuna.db'}"
        engine = {"connect_args": {"timeout": 120}} if url.startswith("sqlite:") else {}  # as the sweeper waits
        self.storage = optuna.storages.RDBStorage(url, engine_kwargs=engine)
        pruner = instantiate(hc.sweeper.pruner) if hc.sweeper.pruner else optuna.pruners.NopPruner()
        name = hc.sweeper.study_name or "linreg"
        self.study = optuna.load_study(study_name=name, storage=self.storage, pruner=pruner)
        self.number, self.pruned_epoch = hc.job.num, None

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch_mse = pl_module.epoch_mse
        if trainer.sanity_checking or not epoch_mse or not math.isfinite(epoch_mse[-1]):
            return  # a diverged run stops itself
        if prune(self.study, self.storage, self.number, len(epoch_mse), epoch_mse[-1]):
            self.pruned_epoch = len(epoch_mse)
            trainer.should_stop = True
