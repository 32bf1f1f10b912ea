"""TensorBoard dashboards: parameter trajectories, the HParams record and a picture of the fit.

Tags (a contract; the module writes `train/loss`, `train/mse`): `params/<name>` (w1, ..., b), `train_end/mse`,
`train_end/ols_gap` and the image `train_end/fit`, each at the run's SGD step count (`global_step`).
"""

import itertools
import math
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from matplotlib.figure import Figure

from linreg.config import override_key
from linreg.models import RegressionModule, log_scalars
from linreg.record import RunRecord, param_names

HP_METRICS = ("train_end/mse", "train_end/ols_gap")  # the HParams metrics: every job logs them, so runs line up
LAYOUT = {  # TensorBoard's Custom Scalars tab: the curves that answer a run or a sweep, on one page
    "linreg": {
        "train/mse (full data, each epoch)": ["Multiline", ["train/mse"]],
        "train/loss (mini-batch)": ["Multiline", ["train/loss"]],
        "params (learned weights)": ["Multiline", ["params/.*"]],
    }
}
HEADLINE_HPARAMS = ("model", "deg", "delta", "lr", "batch_size")  # shown by default in the HParams table
LABEL_EXCLUDE = ("resume.", "logger.", "trainer.max_epochs.")  # how a run is run; each with its dot: keys inside too
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
    """A run's folder name from its overrides (as `override_dirname`, cut at 120); in a sweep the `swept` keys."""
    kept = sorted(o for o in overrides if not f"{override_key(o)}.".startswith(LABEL_EXCLUDE))
    if swept:
        kept = [o for o in kept if override_key(o) in swept] or kept
    return re.sub(r"[^A-Za-z0-9._=,+\-\[\]]", "_", ",".join(kept))[:120] or "defaults"  # one path part: no '/'


class BufferedTensorBoardLogger(TensorBoardLogger):
    """TensorBoardLogger holding scalars until a save or `write_every_s`: its writer's GIL grabs stall training."""

    def __init__(
        self, *args: Any, write_every_s: float = 10.0, fit_figure: bool | str = "auto", prefix: str = "", **kwargs: Any
    ) -> None:
        super().__init__(*args, prefix=prefix, **kwargs)  # fit_figure: the run reads it from the config
        self.tag_prefix = f"{prefix}{self.LOGGER_JOIN_CHAR}" if prefix else ""  # as Lightning prefixes tags
        self.write_every_s = write_every_s
        self.pending: list[tuple[str, float, int | None, float]] = []  # (tag, value, step, wall time)
        self.written_at = time.monotonic()

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        values, now = [], time.time()
        for key, value in metrics.items():  # checked here: a bad value fails at the call that logs it
            value = value.item() if isinstance(value, torch.Tensor) else value
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{key}={value!r}: TensorBoard scalars are numbers or one-element tensors")
            values.append((self.tag_prefix + key, float(value), step, now))
        self.pending += values
        if time.monotonic() - self.written_at >= self.write_every_s:
            self.save()

    def write_pending(self) -> None:
        """Hand the held scalars to TensorBoard's writer: a step's scalars in one event, each as `add_scalar` has it."""
        from tensorboard.compat.proto.summary_pb2 import Summary

        pending, self.pending = self.pending, []
        if pending and self.experiment.file_writer is None:  # closed by a finalize: `add_scalar` opens it again
            self.experiment.add_scalar(*pending[0][:3], walltime=pending[0][3])
            pending = pending[1:]
        for step, run in itertools.groupby(pending, key=lambda held: held[2]):  # in logged order, never reordered
            held = list(run)  # each event costs the writer thread more than its values do
            values = [Summary.Value(tag=tag, simple_value=value) for tag, value, _, _ in held]
            self.experiment.file_writer.add_summary(Summary(value=values), step, held[0][3])
        self.written_at = time.monotonic()

    @rank_zero_only
    def save(self) -> None:
        self.write_pending()
        super().save()  # flushes the event file

    @rank_zero_only
    def finalize(self, status: str) -> None:
        self.write_pending()  # also when the run failed: what was logged is kept
        super().finalize(status)


class Dashboard(L.Callback):
    """`params/*` each epoch and at train/loss's cadence, the HParams record, the layout and the fit image."""

    def __init__(self, hparams: dict[str, Any], fit: bool = True) -> None:
        self.hparams, self.fit = hparams, fit
        self.logged_at = -1  # the step params/* were last written at

    def log_params(self, trainer: L.Trainer, module: RegressionModule) -> None:
        """One point per coefficient at the current step (once per step)."""
        step = trainer.global_step
        if step != self.logged_at:
            weights = module.weights()
            names = param_names(len(weights), bool(module.hparams.bias))
            log_scalars(trainer, {f"params/{n}": v for n, v in zip(names, weights)}, step)
            self.logged_at = step

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.tb = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        if self.tb is not None:
            self.end_summary = start_hparams(self.tb, self.hparams)  # the HParams session's end, for the run's end
        if trainer.global_step > 0:  # a resume: its history up to here is in the logs already
            self.logged_at = trainer.global_step
        else:
            self.log_params(trainer, pl_module)  # the starting weights

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *_: Any) -> None:
        # At the end of the call that passes a multiple of train/loss's N: its steps, unless a call straddles one.
        if trainer.global_step // pl_module.every > self.logged_at // pl_module.every:
            self.log_params(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.log_params(trainer, pl_module)  # at train/mse's step: the run's Trainer has no sanity check
        for logger in trainer.loggers:
            logger.save()  # each epoch, so a killed run keeps its curves (the CSV logger writes on save)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        mse = pl_module.epoch_mse[-1]  # validation (train/mse) ends every epoch; a resume restores the list
        step = trainer.global_step
        log_scalars(trainer, hp_metrics(mse, trainer.datamodule.ols_mse()), step)
        if self.tb is None:
            return
        self.tb.experiment.file_writer.add_summary(self.end_summary)  # status: finished
        if self.fit:
            x, y = trainer.datamodule.full_data()
            stride = max(1, len(y) // 500)  # about 500 points drawn; the model runs on those only
            x, y = x[::stride], y[::stride]
            with torch.no_grad():
                y_hat = pl_module(x.to(pl_module.device)).reshape(-1).cpu()
            self.tb.experiment.add_figure("train_end/fit", fit_figure(x, y.reshape(-1), y_hat, mse), step)


def hp_metrics(mse: float, ols_mse: float) -> dict[str, float]:
    """The HParams metrics for a full-data MSE."""
    return dict(zip(HP_METRICS, (mse, mse - ols_mse)))


def start_hparams(tb: TensorBoardLogger, hparams: dict[str, Any]) -> Any:
    """Write the HParams record's start and the Custom Scalars layout into the run's own event file; its end."""
    from tensorboard.plugins.hparams import plugin_data_pb2
    from torch.utils.tensorboard.summary import hparams as hparams_pb

    experiment, session_start, session_end = hparams_pb(hparams, dict.fromkeys(HP_METRICS))  # keys, not values
    value = experiment.value[0]
    data = plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
    for info in data.experiment.hparam_infos:  # shown by default: a job cannot know what its sweep varies
        info.differs = info.name in HEADLINE_HPARAMS
    value.metadata.plugin_data.content = data.SerializeToString()
    tb.experiment.file_writer.add_summary(experiment)  # in the run's event file: add_hparams would make a new run
    tb.experiment.file_writer.add_summary(session_start)
    tb.experiment.add_custom_scalars(LAYOUT)
    return session_end  # written by the caller when the run ends (status: finished)


def fit_figure(x: torch.Tensor, y: torch.Tensor, y_hat: torch.Tensor, mse: float) -> Figure:
    """Residuals y − ŷ against each feature: flat noise when the model fits, a curve when it misses a shape."""
    residual = (y - torch.where(torch.isfinite(y_hat), y_hat, torch.nan)).numpy()  # a diverged fit draws nothing
    x = x.numpy()  # NumPy, not tensors: matplotlib's unit checks iterate what they plot, element by element
    fig = Figure(figsize=(6.4, 4), dpi=FIT_DPI, layout="constrained")  # a bare Figure: no pyplot state
    ax = fig.subplots()
    for j in range(x.shape[1]):
        if x[:, j].std() > 0:  # the ones column (the manual model's intercept input) carries no information
            ax.plot(x[:, j], residual, ".", markersize=3, alpha=0.5, label=f"x{j + 1}")
    ax.axhline(0, color="black", linewidth=1)
    ax.set(xlabel="feature value", ylabel="residual y − ŷ", title=f"residuals of the fit, MSE {mse:.4g}")
    if 0 < len(ax.lines) - 1 <= 10:
        ax.legend(loc="upper right")
    return fig
