"""`hydra/sweeper=optuna`: Optuna's ask-and-tell behind Hydra's Sweeper; Optuna imported at setup (`_study`)."""

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

from linreg.config import refusing


class Direction(Enum):
    minimize = "minimize"
    maximize = "maximize"


@dataclass
class OptunaConfig:
    """The sweeper's keys (conf/hydra/sweeper/optuna.yaml says what each means)."""

    _target_: str = "hydra_plugins.linreg_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    _recursive_: bool = False  # the sampler and pruner arrive as configs: made per trial, and in each job
    _convert_: str = "all"
    sampler: dict[str, Any] = field(default_factory=lambda: {"_target_": "optuna.samplers.TPESampler"})
    pruner: dict[str, Any] | None = None
    direction: Direction = Direction.minimize
    storage: str | None = None
    study_name: str | None = None
    n_trials: int = 20
    n_jobs: int = 1
    max_failure_rate: float = 0.0
    params: dict[str, str] | None = None
    custom_search_space: str | None = None


ConfigStore.instance().store(group="schema/hydra/sweeper", name="optuna", node=OptunaConfig)


class OptunaSweeper(Sweeper):
    """Optuna sweeper with hydra-optuna-sweeper's config keys, and pruning (conf/hydra/sweeper/pruner)."""

    def __init__(self, **keys: Any) -> None:
        self.keys = OptunaConfig(**keys)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from ._study import StudySweep

        launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )
        with refusing():
            self.study = StudySweep(config, launcher, self.keys)

    def sweep(self, arguments: list[str]) -> None:
        with refusing():
            self.study.sweep(arguments)
