"""A model class of a user's own, named by `_target_` in tests: one more argument, another optimizer."""

from typing import Any

from torch import optim

from linreg.models import LinearRegression


class DecayedLinearRegression(LinearRegression):
    """The tutorial's linear model with weight decay."""

    def __init__(self, in_features: int, weight_decay: float = 0.0, **kwargs: Any) -> None:
        super().__init__(in_features, **kwargs)
        self.save_hyperparameters()

    def configure_optimizers(self) -> optim.Optimizer:
        return optim.SGD(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
