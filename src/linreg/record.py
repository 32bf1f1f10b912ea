"""The run record: `metrics.json` and the config saved beside a checkpoint, read and written safely."""

import contextlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from linreg.config import ConfigError

log = logging.getLogger(__name__)
FINISHED = ("ok", "diverged")  # outcomes; anything else (failed, missing) is no result


def write_atomic(path: Path, data: bytes) -> None:
    """Write via a temp file and a rename, so a crash never leaves a truncated file (nor a temp file)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # the first error is the one to report
            tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """`write_atomic` for a JSON document (metrics.json)."""
    write_atomic(path, (json.dumps(data, indent=2) + "\n").encode())


def read_json(path: Path) -> Any:
    """A JSON file's content, or None when it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


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


def without_epochs(config: Any) -> Any:
    """A saved job config less loggers and epochs: what `checkpoint_config` keeps."""
    if not isinstance(config, dict):
        return config
    plain = json.loads(json.dumps(config))
    plain.pop("logger", None)
    if isinstance(plain.get("trainer"), dict):
        plain["trainer"].pop("max_epochs", None)
    return plain


def finished_record(out: Path) -> dict[str, Any] | None:
    """The finished (ok/diverged) metrics.json in `out`, if there is one."""
    record = read_json(out / "metrics.json")
    if isinstance(record, dict) and record.get("status") in FINISHED:
        return record
    return None


def finished_metrics(out: Path, cfg: DictConfig) -> dict[str, Any] | None:
    """A finished (ok/diverged) metrics.json of this very config in `out`, if there is one."""
    record = finished_record(out)
    if record is not None and record.get("config") == job_config(cfg):
        return record
    return None


class RunDirBusy(ConfigError):
    """The run dir holds another run (or another process is writing it): nothing there may be touched."""


def lock_holder(out: Path) -> str | None:
    """The pid in `out/.lock` when another process holds that lock (a run is writing `out`), else None."""
    import fcntl

    try:
        with open(out / ".lock") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return f.read().strip() or "?"
    except OSError:
        return None
    return None


def refuse_other_runs(out: Path, cfg: DictConfig, check_lock: bool = True) -> None:
    """Raise RunDirBusy when `out` holds a run that this one must not touch: running, finished, or another config."""
    if check_lock and (holder := lock_holder(out)) is not None:
        raise RunDirBusy("hydra.run.dir", str(out), f"another run (pid {holder}) is using it")
    ckpt_dir = out / "checkpoints"
    record = finished_record(out)
    wanted = checkpoint_config(cfg)
    if record is not None:
        if not cfg.resume:
            raise RunDirBusy("hydra.run.dir", str(out), "holds a finished run; resume=true keeps it, or use a new dir")
        if without_epochs(record.get("config")) != wanted:
            raise RunDirBusy("hydra.run.dir", str(out), "holds a finished run of another config; use another dir")
        done = len(record.get("epoch_mse") or [])
        if done > cfg.trainer.max_epochs:
            raise RunDirBusy(
                "trainer.max_epochs", cfg.trainer.max_epochs, f"the run in {out} already has {done} epochs; kept as is"
            )
    if not ((ckpt_dir / "last.ckpt").exists() or (ckpt_dir / "config.json").exists()):
        return
    if not cfg.resume:
        raise RunDirBusy("hydra.run.dir", str(out), "holds an unfinished run; resume=true continues it")
    saved = read_json(ckpt_dir / "config.json")
    if saved is not None and saved != wanted:
        raise RunDirBusy("hydra.run.dir", str(out), "holds a checkpoint of another config; use another dir")


def sweep_value(metrics: dict[str, Any]) -> float:
    """What a job returns to its sweeper: the train MSE, inf when there is none (a minimising sweeper needs one)."""
    mse = metrics.get("train_mse")
    return math.inf if mse is None else mse


def finite_or_none(value: Any) -> Any:
    """NaN/inf become null: JSON has no NaN, and a non-finite number is no result."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [finite_or_none(v) for v in value]
    return value


def safe(read: Any) -> Any:
    """`read()`, or None when the config cannot even be read (a bad interpolation): a failure record is still due."""
    try:
        return read()
    except Exception:
        return None


def model_name(target: Any) -> str | None:
    """A model's name in records and tables: its class (`model._target_`) less `Regression`, lower-cased."""
    if not isinstance(target, str) or not target:
        return None
    cls = target.rpartition(".")[2]
    return cls.removesuffix("Regression").lower() or cls.lower()


def config_fields(cfg: DictConfig) -> dict[str, Any]:
    """The metrics.json fields a run's config decides (any missing or unreadable key is None)."""
    return {
        "model": safe(lambda: model_name(OmegaConf.select(cfg, "model._target_"))),
        "seed": safe(lambda: OmegaConf.select(cfg, "seed")),
        "data": safe(lambda: OmegaConf.to_container(cfg.data, resolve=True) if "data" in cfg else None),
        "lr": safe(lambda: OmegaConf.select(cfg, "model.lr")),
        "batch_size": safe(lambda: OmegaConf.select(cfg, "data.batch_size")),
        "epochs": safe(lambda: OmegaConf.select(cfg, "trainer.max_epochs")),
        "accelerator": safe(lambda: OmegaConf.select(cfg, "trainer.accelerator")),
    }


def failed_metrics(cfg: DictConfig, error: BaseException) -> dict[str, Any]:
    """What a job that raised leaves behind: its config and the error, in one line."""
    fields = config_fields(cfg)
    data = fields["data"] if isinstance(fields["data"], dict) else {}
    return {
        "status": "failed",
        **fields,
        "epoch_mse": [],
        "train_mse": None,
        "weights": None,
        "true_weights": data.get("w"),
        "ols_mse": None,
        "steps": 0,
        "fit_seconds": 0.0,
        "diverged_epoch": None,
        "error": str(error) if isinstance(error, ConfigError) else f"{type(error).__name__}: {error}",
        "config": safe(lambda: job_config(cfg)) or safe(lambda: OmegaConf.to_container(cfg)),
    }


def write_failure(out: Path, failed: dict[str, Any]) -> None:
    """Record a failure without ever replacing a finished result (then it goes to failed.json beside it)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        name = "failed.json" if finished_record(out) is not None else "metrics.json"
        write_json_atomic(out / name, failed)
    except OSError as err:
        log.error("could not record the failure in %s: %s", out, err)
