"""Evaluate a trained checkpoint: its MSE on fresh data from the run's generator and on its training data.

`python -m linreg.evaluate ckpt_path=<run dir>/checkpoints/last.ckpt` (or `linreg-evaluate ...`) writes
`eval.json` in its own run dir (`outputs/eval/<time>/`). Bad input is refused by `CheckInputs` before
Hydra makes that dir, so a refused command leaves nothing behind.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from linreg.config import ConfigError, first_line, is_int, note_if_new, refuse, remove_if_created, target_class
from linreg.record import finite_or_none, model_name, write_json_atomic
from linreg.train import CONFIG_DIR, NOISE, output_dir

if TYPE_CHECKING:
    from linreg.data import RegressionDataModule
    from linreg.models import RegressionModule

DATA_KEYS = ("num_examples", "w", "bias", "delta", "deg", "batch_size")  # what checkpoint_config saves of `data`


@dataclass
class Inputs:
    """A checked command line: the checkpoint, its run's config and the held-out set's seed and size."""

    ckpt: Path
    run_cfg: dict[str, Any]
    data_seed: int
    num_examples: int


def short_error(err: BaseException) -> str:
    """An error as one short line, its type first (torch's errors run to many lines, some with terminal colours)."""
    text = f"{type(err).__name__}: {first_line(err)}".rstrip(": ")
    return text if len(text) <= 120 else text[:117] + "..."


def checkpoint_path(value: Any) -> Path:
    """`ckpt_path` as an existing file, absolute (a relative path is taken from the directory the command ran in)."""
    if value is None or str(value) == "":
        raise ConfigError("ckpt_path", value, "required: ckpt_path=<run dir>/checkpoints/last.ckpt")
    path = Path(str(value)).expanduser()
    if path.is_dir():
        hint = path / "checkpoints" / "last.ckpt"
        example = f", e.g. ckpt_path={hint}" if hint.is_file() else " (a run's checkpoints/last.ckpt)"
        raise ConfigError("ckpt_path", value, f"is a directory; give the checkpoint file{example}")
    if not path.is_file():
        raise ConfigError("ckpt_path", value, "no such file")
    return path.resolve()


def run_config(ckpt: Path) -> dict[str, Any]:
    """The training run's config saved beside the checkpoint (`config.json`), checked for what is read here."""
    path = ckpt.parent / "config.json"
    try:
        saved = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError("ckpt_path", str(ckpt), "no config.json beside it (linreg.train writes one)") from None
    except (OSError, ValueError) as err:
        raise ConfigError("ckpt_path", str(ckpt), f"config.json beside it is unreadable ({short_error(err)})") from None
    problem = config_problem(saved)
    if problem:
        raise ConfigError("ckpt_path", str(ckpt), f"config.json beside it is not a run's config: {problem}")
    return saved


def config_problem(saved: Any) -> str | None:
    """What is missing or wrong in a saved run config, or None."""
    if not isinstance(saved, dict):
        return "not a JSON object"
    if not is_int(saved.get("seed")) or saved["seed"] < 0:
        return f"seed={saved.get('seed')!r}"
    data = saved.get("data")
    missing = [k for k in DATA_KEYS if k not in data] if isinstance(data, dict) else list(DATA_KEYS)
    if missing:
        return f"no data.{missing[0]}"
    model = saved.get("model")
    if isinstance(model, dict) and "name" in model and "_target_" not in model:
        return "written by an earlier linreg (model.name, not model._target_): train the run again"
    target = model.get("_target_") if isinstance(model, dict) else None
    if not isinstance(target, str) or "." not in target:
        return f"model._target_={target!r}, not a model class"
    try:
        target_class("model", target)
    except ConfigError as err:
        return str(err)
    return None


def held_out_seed(value: Any, train_seed: int) -> int:
    """`data_seed`, or the training seed + 1 when null; never the training seed (that set is not held out)."""
    if value is None:
        return train_seed + 1
    if not is_int(value) or value < 0:
        raise ConfigError("data_seed", value, "must be an integer >= 0, or null (the training seed + 1)")
    if value == train_seed:
        raise ConfigError("data_seed", value, "is the training seed: that data is not held out (train_mse is on it)")
    return value


def held_out_size(value: Any, train_size: int) -> int:
    """`num_examples`, or the training set's size when null."""
    if value is None:
        return train_size
    if not is_int(value) or value <= 0:
        raise ConfigError("num_examples", value, "must be a positive integer, or null (as in training)")
    return value


def check_inputs(cfg: DictConfig) -> Inputs:
    """Check the command line and the files it names (not yet the checkpoint's tensors); raise ConfigError if bad."""
    ckpt = checkpoint_path(cfg.get("ckpt_path"))
    run_cfg = run_config(ckpt)
    return Inputs(
        ckpt=ckpt,
        run_cfg=run_cfg,
        data_seed=held_out_seed(cfg.get("data_seed"), run_cfg["seed"]),
        num_examples=held_out_size(cfg.get("num_examples"), run_cfg["data"]["num_examples"]),
    )


def load_model(inputs: Inputs) -> RegressionModule:
    """The trained module, loaded tensors-only (`weights_only=True`) onto the CPU, with as many inputs as its data."""
    target = inputs.run_cfg["model"]["_target_"]
    name = model_name(target)
    try:
        model = target_class("model", target).load_from_checkpoint(inputs.ckpt, map_location="cpu", weights_only=True)
    except Exception as err:  # torch and Lightning raise many types for a bad file (EOF, zip, unpickling, keys)
        raise ConfigError("ckpt_path", str(inputs.ckpt), load_error(err, name)) from None
    features = datamodule(inputs, inputs.data_seed, inputs.num_examples).in_features
    if model.hparams.in_features != features:
        reason = f"has {model.hparams.in_features} inputs, config.json's data gives {features}"
        raise ConfigError("ckpt_path", str(inputs.ckpt), reason)
    return model.eval()


def load_error(err: Exception, name: str) -> str:
    """Why a checkpoint did not load, in one line (torch's weights-only messages run to a paragraph)."""
    text = str(err)
    if found := re.search(r"Unsupported global: GLOBAL (\S+)", text):
        return f"holds a {found[1]} object, not only tensors and plain values: refused (loaded with weights_only=True)"
    detail = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    return f"not a loadable checkpoint of a {name} model ({detail[1].strip() if detail else short_error(err)})"


def datamodule(inputs: Inputs, seed: int, num_examples: int) -> RegressionDataModule:
    """The run's data generator with another seed and size (not yet set up)."""
    from linreg.data import RegressionDataModule

    data = {k: inputs.run_cfg["data"][k] for k in DATA_KEYS if k != "num_examples"}
    ones = target_class("model", inputs.run_cfg["model"]["_target_"]).uses_ones_column
    return RegressionDataModule(**data, num_examples=num_examples, seed=seed, ones_column=ones)


def measure_mse(model: RegressionModule, dm: RegressionDataModule, out: Path) -> float:
    """The tutorial's squared_loss over the whole of `dm`'s data, by `Trainer.test`."""
    import lightning as L

    with warnings.catch_warnings():
        for message in NOISE:  # the third-party warnings a training run hides too
            warnings.filterwarnings("ignore", message=message)
        trainer = L.Trainer(
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=str(out),
        )
        # No ckpt_path: the model holds the checkpoint's weights already, and with a path Lightning asks for the
        # training run's callbacks.
        results = trainer.test(model, datamodule=dm, verbose=False)
    return results[0]["test/mse"]


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Check the inputs, measure the checkpoint's held-out and training MSE; write and return eval.json."""
    inputs = check_inputs(cfg)
    model = load_model(inputs)
    out = output_dir()
    run_cfg = inputs.run_cfg
    heldout = datamodule(inputs, inputs.data_seed, inputs.num_examples)
    train = datamodule(inputs, run_cfg["seed"], run_cfg["data"]["num_examples"])
    result = {
        "ckpt_path": str(inputs.ckpt),
        "model": model_name(run_cfg["model"]["_target_"]),
        "seed": run_cfg["seed"],
        "data_seed": inputs.data_seed,
        "num_examples": inputs.num_examples,
        "train_num_examples": run_cfg["data"]["num_examples"],
        "heldout_mse": finite_or_none(measure_mse(model, heldout, out)),
        "train_mse": finite_or_none(measure_mse(model, train, out)),
        "heldout_ols_mse": heldout.ols_mse(),
        "train_ols_mse": train.ols_mse(),
        "weights": finite_or_none(model.weights()),
        "true_weights": run_cfg["data"]["w"],
        "data": run_cfg["data"],
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "eval.json", result)
    return result


class CheckInputs(Callback):
    """Refuses a bad command line, the checkpoint's tensors included, in `on_run_start`: before Hydra makes the dir.

    The run checks again (a sweep has no `on_run_start`) and removes a dir only if it was noted here as new.
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            load_model(check_inputs(config))
        except ConfigError as err:
            # SystemExit, not an Exception: Hydra turns an Exception from a callback into a warning and goes on.
            refuse(err)
        note_if_new(Path(str(config.hydra.run.dir)))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        note_if_new(Path(str(config.hydra.sweep.dir)))


def fmt(value: float | None) -> str:
    """An MSE for the console line: 6 significant digits, or null for a non-finite one."""
    return "null" if value is None or not math.isfinite(value) else f"{value:.6g}"


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="evaluate")
def main(cfg: DictConfig) -> float:
    """Hydra entry: `python -m linreg.evaluate ckpt_path=PATH [overrides]` or `linreg-evaluate ...`."""
    try:
        result = evaluate(cfg)
    except ConfigError as err:
        # Bad input in a sweep (no on_run_start there), or a file changed since the check: leave no dir it made.
        remove_if_created(Path(HydraConfig.get().runtime.output_dir))
        refuse(err)
    out = output_dir()
    print(
        f"eval: {result['model']} heldout_mse={fmt(result['heldout_mse'])} train_mse={fmt(result['train_mse'])}"
        f" (ckpt {result['ckpt_path']}; {out / 'eval.json'})"
    )
    return math.inf if result["heldout_mse"] is None else result["heldout_mse"]


def cli() -> None:
    """`python -m linreg.evaluate` and `linreg-evaluate`: the command line checked (linreg.cli), then Hydra's main."""
    from linreg.cli import entry

    entry(main, CONFIG_DIR, "evaluate")


if __name__ == "__main__":
    cli()
