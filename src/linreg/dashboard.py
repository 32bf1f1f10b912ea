"""TensorBoard dashboards: parameter trajectories, the HParams record and a picture of the fit.

Tags written here (a contract for dashboards and scripts; `train/loss` and `train/mse` come from the module):
`params/<name>` (w1, w2, ..., b), `train_end/mse`, `train_end/ols_gap` and the image `train_end/fit` (the graph
is Lightning's). Every scalar is written at the run's SGD step count (`global_step`), so all curves share one axis.
"""

import math
import re
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

from linreg.config import override_key
from linreg.models import RegressionModule, log_scalars, log_step, squared_loss
from linreg.record import RunRecord

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# The HParams columns: every job logs exactly these keys, so TensorBoard lines the runs up in one table. Time Series
# sorts its groups by name and opens the first two (params, train): the end results come after them.
HP_METRICS = ("train_end/mse", "train_end/ols_gap")
LAYOUT = {  # TensorBoard's Custom Scalars tab: the curves that answer a run or a sweep, on one page
    "linreg": {
        "train/mse (full data, each epoch)": ["Multiline", ["train/mse"]],
        "train/loss (mini-batch)": ["Multiline", ["train/loss"]],
        "params (learned weights)": ["Multiline", ["params/.*"]],
    }
}
HEADLINE_HPARAMS = ("model", "deg", "delta", "lr", "batch_size")  # shown by default in the HParams table
LABEL_EXCLUDE = (
    "resume",
    "logger",
    "trainer.max_epochs",
)  # a resume may add epochs: the same run  # overrides that do not change what a run computes
MAX_LABEL = 120  # longest run label; longer override lists are cut (the HParams table has them all)
FIT_POINTS = 500  # about this many data points are drawn in the fit image (every k-th)
FIT_DPI = 80  # the fit image's pixels per inch: 512 x 320, drawn and PNG-encoded every job (benchmarks/README.md)


def hparams(r: RunRecord) -> dict[str, Any]:
    """The HParams record's hyperparameters, one scalar each (the same keys for every run, so rows line up)."""
    data = r.data or {}
    return {
        "model": str(r.model), "deg": int(data.get("deg", 0)), "delta": float(data.get("delta", math.nan)),
        "lr": float(r.lr) if r.lr is not None else math.nan, "batch_size": int(r.batch_size or 0),
        "accelerator": str(r.accelerator), "seed": int(r.seed or 0),
        "num_examples": int(data.get("num_examples", 0)), "epochs": int(r.epochs or 0),
    }  # fmt: skip


def run_label(overrides: Sequence[str], swept: Sequence[str] | None = None) -> str:
    """A run's folder name from its command-line overrides (as Hydra's `override_dirname`), one path part.

    In a sweep, only the `swept` keys: what every job shares (`sweep=smoke`) names none of them.
    """
    # `resume=true` must land in the same run as the first try (and `logger=...` changes no result).
    kept = sorted(o for o in overrides if override_key(o) not in LABEL_EXCLUDE)
    if swept:
        kept = [o for o in kept if override_key(o) in swept] or kept
    # A '/' in an override (a path) would nest folders and split the run in TensorBoard.
    label = re.sub(r"[^A-Za-z0-9._=,+\-\[\]]", "_", ",".join(kept))[:MAX_LABEL]
    return label or "defaults"


def param_names(count: int, bias: bool) -> list[str]:
    """Names of the coefficients in the tutorial's order: w1..wk, then b for the intercept."""
    features = count - 1 if bias else count
    return [f"w{i + 1}" for i in range(features)] + (["b"] if bias else [])


class BufferedTensorBoardLogger(TensorBoardLogger):
    """Lightning's TensorBoardLogger, with scalars held in memory and written at each save (each epoch here).

    TensorBoard's writer thread wakes for every event, and its grabs of the GIL stall the training thread.
    Held, the scalars are written in one burst, at their own wall times. After `write_every_s` they are
    saved from the logging call itself, so a long epoch still shows up live. Values are numbers or
    one-element tensors (no dicts). `fit_figure` is read by the run (the Dashboard draws the image `fit`).
    """

    def __init__(
        self, *args: Any, write_every_s: float = 10.0, fit_figure: bool | str = "auto", prefix: str = "", **kwargs: Any
    ) -> None:
        super().__init__(*args, prefix=prefix, **kwargs)
        self.fit_figure = fit_figure
        self.tag_prefix = f"{prefix}{self.LOGGER_JOIN_CHAR}" if prefix else ""  # as Lightning prefixes tags
        self.write_every_s = write_every_s
        self.pending: list[tuple[dict[str, float], int | None, float]] = []  # (scalars, step, wall time)
        self.written_at = time.monotonic()

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        values = {}
        # Checked here, so a bad value fails at the call that logs it, not at the end of the epoch.
        for key, value in metrics.items():
            value = value.item() if isinstance(value, torch.Tensor) else value
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{key}={value!r}: TensorBoard scalars are numbers or one-element tensors")
            values[self.tag_prefix + key] = float(value)
        self.pending.append((values, step, time.time()))
        if time.monotonic() - self.written_at >= self.write_every_s:
            self.save()

    def write_pending(self) -> None:
        """Hand the held scalars to TensorBoard's writer in the order they were logged."""
        pending, self.pending = self.pending, []
        for values, step, walltime in pending:
            for tag, value in values.items():
                self.experiment.add_scalar(tag, value, step, walltime=walltime)
        self.written_at = time.monotonic()

    @rank_zero_only
    def save(self) -> None:
        self.write_pending()
        super().save()  # flushes the event file

    @rank_zero_only
    def finalize(self, status: str) -> None:
        self.write_pending()  # also when the run failed: what was logged is kept
        super().finalize(status)


def tensorboard_logger(trainer: L.Trainer) -> TensorBoardLogger | None:
    """The run's TensorBoard logger, if it has one."""
    return next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)


class Dashboard(L.Callback):
    """Everything the dashboards need beyond the module's own curves, in one callback.

    `params/<name>` after each epoch and at train/loss's cadence (the module's `log_every_sgd_steps`); the
    HParams record (`hparams`, with `HP_METRICS` once, at the end: a result, not a curve); a Custom Scalars
    layout that opens on the curves; and with `fit`, the image `train_end/fit` at the end.
    The graph is Lightning's (the logger's `log_graph`).
    """

    def __init__(self, hparams: dict[str, Any], fit: bool = True) -> None:
        self.hparams, self.fit = hparams, fit
        self.ols_mse = math.nan
        self.end_summary: Any = None
        self.logged_at = -1  # the step params/* were last written at

    def log_params(self, trainer: L.Trainer, module: RegressionModule) -> None:
        """One point per coefficient at the current step (once per step)."""
        step = log_step(trainer)
        if step == self.logged_at:
            return
        weights = module.weights()
        names = param_names(len(weights), bool(module.hparams.bias))
        log_scalars(trainer, {f"params/{n}": v for n, v in zip(names, weights)}, step)
        self.logged_at = step

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.ols_mse = trainer.datamodule.ols_mse()
        start = hp_metrics(full_data_mse(trainer, pl_module), self.ols_mse)
        tb = tensorboard_logger(trainer)
        if tb is not None:
            self.end_summary = start_hparams(tb, self.hparams, start)
        if log_step(trainer) > 0:  # a resume: its history up to here is in the logs already
            self.logged_at = log_step(trainer)
            return
        self.log_params(trainer, pl_module)  # the starting weights

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Every N SGD steps, like train/loss, at the end of the call that reaches each multiple of N: the same
        # steps as train/loss's when no call straddles one (N a multiple of batches_per_call, whole calls an epoch).
        every = pl_module.every
        if every > 0 and log_step(trainer) // every > self.logged_at // every:  # a multiple of N passed since
            self.log_params(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Validation is the end-of-epoch evaluation here: the same step as that epoch's train/mse.
        if not trainer.sanity_checking:
            self.log_params(trainer, pl_module)
            for logger in trainer.loggers:
                logger.save()  # each epoch, so a killed run keeps its curves (the CSV logger writes on save)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch_mse = getattr(pl_module, "epoch_mse", None)
        mse = epoch_mse[-1] if epoch_mse else full_data_mse(trainer, pl_module)
        log_scalars(trainer, hp_metrics(mse, self.ols_mse), log_step(trainer))
        tb = tensorboard_logger(trainer)
        if tb is None:
            return
        if self.end_summary is not None:
            tb.experiment.file_writer.add_summary(self.end_summary)  # status: finished
        if self.fit:
            x, y = trainer.datamodule.full_data()
            stride = max(1, len(y) // FIT_POINTS)
            x, y = x[::stride], y[::stride]  # the model runs on the drawn points only: no n-sized output
            with torch.no_grad():
                y_hat = pl_module(x.to(pl_module.device)).reshape(-1).cpu()
            pixels = figure_pixels(fit_figure(x, y.reshape(-1), y_hat, mse))
            tb.experiment.add_image("train_end/fit", pixels, log_step(trainer), dataformats="HWC")


def hp_metrics(mse: float, ols_mse: float) -> dict[str, float]:
    """The HParams metrics for a full-data MSE."""
    return dict(zip(HP_METRICS, (mse, mse - ols_mse)))


def start_hparams(tb: TensorBoardLogger, hparams: dict[str, Any], metrics: dict[str, float]) -> Any:
    """Write the HParams record's start and the Custom Scalars layout into the run's own event file; its end."""
    from tensorboard.plugins.hparams import plugin_data_pb2
    from torch.utils.tensorboard.summary import hparams as hparams_pb

    experiment, session_start, session_end = hparams_pb(hparams, metrics)
    # TensorBoard shows the first five hparams it is told "differ" (else the first five by name:
    # accelerator, batch_size, deg, delta, epochs). A job cannot know what its sweep varies, so
    # the headline columns are declared here.
    value = experiment.value[0]
    data = plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
    for info in data.experiment.hparam_infos:
        info.differs = info.name in HEADLINE_HPARAMS
    value.metadata.plugin_data.content = data.SerializeToString()
    # SummaryWriter.add_hparams would put the record in a run of its own: written to this run's file.
    tb.experiment.file_writer.add_summary(experiment)
    tb.experiment.file_writer.add_summary(session_start)
    tb.experiment.add_custom_scalars(LAYOUT)
    return session_end  # written by the caller when the run ends (status: finished)


def full_data_mse(trainer: L.Trainer, module: L.LightningModule) -> float:
    """The model's MSE on the whole data set now."""
    x, y = trainer.datamodule.full_data()
    with torch.no_grad():
        return squared_loss(module(x.to(module.device)).cpu(), y).item()


def fit_figure(x: torch.Tensor, y: torch.Tensor, y_hat: torch.Tensor, mse: float) -> "Figure":
    """Residuals y − ŷ against each feature: flat noise when the model fits, a curve when it misses a shape."""
    # A bare Figure (no pyplot): no display, no backend choice; imported here, so runs without it never load it.
    from matplotlib.figure import Figure

    residual = (y - torch.where(torch.isfinite(y_hat), y_hat, torch.nan)).numpy()  # a diverged fit draws nothing
    x = x.numpy()  # NumPy, not tensors: matplotlib's unit checks iterate what they plot, element by element
    fig = Figure(figsize=(6.4, 4), dpi=FIT_DPI, layout="constrained")
    ax = fig.subplots()
    for j in range(x.shape[1]):
        if x[:, j].std() > 0:  # the ones column (the manual model's intercept input) carries no information
            ax.plot(x[:, j], residual, ".", markersize=3, alpha=0.5, label=f"x{j + 1}")
    ax.axhline(0, color="black", linewidth=1)
    ax.set(xlabel="feature value", ylabel="residual y − ŷ", title=f"residuals of the fit, MSE {mse:.4g}")
    if 0 < len(ax.lines) - 1 <= 10:
        ax.legend(loc="upper right")
    return fig


def figure_pixels(fig: "Figure") -> np.ndarray:
    """A figure drawn by matplotlib's Agg canvas, as RGB pixels (height, width, 3) for `add_image`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3]
