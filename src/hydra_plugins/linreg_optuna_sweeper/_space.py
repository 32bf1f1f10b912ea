"""hydra-optuna-sweeper's search-space grammar as Optuna distributions, and trial params as overrides."""

import re
from collections.abc import Callable, Sequence
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep, Transformer
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.samplers import BaseSampler

from linreg.config import ConfigError

PLAIN = re.compile(r"[A-Za-z_][\w.\-/]*")  # a string Hydra reads back as that same string, unquoted
KEYWORDS = {"true", "false", "null", "nan", "inf"}  # unquoted, Hydra reads these as bool, null or float


def choices(override: Override) -> list[Any]:
    """The values of a choice (or shuffled range) sweep, as hydra-optuna-sweeper passes them to Optuna."""
    values = list(override.sweep_iterator(transformer=Transformer.encode))
    for v in values:
        if not isinstance(v, (str, int, float, bool, type(None))):
            raise ConfigError(override.get_key_element(), v, "a choice takes numbers, strings, booleans or null")
    return values


def distribution(override: Override) -> BaseDistribution:
    """The Optuna distribution of a sweep override: choice, range (its stop included, as Optuna's high), interval."""
    value = override.value()
    if isinstance(value, ChoiceSweep):
        return CategoricalDistribution(choices(override))
    if isinstance(value, RangeSweep) and value.shuffle:
        # In order: a study refuses a param whose choices come in another order than in its earlier trials.
        return CategoricalDistribution(sorted(choices(override)))
    if isinstance(value, RangeSweep):
        if any(isinstance(v, float) for v in (value.start, value.stop, value.step)):
            return FloatDistribution(value.start, value.stop, step=value.step)
        return IntDistribution(int(value.start), int(value.stop), step=int(value.step))
    if isinstance(value, IntervalSweep):
        log = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return IntDistribution(value.start, value.end, log=log)
        return FloatDistribution(value.start, value.end, log=log)
    raise ConfigError(override.get_key_element(), override.input_line, "a sweep must be choice, range or interval")


def parse(line: str, key: str = "", value: str = "") -> Override:
    """One override parsed by Hydra's parser; a syntax error names the key and value given."""
    try:
        return OverridesParser.create().parse_overrides([line])[0]
    except Exception as err:  # Hydra's OverrideParseException, or an error building the sweep
        raise ConfigError(key or line, value or line, f"not a Hydra override: {' '.join(str(err).split())}") from None


def search_space(params: dict[str, str], arguments: Sequence[str]) -> tuple[dict[str, BaseDistribution], list[str]]:
    """Distributions of the sweep overrides, and the fixed overrides; the command line wins over `params`."""
    parsed = [parse(f"{k}={v}", f"hydra.sweeper.params.{k}", v) for k, v in params.items()]
    parsed += [parse(line) for line in arguments]  # Hydra itself has parsed these already
    space: dict[str, BaseDistribution] = {}
    fixed: dict[str, str] = {}
    for override in parsed:
        key = override.get_key_element()
        space.pop(key, None)
        fixed.pop(key, None)
        if override.is_sweep_override():
            try:
                space[key] = distribution(override)
            except ValueError as err:  # Optuna refuses a bound (low > high, log of 0) or a step
                if isinstance(err, ConfigError):
                    raise
                raise ConfigError(key, str(override.input_line).partition("=")[2], str(err)) from None
        else:
            fixed[key] = str(override.input_line)
    return space, list(fixed.values())


def as_override_value(value: Any) -> str:
    """A sampled value written so that Hydra's parser reads back the same value and type."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str) and not (PLAIN.fullmatch(value) and value.lower() not in KEYWORDS):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return str(value)


def trial_overrides(params: dict[str, Any], fixed: Sequence[str]) -> list[str]:
    """A trial's job overrides: its sampled params, then the fixed overrides of the command line."""
    return [f"{key}={as_override_value(value)}" for key, value in params.items()] + list(fixed)


class SeedPerTrial(BaseSampler):
    """The configured sampler made anew for every trial, seeded with `seed + trial number`.

    A sampler's random state lives in its process: a resumed sweep, or a second sweep on a shared study, would
    start the seeded stream again and repeat the first trials' points. Seeded by trial number, every trial draws
    differently and the same study still draws the same points.
    """

    def __init__(self, make: Callable[[int], BaseSampler], seed: int) -> None:
        self.make, self.seed = make, seed
        self.sampler = make(seed)

    def before_trial(self, study: Any, trial: Any) -> None:
        self.sampler = self.make(self.seed + trial.number)
        self.sampler.before_trial(study, trial)

    def infer_relative_search_space(self, study: Any, trial: Any) -> dict[str, BaseDistribution]:
        return self.sampler.infer_relative_search_space(study, trial)

    def sample_relative(self, study: Any, trial: Any, search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        return self.sampler.sample_relative(study, trial, search_space)

    def sample_independent(self, study: Any, trial: Any, param_name: str, param_distribution: BaseDistribution) -> Any:
        return self.sampler.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study: Any, trial: Any, state: Any, values: Sequence[float] | None) -> None:
        self.sampler.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.sampler.reseed_rng()
