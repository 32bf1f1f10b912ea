"""`hydra/sweeper=optuna`: Optuna's ask-and-tell API behind Hydra's Sweeper interface, the study in a database.

hydra-optuna-sweeper's config keys and `params` grammar (conf/hydra/sweeper/optuna.yaml), with
- the study in `sqlite:///<sweep dir>/optuna.db` (study `linreg`) unless `storage`/`study_name` say otherwise;
- `resume=true`: a killed sweep continues to `n_trials` in all, its unfinished trials run again in their own
  job dirs (job number = trial number);
- sweeps sharing a storage and study name fill one study to `n_trials` together, each in its own sweep dir.

Hydra imports every public module under hydra_plugins at each start: Optuna is imported only when this sweeper
is set up (`_impl`, whose leading underscore keeps Hydra's plugin scan out of it).
"""

from typing import Any

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

from linreg.config import ConfigError, full_error, refuse


def refuse_unless_full_error(err: ConfigError) -> None:
    """Bad sweeper input: one line and exit code 2, or Hydra's traceback with HYDRA_FULL_ERROR=1."""
    if full_error():
        raise err
    refuse(err)


class OptunaSweeper(Sweeper):
    """Optuna sweeper with hydra-optuna-sweeper's config keys; see conf/hydra/sweeper/optuna.yaml."""

    def __init__(self, **config: Any) -> None:
        from ._impl import OptunaSweeperImpl

        try:
            self.impl = OptunaSweeperImpl(**config)
        except ConfigError as err:
            refuse_unless_full_error(err)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.impl.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> None:
        try:
            self.impl.sweep(arguments)
        except ConfigError as err:
            refuse_unless_full_error(err)
