"""The run record: `metrics.json`, one bounded reader for every file read back, atomic writes, the run-dir lock."""

import dataclasses
import fcntl
import json
import math
import os
import shutil
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from linreg.config import Config, ConfigError, is_int, is_number, plain

FINISHED = ("ok", "diverged", "pruned")  # outcomes; failed, missing and corrupt are no result
MAX_BYTES = 1 << 20  # the largest record, config or YAML file read back (a 1,000-weight record is ~30 KiB)
ROOM = 2 << 20  # free bytes a run (or a sweep's next job) starts with: its files, and a sweep's table after it


class CorruptRecord(ValueError):
    """A file that cannot be read back or trusted; the message says which and why."""


class RunDirBusy(ConfigError):
    """The run dir holds another run, or another process writes it: nothing there may be touched."""


WRITING: set[Path] = set()  # temp files being written: a signal handler that ends the process removes them


def write_atomic(path: Path, data: bytes) -> None:
    """Write through a temp file and a rename: a crash or a full disk never leaves a torn file (nor the temp)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    WRITING.add(tmp)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError):
            err.filename, err.filename2 = str(path), None  # a message names the file, not its temp
        raise
    finally:
        WRITING.discard(tmp)


def write_json(path: Path, data: Any) -> None:
    """`write_atomic` for a JSON document."""
    write_atomic(path, (json.dumps(data, indent=2) + "\n").encode())


def room(path: Path, key: str) -> None:
    """ConfigError naming `key` when `path`'s filesystem has less than ROOM free: nothing is started half-way."""
    free = shutil.disk_usage(path).free
    if free < ROOM:
        raise ConfigError(key, str(path), f"{free >> 10} KiB free there; a run needs {ROOM >> 20} MiB (disk full?)")


def write_job_files(out: Path, cfg: DictConfig) -> None:
    """Hydra's record of a job in `.hydra/` (config, hydra, overrides), written atomically (`output_subdir: null`)."""
    hydra = HydraConfig.instance().cfg
    (out / ".hydra").mkdir(exist_ok=True)
    for name, node in (("config.yaml", cfg), ("hydra.yaml", hydra), ("overrides.yaml", hydra.hydra.overrides.task)):
        write_atomic(out / ".hydra" / name, OmegaConf.to_yaml(node).encode())


YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's parser where PyYAML has it: 5x faster
MAX_DEPTH = 100  # nesting a YAML file may have (Hydra's are < 10 deep); libyaml < 0.2.6 recurses without a limit


def load_yaml(text: bytes) -> Any:
    """YAML without aliases (a few bytes of them expand past any size limit) and at most MAX_DEPTH deep."""
    # ASCII (no NUL: not UTF-16) without `*` has no alias; collections start at \n, \r, -, ?, { or [ (twice: `[a: 1]`).
    starts = 1 + sum(map(text.count, (b"\n", b"\r", b"-", b"?", b"[", b"[", b"{")))
    if text.isascii() and b"\0" not in text and b"*" not in text and starts <= MAX_DEPTH:
        return yaml.load(text, Loader=YAML_LOADER)
    depth = 0
    for event in yaml.parse(text, Loader=YAML_LOADER):  # the parser keeps its own stack: no recursion here
        if isinstance(event, yaml.AliasEvent):
            raise yaml.YAMLError("aliases are not allowed")
        depth += isinstance(event, yaml.CollectionStartEvent) - isinstance(event, yaml.CollectionEndEvent)
        if depth > MAX_DEPTH:
            raise yaml.YAMLError(f"nested more than {MAX_DEPTH} deep")
    return yaml.load(text, Loader=YAML_LOADER)


def read_file(path: Path) -> Any:
    """A JSON or YAML file's content: a regular file, not a link, at most MAX_BYTES. CorruptRecord otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)  # a FIFO opens without waiting
    except OSError as err:
        raise CorruptRecord(f"{path.name}: {err.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise CorruptRecord(f"{path.name}: not a regular file")
        if info.st_size > MAX_BYTES:
            raise CorruptRecord(f"{path.name}: {info.st_size} bytes, more than a record holds ({MAX_BYTES})")
        text = os.read(fd, MAX_BYTES + 1)
    finally:
        os.close(fd)
    try:
        if path.suffix == ".json":
            return json.loads(text)
        data = load_yaml(text)
        json.dumps(data)  # plain data, as Hydra writes: YAML's dates, bytes and sets are in no file of a run
        return data
    except (ValueError, TypeError, yaml.YAMLError, RecursionError) as err:  # RecursionError: past Python's stack
        raise CorruptRecord(f"{path.name}: {type(err).__name__}: {str(err).splitlines()[0][:100]}") from None


def read_or_none(path: Path) -> Any:
    """`read_file`, or None when the file is missing or cannot be trusted."""
    try:
        return read_file(path)
    except CorruptRecord:
        return None


def sweep_dir_of(hydra: DictConfig) -> Path:
    """A job's sweep dir (`hydra` its Hydra config): a relative one is the launching cwd's (hydra.job.chdir=true)."""
    return Path(hydra.runtime.cwd, hydra.sweep.dir)


def identity(cfg: Config) -> dict[str, Any]:
    """What a run computes: its config less `hydra` and `resume` (how it is run), resolved."""
    return plain(cfg, ("hydra", "resume"))


def resumable(config: Any) -> Any:
    """What a checkpoint must have been trained with to be continued: the identity less loggers and epochs."""
    if not isinstance(config, dict):
        return config
    plain = json.loads(json.dumps(config))
    plain.pop("logger", None)
    if isinstance(plain.get("trainer"), dict):
        plain["trainer"].pop("max_epochs", None)  # more epochs is what resume is for
    return plain


def finite_or_none(value: Any) -> Any:
    """NaN and inf as None (JSON has no NaN; a non-finite number is no result), in lists too."""
    if isinstance(value, list):
        return [finite_or_none(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def shown(values: list[float | None] | None, spec: str = ".4f", sep: str = ", ") -> str:
    """Numbers for a console line, `nan` for a missing one: `2.0006, -0.9999, 1.0007`."""
    return sep.join("nan" if v is None else format(v, spec) for v in values or [])


def model_name(target: Any) -> str | None:
    """A model's name in records and tables: its class less `Regression`, lower-cased."""
    if not isinstance(target, str) or not target:
        return None
    cls = target.rpartition(".")[2]
    return cls.removesuffix("Regression").lower() or cls.lower()


def param_names(count: int, bias: bool) -> list[str]:
    """Names of the coefficients in the tutorial's order: w1..wk, then b for the intercept."""
    return [f"w{i + 1}" for i in range(count - bias)] + ["b"] * bias


KINDS = {  # metrics.json's typed fields: (test, what it must be); None is always allowed here
    "number": (is_number, "a finite number"),
    "mse": (lambda v: is_number(v) and v >= 0, "a finite number >= 0"),
    "integer": (is_int, "an integer"),
    "numbers": (lambda v: isinstance(v, list) and all(x is None or is_number(x) for x in v), "a list of numbers"),
    "mses": (lambda v: isinstance(v, list) and all(x is None or (is_number(x) and x >= 0) for x in v), "MSEs >= 0"),
    "text": (lambda v: isinstance(v, str), "a string"),
    "object": (lambda v: isinstance(v, dict), "an object"),
}
FIELD_KINDS = {
    "model": "text", "seed": "integer", "data": "object", "lr": "number", "batch_size": "integer",
    "epochs": "integer", "accelerator": "text", "epoch_mse": "mses", "train_mse": "mse",
    "weights": "numbers", "true_weights": "numbers", "ols_mse": "mse", "steps": "integer",
    "fit_seconds": "number", "diverged_epoch": "integer", "pruned_epoch": "integer", "error": "text",
    "config": "object",
}  # fmt: skip


@dataclass
class RunRecord:
    """One run's record: the fields of metrics.json in its order; tables, HParams and progress lines read it."""

    status: str  # ok, diverged, pruned (an Optuna trial stopped early) or failed (a reader also finds missing, corrupt)
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
    pruned_epoch: int | None = None  # the epoch (from 1) after which its pruner stopped it
    error: str | None = None
    config: dict[str, Any] | None = None

    @classmethod
    def of(cls, cfg: Config, status: str, **outcome: Any) -> "RunRecord":
        """The record of `cfg`'s run: what its config decides, then the outcome (NaN and inf as None)."""
        try:
            config = identity(cfg)
        except Exception:  # a value that does not resolve: the failure is still recorded
            config = {}
        data, model, trainer = (
            config.get(k) if isinstance(config.get(k), dict) else {} for k in ("data", "model", "trainer")
        )
        return cls(
            status=status, model=model_name(model.get("_target_")), seed=config.get("seed"), data=data or None,
            lr=finite_or_none(model.get("lr")), batch_size=data.get("batch_size"), epochs=trainer.get("max_epochs"),
            accelerator=trainer.get("accelerator"), true_weights=data.get("w"), config=config,
            **{k: finite_or_none(v) for k, v in outcome.items()},
        )  # fmt: skip

    @classmethod
    def failed(cls, cfg: Config, error: BaseException) -> "RunRecord":
        """What a run that raised leaves: its config and the error in one line."""
        text = str(error) if isinstance(error, ConfigError) else f"{type(error).__name__}: {error}"
        return cls.of(cfg, "failed", steps=0, error=text.splitlines()[0])

    @classmethod
    def parse(cls, metrics: Any) -> "RunRecord":
        """metrics.json's content as a record; CorruptRecord when it cannot be trusted."""
        if not isinstance(metrics, dict) or metrics.get("status") not in (*FINISHED, "failed"):
            raise CorruptRecord("metrics.json: not a run record (no status ok, diverged, pruned or failed)")
        for key, kind in FIELD_KINDS.items():
            good, want = KINDS[kind]
            if metrics.get(key) is not None and not good(metrics[key]):
                raise CorruptRecord(f"metrics.json: {key} is not {want}")
        record = cls(**{f.name: metrics.get(f.name) for f in dataclasses.fields(cls) if f.name in metrics})
        if record.status == "diverged" and record.diverged_epoch is None:
            raise CorruptRecord("metrics.json: a diverged run without diverged_epoch")
        if record.status == "ok":
            if record.train_mse is None or record.ols_mse is None or not record.weights:
                raise CorruptRecord("metrics.json: an ok run without train_mse, ols_mse or weights")
            if record.true_weights is not None and len(record.weights) != len(record.true_weights):
                raise CorruptRecord("metrics.json: the weights disagree in number with the true weights")
        return record

    @classmethod
    def read(cls, out: Path) -> "RunRecord":
        """The record in run dir `out`; CorruptRecord when it is there but cannot be trusted, FileNotFoundError."""
        if not os.path.lexists(out / "metrics.json"):
            raise FileNotFoundError(out / "metrics.json")
        return cls.parse(read_file(out / "metrics.json"))

    def as_json(self) -> dict[str, Any]:
        """metrics.json's content (its values shared with the record: `asdict`'s deep copy costs a table)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def write(self, out: Path) -> None:
        """metrics.json in `out`; a failure never replaces a finished record (it goes to failed.json then)."""
        name = "failed.json" if self.status == "failed" and finished(out) is not None else "metrics.json"
        write_json(out / name, self.as_json())

    @property
    def gap(self) -> float | None:
        """How far an ok run is above the least-squares floor."""
        ok = self.status == "ok" and self.train_mse is not None and self.ols_mse is not None
        return self.train_mse - self.ols_mse if ok else None


def finished(out: Path, cfg: Config | None = None) -> RunRecord | None:
    """The finished (ok or diverged) record in `out`; when `cfg` is given, of its run (its loggers aside)."""
    try:
        record = RunRecord.read(out)
    except (OSError, CorruptRecord):
        return None
    if record.status not in FINISHED:
        return None
    if cfg is None:
        return record
    same = resumable(record.config) == resumable(identity(cfg)) and record.epochs == cfg["trainer"]["max_epochs"]
    return record if same else None


class RunDirLock:
    """An exclusive lock on `<dir>/.lock` for a run's (or sweep's) life: one writer; the kernel drops it on death."""

    def __init__(self, out: Path, key: str = "hydra.run.dir", who: str = "another run") -> None:
        self.path, self.key, self.who, self.file = out / ".lock", key, who, None

    def __enter__(self) -> "RunDirLock":
        try:  # never through a link, never waiting on a FIFO
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
        except OSError as err:
            raise RunDirBusy(self.key, str(self.path.parent), f"its .lock cannot be opened ({err.strerror})") from None
        self.file = os.fdopen(fd, "r+")
        for _ in range(20):  # another process's `is_locked` probe holds it for a moment only
            try:
                fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except BlockingIOError:
                time.sleep(0.05)
        self.file.close()
        raise RunDirBusy(self.key, str(self.path.parent), f"{self.who} is using it")

    def __exit__(self, *exc: Any) -> None:
        self.file.close()  # closing drops the lock


def is_locked(out: Path) -> bool:
    """Whether another process holds `out`'s run-dir lock."""
    try:
        fd = os.open(out / ".lock", os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def refuse_other_runs(out: Path, cfg: Config, lock_held: bool = False) -> None:
    """RunDirBusy when `out` holds a run this one must not touch: running, finished, or of another config."""
    if not lock_held and is_locked(out):
        raise RunDirBusy("hydra.run.dir", str(out), "another run is using it")
    if os.path.lexists(out / ".sweep.json"):
        raise RunDirBusy("hydra.run.dir", str(out), "is a sweep's dir; use a dir of its own")
    try:
        record = RunRecord.read(out)
    except FileNotFoundError:
        record = None
    except CorruptRecord as err:  # not a record this project wrote (its writes are atomic): nothing goes over it
        raise RunDirBusy("hydra.run.dir", str(out), f"its {err}; move it away or use another dir") from None
    if record is not None and record.status in FINISHED:
        if not cfg["resume"]:
            raise RunDirBusy("hydra.run.dir", str(out), "holds a finished run; resume=true keeps it, or use a new dir")
        if resumable(record.config) != resumable(identity(cfg)):
            raise RunDirBusy("hydra.run.dir", str(out), "holds a finished run of another config; use another dir")
        if len(record.epoch_mse) > (epochs := cfg["trainer"]["max_epochs"]):
            why = f"the run in {out} already has {len(record.epoch_mse)} epochs; kept as is"
            raise RunDirBusy("trainer.max_epochs", epochs, why)
    saved = out / "checkpoints" / "config.json"
    if not os.path.lexists(saved) and not os.path.lexists(out / "checkpoints" / "last.ckpt"):
        return
    if not cfg["resume"]:
        raise RunDirBusy("hydra.run.dir", str(out), "holds an unfinished run; resume=true continues it")
    if (config := read_or_none(saved)) is not None and config != resumable(identity(cfg)):
        raise RunDirBusy("hydra.run.dir", str(out), "holds a checkpoint of another config; use another dir")
