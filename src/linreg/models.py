"""The tutorial's two models as LightningModules: `manual` (hand-written) and `linear` (nn.Linear)."""

import math
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn, optim


def linreg(X: Tensor, w: Tensor) -> Tensor:
    """The tutorial's model: X @ w."""
    return torch.mm(X, w)


def squared_loss(y_hat: Tensor, y: Tensor) -> Tensor:
    """The tutorial's MSE: sum of squared errors over the number of elements."""
    return torch.sum((y_hat.reshape(-1, 1) - y.reshape(-1, 1)) ** 2) / y.numel()


def sgd(params: list[Tensor], lr: float) -> None:
    """The tutorial's update: w -= lr * grad outside autograd (w stays a leaf), then zero the gradient."""
    with torch.no_grad():
        for p in params:
            p -= lr * p.grad
            p.grad.zero_()


class HandSGD(optim.Optimizer):
    """The tutorial's `sgd` wrapped as an Optimizer only so Lightning counts its steps (global_step)."""

    def __init__(self, params: Any, lr: float) -> None:
        super().__init__(params, {"lr": lr})

    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            sgd(group["params"], group["lr"])


class RegressionModule(L.LightningModule):
    """What both models share: manual optimization, sampled batch loss, full-data MSE per epoch."""

    uses_ones_column: bool = True  # whether the features carry the tutorial's column of ones

    def __init__(self, in_features: int, lr: float, bias: bool, log_every_n_steps: int) -> None:
        super().__init__()
        # Both modules drive their own steps: `training_step` may hold several mini-batches.
        self.automatic_optimization = False
        self.example_input_array = torch.zeros(1, in_features)
        self.epoch_mse: list[float] = []
        self.diverged_epoch: int | None = None

    def update(self, x: Tensor, y: Tensor, opt: optim.Optimizer) -> Tensor:
        """One SGD step on one mini-batch; returns its loss."""
        raise NotImplementedError

    def weights(self) -> list[float]:
        """Learned coefficients in the tutorial's order: feature weights, then intercept."""
        raise NotImplementedError

    def training_step(self, batch: list[tuple[Tensor, Tensor]], batch_idx: int) -> None:
        opt = self.optimizers()
        for x, y in batch:
            loss = self.update(x, y, opt)
        # Logging costs about as much as a step on this tiny model: sample it.
        if batch_idx % self.hparams.log_every_n_steps == 0:
            self.log("train/loss", loss.detach(), on_step=True, on_epoch=False)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        mse = squared_loss(self(x), y)
        self.log("train/mse", mse, on_step=False, on_epoch=True)
        if self.trainer.sanity_checking:
            return
        value = mse.item()
        self.epoch_mse.append(value)
        if not (math.isfinite(value) and all(math.isfinite(v) for v in self.weights())):
            # Non-finite loss or weights: an outcome to record, not something to train on.
            self.diverged_epoch = self.current_epoch
            self.trainer.should_stop = True

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["epoch_mse"] = self.epoch_mse

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.epoch_mse = list(checkpoint.get("epoch_mse", []))


class ManualRegression(RegressionModule):
    """The tutorial's hand-written model: a leaf `w`, `linreg`, `squared_loss` and `sgd`."""

    uses_ones_column = True

    def __init__(self, in_features: int, lr: float = 0.03, bias: bool = True, log_every_n_steps: int = 50) -> None:
        super().__init__(in_features, lr, bias, log_every_n_steps)
        self.save_hyperparameters()
        # torch.zeros(3, 1, requires_grad=True) in the tutorial; the intercept is the ones column's weight.
        self.w = nn.Parameter(torch.zeros(in_features, 1))

    def forward(self, x: Tensor) -> Tensor:
        return linreg(x, self.w)

    def configure_optimizers(self) -> optim.Optimizer:
        return HandSGD([self.w], lr=self.hparams.lr)

    def update(self, x: Tensor, y: Tensor, opt: optim.Optimizer) -> Tensor:
        loss = squared_loss(self(x), y)
        self.manual_backward(loss)
        opt.step()  # sgd(w, lr): the update under torch.no_grad(), then w.grad.zero_()
        return loss

    def weights(self) -> list[float]:
        return self.w.detach().flatten().tolist()


class LinearRegression(RegressionModule):
    """The tutorial's `nn.Linear` + `nn.MSELoss` + `optim.SGD` model."""

    uses_ones_column = False

    def __init__(
        self,
        in_features: int,
        lr: float = 0.03,
        bias: bool = True,
        log_every_n_steps: int = 50,
        init: str = "default",
    ) -> None:
        super().__init__(in_features, lr, bias, log_every_n_steps)
        self.save_hyperparameters()
        self.linear = nn.Linear(in_features, 1, bias=bias)
        if init == "zeros":
            nn.init.zeros_(self.linear.weight)
            if bias:
                nn.init.zeros_(self.linear.bias)
        self.criterion = nn.MSELoss()

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x)

    def configure_optimizers(self) -> optim.Optimizer:
        return optim.SGD(self.parameters(), lr=self.hparams.lr)

    def update(self, x: Tensor, y: Tensor, opt: optim.Optimizer) -> Tensor:
        loss = self.criterion(self(x), y)
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        return loss

    def weights(self) -> list[float]:
        w = self.linear.weight.detach().flatten().tolist()
        return w + (self.linear.bias.detach().tolist() if self.linear.bias is not None else [])


MODELS: dict[str, type[RegressionModule]] = {"manual": ManualRegression, "linear": LinearRegression}
