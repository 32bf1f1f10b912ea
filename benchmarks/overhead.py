"""`make bench` / `python -m benchmarks.overhead`: what the project costs next to the tutorial's plain loops.

Three parts (`--only ratios|grid|scaling`, default all; `--quick` for a smaller run):
- ratios: `linreg.run.run(cfg)` vs the tutorial's loop on workload W (30,000 samples, 3 epochs, batch 10,
  lr 0.03: 9,000 SGD steps), default config (TensorBoard on) and the fast setting; alternated in one
  process, so load from other work hits both sides alike; the median of the per-round ratios.
- grid: the 48-job tutorial sweep (`-m sweep=tutorial`) as one process vs its 48 plain loops as one process.
- scaling: num_examples 1e4..1e7 at batch 1000, each size in a fresh process (a clean peak RSS).
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
W = {"num_examples": 30_000, "epochs": 3, "batch_size": 10, "lr": 0.03}
FAST = ["data.batches_per_call=100", "logger.tensorboard.fit_figure=false"]  # the documented fast setting
# Rows of the ratio table: the defaults, one Lightning call per SGD step (for comparison), the fast setting.
SETTINGS = {
    "default": [],
    "one call a step: data.batches_per_call=1": ["data.batches_per_call=1"],
    "fast: " + " ".join(FAST): FAST,
}
GRID = ["sweep=tutorial"]  # model x deg x delta x lr x batch: 48 jobs, 1000 samples, 3 epochs
GRID_POINTS = [
    (model, deg, delta, lr, batch)
    for model in ("manual", "linear")
    for deg in (1, 2)
    for delta in (0.01, 2.0)
    for lr in (0.003, 0.03, 0.1)
    for batch in (10, 100)
]
SCALING = [10_000, 100_000, 1_000_000, 10_000_000]
SCALING_BATCH, SCALING_EPOCHS = 1000, 2


def quiet() -> None:
    """Silence Lightning's info lines and warnings: the table is the output."""
    import logging
    import warnings

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def project_cfg(model: str, overrides: list[str], out: Path) -> Any:
    """Compose `train.yaml` as the CLI does (and make it the current Hydra config): what `run` is given."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    from linreg.train import CONFIG_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        overrides = [f"hydra.run.dir={out}", f"model={model}", *overrides]
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return cfg


def project_run(model: str, overrides: list[str], out: Path) -> dict[str, Any]:
    """`run(cfg)` on the composed config; returns its metrics."""
    from linreg.run import run

    return run(project_cfg(model, overrides, out)).as_json()


def w_overrides(num_examples: int, epochs: int, batch_size: int, lr: float) -> list[str]:
    """Workload W as config overrides."""
    n, e, b = num_examples, epochs, batch_size
    return [f"data.num_examples={n}", f"trainer.max_epochs={e}", f"data.batch_size={b}", f"model.lr={lr}"]


def config_threads() -> int:
    """The intra-op thread count every project run sets for itself (`threads` in conf/train.yaml)."""
    from omegaconf import OmegaConf

    return int(OmegaConf.load(REPO / "conf" / "train.yaml").threads)


def torch_defaults() -> None:
    """Torch's global flags as the tutorial runs with them, at the project's thread count."""
    import torch

    # A Trainer leaves deterministic mode on process-wide: the baseline is the tutorial's loop as it runs alone.
    torch.use_deterministic_algorithms(False)
    torch.utils.deterministic.fill_uninitialized_memory = True
    # The same intra-op threads as the project's runs (`threads: 1`), so the ratio compares the code, not cores.
    torch.set_num_threads(config_threads())


def timed(fn: Callable[[], Any]) -> float:
    """Wall seconds of one call."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def ratios(rounds: int, workload: dict[str, Any], tmp: Path) -> list[dict[str, Any]]:
    """Project vs plain loop per module and setting, alternated round by round."""
    from benchmarks.tutorial_loops import train
    from linreg.run import run

    base = w_overrides(**workload)
    plain_args = {k: workload[k] for k in ("num_examples", "batch_size", "lr", "epochs")}
    times: dict[tuple[str, ...], list[float]] = {}
    counter = iter(range(10**6))

    def project(model: str, setting: str) -> float:
        # The measure is `run(cfg)`: composing cfg with Hydra is the command line's work, not timed here.
        cfg = project_cfg(model, base + SETTINGS[setting], tmp / f"ratio-{next(counter)}")
        return timed(lambda: run(cfg))

    # Warm-up (not counted): first-call imports (matplotlib for the fit figure, TensorBoard) and caches.
    for model in ("manual", "linear"):
        train(model, 1000, 10, 0.03, 1)
        project_run(model, ["data.num_examples=1000", "trainer.max_epochs=1"], tmp / f"warm-{model}")
    for r in range(rounds):
        for model in ("manual", "linear"):
            for setting in SETTINGS:
                # Each project run right after a plain run of its own: this VM's speed drifts within seconds,
                # so a ratio is only taken between neighbours.
                torch_defaults()
                times.setdefault((model, "plain", setting), []).append(timed(lambda m=model: train(m, **plain_args)))
                times.setdefault((model, setting), []).append(project(model, setting))
        print(f"  round {r + 1}/{rounds} done (load {os.getloadavg()[0]:.2f})", file=sys.stderr, flush=True)
    rows = []
    for model in ("manual", "linear"):
        for setting in SETTINGS:
            plain, proj = times[(model, "plain", setting)], times[(model, setting)]
            per_round = [p / q for p, q in zip(proj, plain)]
            rows.append(
                {
                    "module": model,
                    "setting": setting,
                    "plain_s": statistics.median(plain),
                    "project_s": statistics.median(proj),
                    "ratio": statistics.median(per_round),
                    "ratios": per_round,
                }
            )
    return rows


def plain_grid() -> None:
    """The 48 grid points as the tutorial's loops, in this one process (`--plain-grid`)."""
    from benchmarks.tutorial_loops import train

    torch_defaults()
    for model, deg, delta, lr, batch in GRID_POINTS:
        train(model, 1000, batch, lr, 3, deg=deg, delta=delta)


def run_process(args: list[str]) -> float:
    """Wall seconds of a whole Python process (interpreter start and imports included)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "HYDRA_FULL_ERROR": "1"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    return seconds


def grid(rounds: int, tmp: Path) -> list[dict[str, Any]]:
    """The 48-job sweep as one multirun process (basic and joblib launchers) vs 48 plain loops in one process."""
    launchers = {
        "basic": [],
        "joblib": ["hydra/launcher=joblib"],
        # The per-job fit image (matplotlib) is most of a small job's cost: the grid without it.
        "basic, no fit image": ["logger.tensorboard.fit_figure=false"],
    }
    times: dict[str, list[float]] = {}
    for r in range(rounds):
        times.setdefault("plain", []).append(run_process(["-m", "benchmarks.overhead", "--plain-grid"]))
        for name, extra in launchers.items():
            slug = "".join(c if c.isalnum() else "-" for c in name)  # a comma would read as a sweep list
            sweep = [f"hydra.sweep.dir={tmp / f'grid-{slug}-{r}'}", *extra]
            times.setdefault(name, []).append(run_process(["-m", "linreg.train", "-m", *GRID, *sweep]))
    plain = times["plain"]
    return [
        {
            "launcher": name,
            "jobs": len(GRID_POINTS),
            "plain_s": statistics.median(plain),
            "project_s": statistics.median(times[name]),
            "ratio": statistics.median([p / q for p, q in zip(times[name], plain)]),
        }
        for name in launchers
    ]


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (since its exec: not its parent's)."""
    # ru_maxrss also counts the parent's RSS at the fork (Linux folds the old memory's peak in at exec):
    # a child of a big benchmark process would start its "peak" at the parent's size. VmHWM does not.
    try:
        status = Path("/proc/self/status").read_text()
        return int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("VmHWM:"))) * 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def scaling_child(num_examples: int, accelerator: str) -> None:
    """One scaling point in this fresh process; prints one JSON line (`--scaling-child`)."""
    quiet()
    import lightning as L
    import torch  # noqa: F401 (imported before the baseline, as every run has it)

    import linreg.run

    epochs: list[float] = []

    class EpochTimer(L.Callback):
        """Seconds of each training epoch (its steps and its full-data evaluation)."""

        def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            self.start = time.perf_counter()

        def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            epochs.append(time.perf_counter() - self.start)

    run_callbacks = linreg.run.run_callbacks
    linreg.run.run_callbacks = lambda *args: [*run_callbacks(*args), EpochTimer()]
    base_rss = peak_rss_bytes()
    overrides = [
        f"data.num_examples={num_examples}",
        f"data.batch_size={SCALING_BATCH}",
        f"trainer.max_epochs={SCALING_EPOCHS}",
        f"trainer={accelerator}",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        m = project_run("manual", overrides, Path(tmp) / "run")
    data_bytes = num_examples * (len(m["weights"]) + 1) * 4  # float32 features (with the ones column) + labels
    print(
        json.dumps(
            {
                "num_examples": num_examples,
                "accelerator": accelerator,
                "epoch_s": epochs[-1],  # the last epoch: no first-call costs
                "steps_per_s": m["steps"] / m["epochs"] / epochs[-1],
                "fit_s": m["fit_seconds"],
                "base_rss": base_rss,
                "peak_rss": peak_rss_bytes(),
                "data_bytes": data_bytes,
                "status": m["status"],
            }
        )
    )


def scaling(sizes: list[int]) -> list[dict[str, Any]]:
    """Each size in a fresh process, on CPU and (when there is one) on the GPU."""
    import torch

    accelerators = ["cpu", *(["gpu"] if torch.cuda.is_available() else [])]
    rows = []
    for n in sizes:
        for acc in accelerators:
            env = {**os.environ, "PYTHONWARNINGS": "ignore"}
            cmd = [sys.executable, "-m", "benchmarks.overhead", "--scaling-child", str(n), "--accelerator", acc]
            proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"scaling n={n} {acc} exited {proc.returncode}:\n{proc.stderr[-2000:]}")
            rows.append(json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("{"))))
        rows[-1 - (len(accelerators) - 1)]["plain_epoch_s"] = plain_epoch_seconds(n)
    return rows


def plain_epoch_seconds(num_examples: int) -> float:
    """One epoch of the tutorial's manual loop at the scaling batch size: the hardware's own scaling."""
    from benchmarks.tutorial_loops import make_data, manual_loop

    torch_defaults()
    features, labels = make_data(num_examples)
    return timed(lambda: manual_loop(features, labels, SCALING_BATCH, 0.03, 1))


def machine() -> str:
    """CPU model, cores, GPU and load: the context every figure needs."""
    import torch

    model = platform.processor() or "?"
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
        model = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    return f"{model}, {os.cpu_count()} cores, {gpu}; torch {torch.__version__}; load average {load}"


def print_ratios(rows: list[dict[str, Any]], workload: dict[str, Any]) -> None:
    """The ratio table."""
    steps = workload["num_examples"] // workload["batch_size"] * workload["epochs"]
    print(f"\nWorkload: {workload} = {steps} SGD steps; project = run(cfg) with the default config (TensorBoard on)")
    width = max(len(r["setting"]) for r in rows)
    print(f"{'module':<8} {'setting':<{width}} {'plain s':>8} {'project s':>10} {'ratio':>6}  per round")
    for r in rows:
        setting = r["setting"]
        rounds = " ".join(f"{v:.2f}" for v in r["ratios"])
        figures = f"{r['plain_s']:>8.2f} {r['project_s']:>10.2f} {r['ratio']:>6.2f}"
        print(f"{r['module']:<8} {setting:<{width}} {figures}  {rounds}")


def print_grid(rows: list[dict[str, Any]]) -> None:
    """The grid table."""
    print(f"\nGrid: python -m linreg.train -m {' '.join(GRID)} (whole process) vs 48 plain loops (whole process)")
    print(f"{'launcher':<20} {'jobs':>4} {'plain s':>8} {'project s':>10} {'ratio':>6}")
    for r in rows:
        print(f"{r['launcher']:<20} {r['jobs']:>4} {r['plain_s']:>8.2f} {r['project_s']:>10.2f} {r['ratio']:>6.2f}")


def print_scaling(rows: list[dict[str, Any]]) -> None:
    """The scaling table; with a GPU, whether it beats the CPU at each size."""
    mib = 2**20
    setup = f"model=manual, batch {SCALING_BATCH}, {SCALING_EPOCHS} epochs, default config"
    print(f"\nScaling: {setup}, each size in a fresh process")
    print(
        f"{'n':>10} {'device':<6} {'s/epoch':>8} {'plain s':>8} {'steps/s':>8} {'data MiB':>9} {'peak MiB':>9} "
        f"{'base MiB':>9} {'(peak-base)/data':>17}"
    )
    cpu = {r["num_examples"]: r["epoch_s"] for r in rows if r["accelerator"] == "cpu"}
    for r in rows:
        extra = (r["peak_rss"] - r["base_rss"]) / r["data_bytes"]
        line = (
            f"{r['num_examples']:>10} {r['accelerator']:<6} {r['epoch_s']:>8.3f} {r.get('plain_epoch_s', 0):>8.3f} "
            f"{r['steps_per_s']:>8.0f} "
            f"{r['data_bytes'] / mib:>9.1f} {r['peak_rss'] / mib:>9.1f} {r['base_rss'] / mib:>9.1f} {extra:>17.2f}"
        )
        if r["accelerator"] != "cpu":
            line += "  GPU beats CPU" if r["epoch_s"] < cpu[r["num_examples"]] else "  CPU beats GPU"
        print(line)


def main(argv: list[str] | None = None) -> int:
    """Parse flags, run the parts asked for, print the tables (and JSON with --json)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=["ratios", "grid", "scaling"], action="append", help="run only this part")
    p.add_argument("--quick", action="store_true", help="3 rounds, 1 grid round, sizes up to 1e6")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds for the ratios (median)")
    p.add_argument("--grid-rounds", type=int, default=1)
    p.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    p.add_argument("--plain-grid", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--scaling-child", type=int, help=argparse.SUPPRESS)
    p.add_argument("--accelerator", default="cpu", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.plain_grid:
        plain_grid()
        return 0
    if args.scaling_child:
        scaling_child(args.scaling_child, args.accelerator)
        return 0
    quiet()
    parts = args.only or ["ratios", "grid", "scaling"]
    rounds = 3 if args.quick else max(args.rounds, 3)
    print(f"Machine: {machine()}")
    results: dict[str, Any] = {"machine": machine()}
    with tempfile.TemporaryDirectory(prefix="linreg-bench-") as tmp:
        if "ratios" in parts:
            results["ratios"] = ratios(rounds, W, Path(tmp))
            print_ratios(results["ratios"], W)
        if "grid" in parts:
            results["grid"] = grid(1 if args.quick else args.grid_rounds, Path(tmp))
            print_grid(results["grid"])
    if "scaling" in parts:
        results["scaling"] = scaling([n for n in SCALING if not (args.quick and n > 1_000_000)])
        print_scaling(results["scaling"])
    results["load_after"] = os.getloadavg()
    print(f"\nLoad average after: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
