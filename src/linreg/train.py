"""Train one model on the tutorial's data: `run(cfg)` does the work, `main` is the Hydra entry.

Lightning (and what imports it) takes seconds to import, so those imports sit inside the functions
that need them: a bad command line is refused in a blink, before any of them load.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from linreg.config import ConfigError, validate
from linreg.stack import import_training_stack

if TYPE_CHECKING:
    import lightning as L
    from lightning.pytorch.loggers import Logger

log = logging.getLogger(__name__)
CONFIG_DIR = str(Path(__file__).resolve().parent / "conf")  # conf/ of the checkout, or its copy in the wheel


def output_dir() -> Path:
    """This job's output dir: Hydra's runtime dir, or `hydra.run.dir` for a composed config."""
    hc = HydraConfig.get()
    if OmegaConf.is_missing(hc.runtime, "output_dir") or not hc.runtime.output_dir:
        return Path(hc.run.dir)
    return Path(hc.runtime.output_dir)


def write_atomic(path: Path, data: bytes) -> None:
    """Write via a temp file and a rename, so a crash never leaves a truncated file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """`write_atomic` for a JSON document (metrics.json)."""
    write_atomic(path, (json.dumps(data, indent=2) + "\n").encode())


def build_loggers(cfg: DictConfig, out: Path) -> list[Logger]:
    """The loggers named under `logger` (tensorboard, csv); none when `logger=null`."""
    from lightning.pytorch.loggers import CSVLogger

    from linreg.dashboard import BufferedTensorBoardLogger, run_label

    lcfg = cfg.get("logger") or {}
    loggers: list[Logger] = []
    if (tb := lcfg.get("tensorboard")) is not None:
        loggers.append(
            BufferedTensorBoardLogger(
                write_every_s=tb.write_every_s,
                save_dir=str(out),
                name="tensorboard",
                # TensorBoard names a run by its path: <job num>/tensorboard/<overrides> says which job it is.
                version=run_label(HydraConfig.get().overrides.task),
                log_graph=False,  # the Dashboard writes the graph (traced once per model shape)
                default_hp_metric=False,
            )
        )
    if lcfg.get("csv") is not None:
        loggers.append(CSVLogger(save_dir=str(out), name="csv", version=""))
    return loggers


def build_callbacks(cfg: DictConfig, out: Path) -> list[L.Callback]:
    """Lightning callbacks for this run (dashboards, checkpoints)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from linreg.dashboard import dashboard_callbacks

    # last.ckpt after every epoch's evaluation: what `resume=true` continues from.
    checkpoint = ModelCheckpoint(
        dirpath=out / "checkpoints", filename="last", save_top_k=1, enable_version_counter=False, every_n_epochs=1
    )
    return [checkpoint, *dashboard_callbacks(cfg)]


def build_trainer(cfg: DictConfig, out: Path) -> L.Trainer:
    """A Trainer lean enough for a 3-parameter model: no progress bar, summary or sanity run."""
    import lightning as L
    import torch

    t = cfg.trainer
    trainer = L.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        max_epochs=t.max_epochs,
        logger=build_loggers(cfg, out) or False,
        callbacks=build_callbacks(cfg, out),
        log_every_n_steps=1,  # the module samples train/loss itself
        enable_checkpointing=True,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=t.deterministic,
        default_root_dir=str(out),
    )
    if t.deterministic:
        # Deterministic mode also has torch fill every new tensor with NaN before an op writes it: a check for
        # ops that read memory they never wrote, ~35 us of a ~250 us SGD step here. Every op here writes its
        # output whole, so the numbers are the same bits without it (PyTorch's docs: "still deterministic").
        # Like the mode itself (Lightning sets it), this stays so for the rest of the process.
        torch.utils.deterministic.fill_uninitialized_memory = False
    return trainer


def job_config(cfg: DictConfig) -> dict[str, Any]:
    """The run's own config (no `hydra`, no `resume`): what a resumed job must match."""
    return {
        key: OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
        for key, value in cfg.items()
        if key not in ("hydra", "resume")
    }


def checkpoint_config(cfg: DictConfig) -> dict[str, Any]:
    """What a checkpoint must have been trained with to be continued: the job config, less epochs and loggers."""
    plain = job_config(cfg)
    plain.pop("logger", None)
    plain.get("trainer", {}).pop("max_epochs", None)  # continuing to more epochs is what resume is for
    return plain


def resumable_checkpoint(out: Path, cfg: DictConfig) -> Path | None:
    """`last.ckpt` in `out` if `resume=true` and it was trained with this config; else train from scratch."""
    ckpt = out / "checkpoints" / "last.ckpt"
    if not (cfg.resume and ckpt.exists()):
        return None
    try:
        saved = json.loads((out / "checkpoints" / "config.json").read_text())
    except (OSError, ValueError):
        saved = None
    if saved != checkpoint_config(cfg):
        log.warning("resume: %s was trained with another config; training from scratch", ckpt)
        return None
    return ckpt


def finite_or_none(value: Any) -> Any:
    """NaN/inf become null: JSON has no NaN, and a non-finite number is no result."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [finite_or_none(v) for v in value]
    return value


def finished_metrics(out: Path, cfg: DictConfig) -> dict[str, Any] | None:
    """A finished (ok/diverged) metrics.json of this very config in `out`, if there is one."""
    try:
        metrics = json.loads((out / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    if metrics.get("status") in ("ok", "diverged") and metrics.get("config") == job_config(cfg):
        return metrics
    return None


def config_fields(cfg: DictConfig) -> dict[str, Any]:
    """The metrics.json fields a run's config decides (any missing key is None): shared by every status."""
    return {
        "model": OmegaConf.select(cfg, "model.name"),
        "seed": OmegaConf.select(cfg, "seed"),
        "data": OmegaConf.to_container(cfg.data, resolve=True) if "data" in cfg else None,
        "lr": OmegaConf.select(cfg, "model.lr"),
        "batch_size": OmegaConf.select(cfg, "data.batch_size"),
        "epochs": OmegaConf.select(cfg, "trainer.max_epochs"),
        "accelerator": OmegaConf.select(cfg, "trainer.accelerator"),
    }


def failed_metrics(cfg: DictConfig, error: BaseException) -> dict[str, Any]:
    """What a job that raised leaves behind: its config and the error, in one line."""
    fields = config_fields(cfg)
    return {
        "status": "failed",
        **fields,
        "epoch_mse": [],
        "train_mse": None,
        "weights": None,
        "true_weights": (fields["data"] or {}).get("w"),
        "ols_mse": None,
        "steps": 0,
        "fit_seconds": 0.0,
        "diverged_epoch": None,
        "error": str(error) if isinstance(error, ConfigError) else f"{type(error).__name__}: {error}",
        "config": job_config(cfg),
    }


def run(cfg: DictConfig) -> dict[str, Any]:
    """Validate, generate the data, fit (or resume) the configured model; write and return metrics.json."""
    validate(cfg)
    out = output_dir()
    if cfg.resume and (done := finished_metrics(out, cfg)) is not None:
        return done  # this job already finished with this config: nothing to redo
    out.mkdir(parents=True, exist_ok=True)
    import_training_stack()  # before this job makes anything: none of its objects may be frozen
    import lightning as L

    from linreg.data import RegressionDataModule
    from linreg.models import MODELS

    model_cls = MODELS[cfg.model.name]
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    dm = RegressionDataModule(
        **data_cfg, seed=cfg.seed, ones_column=model_cls.uses_ones_column, steps_per_call=cfg.trainer.steps_per_call
    )
    dm.setup("fit")
    L.seed_everything(cfg.seed, verbose=False)  # the linear model's default init
    model_kwargs = {k: v for k, v in cfg.model.items() if k != "name"}
    model = model_cls(
        in_features=dm.in_features,
        bias=cfg.data.bias,
        log_every_n_steps=cfg.trainer.log_every_n_steps,
        **model_kwargs,
    )
    trainer = build_trainer(cfg, out)
    ckpt = resumable_checkpoint(out, cfg)
    (out / "checkpoints").mkdir(exist_ok=True)
    write_json_atomic(out / "checkpoints" / "config.json", checkpoint_config(cfg))
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm, ckpt_path=str(ckpt) if ckpt else None)
    fit_seconds = time.perf_counter() - start

    metrics = {
        "status": "ok" if model.diverged_epoch is None else "diverged",
        **config_fields(cfg),
        "epoch_mse": finite_or_none(model.epoch_mse),
        "train_mse": finite_or_none(model.epoch_mse[-1]) if model.epoch_mse else None,
        "weights": finite_or_none(model.weights()),
        "true_weights": list(cfg.data.w),
        "ols_mse": dm.ols_mse(),
        "steps": trainer.global_step,
        "fit_seconds": fit_seconds,
        "diverged_epoch": model.diverged_epoch,
        "error": None,
        "config": job_config(cfg),
    }
    write_json_atomic(out / "metrics.json", metrics)
    return metrics


def is_multirun() -> bool:
    """Whether this job is one of a Hydra sweep's."""
    return HydraConfig.get().mode == RunMode.MULTIRUN


def remove_if_fresh(out: Path) -> None:
    """Remove a run dir that holds only what Hydra wrote before the job: bad input leaves nothing behind."""
    if out.is_dir() and all(p.name in (".hydra", "train.log") for p in out.iterdir()):
        shutil.rmtree(out, ignore_errors=True)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float:
    """Hydra entry: `python -m linreg.train [overrides]` or `linreg-train [overrides]`."""
    try:
        metrics = run(cfg)
    except Exception as err:
        if isinstance(err, ConfigError) and not is_multirun() and not os.environ.get("HYDRA_FULL_ERROR"):
            remove_if_fresh(output_dir())
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        out = output_dir()
        out.mkdir(parents=True, exist_ok=True)
        failed = failed_metrics(cfg, err)
        write_json_atomic(out / "metrics.json", failed)
        if not is_multirun():
            raise
        # In a sweep a failing job is a row of the results table, not the end of the sweep.
        log.error("job failed: %s", failed["error"])
        return math.inf  # a sweeper minimising train_mse (optuna) needs a number
    weights = metrics["weights"] and [round(v, 4) for v in metrics["weights"]]
    print(f"{metrics['model']}: status={metrics['status']} train_mse={metrics['train_mse']} weights={weights}")
    return math.inf if metrics["train_mse"] is None else metrics["train_mse"]


if __name__ == "__main__":
    main()
