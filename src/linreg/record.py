"""The run record: `metrics.json` and the config saved beside a checkpoint, read and written safely."""

import contextlib
import dataclasses
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from linreg.config import ConfigError, override_key

log = logging.getLogger(__name__)
FINISHED = ("ok", "diverged")  # outcomes; anything else (failed, missing) is no result
STATUSES = (*FINISHED, "failed")  # what a run may write; missing and corrupt are what a reader finds
NOT_IDENTITY = ("resume",)  # how a run is run, not what it computes: left out wherever two runs are compared


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
    """The run's identity: its own config less `hydra` and NOT_IDENTITY; what a resumed job must match."""
    return {
        key: OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
        for key, value in cfg.items()
        if key != "hydra" and key not in NOT_IDENTITY
    }


def identity_overrides(overrides: Sequence[str]) -> list[str]:
    """Command-line overrides less NOT_IDENTITY (`resume=true`, `+resume`, `~resume`): what names a run."""
    return [o for o in overrides if override_key(o) not in NOT_IDENTITY]


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


def sweep_value(train_mse: float | None) -> float:
    """What a job returns to its sweeper: the train MSE, inf when there is none (a minimising sweeper needs one)."""
    return math.inf if train_mse is None else train_mse


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


def value_at(cfg: DictConfig, key: str) -> Any:
    """The config's value at `key` as JSON has it (a bad value may be a list or a mapping: `data.batch_size=[3]`)."""
    value = OmegaConf.select(cfg, key)
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def config_fields(cfg: DictConfig) -> dict[str, Any]:
    """The metrics.json fields a run's config decides (any missing or unreadable key is None)."""
    return {
        "model": safe(lambda: model_name(OmegaConf.select(cfg, "model._target_"))),
        "seed": safe(lambda: value_at(cfg, "seed")),
        "data": safe(lambda: OmegaConf.to_container(cfg.data, resolve=True) if "data" in cfg else None),
        "lr": safe(lambda: value_at(cfg, "model.lr")),
        "batch_size": safe(lambda: value_at(cfg, "data.batch_size")),
        "epochs": safe(lambda: value_at(cfg, "trainer.max_epochs")),
        "accelerator": safe(lambda: value_at(cfg, "trainer.accelerator")),
    }


class CorruptRecord(ValueError):
    """A record that cannot be read or trusted; the message says which file and why."""


def is_finite(value: Any) -> bool:
    """A number with a value: any int (JSON ints are exact), a finite float; not a bool, not a string."""
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))


def json_type(value: Any) -> str:
    """`a list`, `null`, `a string '0.1'`: what a JSON value is, for an error message."""
    if value is None:
        return "null"
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list", dict: "an object"}
    text = json.dumps(value) if not isinstance(value, float) or math.isfinite(value) else str(value)
    return f"{names.get(type(value), type(value).__name__)} {text[:40]}"


KINDS: dict[str, tuple[Callable[[Any], bool], str]] = {  # what a record's value may be, and how to say it
    "number": (is_finite, "a finite number"),
    "numbers": (lambda v: isinstance(v, list) and all(map(is_finite, v)), "a list of finite numbers"),
    # A diverged run's weights: NaN and inf were written as null.
    "numbers or nulls": (
        lambda v: isinstance(v, list) and all(x is None or is_finite(x) for x in v),
        "a list of finite numbers or nulls",
    ),
    "integer": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "text": (lambda v: isinstance(v, str), "a string"),
    "object": (lambda v: isinstance(v, dict), "an object"),
}
# What an ok or diverged record must hold: a failed run may have written whatever bad value it was given.
RESULT_KINDS = {
    "model": "text?",
    "accelerator": "text?",
    "seed": "integer?",
    "lr": "number?",
    "batch_size": "integer?",
    "epochs": "integer?",
    "epoch_mse": "numbers or nulls?",
    "ols_mse": "number?",
    "steps": "integer?",
    "fit_seconds": "number?",
    "diverged_epoch": "integer?",
    "true_weights": "numbers?",
    "error": "text?",
    "config": "object?",
}
OK_KINDS = {"train_mse": "number", "ols_mse": "number", "weights": "numbers"}
DIVERGED_KINDS = {"train_mse": "number?", "weights": "numbers or nulls?", "diverged_epoch": "integer"}


def check_value(record: dict[str, Any], key: str, kind: str) -> None:
    """CorruptRecord unless `record[key]` is of `kind` (a KINDS key; a trailing `?` also allows null)."""
    value = record.get(key)
    if kind.endswith("?") and value is None:
        return
    good, want = KINDS[kind.rstrip("?")]
    if not good(value):
        raise CorruptRecord(f"metrics.json: {key} is {json_type(value)}, not {want}")


@dataclass
class RunRecord:
    """One run's record: the fields of metrics.json, in its order. Tables, HParams and failure rows come from it."""

    status: str  # ok, diverged, failed (a reader also finds missing and corrupt)
    model: str | None = None
    seed: int | None = None
    data: dict[str, Any] | None = None
    lr: float | None = None
    batch_size: int | None = None
    epochs: int | None = None
    accelerator: str | None = None
    epoch_mse: list[float | None] = field(default_factory=list)
    train_mse: float | None = None
    weights: list[float | None] | None = None
    true_weights: list[float] | None = None
    ols_mse: float | None = None
    steps: int | None = None
    fit_seconds: float | None = None
    diverged_epoch: int | None = None
    error: str | None = None
    config: dict[str, Any] | None = None

    @classmethod
    def of(cls, cfg: DictConfig, status: str, **outcome: Any) -> "RunRecord":
        """The record of `cfg`'s run: the fields its config decides, then the outcome (NaN and inf as null)."""
        fields = config_fields(cfg)
        data = fields["data"] if isinstance(fields["data"], dict) else {}
        config = safe(lambda: job_config(cfg)) or safe(lambda: OmegaConf.to_container(cfg))
        outcome = {k: finite_or_none(v) for k, v in outcome.items()}
        return cls(status=status, **fields, true_weights=data.get("w"), config=config, **outcome)

    @classmethod
    def failed(cls, cfg: DictConfig, error: BaseException) -> "RunRecord":
        """What a run that raised leaves behind: its config and the error, in one line."""
        text = str(error) if isinstance(error, ConfigError) else f"{type(error).__name__}: {error}"
        return cls.of(cfg, "failed", steps=0, fit_seconds=0.0, error=text)

    @classmethod
    def parse(cls, metrics: Any) -> "RunRecord":
        """A metrics.json's content as a record; CorruptRecord when it cannot be trusted."""
        if not isinstance(metrics, dict):
            raise CorruptRecord(f"metrics.json: holds {json_type(metrics)}, not an object")
        status = metrics.get("status")
        if status not in STATUSES:
            raise CorruptRecord(f"metrics.json: status is {json_type(status)}, not one of {', '.join(STATUSES)}")
        data = metrics.get("data")
        if data is not None and not isinstance(data, dict):
            raise CorruptRecord(f"metrics.json: data is {json_type(data)}, not an object")
        known = {f.name for f in dataclasses.fields(cls)}
        record = {k: v for k, v in metrics.items() if k in known}
        if status != "failed":
            checks = {**RESULT_KINDS, **(OK_KINDS if status == "ok" else DIVERGED_KINDS)}
            for key, kind in checks.items():
                check_value(record, key, kind)
            for key, kind in (("deg", "number?"), ("delta", "number?")):
                check_value(data or {}, key, kind)
        return cls(**record)

    def as_json(self) -> dict[str, Any]:
        """metrics.json's content."""
        return dataclasses.asdict(self)

    @property
    def gap(self) -> float | None:
        """How far the fit is above the least-squares floor (ok runs only)."""
        if self.status != "ok" or self.train_mse is None or self.ols_mse is None:
            return None
        return self.train_mse - self.ols_mse

    def data_value(self, key: str) -> Any:
        """One `data` setting (deg, delta, num_examples), None when unknown."""
        return self.data.get(key) if isinstance(self.data, dict) else None

    def hparams(self) -> dict[str, Any]:
        """The HParams record's hyperparameters, one scalar each (the same keys for every run)."""
        return {
            "model": str(self.model),
            "deg": int(self.data_value("deg")),
            "delta": float(self.data_value("delta")),
            "lr": float(self.lr) if is_finite(self.lr) else math.nan,  # a model of yours may keep its own default
            "batch_size": int(self.batch_size),
            "accelerator": str(self.accelerator),
            "seed": int(self.seed),
            "num_examples": int(self.data_value("num_examples")),
            "epochs": int(self.epochs),
        }

    def write(self, out: Path) -> None:
        """Write metrics.json in `out` (atomically)."""
        write_json_atomic(out / "metrics.json", self.as_json())


def write_failure(out: Path, failed: RunRecord) -> None:
    """Record a failure without ever replacing a finished result (then it goes to failed.json beside it)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        name = "failed.json" if finished_record(out) is not None else "metrics.json"
        write_json_atomic(out / name, failed.as_json())
    except OSError as err:
        log.error("could not record the failure in %s: %s", out, err)
