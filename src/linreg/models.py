"""The tutorial's two models as LightningModules: `manual` (hand-written) and `linear` (nn.Linear)."""

import math
from typing import Any

import lightning as L
import torch
from lightning.pytorch.core.optimizer import LightningOptimizer
from torch import Tensor, nn, optim

from linreg import fastpath


def linreg(X: Tensor, w: Tensor) -> Tensor:
    """The tutorial's model: X @ w."""
    return torch.mm(X, w)


def squared_loss(y_hat: Tensor, y: Tensor) -> Tensor:
    """The tutorial's MSE: sum of squared errors over the number of elements."""
    return torch.sum((y_hat.reshape(-1, 1) - y.reshape(-1, 1)) ** 2) / y.numel()


def sgd(params: list[Tensor], lr: float) -> None:
    """The tutorial's update: `w.data -= lr * w.grad` outside autograd (w stays a leaf), then zero the gradient."""
    for p in params:
        p.data -= lr * p.grad  # as the tutorial writes it: torch.no_grad()'s numbers, without its context manager
        p.grad.zero_()


def log_scalars(trainer: L.Trainer, metrics: dict[str, float], step: int) -> None:
    """Write scalars straight to every logger: no per-step bookkeeping in Lightning's result collection."""
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)


def log_interval(every: int, num_examples: int, batch_size: int) -> int:
    """SGD steps between two `train/loss` points: `every`, or one an epoch when an epoch is shorter."""
    return max(1, min(every, -(-num_examples // batch_size)))


class HandSGD(optim.Optimizer):
    """The tutorial's `sgd` wrapped as an Optimizer only so Lightning counts its steps (global_step)."""

    def __init__(self, params: Any, lr: float) -> None:
        super().__init__(params, {"lr": lr})

    def update(self, closure: Any = None) -> None:
        for group in self.param_groups:
            sgd(group["params"], group["lr"])

    step = update  # torch wraps `step` in its hooks and profiler; the lean step calls `update`, bare


class RegressionModule(L.LightningModule):
    """Both models' manual optimization, sampled batch loss and full-data MSE per epoch; a model adds `forward`,
    `configure_optimizers`, `loss` and `update` (an SGD step on a mini-batch; its loss), weights before intercept."""

    uses_ones_column: bool = True  # whether the features carry the tutorial's column of ones

    def __init__(self, in_features: int, lr: float, bias: bool, log_every_sgd_steps: int) -> None:
        super().__init__()
        self.automatic_optimization = False  # `training_step` may hold several mini-batches
        self.example_input_array = torch.zeros(1, in_features)
        self.epoch_mse: list[float] = []
        self.diverged_epoch: int | None = None

    def on_train_start(self) -> None:
        self.lean_steps = fastpath.lean_steps(self.trainer)
        data = self.trainer.datamodule.hparams
        self.every = log_interval(self.hparams.log_every_sgd_steps, data.num_examples, data.batch_size)
        if self.diverged_epoch is not None:
            self.trainer.should_stop = True  # resumed from a diverged checkpoint: nothing left to train

    def backward_and_step(self, loss: Tensor, opt: LightningOptimizer) -> None:
        """`loss.backward()` then `opt.step()`, counted by Lightning (global_step) either way."""
        if self.lean_steps:
            inner = opt.optimizer
            fastpath.lean_backward_and_step(loss, opt, inner.update if isinstance(inner, HandSGD) else inner.step)
        else:
            self.manual_backward(loss)
            opt.step()

    def training_step(self, batch: list[tuple[Tensor, Tensor]], batch_idx: int) -> None:
        opt = self.optimizers()
        for step, (x, y) in enumerate(batch, start=self.trainer.global_step):
            loss = self.update(x, y, opt)
            # Sampled: logging costs about a step. Straight to the loggers: `self.log` re-flushes after every step.
            if step % self.every == 0:
                log_scalars(self.trainer, {"train/loss": loss.item()}, step)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        mse = squared_loss(self(x), y)  # the tutorial's full-data loss after each epoch
        # For callbacks (callback_metrics); the loggers get it at the SGD step below.
        self.log("train/mse", mse, on_step=False, on_epoch=True, logger=False)
        if self.trainer.sanity_checking:
            return
        value = mse.item()
        self.epoch_mse.append(value)
        log_scalars(self.trainer, {"train/mse": value}, self.trainer.global_step)
        if not (math.isfinite(value) and all(math.isfinite(v) for v in self.weights())):
            self.diverged_epoch = self.current_epoch  # an outcome to record, not something to train on
            self.trainer.should_stop = True

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        # One batch holds the whole set: weight 1 keeps its float32 MSE exact (Lightning's mean is value * n / n).
        self.log("test/mse", squared_loss(self(x), y), batch_size=1)

    def weights(self) -> list[float]:
        """Learned coefficients in the tutorial's order: feature weights, then intercept."""
        return torch.cat([p.detach().flatten() for p in self.parameters()]).tolist()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["epoch_mse"] = self.epoch_mse
        checkpoint["diverged_epoch"] = self.diverged_epoch

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.epoch_mse = list(checkpoint.get("epoch_mse", []))
        self.diverged_epoch = checkpoint.get("diverged_epoch")


class ManualRegression(RegressionModule):
    """The tutorial's hand-written model: a leaf `w`, `linreg`, `squared_loss` and `sgd`."""

    def __init__(self, in_features: int, lr: float = 0.03, bias: bool = True, log_every_sgd_steps: int = 50) -> None:
        super().__init__(in_features, lr, bias, log_every_sgd_steps)
        self.save_hyperparameters()
        # torch.zeros(3, 1, requires_grad=True) in the tutorial; the intercept is the ones column's weight.
        self.w = nn.Parameter(torch.zeros(in_features, 1))

    def forward(self, x: Tensor) -> Tensor:
        return linreg(x, self.w)

    def configure_optimizers(self) -> optim.Optimizer:
        return HandSGD([self.w], lr=self.hparams.lr)

    def loss(self, y_hat: Tensor, y: Tensor) -> Tensor:
        return squared_loss(y_hat, y)

    def update(self, x: Tensor, y: Tensor, opt: optim.Optimizer) -> Tensor:
        # forward() directly, as the tutorial calls linreg(X, w): no module-call hooks to run per step.
        loss = self.loss(self.forward(x), y)  # squared_loss(linreg(X, w), y)
        self.backward_and_step(loss, opt)  # opt.step() is sgd(w, lr): w.data -= lr * w.grad, then zero w.grad
        return loss


class LinearRegression(RegressionModule):
    """The tutorial's `nn.Linear` + `nn.MSELoss` + `optim.SGD` model."""

    uses_ones_column = False

    def __init__(
        self,
        in_features: int,
        lr: float = 0.03,
        bias: bool = True,
        log_every_sgd_steps: int = 50,
        init: str = "default",
    ) -> None:
        super().__init__(in_features, lr, bias, log_every_sgd_steps)
        self.save_hyperparameters()
        self.linear = nn.Linear(in_features, 1, bias=bias)
        if init == "zeros":
            for p in self.linear.parameters():
                nn.init.zeros_(p)
        self.criterion = nn.MSELoss()

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x)

    def configure_optimizers(self) -> optim.Optimizer:
        return optim.SGD(self.parameters(), lr=self.hparams.lr)

    def loss(self, y_hat: Tensor, y: Tensor) -> Tensor:
        return self.criterion(y_hat, y)  # the tutorial's nn.MSELoss()

    def update(self, x: Tensor, y: Tensor, opt: optim.Optimizer) -> Tensor:
        loss = self.loss(self.forward(x), y)  # criterion(net.forward(X), y), as the tutorial computes it
        opt.zero_grad()
        self.backward_and_step(loss, opt)
        return loss
