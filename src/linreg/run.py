"""One run: check, lock the run dir, build DataModule, model and Trainer, fit or resume, record (imports Lightning)."""

import contextlib
import copy
import csv
import functools
import importlib
import logging
import math
import os
import stat
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_class, instantiate
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from linreg.callbacks import EndWithSweep, EpochLines, ReportToStudy, SaveRunConfig
from linreg.config import Config, ConfigError, check, plain
from linreg.dashboard import Dashboard, hparams
from linreg.data import RegressionDataModule
from linreg.models import RegressionModule
from linreg.record import (
    MAX_BYTES,
    RunDirBusy,
    RunDirLock,
    RunRecord,
    finished,
    identity,
    refuse_other_runs,
    resumable,
    room,
    write_job_files,
)

log = logging.getLogger("linreg.train")
NOISE = (  # third-party warnings with nothing for a user to do (matched by message, nothing else hidden)
    r"Checkpoint directory .* exists and is not empty",  # a resume writes into its own checkpoints/
    r"The `srun` command is available on your system but is not used",
    r".*LeafSpec.* is deprecated",
    r"`torch.jit.trace(_method)?` is deprecated",  # TensorBoard's add_graph on newer torch
    r"Experiment logs directory .* exists and is not empty",  # a resume: keep_history writes the rows again
)
PROGRESS_MIN_STEPS = 20_000  # a single run this long (a few seconds) shows Lightning's progress bar on a terminal


def model_class(target: str) -> type[RegressionModule]:
    """The class `model._target_` names, imported: a subclass of `linreg.models.RegressionModule`."""
    module, _, name = target.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except Exception as err:
        raise ConfigError("model._target_", target, f"cannot be imported: {type(err).__name__}: {err}") from None
    if not (isinstance(cls, type) and issubclass(cls, RegressionModule) and cls is not RegressionModule):
        raise ConfigError("model._target_", target, "must name a subclass of linreg.models.RegressionModule")
    return cls


def build_datamodule(cfg: Config, seed: int | None = None, num_examples: int | None = None) -> RegressionDataModule:
    """The run's data (made now): `cfg.data` under the run's seed, or another seed and size (held-out data)."""
    data = dict(plain(cfg)["data"])
    if num_examples is not None:
        data["num_examples"] = num_examples
    ones = model_class(cfg["model"]["_target_"]).uses_ones_column
    dm = RegressionDataModule(**data, seed=cfg["seed"] if seed is None else seed, ones_column=ones)
    dm.setup("fit")
    if not dm.finite():
        key = "deg" if data["deg"] > 1 else "w"
        raise ConfigError(f"data.{key}", data[key], "the generated data overflows float32; use smaller values")
    return dm


def build_model(cfg: Config, dm: RegressionDataModule, cls: type[RegressionModule] | None = None) -> RegressionModule:
    """The configured model (its class checked by `build_datamodule`, its arguments by building it), seeded."""
    try:
        if cls is None:
            L.seed_everything(cfg["seed"], verbose=False)
            return instantiate(cfg["model"], in_features=dm.in_features, bias=cfg["data"]["bias"])
        # A stacked member: no `instantiate` nor `seed_everything` (slow per job); its init draws from torch's CPU RNG.
        torch.default_generator.manual_seed(cfg["seed"])
        args = {k: v for k, v in plain(cfg)["model"].items() if k != "_target_"}
        return cls(**args, in_features=dm.in_features, bias=cfg["data"]["bias"])
    except Exception as err:  # Hydra wraps the constructor's TypeError (an unknown argument) in its own
        raise ConfigError("model", None, str(err.__cause__ or err).splitlines()[0]) from None


def build_loggers(group: Any, out: Path, label: str, upto: float | None = None) -> list[Any]:
    """The `logger` group's loggers (each a `_target_`), saving into the run dir; `upto`: a resume's checkpoint step."""
    loggers, earlier = [], {}
    for key, lcfg in (group or {}).items():  # none with `~logger`
        if lcfg is None:  # `logger.csv=null` turns one off
            continue
        given: dict[str, Any] = {"save_dir": str(out)}
        try:
            if "_target_" not in lcfg:  # one message whether the config is OmegaConf's or plain data
                raise TypeError("needs a _target_ (a Lightning logger class)")
            if issubclass(get_class(lcfg["_target_"]), TensorBoardLogger) and "version" not in lcfg:
                given["version"] = label  # TensorBoard names a run by its path: <run dir>/tensorboard/<label>
            make = logger_maker(lcfg)
            logger = make.func(*make.args, **{**copy.deepcopy(make.keywords), **given})  # its own argument objects
            if not isinstance(logger, Logger):  # `_target_: builtins.dict` builds, then fails inside the Trainer
                raise TypeError(f"{lcfg['_target_']} is not a Lightning logger (lightning.pytorch.loggers.Logger)")
            if isinstance(logger, TensorBoardLogger):  # its SummaryWriter, which takes the other arguments, now
                found = sorted(Path(logger.log_dir).glob("events.out.tfevents.*"))  # before its own file is made
                if found and not Path(logger.log_dir).resolve().is_relative_to(out.resolve()):  # a shared dir's
                    found = []  # are other runs'
                earlier[logger] = [f for f in found if not any(f in files for files in earlier.values())]  # once
                _ = logger.experiment
            loggers.append(logger)
        except Exception as err:
            raise ConfigError(f"logger.{key}", None, str(err.__cause__ or err).splitlines()[0]) from None
    for logger in loggers:  # once all are built: a refused logger leaves the others' history as it was
        keep_history(logger, earlier.get(logger, []), upto)
    return loggers


MAKERS: dict[str, functools.partial[Any]] = {}  # a logger config, resolved (its repr) -> its class and arguments


def logger_maker(lcfg: Any) -> functools.partial[Any]:
    """A logger config's class with its arguments, instantiated once per config (a stacked group's members share it)."""
    key = repr(OmegaConf.to_container(lcfg, resolve=True) if OmegaConf.is_config(lcfg) else lcfg)
    if key not in MAKERS:
        if len(MAKERS) >= 16:  # bounded: a sweep may vary a logger's arguments
            MAKERS.clear()
        MAKERS[key] = instantiate(lcfg, _partial_=True)
    return MAKERS[key]


def build_trainer(cfg: Config, out: Path | None, callbacks: list[Any], loggers: list[Any], bar: bool) -> L.Trainer:
    """A Trainer lean enough for a 3-parameter model (no summary, no sanity run), given the `trainer` group."""
    return L.Trainer(
        **{**cfg["trainer"], "enable_progress_bar": bar},
        logger=loggers or False,
        callbacks=callbacks,
        log_every_n_steps=1,  # the module samples train/loss itself
        enable_checkpointing=out is not None,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(out) if out is not None else None,
    )


def run_callbacks(cfg: DictConfig, out: Path, progress: bool, in_sweep: bool, bar: bool) -> list[Any]:
    """Checkpoints (last.ckpt each epoch: what resume continues), the saved config, dashboards, epoch lines."""
    callbacks = [
        ModelCheckpoint(dirpath=out / "checkpoints", filename="last", enable_version_counter=False),
        SaveRunConfig(out, resumable(identity(cfg))),
    ]
    if any(v is not None for v in (cfg.get("logger") or {}).values()):
        fit = OmegaConf.select(cfg, "logger.tensorboard.fit_figure", default=False)
        fit = not in_sweep if fit == "auto" else fit is True  # auto: single runs only (a sweep has its plots)
        callbacks.append(Dashboard(hparams(RunRecord.of(cfg, "running")), fit=fit))
    if progress:
        callbacks.append(EpochLines())
    if bar:  # named: with rich installed Lightning would pick its rich bar
        callbacks.append(TQDMProgressBar())
    sweep_pid = os.environ.get("LINREG_SWEEP_PID")
    if in_sweep and sweep_pid and sweep_pid != str(os.getpid()):
        callbacks.append(EndWithSweep(int(sweep_pid)))  # a worker process of a sweep (joblib, submitit_local)
    if in_sweep and HydraConfig.initialized() and "pruner" in HydraConfig.get().sweeper:
        callbacks.append(ReportToStudy(HydraConfig.get()))  # a trial of linreg's Optuna sweeper
    return callbacks


def resume_point(out: Path, cfg: DictConfig) -> tuple[Path | None, float]:
    """The checkpoint to continue from and its step, inf if it holds every epoch (None: from scratch, or unreadable)."""
    ckpt = out / "checkpoints" / "last.ckpt"
    if not cfg.resume or not os.path.lexists(ckpt):
        return None, 0
    if not stat.S_ISREG(os.lstat(ckpt).st_mode):  # a FIFO would block torch.load, a link leads elsewhere
        raise RunDirBusy("hydra.run.dir", str(out), "its checkpoints/last.ckpt is not a file; move it away")
    why = "not a Lightning checkpoint of linreg.train"
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, empty, random bytes, a directory, pickled code
        state, why = None, f"{type(err).__name__}: {err}"
    if not (isinstance(state, dict) and "state_dict" in state and "linreg_config" in state):
        log.warning("resume: %s cannot be read (%s); training from scratch", ckpt, why)
        return None, 0
    if state["linreg_config"] != resumable(identity(cfg)):  # the config saved with the weights decides
        raise RunDirBusy("hydra.run.dir", str(out), "holds a checkpoint of another config; use another dir")
    if (done := int(state.get("epoch", 0)) + 1) > cfg.trainer.max_epochs:  # Lightning would fail, or record it wrong
        why = f"the checkpoint in {out} already has {done} epochs; resume with at least as many"
        raise RunDirBusy("trainer.max_epochs", cfg.trainer.max_epochs, why)
    log.info("resume: continuing %s from epoch %d", out, done + 1)
    return ckpt, math.inf if done == cfg.trainer.max_epochs else int(state.get("global_step", 0))  # all trained


def kept(step: float, tag: str, upto: float | None) -> bool:
    """Whether a restart at a checkpoint's step keeps a logged point: before it, and at it only its epoch's end."""
    ends_epoch = not tag.endswith("train/loss") and "train_end/" not in tag  # (a logger's prefix before them)
    return upto is not None and (step < upto or (step == upto and ends_epoch))


def keep_history(logger: Any, earlier: list[Path], upto: float | None) -> None:
    """A restart's history up to its checkpoint, written again; TensorBoard's earlier event files go (None: all)."""
    if upto == math.inf:  # nothing is left to train: its TensorBoard files stay whole (graph, HParams, fit image)
        earlier = []
    # Lightning's CSVLogger starts metrics.csv anew; TensorBoard would show the earlier points past the checkpoint.
    path = Path(logger.log_dir) / "metrics.csv" if isinstance(logger, CSVLogger) else None
    if upto is not None and path is not None and path.is_file() and path.stat().st_size <= 64 * MAX_BYTES:
        with open(path, newline="") as f:
            rows = [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]
        for row in rows:
            step = row.pop("step", math.inf)
            if row := {k: v for k, v in row.items() if kept(step, k, upto)}:
                logger.log_metrics(row, step=int(step))  # the writer (made now) has removed the file: written again
    for file in earlier:  # a link, or a file past the bound, is left as it is
        from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
        from tensorboard.compat.proto.event_pb2 import Event

        if not stat.S_ISREG((info := os.lstat(file)).st_mode) or info.st_size > 64 * MAX_BYTES:
            continue
        for event in map(Event.FromString, RawEventFileLoader(str(file)).Load()):  # a torn last record: skipped
            values = [v for v in event.summary.value if v.HasField("simple_value") and kept(event.step, v.tag, upto)]
            if values:  # scalars only: the graph, the HParams record and the layout are written anew
                del event.summary.value[:]
                event.summary.value.extend(values)
                logger.experiment.file_writer.add_event(event, walltime=event.wall_time)
        logger.experiment.flush()  # in the new file before the old one goes
        file.unlink()


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads at `n` for a run (the same reductions whichever launcher runs it), then restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        with warnings.catch_warnings():
            for message in NOISE:
                warnings.filterwarnings("ignore", message=message)
            yield
    finally:
        torch.set_num_threads(before)


def run(
    cfg: DictConfig, out: Path | None = None, label: str = "defaults", progress: bool = False, in_sweep: bool = False
) -> RunRecord:
    """Check `cfg`, then fit (or resume, or keep a finished run) in `out` (default `hydra.run.dir`) under its lock."""
    out = Path(cfg.hydra.run.dir) if out is None else out
    check(cfg)
    if out.is_dir():
        refuse_other_runs(out, cfg)  # before anything is written there; looked at again under the lock
    out.mkdir(parents=True, exist_ok=True)
    room(out, "hydra.sweep.dir" if in_sweep else "hydra.run.dir")
    with RunDirLock(out), torch_threads(cfg.threads):
        if cfg.resume and (done := finished(out, cfg)) is not None:
            log.info("resume: %s already finished with this config; nothing to train", out)
            return done
        refuse_other_runs(out, cfg, lock_held=True)
        ckpt, step = resume_point(out, cfg)
        # A bad logger argument is refused before anything else is written.
        loggers = build_loggers(cfg.get("logger"), out, label, step if ckpt else None)
        job_dir = OmegaConf.select(HydraConfig.get(), "runtime.output_dir") if HydraConfig.initialized() else None
        if job_dir == str(out):  # a Hydra job's run
            write_job_files(out, cfg)
        dm = build_datamodule(cfg)
        model = build_model(cfg, dm)
        bar = cfg.trainer.enable_progress_bar
        if bar is None:  # automatic: a long single run on a terminal
            steps = cfg.trainer.max_epochs * -(-cfg.data.num_examples // cfg.data.batch_size)
            bar = progress and sys.stderr.isatty() and steps >= PROGRESS_MIN_STEPS
        trainer = build_trainer(cfg, out, run_callbacks(cfg, out, progress, in_sweep, bar), loggers, bar)
        start = time.perf_counter()
        trainer.fit(model, datamodule=dm, ckpt_path=str(ckpt) if ckpt else None, weights_only=True)
        pruned = next((c.pruned_epoch for c in trainer.callbacks if isinstance(c, ReportToStudy)), None)
        record = RunRecord.of(
            cfg,
            "diverged" if model.diverged_epoch is not None else "pruned" if pruned else "ok",
            epoch_mse=model.epoch_mse,
            train_mse=model.epoch_mse[-1] if model.epoch_mse else None,
            weights=model.weights(),
            ols_mse=dm.ols_mse(),
            steps=trainer.global_step,
            fit_seconds=time.perf_counter() - start,
            diverged_epoch=model.diverged_epoch,
            pruned_epoch=pruned,
        )
        record.write(out)
        return record
