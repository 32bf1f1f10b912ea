"""`hydra/sweeper=optuna`: Optuna's ask-and-tell API behind Hydra's Sweeper interface, the study in a database.

hydra-optuna-sweeper's config keys and `params` grammar (conf/hydra/sweeper/optuna.yaml), with the study in
`sqlite:///<sweep dir>/optuna.db` unless `storage` says otherwise; `resume=true` continues a killed sweep to
`n_trials`; sweeps sharing a storage and study name fill one study together. Hydra imports every public module
under hydra_plugins at each start: Optuna is imported only when this sweeper is set up (`_study`).
"""

from typing import Any

from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

from linreg.config import refusing


class OptunaSweeper(Sweeper):
    """Optuna sweeper with hydra-optuna-sweeper's config keys; see conf/hydra/sweeper/optuna.yaml."""

    def __init__(self, **keys: Any) -> None:
        self.keys = keys

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from ._study import StudySweep

        launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )
        with refusing():
            self.study = StudySweep(config, launcher, **self.keys)

    def sweep(self, arguments: list[str]) -> None:
        with refusing():
            self.study.sweep(arguments)
