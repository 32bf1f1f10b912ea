"""Train one model on the tutorial's data: `run(cfg)` does the work, `main` is the Hydra entry.

Lightning (and what imports it) takes seconds to import, so those imports sit inside the functions
that need them: a bad command line is refused in a blink, before any of them load.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from linreg.config import ConfigError, accepted_arguments, full_error, refuse, remove_if_created, target_class, validate
from linreg.record import (
    RunDirBusy,
    RunRecord,
    checkpoint_config,
    finished_metrics,
    read_json,
    refuse_other_runs,
    sweep_value,
    write_failure,
)

if TYPE_CHECKING:
    import lightning as L
    from lightning.pytorch.loggers import Logger

log = logging.getLogger(__name__)
CONFIG_DIR = str(Path(__file__).resolve().parent / "conf")  # conf/ of the checkout, or its copy in the wheel


NOISE = (  # third-party warnings with nothing for a user to do (matched by message, nothing else hidden)
    r"Checkpoint directory .* exists and is not empty",  # a resume writes into its own checkpoints/
    r"The `srun` command is available on your system but is not used",
    r".*LeafSpec.* is deprecated",
)
PROGRESS_MIN_STEPS = 20_000  # a single run this long (a few seconds) shows Lightning's progress bar on a terminal


def output_dir() -> Path:
    """This job's output dir: Hydra's runtime dir, or `hydra.run.dir` for a composed config."""
    hc = HydraConfig.get()
    if OmegaConf.is_missing(hc.runtime, "output_dir") or not hc.runtime.output_dir:
        return Path(hc.run.dir)
    return Path(hc.runtime.output_dir)


class RunDirLock:
    """An exclusive lock on a run dir for a run's whole life: the kernel drops it when the process dies."""

    def __init__(self, out: Path) -> None:
        self.path = out / ".lock"
        self.file: Any = None

    def __enter__(self) -> RunDirLock:
        self.file = open(self.path, "a+")
        deadline = time.monotonic() + 1.0  # another process's check (lock_holder) holds it for a moment only
        while True:
            try:
                fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                self.file.seek(0)
                holder = self.file.read().strip() or "?"
                self.file.close()
                out = str(self.path.parent)
                raise RunDirBusy("hydra.run.dir", out, f"another run (pid {holder}) is using it") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"{os.getpid()}\n")
        self.file.flush()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.file.close()  # closing drops the lock


def build_loggers(cfg: DictConfig, out: Path, label: str) -> list[Logger]:
    """Every logger under `logger` (each a `_target_`), saving into the run dir; none with `~logger`."""
    from hydra.utils import instantiate
    from lightning.pytorch.loggers import TensorBoardLogger

    loggers: list[Logger] = []
    for key, lcfg in (cfg.get("logger") or {}).items():
        if lcfg is None:  # `logger.csv=null` turns one off
            continue
        cls = target_class(f"logger.{key}", lcfg._target_)
        given: dict[str, Any] = {"save_dir": str(out)} if "save_dir" in accepted_arguments(cls) else {}
        if issubclass(cls, TensorBoardLogger) and "version" not in lcfg:
            given["version"] = label  # TensorBoard names a run by its path: <run dir>/tensorboard/<overrides>
        loggers.append(instantiate(lcfg, **given))
    return loggers


def build_callbacks(cfg: DictConfig, out: Path, progress: bool, in_sweep: bool) -> list[L.Callback]:
    """Lightning callbacks for this run (checkpoints, the saved config, dashboards, epoch lines)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from linreg.callbacks import EndWithSweep, EpochLines, SaveRunConfig
    from linreg.dashboard import dashboard_callbacks

    # last.ckpt after every epoch's evaluation: what `resume=true` continues from.
    checkpoint = ModelCheckpoint(
        dirpath=out / "checkpoints", filename="last", save_top_k=1, enable_version_counter=False, every_n_epochs=1
    )
    callbacks = [checkpoint, SaveRunConfig(out, checkpoint_config(cfg)), *dashboard_callbacks(cfg)]
    if progress:
        callbacks.append(EpochLines())
    sweep_pid = os.environ.get("LINREG_SWEEP_PID")
    if in_sweep and sweep_pid and sweep_pid != str(os.getpid()):
        callbacks.append(EndWithSweep(int(sweep_pid)))  # a worker process of a sweep (joblib, submitit_local)
    return callbacks


def estimated_steps(cfg: DictConfig) -> int:
    """SGD steps the run will take."""
    return cfg.trainer.max_epochs * math.ceil(cfg.data.num_examples / cfg.data.batch_size)


def build_trainer(cfg: DictConfig, out: Path, label: str, progress: bool, in_sweep: bool) -> L.Trainer:
    """A Trainer lean enough for a 3-parameter model: no summary or sanity run; a progress bar only on a terminal."""
    import lightning as L
    import torch

    t = cfg.trainer
    bar = t.get("enable_progress_bar")
    if bar is None:  # automatic: a long single run on a terminal
        bar = progress and sys.stderr.isatty() and estimated_steps(cfg) >= PROGRESS_MIN_STEPS
    callbacks = build_callbacks(cfg, out, progress, in_sweep)
    if bar:  # Lightning's tqdm bar, named: with rich installed Lightning would pick its rich one instead
        from lightning.pytorch.callbacks import TQDMProgressBar

        callbacks.append(TQDMProgressBar())
    trainer = L.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        max_epochs=t.max_epochs,
        logger=build_loggers(cfg, out, label) or False,
        callbacks=callbacks,
        log_every_n_steps=1,  # the module samples train/loss itself
        enable_checkpointing=True,
        enable_progress_bar=bar,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=t.deterministic,
        default_root_dir=str(out),
    )
    if trainer.accelerator.__class__.__name__ == "CUDAAccelerator":
        log.info("training on GPU: %s", torch.cuda.get_device_name(trainer.strategy.root_device))
    return trainer


def readable_checkpoint(ckpt: Path) -> str | None:
    """None when torch can load the checkpoint safely (weights_only), else why not, in a few words."""
    import torch

    try:
        checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, empty, random bytes, a directory, pickled code: all unreadable here
        return f"{type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}"
    if not isinstance(checkpoint, dict) or not {"state_dict", "pytorch-lightning_version"} <= checkpoint.keys():
        return "not a Lightning checkpoint"
    return None


def resume_point(out: Path, cfg: DictConfig) -> Path | None:
    """The checkpoint to continue from (None: train from scratch); refuses a dir that holds another run."""
    refuse_other_runs(out, cfg, check_lock=False)  # run() holds the lock
    ckpt = out / "checkpoints" / "last.ckpt"
    if not cfg.resume or not (ckpt.exists() or (out / "checkpoints" / "config.json").exists()):
        return None
    if read_json(out / "checkpoints" / "config.json") is None or not ckpt.exists():
        log.warning("resume: no readable checkpoint and config in %s; training from scratch", ckpt.parent)
        return None
    if (why := readable_checkpoint(ckpt)) is not None:
        log.warning("resume: %s cannot be read (%s); training from scratch", ckpt, why)
        return None
    return ckpt


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to `n` for a run (the same reductions whichever launcher runs it), then restored."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def check_finite_data(dm: Any, cfg: DictConfig) -> None:
    """Refuse data that overflowed float32 (huge w, delta or deg) before training on it."""
    import torch

    x, y = dm.full_data()
    if not (torch.isfinite(y).all() and torch.isfinite(x).all()):
        key = "data.deg" if cfg.data.deg > 1 else "data.w"
        raise ConfigError(key, OmegaConf.select(cfg, key), "the generated data overflows float32; use smaller values")


def run(
    cfg: DictConfig,
    out_dir: str | Path | None = None,
    *,
    label: str = "defaults",
    progress: bool = False,
    in_sweep: bool = False,
) -> dict[str, Any]:
    """Validate, generate the data, fit (or resume) the configured model in `out_dir`; write and return metrics.json.

    No Hydra state is needed when `out_dir` is given (None: Hydra's output dir). `label` names the TensorBoard
    run; `progress` logs a line per epoch (and shows a bar on a terminal).
    """
    validate(cfg)
    out = Path(out_dir) if out_dir is not None else output_dir()
    out.mkdir(parents=True, exist_ok=True)
    with RunDirLock(out):
        if cfg.resume and (done := finished_metrics(out, cfg)) is not None:
            log.info("resume: %s already finished with this config; nothing to train", out)
            return done
        ckpt = resume_point(out, cfg)
        with warnings.catch_warnings(), torch_threads(cfg.threads):
            for message in NOISE:
                warnings.filterwarnings("ignore", message=message)
            return fit(cfg, out, ckpt, label, progress, in_sweep)


def fit(cfg: DictConfig, out: Path, ckpt: Path | None, label: str, progress: bool, in_sweep: bool) -> dict[str, Any]:
    """Build DataModule, LightningModule and Trainer, fit, and write the run record."""
    import lightning as L
    from hydra.utils import instantiate

    from linreg.data import RegressionDataModule

    model_cls = target_class("model", cfg.model._target_)
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    dm = RegressionDataModule(**data_cfg, seed=cfg.seed, ones_column=model_cls.uses_ones_column)
    dm.setup("fit")
    check_finite_data(dm, cfg)
    L.seed_everything(cfg.seed, verbose=False)  # the linear model's default init
    model = instantiate(cfg.model, in_features=dm.in_features, bias=cfg.data.bias)
    trainer = build_trainer(cfg, out, label, progress, in_sweep)
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm, ckpt_path=str(ckpt) if ckpt else None, weights_only=True)
    fit_seconds = time.perf_counter() - start

    record = RunRecord.of(
        cfg,
        "ok" if model.diverged_epoch is None else "diverged",
        epoch_mse=model.epoch_mse,
        train_mse=model.epoch_mse[-1] if model.epoch_mse else None,
        weights=model.weights(),
        ols_mse=dm.ols_mse(),
        steps=trainer.global_step,
        fit_seconds=fit_seconds,
        diverged_epoch=model.diverged_epoch,
    )
    record.write(out)
    return record.as_json()


def result_line(metrics: dict[str, Any]) -> str:
    """`manual: status=ok train_mse=0.000101 weights=[2.0006, -0.9999, 1.0007]` (diverged: no numbers)."""
    weights = metrics["weights"]
    shown = "[" + ", ".join("nan" if v is None else f"{v:.4f}" for v in weights) + "]" if weights else "n/a"
    mse = metrics["train_mse"]
    text = f"{metrics['model']}: status={metrics['status']} train_mse={'n/a' if mse is None else f'{mse:.6g}'}"
    if metrics["status"] == "diverged":
        text += f" (diverged in epoch {metrics['diverged_epoch'] + 1} of {metrics['epochs']})"
    return f"{text} weights={shown}"


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float:
    """Hydra entry: `python -m linreg.train [overrides]` or `linreg-train [overrides]`."""
    from linreg.callbacks import SweepGone
    from linreg.dashboard import run_label
    from linreg.results import read_plan

    hc = HydraConfig.get()
    sweep = hc.mode == RunMode.MULTIRUN
    out = output_dir()
    swept = read_plan(Path(hc.sweep.dir))["swept"] if sweep else None
    label = run_label(hc.overrides.task, swept)
    try:
        metrics = run(cfg, out, label=label, progress=not sweep, in_sweep=sweep)
    except SweepGone as err:
        # Nobody is left to report to: end the worker process too (its checkpoint stays for a resume).
        log.warning("job ended: %s", err)
        logging.shutdown()
        os._exit(0)
    except RunDirBusy as err:  # the dir is another run's: write nothing there
        if sweep:
            log.error("job refused: %s", err)
            return math.inf
        if full_error():
            raise
        refuse(err)
    except Exception as err:
        if isinstance(err, ConfigError) and not sweep and not full_error():
            remove_if_created(out)
            refuse(err)
        if isinstance(err, OSError) and not sweep and not full_error():  # a full disk, a read-only dir
            print(f"error: cannot write {err.filename or out}: {err.strerror or err}", file=sys.stderr)
            sys.exit(1)
        failed = RunRecord.failed(cfg, err)
        write_failure(out, failed)
        if not sweep:
            raise
        # In a sweep a failing job is a row of the results table, not the end of the sweep.
        log.error("job failed: %s", failed.error)
        return math.inf  # a sweeper minimising train_mse (optuna) needs a number
    if not sweep:
        print(result_line(metrics))
    return sweep_value(metrics["train_mse"])


def cli() -> None:
    """`python -m linreg.train` and `linreg-train`: the command line checked (linreg.cli), then Hydra's main."""
    from linreg.cli import entry

    entry(main, CONFIG_DIR, "train")


if __name__ == "__main__":
    cli()
