"""A sweep as one result: every job's metrics.json in results.csv/results.md and PNG plots.

`python -m linreg.results DIR` rebuilds them for any sweep dir (an interrupted or old one too);
`SweepResults` is the Hydra callback that prints one line per finished job and builds them at the end.
"""

import argparse
import csv
import fcntl
import io
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from linreg.config import is_number, override_key
from linreg.train import config_fields, write_atomic

log = logging.getLogger(__name__)

FINISHED = ("ok", "diverged")  # outcomes; anything else (failed, missing) fails the sweep
COLUMNS = [
    "job",
    "model",
    "deg",
    "delta",
    "lr",
    "batch_size",
    "accelerator",
    "seed",
    "epochs",
    "status",
    "train_mse",
    "ols_mse",
    "gap",
    "weights",
    "true_weights",
    "steps",
    "fit_seconds",
    "diverged_epoch",
    "error",
    "overrides",
    "dir",
]
PARAMS = ["model", "deg", "delta", "lr", "batch_size", "accelerator", "seed", "epochs"]  # candidate plot axes
PLAN_FILE = ".sweep-plan.json"  # written at multirun start: job count, swept keys (jobs may run elsewhere)
PROGRESS_FILE = "progress.log"  # one line per finished job, in finishing order


class SweepFailedError(SystemExit):
    """Some jobs failed: a SystemExit, since Hydra turns a callback's ordinary exception into a warning."""


# ---------------------------------------------------------------- collecting


def job_dirs(sweep_dir: Path, jobs: int | None = None) -> list[Path]:
    """The sweep's job dirs (what Hydra or a job wrote into), in job-number order; with `jobs`, only 0..jobs-1."""
    dirs = [p for p in sweep_dir.iterdir() if p.is_dir() and ((p / ".hydra").is_dir() or (p / "metrics.json").exists())]
    if jobs is not None:  # a re-run with a smaller grid leaves older job dirs that are not part of this sweep
        dirs = [p for p in dirs if not p.name.isdigit() or int(p.name) < jobs]
    return sorted(dirs, key=lambda p: (0, int(p.name), "") if p.name.isdigit() else (1, 0, p.name))


def job_overrides(job_dir: Path) -> list[str]:
    """The job's task overrides as Hydra saved them, without `resume` (not part of the job's config)."""
    path = job_dir / ".hydra" / "overrides.yaml"
    if not path.exists():
        return []
    return without_resume(str(o) for o in OmegaConf.load(path))


def without_resume(overrides: Any) -> list[str]:
    """Overrides less `resume` (and `+resume`/`~resume`): it is how a job was run, not what it computes."""
    return [o for o in overrides if override_key(o) != "resume"]


def missing_metrics(job_dir: Path) -> dict[str, Any]:
    """A job that left no metrics.json (killed, interrupted, still running): its config, status missing."""
    path = job_dir / ".hydra" / "config.yaml"
    cfg = OmegaConf.load(path) if path.exists() else OmegaConf.create({})
    return {"status": "missing", **config_fields(cfg), "error": "no metrics.json: the job did not finish"}


def read_metrics(job_dir: Path) -> dict[str, Any]:
    """The job's metrics.json, or a `missing` stand-in when it has none (or an unreadable one)."""
    try:
        return json.loads((job_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return missing_metrics(job_dir)


def gap(train_mse: Any, ols_mse: Any) -> float | None:
    """How far above the least-squares floor the run ended."""
    if isinstance(train_mse, (int, float)) and isinstance(ols_mse, (int, float)):
        return train_mse - ols_mse
    return None


def job_row(job_dir: Path) -> dict[str, Any]:
    """One table row for a job dir."""
    m = read_metrics(job_dir)
    data = m.get("data") or {}
    return {
        "job": job_dir.name,
        "model": m.get("model"),
        "deg": data.get("deg"),
        "delta": data.get("delta"),
        "lr": m.get("lr"),
        "batch_size": m.get("batch_size"),
        "accelerator": m.get("accelerator"),
        "seed": m.get("seed"),
        "epochs": m.get("epochs"),
        "status": m.get("status") or "missing",
        "train_mse": m.get("train_mse"),
        "ols_mse": m.get("ols_mse"),
        "gap": gap(m.get("train_mse"), m.get("ols_mse")),
        "weights": m.get("weights"),
        "true_weights": m.get("true_weights"),
        "steps": m.get("steps"),
        "fit_seconds": m.get("fit_seconds"),
        "diverged_epoch": m.get("diverged_epoch"),
        "error": one_line(m.get("error")),
        "overrides": job_overrides(job_dir),
        "dir": str(job_dir.resolve()),
    }


def collect(sweep_dir: Path, jobs: int | None = None) -> list[dict[str, Any]]:
    """One row per job dir of the sweep."""
    return [job_row(d) for d in job_dirs(sweep_dir, jobs)]


def one_line(text: Any) -> str | None:
    """An error message on one line (tracebacks and multi-line messages collapse)."""
    return None if text is None else " ".join(str(text).split())


def swept_keys(rows: list[dict[str, Any]]) -> set[str]:
    """Override keys whose value differs between jobs: what names a job within its sweep."""
    values: dict[str, set[str]] = {}
    for row in rows:
        for o in row["overrides"]:
            key, _, value = o.partition("=")
            values.setdefault(key, set()).add(value)
    per_job = [{o.partition("=")[0] for o in row["overrides"]} for row in rows]
    return {k for k, v in values.items() if len(v) > 1 or any(k not in keys for keys in per_job)}


def job_label(row: dict[str, Any], keys: set[str]) -> str:
    """`#3 [model=linear model.lr=0.1]`: the job number and its swept overrides."""
    shown = [o for o in row["overrides"] if o.partition("=")[0] in keys] or row["overrides"]
    return f"#{row['job']} [{' '.join(shown)}]"


def failure_message(sweep_dir: Path, rows: list[dict[str, Any]]) -> str | None:
    """One line naming every job that failed or left no result; None when all finished."""
    bad = [r for r in rows if r["status"] not in FINISHED]
    if not bad:
        return None
    keys = swept_keys(rows)
    named = "; ".join(f"{job_label(r, keys)} {r['status']}: {r['error']}" for r in bad)
    return f"sweep {sweep_dir}: {len(bad)} of {len(rows)} jobs failed: {named}"


# ---------------------------------------------------------------- writing


def csv_value(value: Any) -> Any:
    """Lists as JSON (exact floats), None as empty."""
    if value is None:
        return ""
    if isinstance(value, list):
        return json.dumps(value)
    return value


def to_csv(rows: list[dict[str, Any]]) -> str:
    """Every column, full precision: floats round-trip to the metrics.json values."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: " ".join(row[k]) if k == "overrides" else csv_value(row[k]) for k in COLUMNS})
    return buf.getvalue()


def fmt(value: Any, digits: int = 4) -> str:
    """A cell for the Markdown table."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    if isinstance(value, list):
        return "[" + ", ".join(fmt(v, digits) for v in value) + "]"
    return str(value).replace("|", "\\|")


MD_COLUMNS = [
    ("job", "job"),
    ("model", "model"),
    ("deg", "deg"),
    ("delta", "delta"),
    ("lr", "lr"),
    ("batch_size", "batch"),
    ("accelerator", "accel"),
    ("status", "status"),
    ("train_mse", "train MSE"),
    ("ols_mse", "floor"),
    ("gap", "gap"),
    ("weights", "weights"),
    ("steps", "steps"),
    ("fit_seconds", "fit s"),
]


def status_counts(rows: list[dict[str, Any]]) -> str:
    """`46 ok, 1 diverged, 1 failed`."""
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    return ", ".join(f"{n} {s}" for s, n in sorted(counts.items(), key=lambda kv: kv[0] not in FINISHED))


def to_markdown(sweep_dir: Path, rows: list[dict[str, Any]], plots: list[str]) -> str:
    """A readable summary: counts, failures, the table and the plots."""
    lines = [f"# Sweep {sweep_dir.name}", "", f"{len(rows)} jobs: {status_counts(rows)}.", ""]
    keys = swept_keys(rows)
    for r in rows:
        if r["status"] not in FINISHED:
            lines.append(f"- **{r['status']}** {job_label(r, keys)}: {fmt(r['error'])}")
        elif r["status"] == "diverged":
            lines.append(f"- diverged {job_label(r, keys)} at epoch {r['diverged_epoch']}")
    if lines[-1]:
        lines.append("")
    lines.append("| " + " | ".join(title for _, title in MD_COLUMNS) + " |")
    lines.append("|" + "---|" * len(MD_COLUMNS))
    for r in rows:
        cells = [fmt(r[k], 3 if k == "fit_seconds" else 4) for k, _ in MD_COLUMNS]
        if r["status"] not in FINISHED:
            cells[MD_COLUMNS.index(("status", "status"))] = f"**{r['status']}**"
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines += [f"![{name}]({name})" for name in plots]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- plots


def varying_params(rows: list[dict[str, Any]]) -> list[str]:
    """The table's parameters that take more than one value: the plot's x axes (lr when none varies)."""
    varying = [p for p in PARAMS if p != "model" and len({json.dumps(r[p]) for r in rows}) > 1]
    return varying or ["lr"]


def save_figure(fig: Any, path: Path) -> None:
    """PNG via a temp file and a rename."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    write_atomic(path, buf.getvalue())


GAP_FLOOR = 1e-9  # gaps below this (float32 training against a float64 floor) are drawn at it: log axis


def plot_panel(ax: Any, rows: list[dict[str, Any]], param: str, key: str, models: list[str], legend: bool) -> None:
    """One parameter's panel: `key` of every finished job against the parameter, a median line per model."""
    from matplotlib.ticker import FormatStrFormatter, NullLocator

    done = [r for r in rows if is_number(r[key])]
    values = sorted({json.dumps(r[param]) for r in rows})
    numeric = all(is_number(json.loads(v)) for v in values)
    xs_of = {v: (json.loads(v) if numeric else i) for i, v in enumerate(values)}
    for i, model in enumerate(models):
        pts = [(xs_of[json.dumps(r[param])], max(r[key], GAP_FLOOR)) for r in done if str(r["model"]) == model]
        if not pts:
            continue
        shift = 1 + 0.04 * (i - (len(models) - 1) / 2)  # models side by side, not on top of each other
        xs = [x * shift if numeric else x + (shift - 1) * 2 for x, _ in pts]
        ax.plot(xs, [y for _, y in pts], "o", alpha=0.6, color=f"C{i}")  # marker lines: cheaper than scatter
        line_x = sorted({x for x, _ in pts})
        ax.plot(line_x, [statistics.median(y for x, y in pts if x == lx) for lx in line_x], color=f"C{i}", label=model)
    positive = [json.loads(v) for v in values if numeric and json.loads(v) > 0]
    if numeric and len(positive) == len(values) > 1 and max(positive) / min(positive) >= 10:
        ax.set_xscale("log")
    if len(values) <= 12:  # the swept values themselves as ticks
        ax.set_xticks([xs_of[v] for v in values], [str(json.loads(v)) for v in values])
        ax.minorticks_off()
    if done:
        ax.set_yscale("log")
        # Decades only, plainly labelled: a log axis's minor ticks (8 a decade) and its 10^k mathtext
        # labels were most of this figure's ~2 s.
        ax.yaxis.set_minor_locator(NullLocator())
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.set_xlabel(param)
    ax.grid(True, alpha=0.3)
    if legend and ax.get_legend_handles_labels()[0]:
        ax.legend()


def plot_mse(rows: list[dict[str, Any]], path: Path) -> None:
    """Final train MSE, and its gap to the least-squares floor, against each swept parameter, per model."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on a cluster node or in CI
    import matplotlib.pyplot as plt

    params = varying_params(rows)
    models = sorted({str(r["model"]) for r in rows})
    width = 4.5 * len(params)
    fig, axes = plt.subplots(2, len(params), figsize=(width, 7.5), squeeze=False)
    # Fixed margins: tight_layout measures every label of every panel (seconds for a 10-panel figure).
    fig.subplots_adjust(left=0.9 / width, right=1 - 0.15 / width, bottom=0.08, top=0.93, wspace=0.25, hspace=0.22)
    for col, param in enumerate(params):
        for row, (key, label) in enumerate([("train_mse", "final train MSE"), ("gap", "gap to least-squares floor")]):
            plot_panel(axes[row][col], rows, param, key, models, legend=(row, col) == (0, 0))  # one legend
            if col == 0:
                axes[row][col].set_ylabel(label)
    skipped = sum(1 for r in rows if not is_number(r["train_mse"]))
    title = "dots: jobs, lines: median per model"
    fig.suptitle(f"{title} ({skipped} diverged/failed jobs not shown)" if skipped else title)
    save_figure(fig, path)
    plt.close(fig)


def plot_weights(rows: list[dict[str, Any]], path: Path) -> None:
    """Learned coefficients against the true ones (the diagonal is a perfect fit), one colour per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5))
    done = [r for r in rows if r["weights"] and r["true_weights"] and all(is_number(w) for w in r["weights"])]
    models = sorted({str(r["model"]) for r in rows})
    for i, model in enumerate(models):
        pts = [(t, w) for r in done if str(r["model"]) == model for t, w in zip(r["true_weights"], r["weights"])]
        if pts:
            jitter = 0.04 * (i - (len(models) - 1) / 2)
            ax.scatter([t + jitter for t, _ in pts], [w for _, w in pts], alpha=0.6, label=model)
    truths = sorted({t for r in done for t in r["true_weights"]})
    if truths:
        lo, hi = truths[0] - 0.5, truths[-1] + 0.5
        ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="learned = true")
        ax.legend()
    ax.set_xlabel("true coefficient")
    ax.set_ylabel("learned coefficient")
    ax.set_title(f"coefficients of {len(done)} finished jobs", y=1.0)
    ax.grid(True, alpha=0.3)
    fig.subplots_adjust(left=0.14, right=0.97, bottom=0.11, top=0.93)
    save_figure(fig, path)
    plt.close(fig)


# ---------------------------------------------------------------- entry points


def summarize(sweep_dir: Path, jobs: int | None = None) -> list[dict[str, Any]]:
    """Write results.csv, results.md and the plots into the sweep dir; return the rows."""
    rows = collect(sweep_dir, jobs)
    plots = {"mse.png": plot_mse, "weights.png": plot_weights}
    table = to_csv(rows)
    outputs = [sweep_dir / name for name in ("results.csv", "results.md", *plots)]
    if all(p.exists() for p in outputs) and (sweep_dir / "results.csv").read_text() == table:
        return rows  # the same table as last time (a resumed sweep): its plots are already drawn
    for name, plot in plots.items():
        plot(rows, sweep_dir / name)
    write_atomic(sweep_dir / "results.csv", table.encode())
    write_atomic(sweep_dir / "results.md", to_markdown(sweep_dir, rows, list(plots)).encode())
    return rows


def main(argv: list[str] | None = None) -> int:
    """`python -m linreg.results DIR`: rebuild a sweep's table and plots; non-zero when jobs failed."""
    parser = argparse.ArgumentParser(prog="python -m linreg.results", description=main.__doc__)
    parser.add_argument("sweep_dir", type=Path, help="a multirun dir, e.g. outputs/multirun/<time>")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir() or not job_dirs(args.sweep_dir):
        print(f"error: {args.sweep_dir}: no job dirs (not a sweep dir?)", file=sys.stderr)
        return 2
    rows = summarize(args.sweep_dir)
    print(f"{len(rows)} jobs: {status_counts(rows)} -> {args.sweep_dir / 'results.md'}")
    message = failure_message(args.sweep_dir, rows)
    if message:
        print(f"error: {message}", file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------- Hydra callback


def planned_jobs(config: DictConfig) -> tuple[int | None, list[str]]:
    """How many jobs the sweep will run, and which keys it sweeps (None jobs when it cannot tell)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    sweeper = config.hydra.sweeper
    params = {str(k): str(v) for k, v in (sweeper.get("params") or {}).items()}
    if sweeper.get("n_trials") is not None:  # optuna: one job per trial
        return int(sweeper.n_trials), list(params)
    args = [f"{k}={v}" for k, v in params.items()] + [str(o) for o in config.hydra.overrides.task]
    try:
        overrides = OverridesParser.create().parse_overrides(args)
        swept = list(dict.fromkeys(o.get_key_element() for o in overrides if o.is_sweep_override()))
        return sum(len(batch) for batch in BasicSweeper.split_arguments(overrides, None)), swept
    except Exception:  # a sweep syntax the basic sweeper cannot expand: progress shows k/?
        return None, list(params)


def read_plan(sweep_dir: Path) -> dict[str, Any]:
    """What `on_multirun_start` recorded; unknowns (None, no swept keys) when the file is missing or torn."""
    try:
        return json.loads((sweep_dir / PLAN_FILE).read_text())
    except (OSError, ValueError):
        return {"jobs": None, "swept": [], "started": None}


def append_progress(path: Path, make_line: Any) -> str:
    """Append one line under an exclusive lock; `make_line(k)` gets this job's finishing rank."""
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # parallel jobs (joblib, submitit) append to the same file
        f.seek(0)
        k = sum(1 for _ in f) + 1
        line = make_line(k)
        f.write(line + "\n")
        f.flush()
        fcntl.flock(f, fcntl.LOCK_UN)
    return line


class SweepResults(Callback):
    """Progress lines while a sweep runs; the results table and plots when it ends; failures exit non-zero."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Record the job count and swept keys for the jobs, which may run in other processes."""
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        n, swept = planned_jobs(config)
        plan = {"jobs": n, "swept": swept, "started": time.time()}
        write_atomic(sweep_dir / PLAN_FILE, json.dumps(plan).encode())
        write_atomic(sweep_dir / PROGRESS_FILE, b"")  # a re-run (resume) counts from 1 again

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        """One line: `[3/48] model=linear data.deg=2 ...: ok train_mse=0.0001`."""
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        sweep_dir, out = Path(config.hydra.sweep.dir), Path(config.hydra.runtime.output_dir)
        plan = read_plan(sweep_dir)
        line = append_progress(sweep_dir / PROGRESS_FILE, lambda k: progress_line(k, plan, out, job_return))
        log.info(line)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Build the table and plots; exit non-zero with one line naming the failed jobs, if any."""
        sweep_dir = Path(config.hydra.sweep.dir)
        jobs = read_plan(sweep_dir)["jobs"]
        if not sweep_dir.is_dir() or not job_dirs(sweep_dir, jobs):
            return
        rows = summarize(sweep_dir, jobs)
        log.info(f"sweep: {len(rows)} jobs: {status_counts(rows)} -> {sweep_dir / 'results.md'}")
        message = failure_message(sweep_dir, rows)
        if message:
            raise SweepFailedError(f"error: {message}")


def progress_line(k: int, plan: dict[str, Any], out: Path, job_return: JobReturn) -> str:
    """The progress line of the k-th finished job."""
    swept = set(plan.get("swept") or [])
    given = job_return.overrides or []
    overrides = [o for o in given if o.partition("=")[0] in swept] or without_resume(given)
    metrics_path = out / "metrics.json"
    try:
        m = json.loads(metrics_path.read_text())
        status, mse = m.get("status"), m.get("train_mse")
        if m.get("error"):
            status = f"{status} ({one_line(m['error'])})"
        resumed = plan.get("started") is not None and metrics_path.stat().st_mtime < plan["started"]
    except (OSError, ValueError):
        status, mse, resumed = "failed", None, False
    if job_return.status == JobStatus.FAILED:
        status = f"failed ({type(job_return._return_value).__name__}: {job_return._return_value})"
    mse_text = f"{mse:.6g}" if isinstance(mse, float) else "n/a"
    total = plan.get("jobs") or "?"
    return f"[{k}/{total}] {' '.join(overrides)}: {status} train_mse={mse_text}{' (done before)' if resumed else ''}"


if __name__ == "__main__":
    sys.exit(main())
