"""Checks a composed config before any work, so a bad value fails in one clear line."""

import math
from typing import Any

import psutil
from omegaconf import DictConfig, OmegaConf

MODEL_NAMES = ("manual", "linear")  # linreg.models.MODELS (not imported here: Lightning is slow to import)
ACCELERATORS = ("cpu", "gpu", "cuda", "auto")
INITS = ("default", "zeros")


class ConfigError(ValueError):
    """A bad config value: says the key, the value and what is allowed."""

    def __init__(self, key: str, value: Any, allowed: str) -> None:
        super().__init__(f"{key}={value!r}: {allowed}")
        self.key = key


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    """A finite int/float (not a bool)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def override_key(override: str) -> str:
    """The config key a command-line override sets: `x.y` for `x.y=1`, `+x.y=1`, `++x.y=1` and `~x.y`."""
    return override.split("=", 1)[0].lstrip("+~")


def _positive_int(cfg: DictConfig, key: str) -> int:
    v = OmegaConf.select(cfg, key)
    if not _is_int(v) or v <= 0:
        raise ConfigError(key, v, "must be a positive integer")
    return v


def _check_data(cfg: DictConfig) -> None:
    d = cfg.data
    _positive_int(cfg, "data.num_examples")
    _positive_int(cfg, "data.batch_size")
    _positive_int(cfg, "data.deg")
    w = OmegaConf.to_container(d.w) if OmegaConf.is_list(d.w) else d.w
    if not isinstance(w, list) or not w or not all(is_number(v) for v in w):
        raise ConfigError("data.w", w, "must be a non-empty list of finite numbers, e.g. [2,-1,1]")
    if not isinstance(d.bias, bool):
        raise ConfigError("data.bias", d.bias, "must be true or false")
    if d.bias and len(w) < 2:
        raise ConfigError("data.w", w, "needs at least one feature weight and the intercept when data.bias=true")
    if not is_number(d.delta) or d.delta < 0:
        raise ConfigError("data.delta", d.delta, "must be a finite number >= 0")


def _check_model(cfg: DictConfig) -> None:
    if cfg.model.get("name") not in MODEL_NAMES:
        raise ConfigError("model.name", cfg.model.get("name"), f"must be one of {', '.join(MODEL_NAMES)}")
    lr = cfg.model.lr
    if not is_number(lr) or lr <= 0:
        raise ConfigError("model.lr", lr, "must be a finite number > 0")
    if cfg.model.name == "linear" and cfg.model.get("init") not in INITS:
        raise ConfigError("model.init", cfg.model.get("init"), f"must be one of {', '.join(INITS)}")


def _check_trainer(cfg: DictConfig) -> None:
    _positive_int(cfg, "trainer.max_epochs")
    _positive_int(cfg, "trainer.log_every_n_steps")
    _positive_int(cfg, "trainer.steps_per_call")
    acc = cfg.trainer.accelerator
    if acc not in ACCELERATORS:
        raise ConfigError("trainer.accelerator", acc, f"must be one of {', '.join(ACCELERATORS)}")
    if acc in ("gpu", "cuda") and not _gpu_available():
        raise ConfigError("trainer.accelerator", acc, "no GPU available; use trainer=cpu")


def _check_logger(cfg: DictConfig) -> None:
    tb = OmegaConf.select(cfg, "logger.tensorboard")
    if tb is None:
        return
    if not isinstance(tb, DictConfig):
        raise ConfigError("logger.tensorboard", tb, "must be a mapping (conf/logger/tensorboard.yaml) or null")
    for key in ("log_graph", "fit_figure"):
        if not isinstance(tb.get(key, True), bool):
            raise ConfigError(f"logger.tensorboard.{key}", tb.get(key), "must be true or false")
    every = tb.get("write_every_s")
    if not is_number(every) or every < 0:
        raise ConfigError("logger.tensorboard.write_every_s", every, "must be a finite number >= 0")


def _gpu_available() -> bool:
    import torch  # only here: torch takes seconds to import, and only a GPU run needs the answer

    return torch.cuda.is_available()


def _check_memory(cfg: DictConfig) -> None:
    """Refuse data that would not fit, instead of letting the OS kill the process."""
    d = cfg.data
    n_cols = len(d.w) + 2  # features (with the ones column) and the label
    # float32 data, plus the generator's intermediates (pow, the cat with the ones column): ~3 copies at peak
    needed = 3 * 4 * d.num_examples * n_cols
    available = psutil.virtual_memory().available
    if needed > available:
        raise ConfigError(
            "data.num_examples",
            d.num_examples,
            f"needs about {needed / 2**30:.1f} GiB for the data, only {available / 2**30:.1f} GiB available",
        )


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError on the first bad value; cheap, and runs before any data is made."""
    seed = cfg.get("seed")
    if not _is_int(seed) or seed < 0:
        raise ConfigError("seed", seed, "must be an integer >= 0")
    if not isinstance(cfg.get("resume"), bool):
        raise ConfigError("resume", cfg.get("resume"), "must be true or false")
    _check_data(cfg)
    _check_model(cfg)
    _check_trainer(cfg)
    _check_logger(cfg)
    _check_memory(cfg)
