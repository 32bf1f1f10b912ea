"""`python -m benchmarks.pruning`: the `sweep=optuna_pruned` study with and without each pruner.

Each pruner (none, median, successive_halving, hyperband) runs the same study (same sampler seed) as one whole
`python -m linreg.train -m sweep=optuna_pruned hydra/sweeper/pruner=<p>` process on the basic launcher (or, with
`--launcher vectorized`, trials asked 10 at a time and trained stacked, pruned members leaving the stack); with
`--rounds N` the pruners alternate within each round and the table gives medians. Per study: wall seconds, SGD
steps trained (the sum of `steps` over its trials' metrics.json), trials pruned, the best train_mse of a complete
trial and its gap to the least-squares floor (ols_mse), and steps and best value against the unpruned study.
`--trials` and `--samples` make the study smaller for a busy machine.
"""

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.overhead import machine, run_process

PRUNERS = ("none", "median", "successive_halving", "hyperband")


def study(pruner: str, sweep: Path, extra: list[str]) -> dict[str, Any]:
    """One study in `sweep`: its wall time, steps, pruned trials, best complete train_mse and that trial's gap."""
    args = ["-m", "linreg.train", "-m", "sweep=optuna_pruned", f"hydra/sweeper/pruner={pruner}", *extra]
    seconds = run_process([*args, f"hydra.sweep.dir={sweep}"])
    records = [json.loads(p.read_text()) for p in sweep.glob("*/metrics.json")]
    best = min((r for r in records if r["status"] == "ok"), key=lambda r: r["train_mse"])
    return {
        "seconds": seconds,
        "steps": sum(r["steps"] for r in records),
        "trials": len(records),
        "pruned": sum(r["status"] == "pruned" for r in records),
        "best": best["train_mse"],
        "gap": best["train_mse"] - best["ols_mse"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pruning", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--trials", type=int, default=None, help="n_trials (the preset's 40 if not given)")
    parser.add_argument("--samples", type=int, default=None, help="data.num_examples (the preset's 5,000)")
    parser.add_argument("--pruners", nargs="+", default=list(PRUNERS), choices=PRUNERS)
    parser.add_argument("--json", type=Path, help="write the rows here too")
    parser.add_argument("--launcher", choices=("basic", "vectorized"), default="basic", help="vectorized: 10 at once")
    a = parser.parse_args()
    extra = ["hydra/launcher=vectorized", "hydra.sweeper.n_jobs=10"] if a.launcher == "vectorized" else []
    extra += [f"hydra.sweeper.n_trials={a.trials}"] * (a.trials is not None)
    extra += [f"data.num_examples={a.samples}"] * (a.samples is not None)
    print(f"machine: {machine()}")
    runs: dict[str, list[dict[str, Any]]] = {p: [] for p in a.pruners}
    with tempfile.TemporaryDirectory(prefix="bench-pruning-") as tmp:
        for r in range(a.rounds):
            for p in a.pruners:
                runs[p].append(study(p, Path(tmp) / f"{p}-{r}", extra))
                print(f"round {r + 1}, {p}: {runs[p][-1]}", flush=True)
    rows = {p: {k: statistics.median(run[k] for run in rs) for k in rs[0]} for p, rs in runs.items()}
    base = rows.get("none")
    print(f"\nafter: {machine()}\n")
    print("| pruner | wall s | SGD steps | pruned | best train_mse | gap to floor | less training | best vs none |")
    print("|---|---|---|---|---|---|---|---|")
    for p, row in rows.items():
        vs = (f"{base['steps'] / row['steps']:.2f}x", f"{row['best'] / base['best'] - 1:+.2%}") if base else ("", "")
        print(
            f"| {p} | {row['seconds']:.1f} | {row['steps']:,.0f} | {row['pruned']:.0f} of {row['trials']:.0f} "
            f"| {row['best']:.6g} | {row['gap']:.3g} | {vs[0]} | {vs[1]} |"
        )
    if a.json:
        a.json.write_text(json.dumps({"machine": machine(), "rows": rows, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
