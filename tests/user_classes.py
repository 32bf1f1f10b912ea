"""Classes of a user's own, named by `_target_` in tests: a model and a logger that are not the project's."""

from torch import optim

from linreg.models import LinearRegression


class DecayedLinearRegression(LinearRegression):
    """The tutorial's linear model with weight decay: one more argument, one other optimizer."""

    def __init__(self, in_features: int, lr: float = 0.03, bias: bool = True, weight_decay: float = 0.0) -> None:
        super().__init__(in_features, lr=lr, bias=bias)
        self.save_hyperparameters()

    def configure_optimizers(self) -> optim.Optimizer:
        return optim.SGD(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
