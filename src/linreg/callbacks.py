"""Lightning callbacks of a run beyond the dashboards: the saved config, epoch lines, the end of a killed sweep."""

import logging
import os
from pathlib import Path
from typing import Any

import lightning as L

from linreg.record import write_json_atomic

log = logging.getLogger("linreg.train")


class SweepGone(RuntimeError):
    """The sweep that started this job was killed: the job ends and leaves its checkpoint for a resume."""


class SaveRunConfig(L.Callback):
    """Writes `checkpoints/config.json` (what a resume must match) as training starts.

    Not before: Lightning warns at set-up about a checkpoint dir that is not empty.
    """

    def __init__(self, out: Path, config: dict[str, Any]) -> None:
        self.out, self.config = out, config

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        (self.out / "checkpoints").mkdir(exist_ok=True)
        write_json_atomic(self.out / "checkpoints" / "config.json", self.config)


class EpochLines(L.Callback):
    """The tutorial's `epoch 1, loss 0.000122` after each epoch: the full-data MSE."""

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch_mse = getattr(pl_module, "epoch_mse", None)
        if epoch_mse and not trainer.sanity_checking:
            log.info("epoch %d, loss %f", len(epoch_mse), epoch_mse[-1])


class EndWithSweep(L.Callback):
    """Ends a sweep's worker job when the sweep's process is gone (its parent changed): a resume will redo it."""

    def __init__(self) -> None:
        self.parent = os.getppid()

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if os.getppid() != self.parent:
            raise SweepGone(f"the sweep's process (pid {self.parent}) is gone")
