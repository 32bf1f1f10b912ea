"""Lightning callbacks of a run beyond the dashboards: the saved config, epoch lines, the end of a killed sweep."""

import logging
import os
import select
from pathlib import Path
from typing import Any

import lightning as L

from linreg.record import write_json

log = logging.getLogger("linreg.train")


class SweepGone(RuntimeError):
    """The sweep that started this job was killed: the job ends and leaves its checkpoint for a resume."""


class SaveRunConfig(L.Callback):
    """The run's config in `checkpoints/config.json` (what a resume must match) and inside every checkpoint.

    Inside the checkpoint, evaluate needs no file beside it: what it reads was saved with the weights.
    Written as training starts, not before: Lightning warns at set-up about a checkpoint dir that is not empty.
    """

    def __init__(self, out: Path, config: dict[str, Any]) -> None:
        self.out, self.config = out, config

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        (self.out / "checkpoints").mkdir(exist_ok=True)
        write_json(self.out / "checkpoints" / "config.json", self.config)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint["linreg_config"] = self.config


class EpochLines(L.Callback):
    """The tutorial's `epoch 1, loss 0.000122` after each epoch: the full-data MSE."""

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch_mse = getattr(pl_module, "epoch_mse", None)
        if epoch_mse and not trainer.sanity_checking:
            log.info("epoch %d, loss %f", len(epoch_mse), epoch_mse[-1])


class EndWithSweep(L.Callback):
    """Ends a sweep's worker job once the sweep's process is gone: a resume will redo it.

    The sweep names its pid; a pidfd on it (Linux) sees it exit even if the pid is reused. Not its parent pid
    at set-up: a sweep killed before the job builds its Trainer has already left the worker to init, and
    submitit_local's jobs are its grandchildren.
    """

    def __init__(self, sweep_pid: int) -> None:
        self.sweep_pid, self.pidfd, self.poller = sweep_pid, -1, None
        self.parent = os.getppid()  # without a pidfd, a parent that changes says so too (a reused pid would not)
        self.gone = False
        try:
            self.pidfd = os.pidfd_open(sweep_pid)
        except ProcessLookupError:
            self.gone = True  # killed already: the first check ends the job
        except (AttributeError, OSError):
            pass  # no pidfd here (not Linux): ask by pid instead
        if self.pidfd >= 0:
            self.poller = select.poll()
            self.poller.register(self.pidfd, select.POLLIN)  # readable once the process has exited

    def sweep_gone(self) -> bool:
        """Whether the sweep's process has exited."""
        if self.gone or self.poller is not None:
            return self.gone or bool(self.poller.poll(0))
        try:
            os.kill(self.sweep_pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass  # alive, and somebody else's
        return os.getppid() != self.parent

    def check(self) -> None:
        """Raise `SweepGone` once the sweep's process has exited."""
        if self.sweep_gone():
            raise SweepGone(f"the sweep's process (pid {self.sweep_pid}) is gone")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.check()

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.check()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.poller is not None:
            os.close(self.pidfd)
            self.pidfd, self.poller = -1, None
