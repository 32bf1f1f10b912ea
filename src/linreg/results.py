"""A sweep as one result: every job's metrics.json in results.csv/results.md, and the plots of linreg.plots.

`python -m linreg.results DIR` rebuilds them for any sweep dir (an interrupted or old one too);
`SweepResults` is the Hydra callback that prints one line per finished job and builds them at the end.
A job dir's record is checked before it becomes a row: one that cannot be read or trusted is `corrupt`.
"""

import argparse
import csv
import fcntl
import io
import json
import logging
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from linreg.record import FINISHED, CorruptRecord, RunRecord, write_atomic
from linreg.record import is_number as is_finite


def override_key(o: str) -> str:  # TEMP shim until results.py is rewritten
    return o.split("=", 1)[0].lstrip("+~")


def typed_overrides(config: DictConfig) -> list[str]:  # TEMP shim
    return [str(o) for o in OmegaConf.to_container(config.hydra.overrides.task, resolve=False)]


def identity_overrides(overrides: list[str]) -> list[str]:  # TEMP shim
    return [o for o in overrides if override_key(o) != "resume"]

log = logging.getLogger(__name__)

COLUMNS = [  # a row: the job, its record's fields (data as deg and delta), how far above the floor, where
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
PLAN_FILE = ".sweep-plan.json"  # written at multirun start: job count, swept keys (jobs may run elsewhere)
PROGRESS_FILE = "progress.log"  # one line per finished job, in finishing order
PLOTS = ("mse.png", "weights.png")
ERROR_CHARS = 120  # an error's share of the one-line summary (results.md has it whole)
GROUPS_SHOWN = 3  # distinct errors named in the summary line, per kind of failure
RANGES_SHOWN = 6  # job-number ranges named per error in the summary line


class SweepFailedError(SystemExit):
    """The sweep failed or its results could not be written: a SystemExit, which Hydra lets through to exit 1."""


# ---------------------------------------------------------------- reading a job's record


def job_dirs(sweep_dir: Path, jobs: int | None = None) -> list[Path]:
    """The sweep's job dirs (what Hydra or a job wrote into), in job-number order; with `jobs`, only 0..jobs-1.

    With `jobs`, a planned job's numbered dir counts even if nothing was written there (a job refused because
    another run holds it): it is a row, missing, not a job that vanished from the table.
    """

    def is_job(p: Path) -> bool:
        if not p.is_dir():
            return False
        return (p / ".hydra").is_dir() or (p / "metrics.json").exists() or (jobs is not None and p.name.isdigit())

    dirs = [p for p in sweep_dir.iterdir() if is_job(p)]
    if jobs is not None:  # a re-run with a smaller grid leaves older job dirs that are not part of this sweep
        dirs = [p for p in dirs if not p.name.isdigit() or int(p.name) < jobs]
    return sorted(dirs, key=lambda p: (0, int(p.name), "") if p.name.isdigit() else (1, 0, p.name))


def load_yaml(job_dir: Path, name: str) -> Any:
    """`.hydra/<name>` as plain data, None when absent; CorruptRecord when it cannot be read or parsed."""
    path = job_dir / ".hydra" / name
    if not path.exists():
        return None
    try:
        return OmegaConf.to_container(OmegaConf.load(path))
    except (OSError, UnicodeDecodeError, yaml.YAMLError, OmegaConfBaseException, ValueError) as err:
        raise CorruptRecord(f".hydra/{name}: {reason(err)}") from err


def reason(err: BaseException) -> str:
    """An exception as a short one-line reason: the OS's words for an OSError, else its type and message."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return one_line(f"{type(err).__name__}: {err}") or type(err).__name__


def job_overrides(job_dir: Path) -> list[str]:
    """The job's task overrides as Hydra saved them, less what is not the run's identity (`resume`)."""
    overrides = load_yaml(job_dir, "overrides.yaml")
    if overrides is None:
        return []
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise CorruptRecord(".hydra/overrides.yaml: not a list of overrides")
    return identity_overrides(overrides)


def saved_record(job_dir: Path) -> RunRecord:
    """A `missing` record made from the job's saved config, for a job without a metrics.json."""
    cfg = load_yaml(job_dir, "config.yaml")
    if cfg is not None and not isinstance(cfg, dict):
        raise CorruptRecord(".hydra/config.yaml: not a mapping")
    return RunRecord.of(OmegaConf.create(cfg or {}), "missing", error="no metrics.json")


def read_record(job_dir: Path) -> RunRecord | None:
    """The job's metrics.json as a record, None when there is none; CorruptRecord when it cannot be trusted."""
    path = job_dir / "metrics.json"
    if not path.exists() and not path.is_symlink():
        return None
    try:
        metrics = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CorruptRecord(
            f"metrics.json: not valid JSON ({err.msg} at line {err.lineno} column {err.colno})"
        ) from err
    except (OSError, UnicodeDecodeError) as err:
        raise CorruptRecord(f"metrics.json: {reason(err)}") from err
    return RunRecord.parse(metrics)


def record_row(record: RunRecord) -> dict[str, Any]:
    """A record's fields as a row: `data` as its deg and delta, the error on one line, the gap to the floor."""
    fields = record.as_json()
    row = {k: fields[k] for k in COLUMNS if k in fields}
    row.update(deg=record.data_value("deg"), delta=record.data_value("delta"), gap=record.gap)
    row["error"] = one_line(record.error)
    return row


def job_row(job_dir: Path) -> dict[str, Any]:
    """One table row for a job dir: its record, or one made from its saved config (missing), or corrupt."""
    row: dict[str, Any] = {
        **dict.fromkeys(COLUMNS),
        "job": job_dir.name,
        "overrides": [],
        "dir": str(job_dir.resolve()),
    }
    problems = []
    try:
        row["overrides"] = job_overrides(job_dir)
    except CorruptRecord as err:
        problems.append(str(err))
    record = None
    try:
        record = read_record(job_dir)
    except CorruptRecord as err:
        problems.append(str(err))
    if record is None:
        try:
            record = saved_record(job_dir)
        except CorruptRecord as err:
            problems.append(str(err))
            record = RunRecord("missing")
    row.update(record_row(record))
    if problems:
        row.update(status="corrupt", error="; ".join(problems), gap=None)
    return row


def collect(sweep_dir: Path, jobs: int | None = None) -> list[dict[str, Any]]:
    """One row per job dir of the sweep."""
    return [job_row(d) for d in job_dirs(sweep_dir, jobs)]


def one_line(text: Any) -> str | None:
    """An error message on one line (tracebacks and multi-line messages collapse)."""
    return None if text is None else " ".join(str(text).split())


# ---------------------------------------------------------------- naming jobs and failures


def swept_keys(rows: list[dict[str, Any]]) -> list[str]:
    """Override keys whose value differs between jobs, in the order the jobs give them: what names a job."""
    values: dict[str, set[str]] = {}
    for row in rows:
        for o in row["overrides"]:
            values.setdefault(override_key(o), set()).add(o.partition("=")[2])
    per_job = [{override_key(o) for o in row["overrides"]} for row in rows]
    return [k for k, v in values.items() if len(v) > 1 or any(k not in keys for keys in per_job)]


def job_ranges(names: list[str], limit: int | None = None) -> str:
    """`0-15`, `0, 2, 5-7`: job numbers as ranges (other names as they are), `limit` pieces at most."""
    numbers = sorted(int(n) for n in names if n.isdigit())
    pieces: list[str] = []
    start = prev = None
    for n in [*numbers, None]:
        if start is not None and n != prev + 1:
            pieces.append(str(start) if start == prev else f"{start}-{prev}")
            start = None
        if n is not None and start is None:
            start = n
        prev = n
    pieces += sorted(n for n in names if not n.isdigit())
    if limit is not None and len(pieces) > limit:
        pieces = [*pieces[:limit], f"… ({len(names)} in all)"]
    return ", ".join(pieces)


def jobs_label(rows: list[dict[str, Any]], limit: int | None = None) -> str:
    """`#3` for one job, `jobs 0-15` for several."""
    names = [r["job"] for r in rows]
    return f"#{names[0]}" if len(names) == 1 else f"jobs {job_ranges(names, limit)}"


def common_overrides(rows: list[dict[str, Any]], keys: list[str], error: str) -> list[str]:
    """The swept overrides all these jobs share and their error does not name: what sets them apart."""
    shared = set(rows[0]["overrides"]).intersection(*(r["overrides"] for r in rows[1:]))
    return [o for o in rows[0]["overrides"] if o in shared and override_key(o) in keys and override_key(o) not in error]


def by_error(rows: list[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:
    """Jobs grouped by their error, in the order of their first job."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r["error"] or "(no error recorded)", []).append(r)
    return list(groups.items())


def clipped(text: str, limit: int = ERROR_CHARS) -> str:
    """`text`, cut to `limit` characters with an ellipsis."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def failure_clause(bad: list[dict[str, Any]], total: int, status: str, keys: list[str]) -> str:
    """`16 of 48 jobs failed: <error> (jobs 0-15)`: one kind of failure, jobs failing alike named once."""
    verb = {"failed": "failed", "missing": "did not finish", "corrupt": "left a corrupt record"}.get(status, status)
    groups = by_error(bad)
    named = []
    for error, rows in groups[:GROUPS_SHOWN]:
        label = jobs_label(rows, RANGES_SHOWN)
        if status == "missing":
            named.append(f"{label} ({error})")
            continue
        extra = common_overrides(rows, keys, error) if status == "failed" else []
        named.append(f"{clipped(error)} ({label}{': ' + clipped(' '.join(extra), 60) if extra else ''})")
    if len(groups) > GROUPS_SHOWN:
        named.append(f"{len(groups) - GROUPS_SHOWN} more errors in results.md")
    return f"{len(bad)} of {total} {'job' if total == 1 else 'jobs'} {verb}: {'; '.join(named)}"


def failure_message(sweep_dir: Path, rows: list[dict[str, Any]], problems: list[str] | None = None) -> str | None:
    """One line: what could not be written, and the jobs that failed, did not finish or are corrupt; else None."""
    keys = swept_keys(rows)
    clauses = list(problems or [])
    for status in ("failed", "missing", "corrupt"):
        bad = [r for r in rows if r["status"] == status]
        if bad:
            clauses.append(failure_clause(bad, len(rows), status, keys))
    return f"sweep {sweep_dir}: {'; '.join(clauses)}" if clauses else None


# ---------------------------------------------------------------- the table


def csv_value(value: Any) -> Any:
    """Lists and objects as JSON (exact floats), None as empty."""
    if value is None:
        return ""
    if isinstance(value, (list, dict)):
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


def jobs_count(rows: list[Any]) -> str:
    """`1 job`, `48 jobs`."""
    return f"{len(rows)} job{'' if len(rows) == 1 else 's'}"


def status_counts(rows: list[dict[str, Any]]) -> str:
    """`46 ok, 1 diverged, 1 failed`."""
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    return ", ".join(f"{n} {s}" for s, n in sorted(counts.items(), key=lambda kv: kv[0] not in FINISHED))


def failure_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown list items: each error once with its jobs, and the diverged jobs by epoch."""
    lines = []
    for status in ("failed", "missing", "corrupt"):
        for error, group in by_error([r for r in rows if r["status"] == status]):
            lines.append(f"- **{status}** {jobs_label(group)}: {fmt(error)}")
    diverged: dict[Any, list[dict[str, Any]]] = {}
    for r in rows:
        if r["status"] == "diverged":
            diverged.setdefault(r["diverged_epoch"], []).append(r)
    lines += [f"- diverged at epoch {epoch}: {jobs_label(group)}" for epoch, group in diverged.items()]
    return lines


def to_markdown(sweep_dir: Path, rows: list[dict[str, Any]], plots: list[str]) -> str:
    """A readable summary: counts, failures, the table and the plots."""
    lines = [f"# Sweep {sweep_dir.name}", "", f"{jobs_count(rows)}: {status_counts(rows)}.", ""]
    if failed := failure_lines(rows):
        lines += [*failed, ""]
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


# ---------------------------------------------------------------- writing


def write_outputs(sweep_dir: Path, files: dict[str, Callable[[], bytes]]) -> list[str]:
    """Make and write each file (one failing does not stop the rest); the failures, one text per reason."""
    failed: dict[tuple[str, str], list[str]] = {}
    for name, make in files.items():
        path = sweep_dir / name
        try:
            write_atomic(path, make())
            continue
        except OSError as err:  # a full disk, a read-only dir, a directory in the file's place
            failed.setdefault(("cannot write", reason(err)), []).append(name)
        except Exception as err:  # a plot that cannot be drawn must not cost the table, nor pass unnoticed
            failed.setdefault(("could not make", reason(err)), []).append(name)
        try:
            path.unlink(missing_ok=True)  # an older file would pass for this sweep's
        except OSError:
            pass  # what could not be written may not be removable either: the message names it
    return [
        f"{verb} {', '.join([str(sweep_dir / names[0]), *names[1:]])}: {why}" for (verb, why), names in failed.items()
    ]


def same_results(sweep_dir: Path, table: str) -> bool:
    """Whether the sweep dir already holds this table and every output (a resumed sweep): nothing to redo."""
    try:
        return all((sweep_dir / n).is_file() for n in ("results.md", *PLOTS)) and (
            (sweep_dir / "results.csv").read_text() == table
        )
    except (OSError, UnicodeDecodeError):
        return False


def plan_swept(sweep_dir: Path, rows: list[dict[str, Any]]) -> list[str]:
    """The swept keys as the sweep planned them, else as the jobs' overrides show them."""
    return read_plan(sweep_dir)["swept"] or swept_keys(rows)


def summarize(sweep_dir: Path, jobs: int | None = None) -> tuple[list[dict[str, Any]], list[str]]:
    """Write results.csv and results.md, then the plots; return the rows and what could not be written."""
    from linreg.plots import mse_figure, weights_figure

    rows = collect(sweep_dir, jobs)
    table = to_csv(rows)
    if same_results(sweep_dir, table):
        return rows, []
    swept = plan_swept(sweep_dir, rows)
    files = {  # made and written in this order: the table first, so that a plot failing cannot cost it
        "results.csv": table.encode,
        "results.md": lambda: to_markdown(sweep_dir, rows, list(PLOTS)).encode(),
        "mse.png": lambda: mse_figure(rows, swept),
        "weights.png": lambda: weights_figure(rows),
    }
    return rows, write_outputs(sweep_dir, files)


def report(sweep_dir: Path, rows: list[dict[str, Any]], problems: list[str]) -> tuple[str, str | None]:
    """The summary line for stdout, and the error line (None when the sweep succeeded and all was written)."""
    where = f" -> {sweep_dir / 'results.md'}" if (sweep_dir / "results.md").is_file() else ""
    return f"{jobs_count(rows)}: {status_counts(rows)}{where}", failure_message(sweep_dir, rows, problems)


def main(argv: list[str] | None = None) -> int:
    """`python -m linreg.results DIR`: rebuild a sweep's table and plots; non-zero when jobs failed."""
    parser = argparse.ArgumentParser(prog="python -m linreg.results", description=main.__doc__)
    parser.add_argument("sweep_dir", type=Path, help="a multirun dir, e.g. outputs/multirun/<time>")
    sweep_dir = parser.parse_args(argv).sweep_dir
    if not sweep_dir.exists():
        return refuse(f"{sweep_dir}: no such directory")
    if not sweep_dir.is_dir():
        return refuse(f"{sweep_dir}: not a directory")
    try:
        found = job_dirs(sweep_dir)
    except OSError as err:
        return refuse(f"{sweep_dir}: cannot read: {reason(err)}")
    if not found:
        return refuse(f"{sweep_dir}: no job dirs (not a sweep dir?)")
    rows, problems = summarize(sweep_dir, read_plan(sweep_dir)["jobs"])
    summary, error = report(sweep_dir, rows, problems)
    print(summary)
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def refuse(message: str) -> int:
    """Exit status 2 with one line: the dir given is no sweep dir."""
    print(f"error: {message}", file=sys.stderr)
    return 2


# ---------------------------------------------------------------- Hydra callback


def planned_jobs(config: DictConfig) -> tuple[int | None, list[str]]:
    """How many jobs the sweep will run, and which keys it sweeps (None jobs when it cannot tell)."""
    sweeper = config.hydra.sweeper
    params = {str(k): str(v) for k, v in (sweeper.get("params") or {}).items()}
    if sweeper.get("n_trials") is not None:  # optuna: one job per trial
        return int(sweeper.n_trials), list(params)
    args = [f"{k}={v}" for k, v in params.items()] + typed_overrides(config)  # as typed: `${...}` is each job's
    try:
        final = {}
        loader = GlobalHydra.instance().config_loader() if GlobalHydra.instance().is_initialized() else None
        for override in OverridesParser.create(config_loader=loader).parse_overrides(args):  # glob() lists options
            final[override.get_key_element()] = override  # as Hydra's basic sweeper: the command line's value wins
        sizes = {
            override_key(key): len(list(o.sweep_string_iterator())) for key, o in final.items() if o.is_sweep_override()
        }
    except HydraException:  # a sweep the grid cannot enumerate (an interval, a glob): progress shows k/?
        return None, list(params)
    return math.prod(sizes.values()), list(sizes)


def read_plan(sweep_dir: Path) -> dict[str, Any]:
    """What `on_multirun_start` recorded; unknowns (None, no swept keys) when the file is missing or torn."""
    unknown: dict[str, Any] = {"jobs": None, "swept": [], "started": None}
    try:
        plan = json.loads((sweep_dir / PLAN_FILE).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return unknown
    if not isinstance(plan, dict):
        return unknown
    jobs, swept, started = plan.get("jobs"), plan.get("swept"), plan.get("started")
    return {
        "jobs": jobs if isinstance(jobs, int) and not isinstance(jobs, bool) and jobs >= 0 else None,
        "swept": swept if isinstance(swept, list) and all(isinstance(k, str) for k in swept) else [],
        "started": float(started) if is_finite(started) else None,
    }


def append_progress(path: Path, make_line: Callable[[int], str]) -> str:
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
        log.info(f"sweep: {n if n is not None else 'an unknown number of'} jobs -> {sweep_dir}")

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        """One line: `[3/48 12s, ~2m left] model=linear data.deg=2 ...: ok train_mse=0.0001`."""
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        sweep_dir, out = Path(config.hydra.sweep.dir), Path(config.hydra.runtime.output_dir)
        plan = read_plan(sweep_dir)
        line = append_progress(sweep_dir / PROGRESS_FILE, lambda k: progress_line(k, plan, out, job_return))
        log.info(line)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Build the table and plots; exit non-zero with one line when jobs failed or a file could not be written."""
        sweep_dir = Path(config.hydra.sweep.dir)
        template = sweep_dir / ".submitit" / "%j"  # submitit makes its folder template itself, and leaves it empty
        if template.is_dir() and not any(template.iterdir()):
            template.rmdir()
        optuna = config.hydra.sweeper.get("n_trials") is not None
        try:
            # Optuna's job numbers are trial numbers, which pass n_trials - 1 when a kill left a trial unlaunched.
            jobs = None if optuna else read_plan(sweep_dir)["jobs"]
            if optuna and (sweep_dir / "optimization_results.yaml").exists() and not job_dirs(sweep_dir, jobs):
                log.info(f"sweep: the shared study was already full; no trial ran in {sweep_dir}")
                return
            if not sweep_dir.is_dir() or not job_dirs(sweep_dir, jobs):
                raise SweepFailedError(f"error: sweep {sweep_dir}: no job dirs: no job left a result")
            rows, problems = summarize(sweep_dir, jobs)
        except Exception as err:  # Hydra would turn it into a warning and exit 0: the sweep would seem fine
            raise SweepFailedError(f"error: sweep {sweep_dir}: no results table: {reason(err)}") from err
        summary, error = report(sweep_dir, rows, problems)
        log.info(f"sweep: {summary}")
        if error:
            raise SweepFailedError(f"error: {error}")


def duration(seconds: float) -> str:
    """`45s`, `2m05s`, `25m`, `1h05m`."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 3600:
        return f"{round(s / 60)}m"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def timing(k: int, total: int | None, started: float | None, now: float) -> str:
    """` 12s, ~2m left`: time since the sweep started and, from the pace so far, an estimate of what is left."""
    if started is None:
        return ""
    elapsed = now - started
    left = f", ~{duration(elapsed / k * (total - k))} left" if total and k < total else ""
    return f" {duration(elapsed)}{left}"


def job_outcome(out: Path, plan: dict[str, Any], job_return: JobReturn) -> tuple[str, Any, bool]:
    """The job's status text, its train MSE and whether it finished before this sweep started (resume)."""
    if job_return.status == JobStatus.FAILED:
        try:
            _ = job_return.return_value  # re-raises what the job raised
        except Exception as err:
            return f"failed ({reason(err)})", None, False
    try:
        row = job_row(out)
    except OSError as err:
        return f"unknown ({reason(err)})", None, False
    status = row["status"]
    if row["error"] and status != "missing":
        status = f"{status} ({row['error']})"
    started = plan.get("started")
    try:
        resumed = started is not None and (out / "metrics.json").stat().st_mtime < started
    except OSError:
        resumed = False
    return status, row["train_mse"], resumed


def progress_line(k: int, plan: dict[str, Any], out: Path, job_return: JobReturn, now: float | None = None) -> str:
    """The progress line of the k-th finished job: `[3/48 12s, ~2m left] model=linear: ok train_mse=0.0001`."""
    swept = set(plan.get("swept") or [])
    given = job_return.overrides or []
    overrides = [o for o in given if override_key(o) in swept] or identity_overrides(given) or ["defaults"]
    status, mse, resumed = job_outcome(out, plan, job_return)
    mse_text = f"{mse:.6g}" if is_finite(mse) else "n/a"
    total = plan.get("jobs")
    clock = timing(k, total, plan.get("started"), time.time() if now is None else now)
    return (
        f"[{k}/{total or '?'}{clock}] {' '.join(overrides)}: {status} train_mse={mse_text}"
        f"{' (done before)' if resumed else ''}"
    )


if __name__ == "__main__":
    sys.exit(main())
