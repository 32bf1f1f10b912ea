"""The config's schema (in Hydra's ConfigStore) and `check`: what Hydra cannot know (ranges, memory, a GPU, `+key`)."""

import contextlib
import os
import shutil
import sys
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import psutil
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONFIG_DIR = str(Path(__file__).resolve().parent / "conf")  # conf/ of the checkout, or its copy in the wheel
NEW_DIRS: set[Path] = set()  # run and sweep dirs this process made (resolved): a refusal removes them again
FLOAT32_MAX = 3.4028234663852886e38
MAX_DEG = 20  # higher powers of N(0, 1) features overflow float32 in any sizeable sample
Config = DictConfig | dict[str, Any]  # a run's: Hydra's, or (a stacked member's) the same as plain data, read by item


@dataclass
class DataConfig:
    """tensorGenReg's arguments, the mini-batch size and how many mini-batches one `training_step` call takes."""

    num_examples: int = 1000
    w: list[float] = field(default_factory=lambda: [2.0, -1.0, 1.0])
    bias: bool = True
    delta: float = 0.01
    deg: int = 1
    batch_size: int = 10
    batches_per_call: int = 10


@dataclass
class ManualConfig:
    """`linreg.models.ManualRegression`'s arguments (in_features and bias come from the data)."""

    _target_: str = "linreg.models.ManualRegression"
    lr: float = 0.03
    log_every_sgd_steps: int = 50


@dataclass
class LinearConfig(ManualConfig):
    """`linreg.models.LinearRegression`'s arguments."""

    _target_: str = "linreg.models.LinearRegression"
    init: str = "default"


@dataclass
class TrainerConfig:
    """The `lightning.Trainer` arguments a run sets, with Lightning's meaning."""

    accelerator: str = "cpu"
    devices: int = 1
    max_epochs: int = 3
    deterministic: bool = True
    enable_progress_bar: bool | None = None


@dataclass
class TrainConfig:
    """`conf/train.yaml`: the groups and the run's own keys."""

    data: DataConfig = MISSING
    model: Any = MISSING
    trainer: TrainerConfig = MISSING
    logger: Any = None
    seed: int = 420
    resume: bool = False
    threads: int = 1


@dataclass
class EvaluateConfig:
    """`conf/evaluate.yaml`: the checkpoint, and the held-out set's seed and size (null: seed + 1, same size)."""

    ckpt_path: str | None = None
    data_seed: int | None = None
    num_examples: int | None = None


MODELS = {schema._target_: schema for schema in (ManualConfig, LinearConfig)}

# Each YAML option pulls its schema in with `- /schema/<group>@_here_: <name>` in its defaults list.
store = ConfigStore.instance()
store.store(group="schema/train", name="train", node=TrainConfig)
store.store(group="schema/evaluate", name="evaluate", node=EvaluateConfig)
store.store(group="schema/data", name="data", node=DataConfig)
store.store(group="schema/model", name="manual", node=ManualConfig)
store.store(group="schema/model", name="linear", node=LinearConfig)
store.store(group="schema/trainer", name="trainer", node=TrainerConfig)


class ConfigError(ValueError):
    """A value the run cannot use: `key=value: why`."""

    def __init__(self, key: str, value: Any, why: str) -> None:
        shown = "" if value is None else f"={value!r}"[:200]
        super().__init__(" ".join(f"{key}{shown}: {why}".split()))  # one line, whatever a library said
        self.key, self.value = key, value


def refuse(err: Exception) -> NoReturn:
    """One line on stderr and exit 2 (a SystemExit passes Hydra's callback guard); the dirs made for it go."""
    discard_new_dirs()
    print(f"error: {err}", file=sys.stderr)
    raise SystemExit(2)


def discard_new_dirs() -> None:
    """Remove the dirs this process made for work it refuses, unless a run or an evaluation left a result there."""
    for made in NEW_DIRS:
        if made.is_dir() and not any(p.name in ("metrics.json", "eval.json") for p in made.rglob("*.json")):
            shutil.rmtree(made, ignore_errors=True)


@contextlib.contextmanager
def refusing(callback: bool = False) -> Iterator[None]:
    """A ConfigError inside becomes `refuse`, Hydra's own errors pass (its dirs removed); in a callback all refuse."""
    try:
        yield
    except Exception as err:
        if callback and not isinstance(err, ConfigError):  # Hydra would make it a warning and skip the checks
            if full_error():
                traceback.print_exc()
            why = f"{type(err).__name__}: {first_line(err)}"
            err = ConfigError(str(getattr(err, "full_key", "") or "config"), None, why)
        if not isinstance(err, ConfigError):
            discard_new_dirs()
        elif not full_error() or callback:
            refuse(err)
        raise


def first_line(err: Exception) -> str:
    """An error's first line (OmegaConf's and submitit's go on with details)."""
    return (str(err).strip().splitlines() or [""])[0]


def override_key(override: str) -> str:
    """The key an override sets: `x.y` for `x.y=1`, `+x.y=1`, `++x.y=1` and `~x.y`."""
    return override.split("=", 1)[0].lstrip("+~")


def is_int(v: Any) -> bool:
    """An int that is not a bool."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    """A finite int or float, not a bool (NaN, inf and an integer past float's range fail the bound)."""
    return not isinstance(v, bool) and isinstance(v, (int, float)) and abs(v) <= sys.float_info.max


def finite(v: Any) -> bool:
    """A number that float32 holds."""
    return is_number(v) and abs(v) <= FLOAT32_MAX


# What the types allow but a run cannot use: key -> (test, what is allowed). Keys left out of a config are skipped.
RANGES: dict[str, tuple[Any, str]] = {
    "seed": (lambda v: 0 <= v < 2**32, "must be from 0 to 2**32-1 (numpy's seed range)"),
    "threads": (lambda v: 1 <= v <= 1024, "must be from 1 to 1024"),
    "data.num_examples": (lambda v: 0 < v < 2**63, "must be a positive integer"),
    "data.w": (lambda v: v and all(map(finite, v)), "must be a non-empty list of numbers that fit float32"),
    "data.delta": (lambda v: finite(v) and 0 <= v <= FLOAT32_MAX / 16, "must be from 0 to 2.1e37 (noise fits float32)"),
    "data.deg": (lambda v: 1 <= v <= MAX_DEG, f"must be from 1 to {MAX_DEG} (higher powers overflow float32)"),
    "data.batch_size": (lambda v: 0 < v < 2**63, "must be a positive integer"),
    "data.batches_per_call": (lambda v: 0 < v < 2**63, "must be a positive integer"),
    "model.lr": (lambda v: finite(v) and v > 0, "must be a finite number > 0"),
    "model.log_every_sgd_steps": (lambda v: 0 < v < 2**63, "must be a positive integer"),
    "model.init": (lambda v: v in ("default", "zeros"), "must be default or zeros"),
    "trainer.accelerator": (lambda v: v in ("cpu", "gpu", "cuda", "auto"), "must be cpu, gpu, cuda or auto"),
    "trainer.devices": (lambda v: v == 1, "must be 1: one small model on one device"),
    "trainer.max_epochs": (lambda v: 0 < v < 2**31, "must be a positive integer"),
}
LAUNCHER = {  # launcher settings their plugins take unchecked (a traceback at the first job)
    "n_jobs": (lambda v: is_int(v) and v != 0, "must be a non-zero integer (joblib: -1 is one worker per core)"),
    "memory_budget_gb": (lambda v: v is None or (finite(v) and v > 0), "must be a number > 0, or null"),
    "max_group_size": (lambda v: v is None or (is_int(v) and v > 0), "must be a positive integer, or null"),
}


@contextlib.contextmanager
def naming_key() -> Iterator[None]:
    """OmegaConf's error inside as a ConfigError naming its key, in one line."""
    try:
        yield
    except OmegaConfBaseException as err:
        raise ConfigError(str(getattr(err, "full_key", "") or "config"), None, str(err).splitlines()[0]) from None


def plain(cfg: Config, skip: tuple[str, ...] = ("hydra",)) -> dict[str, Any]:
    """The config as plain data, resolved, less the `skip` keys (Hydra's own by default)."""
    with naming_key():
        return {
            k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
            for k, v in cfg.items()
            if k not in skip
        }


def check(cfg: Config, schema: bool = True) -> None:
    """ConfigError for the first value the schema lets through but a run cannot use (`schema`: its keys too)."""
    plain_cfg = plain(cfg)
    if schema:  # keys added with `+` (Hydra lets them past); the vectorized launcher checks them once per group
        model = plain_cfg.get("model")
        known = MODELS.get(model.get("_target_")) if isinstance(model, dict) else None
        with naming_key():  # another model's arguments are checked by building it
            OmegaConf.merge(OmegaConf.structured(TrainConfig(model=known()) if known else TrainConfig), plain_cfg)
        for group in ("data", "model", "trainer"):  # `model: null` in an experiment passes the schema's Any
            if not isinstance(plain_cfg.get(group), dict):
                raise ConfigError(group, plain_cfg.get(group), f"missing: choose an option, e.g. {group}=<name>")
        for key in ("seed", "resume", "threads"):
            if key not in plain_cfg:  # `~seed`: the schema's default would hide it, but the run reads the config
                raise ConfigError(key, None, "missing: conf/train.yaml sets it; give a value instead of removing it")
    within(RANGES, plain_cfg)
    data = plain_cfg["data"]
    if data["bias"] and len(data["w"]) < 2:
        raise ConfigError("data.w", data["w"], "needs a feature weight and the intercept when data.bias=true")
    if plain_cfg["trainer"]["accelerator"] in ("gpu", "cuda") and not gpu_available():
        raise ConfigError("trainer.accelerator", plain_cfg["trainer"]["accelerator"], "no GPU here; use trainer=cpu")
    needed = 3 * 4 * data["num_examples"] * (len(data["w"]) + 2)  # float32 features and labels, ~3 copies at peak
    if needed > (free := psutil.virtual_memory().available):
        why = f"needs about {needed / 2**30:.1f} GiB, {free / 2**30:.1f} GiB available"
        raise ConfigError("data.num_examples", data["num_examples"], why)


def within(ranges: dict[str, tuple[Any, str]], plain: dict[str, Any], prefix: str = "") -> None:
    """ConfigError for the first `group.key` of `ranges` whose value in `plain` fails its test (absent keys pass)."""
    for key, (ok, why) in ranges.items():
        group, _, name = key.rpartition(".")
        holder = plain.get(group) if group else plain
        if isinstance(holder, dict) and name in holder and not ok(holder[name]):
            raise ConfigError(prefix + key, holder[name], why)


def gpu_available() -> bool:
    """Whether torch sees a CUDA device (torch is imported only when a run asks for a GPU)."""
    import torch

    return torch.cuda.is_available()


def full_error() -> bool:
    """Hydra's rule: tracebacks only with HYDRA_FULL_ERROR=1."""
    return os.environ.get("HYDRA_FULL_ERROR") == "1"
