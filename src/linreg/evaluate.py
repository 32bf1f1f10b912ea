"""`python -m linreg.evaluate ckpt_path=<run dir>/checkpoints/last.ckpt`: its MSE on held-out and training data."""

import contextlib
import json
import math
import os
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, NamedTuple

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf

from linreg import fastpath
from linreg.checks import makeable, own_dir, separate_job_dirs
from linreg.config import CONFIG_DIR, MODELS, ConfigError, EvaluateConfig, check, naming_key, plain, refuse, refusing
from linreg.record import finite_or_none, model_name, read_or_none, write_job_files, write_json

SWEEP: dict[str, Any] = {}  # the sweep's process (pid) and its jobs that failed there (the basic launcher's)


class Inputs(NamedTuple):
    """A checked command line: the checkpoint, its run's config, the held-out set's seed and size."""

    ckpt: Path
    run_cfg: DictConfig
    data_seed: int
    num_examples: int


def run_config(ckpt: Path) -> DictConfig:
    """The training run's config, saved inside the checkpoint; ConfigError when it is not a linreg checkpoint."""
    import torch

    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, empty, random bytes, pickled code
        raise ConfigError("ckpt_path", str(ckpt), f"not a loadable checkpoint ({type(err).__name__})") from None
    saved = state.get("linreg_config") if isinstance(state, dict) else None
    if not isinstance(saved, dict):
        raise ConfigError("ckpt_path", str(ckpt), "holds no linreg run config: not a checkpoint of linreg.train")
    try:
        text = json.dumps(saved)  # plain data as linreg.train saves it: no interpolation, no deep nesting
    except (TypeError, ValueError, RecursionError):
        text = "${"
    if "${" in text:
        raise ConfigError("ckpt_path", str(ckpt), "its saved config is not plain data as linreg.train writes it")
    data = saved.get("data") if isinstance(saved.get("data"), dict) else {}
    trained = state.get("datamodule_hyper_parameters")  # what Lightning saved of the DataModule it trained on
    trained = {k: v for k, v in trained.items() if k in {*data, "seed"}} if isinstance(trained, dict) else {}
    if {**data, "seed": saved.get("seed")} != trained:
        raise ConfigError("ckpt_path", str(ckpt), "its saved config disagrees with the data it was trained on")
    target = saved["model"].get("_target_") if isinstance(saved.get("model"), dict) else None
    if target not in {*MODELS, *(ep.value.replace(":", ".") for ep in entry_points(group="linreg.models"))}:
        why = "names a model class that is neither linreg's nor registered (entry points `linreg.models`)"
        raise ConfigError("ckpt_path", str(ckpt), f"{why}: {target!r}")
    trainer = saved.get("trainer") if isinstance(saved.get("trainer"), dict) else {}
    trainer = {**trainer, "accelerator": "cpu", "devices": 1, "max_epochs": 1}  # evaluated on the CPU
    try:
        cfg = OmegaConf.create({**saved, "trainer": trainer, "resume": False})
        check(cfg)
    except (ConfigError, RecursionError) as err:  # RecursionError: nested past any config's depth
        why = err if isinstance(err, ConfigError) else "nested too deep"
        raise ConfigError("ckpt_path", str(ckpt), f"its saved config is not a run's: {why}") from None
    return cfg


def check_inputs(cfg: DictConfig) -> Inputs:
    """The command line and the checkpoint it names, checked; ConfigError naming the key otherwise."""
    value = cfg.get("ckpt_path")
    if not value:
        raise ConfigError("ckpt_path", value, "required: ckpt_path=<run dir>/checkpoints/last.ckpt")
    ckpt = Path(to_absolute_path(os.path.expanduser(str(value))))  # the launching dir's, with hydra.job.chdir too
    if not ckpt.is_file():
        why = "is a directory; give the checkpoint file (checkpoints/last.ckpt)" if ckpt.is_dir() else "no such file"
        raise ConfigError("ckpt_path", value, why)
    run_cfg = run_config(ckpt.resolve())
    seed = (run_cfg.seed + 1) % 2**32 if cfg.get("data_seed") is None else cfg.data_seed  # within numpy's range
    if seed == run_cfg.seed:
        raise ConfigError("data_seed", seed, "is the training seed: that data is not held out")
    n = run_cfg.data.num_examples if cfg.get("num_examples") is None else cfg.num_examples
    try:
        check(OmegaConf.merge(run_cfg, {"seed": seed, "data": {"num_examples": n}}))  # ranges and memory, as train
    except ConfigError as err:  # named as this command line names it
        key = {"seed": "data_seed", "data.num_examples": "num_examples"}.get(err.key, err.key)
        raise ConfigError(key, err.value, str(err).partition(": ")[2]) from None
    return Inputs(ckpt.resolve(), run_cfg, seed, n)


def evaluate(inputs: Inputs, out: Path) -> dict[str, Any]:
    """The checkpoint's MSE on held-out and on training data by `Trainer.test`; eval.json's content."""
    from linreg.run import build_datamodule, build_trainer, model_class, torch_threads

    cfg = inputs.run_cfg
    with torch_threads(cfg.threads):
        cls = model_class(cfg.model._target_)
        try:
            model = cls.load_from_checkpoint(inputs.ckpt, map_location="cpu", weights_only=True).eval()
        except Exception as err:  # Lightning raises many types for a checkpoint that does not fit the class
            raise ConfigError("ckpt_path", str(inputs.ckpt), f"does not load as {cls.__name__}: {err}") from None
        heldout = build_datamodule(cfg, seed=inputs.data_seed, num_examples=inputs.num_examples)
        train = build_datamodule(cfg)
        if model.hparams.in_features != train.in_features:
            raise ConfigError("ckpt_path", str(inputs.ckpt), "its weights do not fit its saved data config")
        test = build_trainer(cfg, None, [], [], bar=False).test
        heldout_mse, train_mse = (test(model, datamodule=dm, verbose=False)[0]["test/mse"] for dm in (heldout, train))
        result = {
            "ckpt_path": str(inputs.ckpt),
            "model": model_name(cfg.model._target_),
            "seed": cfg.seed,
            "data_seed": inputs.data_seed,
            "num_examples": inputs.num_examples,
            "train_num_examples": cfg.data.num_examples,
            "heldout_mse": finite_or_none(heldout_mse),
            "train_mse": finite_or_none(train_mse),
            "heldout_ols_mse": heldout.ols_mse(),
            "train_ols_mse": train.ols_mse(),
            "weights": finite_or_none(model.weights()),
            "true_weights": list(cfg.data.w),
            "data": OmegaConf.to_container(cfg.data),
        }
    write_json(out / "eval.json", result)
    return result


class CheckInputs(Callback):
    """Refuses bad input before Hydra makes the run dir, or a sweep's: a refused command leaves nothing."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        with refusing(callback=True), naming_key():
            OmegaConf.merge(OmegaConf.structured(EvaluateConfig), plain(config))  # `+key=...` too
            check_inputs(config)
            makeable(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        with refusing(callback=True):  # before Hydra's sweeper writes multirun.yaml there
            separate_job_dirs(config)
            own_eval_dir(makeable(config, "hydra.sweep.dir"), "hydra.sweep.dir", sweep=True)
        SWEEP.update(pid=os.getpid(), failed=[])

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if failed := SWEEP.get("failed"):  # each said why in its own line
            jobs = f"#{failed[0]}" if len(failed) == 1 else "jobs " + ", ".join(map(str, failed))
            raise SystemExit(f"error: evaluation sweep {config.hydra.sweep.dir}: {jobs} failed (see above)")


def own_eval_dir(out: Path, key: str, sweep: bool = False) -> None:
    """An evaluation's (or its sweep's) dir: new, empty or its own kind's; never a run's or sweep's, nor inside."""
    saved = read_or_none(out / ".hydra" / "config.yaml")  # an earlier evaluate's (a ckpt_path) may be rewritten
    run = os.path.lexists(out / ".hydra") and not (isinstance(saved, dict) and "ckpt_path" in saved)
    theirs = ("metrics.json", "checkpoints", ".sweep.json") + ((".hydra", "eval.json") if sweep else ())
    if run or any(os.path.lexists(out / n) for n in theirs):
        raise ConfigError(key, str(out), "holds a training run or a sweep; give the evaluation its own dir")
    own_dir(out, key, ("multirun.yaml",) if sweep else (".hydra", "eval.json"), ())


def failed_job(num: int, out: Path, why: str) -> float:
    """A sweep's job that cannot evaluate: its error line; the other jobs run, and the sweep exits 1 at its end."""
    with contextlib.suppress(OSError):
        out.rmdir()  # the empty dir Hydra made for it
    if SWEEP.get("pid") != os.getpid():  # another process's job (joblib, submitit): Hydra's failed job, exit 1
        raise CompactHydraException(f"error: job {num}: {why}")  # Hydra prints it, once
    print(f"error: job {num}: {why}", file=sys.stderr)
    SWEEP["failed"].append(num)
    return math.inf


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="evaluate")
def main(cfg: DictConfig) -> float:
    """Hydra entry: `python -m linreg.evaluate ckpt_path=PATH [data_seed=N] [num_examples=N]`."""
    with fastpath.importing():  # the command's process only: evaluate() may run in a user's
        import linreg.run  # noqa: F401  # what evaluate() imports: Lightning's seconds
    hc = HydraConfig.get()
    out = Path(hc.runtime.output_dir)
    sweep = hc.mode == RunMode.MULTIRUN
    try:
        inputs = check_inputs(cfg)
        # Each job's dir, a sweep's too: Hydra writes nothing there first (hydra.output_subdir: null).
        own_eval_dir(out, "hydra.sweep.subdir" if sweep else "hydra.run.dir")
        (out / "eval.json").unlink(missing_ok=True)  # an earlier evaluation's: never beside this one's files
        write_job_files(out, cfg)
        result = evaluate(inputs, out)
    except (ConfigError, OSError) as err:  # a sweep's job (no on_run_start there), a full disk, a file changed since
        why = str(err) if isinstance(err, ConfigError) else f"cannot write {err.filename or out}: {err.strerror or err}"
        if sweep:  # linreg.evaluate's, whose SWEEP its callback holds (under `python -m` this module is __main__)
            from linreg.evaluate import failed_job

            return failed_job(hc.job.num, out, why)
        if isinstance(err, ConfigError):
            refuse(err)
        print(f"error: {why}", file=sys.stderr)
        sys.exit(1)
    shown = " ".join(f"{k}={'null' if result[k] is None else f'{result[k]:.6g}'}" for k in ("heldout_mse", "train_mse"))
    print(f"eval: {result['model']} {shown} -> {out / 'eval.json'}")
    return math.inf if result["heldout_mse"] is None else result["heldout_mse"]


if __name__ == "__main__":
    main()
