"""Train one model on the tutorial's data: `run(cfg)` does the work, `main` is the Hydra entry."""

import json
import os
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from linreg.data import RegressionDataModule
from linreg.models import MODELS, RegressionModule

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")


def output_dir() -> Path:
    """This job's output dir: Hydra's runtime dir, or `hydra.run.dir` for a composed config."""
    hc = HydraConfig.get()
    if OmegaConf.is_missing(hc.runtime, "output_dir") or not hc.runtime.output_dir:
        return Path(hc.run.dir)
    return Path(hc.runtime.output_dir)


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write JSON via a temp file and a rename, so a crash never leaves a truncated file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def build_loggers(cfg: DictConfig, out: Path) -> list[Logger]:
    """The loggers named under `logger` (tensorboard, csv); none when `logger=null`."""
    lcfg = cfg.get("logger") or {}
    loggers: list[Logger] = []
    if lcfg.get("tensorboard") is not None:
        loggers.append(
            TensorBoardLogger(
                save_dir=str(out),
                name="tensorboard",
                version="",
                log_graph=bool(lcfg.tensorboard.get("log_graph", True)),
                default_hp_metric=False,
            )
        )
    if lcfg.get("csv") is not None:
        loggers.append(CSVLogger(save_dir=str(out), name="csv", version=""))
    return loggers


def build_callbacks(cfg: DictConfig, out: Path) -> list[L.Callback]:
    """Lightning callbacks for this run (dashboards, checkpoints)."""
    return []


def build_trainer(cfg: DictConfig, out: Path) -> L.Trainer:
    """A Trainer lean enough for a 3-parameter model: no progress bar, summary or sanity run."""
    t = cfg.trainer
    return L.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        max_epochs=t.max_epochs,
        logger=build_loggers(cfg, out) or False,
        callbacks=build_callbacks(cfg, out),
        log_every_n_steps=1,  # the module samples train/loss itself
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=t.deterministic,
        default_root_dir=str(out),
    )


def run(cfg: DictConfig) -> dict[str, Any]:
    """Generate the data, fit the configured model, write and return `metrics.json`'s content."""
    out = output_dir()
    out.mkdir(parents=True, exist_ok=True)
    model_cls: type[RegressionModule] = MODELS[cfg.model.name]
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
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    fit_seconds = time.perf_counter() - start

    train_mse = model.epoch_mse[-1] if model.epoch_mse else float("nan")
    metrics = {
        "status": "ok" if model.diverged_epoch is None else "diverged",
        "model": cfg.model.name,
        "seed": cfg.seed,
        "data": data_cfg,
        "lr": cfg.model.lr,
        "batch_size": cfg.data.batch_size,
        "epochs": cfg.trainer.max_epochs,
        "accelerator": cfg.trainer.accelerator,
        "epoch_mse": model.epoch_mse,
        "train_mse": train_mse,
        "weights": model.weights(),
        "true_weights": list(cfg.data.w),
        "ols_mse": dm.ols_mse(),
        "steps": trainer.global_step,
        "fit_seconds": fit_seconds,
        "diverged_epoch": model.diverged_epoch,
        "error": None,
    }
    write_json_atomic(out / "metrics.json", metrics)
    return metrics


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float:
    """Hydra entry: `python -m linreg.train [overrides]` or `linreg-train [overrides]`."""
    metrics = run(cfg)
    weights = [round(v, 4) for v in metrics["weights"]]
    print(f"{metrics['model']}: status={metrics['status']} train_mse={metrics['train_mse']:.6g} weights={weights}")
    return metrics["train_mse"]


if __name__ == "__main__":
    main()
