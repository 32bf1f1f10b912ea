"""`python -m benchmarks.vectorized`: `hydra/launcher=vectorized` against the basic launcher and plain loops.

Parts (`--only grid|lr_seed|thousand|scaling`, default all):
- grid: the 48-job tutorial grid as one process: plain loops, basic launcher, vectorized launcher.
- lr_seed: 10 learning rates x 20 seeds at 5,000 samples (200 jobs): basic vs vectorized, whole process.
- thousand: 10 learning rates x 100 seeds at 5,000 samples (1,000 jobs), vectorized; the basic launcher only
  with `--basic-thousand` (minutes), else estimated from the 200-job row's time a job.
- scaling: time per SGD step of one stacked fit against group size (1, 10, 100, 1,000 members), in process
  (`--trainer gpu` on a GPU machine).
Every sweep row runs with the default config (TensorBoard on); `--no-logger` adds `~logger` to all of them.
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.overhead import GRID, machine, run_process

VECTORIZED = ["hydra/launcher=vectorized"]
LRS = "model.lr=0.001,0.002,0.005,0.01,0.02,0.03,0.05,0.07,0.1,0.2"
LR_SEED = ["data.num_examples=5000", LRS, "seed=range(0,20)"]
THOUSAND = ["data.num_examples=5000", LRS, "seed=range(0,100)"]
GROUP_SIZES = (1, 10, 100, 1000)


def sweep_seconds(args: list[str], tmp: Path, name: str, extra: list[str]) -> float:
    """Wall seconds of one multirun process into its own sweep dir."""
    return run_process(["-m", "linreg.train", "-m", *args, *extra, f"hydra.sweep.dir={tmp / name}"])


def grid(rounds: int, tmp: Path, extra: list[str]) -> dict[str, Any]:
    """The tutorial grid: plain loops, basic and vectorized, alternated per round; medians and ratios."""
    times: dict[str, list[float]] = {"plain": [], "basic": [], "vectorized": []}
    for r in range(rounds):
        times["plain"].append(run_process(["-m", "benchmarks.overhead", "--plain-grid"]))
        times["basic"].append(sweep_seconds(GRID, tmp, f"grid-basic-{r}", extra))
        times["vectorized"].append(sweep_seconds([*VECTORIZED, *GRID], tmp, f"grid-vec-{r}", extra))
    row = {k: statistics.median(v) for k, v in times.items()}
    row["vectorized/basic"] = statistics.median(v / b for v, b in zip(times["vectorized"], times["basic"]))
    row["vectorized/plain"] = statistics.median(v / p for v, p in zip(times["vectorized"], times["plain"]))
    return row


def lr_seed(tmp: Path, extra: list[str]) -> dict[str, Any]:
    """200 jobs (10 lr x 20 seeds, 5,000 samples): basic vs vectorized."""
    basic = sweep_seconds(LR_SEED, tmp, "lr-seed-basic", extra)
    vec = sweep_seconds([*VECTORIZED, *LR_SEED], tmp, "lr-seed-vec", extra)
    return {"jobs": 200, "basic_s": basic, "vectorized_s": vec, "speed-up": basic / vec}


def thousand(tmp: Path, extra: list[str], basic_per_job: float | None, run_basic: bool) -> dict[str, Any]:
    """1,000 jobs (10 lr x 100 seeds, 5,000 samples), vectorized; basic measured or estimated."""
    vec = sweep_seconds([*VECTORIZED, *THOUSAND], tmp, "thousand-vec", extra)
    row: dict[str, Any] = {"jobs": 1000, "vectorized_s": vec}
    if run_basic:
        row["basic_s"] = sweep_seconds(THOUSAND, tmp, "thousand-basic", extra)
    elif basic_per_job is not None:
        row["basic_s (estimated)"] = basic_per_job * 1000
    basic = row.get("basic_s", row.get("basic_s (estimated)"))
    if basic is not None:
        row["speed-up"] = basic / vec
    return row


def member_configs(count: int, num_examples: int, trainer: str = "cpu") -> list[Any]:
    """`count` configs of the default job (manual model), seeds 0..count-1, composed as the CLI composes them."""
    from hydra import compose, initialize_config_dir

    from linreg.train import CONFIG_DIR

    overrides = [f"data.num_examples={num_examples}", "trainer.max_epochs=1", "~logger", f"trainer={trainer}"]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        base = compose("train", overrides=overrides)
    cfgs = []
    for seed in range(count):
        cfg = base.copy()
        cfg.seed = seed
        cfgs.append(cfg)
    return cfgs


def scaling(num_examples: int, trainer: str = "cpu") -> list[dict[str, Any]]:
    """Seconds per SGD step (all members at once) of one stacked fit, per group size."""
    import logging
    import warnings

    from linreg.stacked import train_group

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    rows = []
    train_group(member_configs(1, 100, trainer))  # warm-up: first-fit costs (imports, kernels) are no step's
    for size in GROUP_SIZES:
        cfgs = member_configs(size, num_examples, trainer)
        start = time.perf_counter()
        results = train_group(cfgs)
        total = time.perf_counter() - start
        fit = results[0].record.fit_seconds * size  # the group's fit (metrics hold a member's share)
        steps = results[0].record.steps
        rows.append(
            {
                "members": size,
                "steps": steps,
                "ms_per_step": fit / steps * 1e3,
                "us_per_member_step": fit / steps / size * 1e6,
                "group_s (data + fit)": total,
            }
        )
    return rows


def show(title: str, rows: list[dict[str, Any]]) -> None:
    """One Markdown table."""
    print(f"\n{title}\n")
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        cells = [f"{v:.3g}" if isinstance(v, float) else str(v) for v in row.values()]
        print("| " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> int:
    """Run the parts asked for, print their tables (and JSON with --json)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=["grid", "lr_seed", "thousand", "scaling"], action="append")
    p.add_argument("--grid-rounds", type=int, default=3)
    p.add_argument("--basic-thousand", action="store_true", help="also time the 1,000 jobs with the basic launcher")
    p.add_argument("--no-logger", action="store_true", help="~logger for every sweep")
    p.add_argument("--scaling-samples", type=int, default=1000)
    p.add_argument("--trainer", choices=["cpu", "gpu"], default="cpu", help="the scaling table on this device")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    parts = args.only or ["grid", "lr_seed", "thousand", "scaling"]
    extra = ["~logger"] if args.no_logger else []
    print(f"machine: {machine()}")
    out: dict[str, Any] = {"machine": machine()}
    with tempfile.TemporaryDirectory(prefix="linreg-vec-") as tmp_name:
        tmp = Path(tmp_name)
        if "grid" in parts:
            out["grid"] = grid(args.grid_rounds, tmp, extra)
            show("48-job tutorial grid, whole process (seconds, medians)", [out["grid"]])
        if "lr_seed" in parts:
            out["lr_seed"] = lr_seed(tmp, extra)
            show("200-job lr x seed sweep, 5,000 samples", [out["lr_seed"]])
        if "thousand" in parts:
            per_job = out["lr_seed"]["basic_s"] / 200 if "lr_seed" in out else None
            out["thousand"] = thousand(tmp, extra, per_job, args.basic_thousand)
            show("1,000-job lr x seed sweep, 5,000 samples", [out["thousand"]])
    if "scaling" in parts:
        out["scaling"] = scaling(args.scaling_samples, args.trainer)
        title = f"time per SGD step against group size ({args.scaling_samples} samples, batch 10, {args.trainer})"
        show(title, out["scaling"])
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
