"""Classes of a user's own, named by `_target_` in tests: a model with one more argument, a logger that stops."""

import os
import signal
import time
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger
from torch import optim

from linreg.models import LinearRegression


class DecayedLinearRegression(LinearRegression):
    """The tutorial's linear model with weight decay."""

    def __init__(self, in_features: int, weight_decay: float = 0.0, **kwargs: Any) -> None:
        super().__init__(in_features, **kwargs)
        self.save_hyperparameters()

    def configure_optimizers(self) -> optim.Optimizer:
        return optim.SGD(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)


class SigtermCSVLogger(CSVLogger):
    """Lightning's CSV logger that sends its own process a SIGTERM when made for job 1's dir: between two fits."""

    signum = signal.SIGTERM

    def __init__(self, save_dir: str, **kwargs: Any) -> None:
        if Path(save_dir).name == "1":
            os.kill(os.getpid(), self.signum)
        super().__init__(save_dir, **kwargs)


class SigintCSVLogger(SigtermCSVLogger):
    """The same with a Ctrl-C (SIGINT): between two fits, or in a single run in a dir named 1 before its fit."""

    signum = signal.SIGINT


class SigkillCSVLogger(CSVLogger):
    """Lightning's CSV logger that kills its own worker (as the OOM killer would) for job 1, once job 0 is done;
    once only (a resume runs it)."""

    def __init__(self, save_dir: str, **kwargs: Any) -> None:
        if Path(save_dir).name == "1" and not (Path(save_dir) / "killed").exists():
            (Path(save_dir) / "killed").touch()
            for _ in range(600):
                if (Path(save_dir).parent / "0" / "metrics.json").exists():
                    break
                time.sleep(0.1)
            os.kill(os.getpid(), signal.SIGKILL)
        super().__init__(save_dir, **kwargs)
