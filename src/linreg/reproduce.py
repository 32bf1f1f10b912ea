"""`make run`: the tutorial's four experiments, side by side with the tutorial's own figures."""

import argparse
import logging
import sys
from datetime import datetime
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException

from linreg.config import CONFIG_DIR, ConfigError, override_key, refuse, refusing
from linreg.record import shown
from linreg.run import run

# Each experiment, the tutorial's MSE and weights, and the band a re-run must land in (its shuffle was unseeded).
TUTORIAL = [
    ("tutorial_manual", "0.000122/0.000102/0.000101", "[2.0001, -1.0002, 1.0002]", (0.0, 2e-4)),
    ("tutorial_linear", "0.0001", "[1.9992, -1.0003, 0.9994]", (0.0, 2e-4)),
    ("deg2", "10.1555", "-", (9.9, 10.9)),
    ("delta2", "4.0763", "-", (3.9, 4.25)),
]
HEADER = ("experiment", "model", "MSE per epoch", "OLS floor", "weights", "tutorial MSE", "tutorial weights", "in band")


def main(argv: list[str] | None = None) -> int:
    """Run every experiment, print one table, return 1 if any result leaves the tutorial's band."""
    parser = argparse.ArgumentParser(prog="python -m linreg.reproduce", description=__doc__)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every experiment, e.g. trainer.max_epochs=5")
    overrides = parser.parse_args(argv).overrides
    if given := [o for o in overrides if override_key(o) == "experiment"]:  # each row sets its own
        why = "reproduce runs each of the tutorial's experiments; one alone: python -m linreg.train experiment=<name>"
        refuse(ConfigError("experiment", given[0].partition("=")[2], why))
    # The table is the output: no Lightning banners, tips or "fit stopped" lines above it.
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    out = Path("outputs/reproduce") / datetime.now().strftime("%Y-%m-%d_%H-%M-%S_%f")
    rows, ok = [HEADER], True
    try:
        with refusing(), initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):  # one line, exit 2
            for name, mse, weights, (low, high) in TUTORIAL:
                m = run(compose("train", overrides=[f"experiment={name}", *overrides]), out / name, label=name)
                inside = m.train_mse is not None and low <= m.train_mse <= high
                ok &= inside
                learned = (shown(m.epoch_mse, ".6f", "/"), shown([m.ols_mse], ".6f"), f"[{shown(m.weights)}]")
                rows.append((name, m.model, *learned, mse, weights, "yes" if inside else "NO"))
    except HydraException as err:  # an override Hydra cannot parse or compose: its message, as `linreg.train` shows
        cause = f"\n{err.__cause__}" if err.__cause__ else ""
        print(f"error: {err}{cause}", file=sys.stderr)
        return 2
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(HEADER))]
    for r in [rows[0], tuple("-" * w for w in widths), *rows[1:]]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    tensorboard = Path(sys.executable).parent / "tensorboard"  # the venv's, which a shell may not have on PATH
    if tensorboard.is_relative_to(Path.cwd()):
        tensorboard = tensorboard.relative_to(Path.cwd())
    print(f"\nRuns (metrics.json, TensorBoard) in {out}/")
    print(f"Dashboard: {tensorboard} --logdir {out} --host 127.0.0.1   (or: make tensorboard LOGDIR={out})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
