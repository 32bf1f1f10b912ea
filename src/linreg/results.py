"""A sweep as one result: a row per job dir in results.csv and results.md, and the plots of `linreg.plots`.

`SweepResults`, a Hydra callback, prints a line per finished job (jobs in other processes share the plan and
progress files) and writes them when the sweep ends; `python -m linreg.results DIR` rebuilds them.
"""

import argparse
import contextlib
import csv
import fcntl
import functools
import io
import itertools
import json
import logging
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from linreg.config import ConfigError, first_line, full_error, is_int, override_key, refuse
from linreg.record import (
    FINISHED,
    CorruptRecord,
    RunRecord,
    finished,
    identity,
    is_locked,
    is_number,
    read_file,
    read_or_none,
    sweep_dir_of,
    write_atomic,
    write_json,
)

log = logging.getLogger(__name__)
COLUMNS = (  # a row: the job, its record's fields (data as deg, delta and bias), its gap to the floor, where
    "job model deg delta bias lr batch_size accelerator seed epochs status train_mse ols_mse gap weights true_weights"
    " steps fit_seconds diverged_epoch pruned_epoch error overrides dir"
).split()
MD_COLUMNS = "job model deg delta lr batch_size status train_mse ols_mse gap weights steps".split()
MAX_JOBS = 1_000_000  # the most jobs a sweep plan may claim (a planted count past it would fill the memory)
PLAN, PROGRESS, PLOTS = ".sweep-plan.json", "progress.log", ("mse.png", "weights.png")
STATUSES = ("ok", "diverged", "pruned", "failed", "missing", "corrupt")
VERBS = {"failed": "failed", "missing": "did not finish", "corrupt": "left a corrupt record"}  # no result
ROW_FILES = (".hydra/overrides.yaml", ".hydra/config.yaml", "metrics.json")  # with the job dir: what a row reads


def one_line(text: Any) -> str:
    """A message on one line (a traceback or multi-line error collapses)."""
    return " ".join(str(text).split())


def job_dirs(sweep_dir: Path, jobs: int | None = None) -> list[Path]:
    """The sweep's job dirs in job-number order; with `jobs` (a grid's count), its numbers 0..jobs-1, run or not."""
    signs = (".hydra", "metrics.json", ".lock")  # Hydra's record, a run's, or a group killed early: its run-dir lock
    found = [p for p in sweep_dir.iterdir() if p.is_dir() and any(os.path.lexists(p / n) for n in signs)]
    if jobs is not None and all(p.name.isdigit() for p in found):
        found = [sweep_dir / str(i) for i in range(jobs)]  # not a larger earlier grid's; one not started: missing
    return sorted(found, key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name))


def job_row(job_dir: Path) -> dict[str, Any]:
    """A job dir as a row: its record, gap and overrides less `resume`; else `missing`, or `corrupt` with why."""
    stamp = (stamp_of(job_dir), *(stamp_of(job_dir / name) for name in ROW_FILES))  # a changed file is read again
    return dict(read_row(job_dir, os.path.abspath(job_dir), stamp))  # a sweep's progress lines read them first


def stamp_of(path: Path) -> tuple[int, ...] | None:
    """What tells a file's content changed (atomic writes make a new inode), or None when it is not there."""
    try:
        s = os.lstat(path)
    except OSError:
        return None
    return s.st_ino, s.st_mode, s.st_size, s.st_mtime_ns, s.st_ctime_ns


@functools.lru_cache(maxsize=20_000)  # rows kept, ~2 KB each
def read_row(job_dir: Path, where: str, stamp: tuple[Any, ...]) -> dict[str, Any]:
    """`job_row`, read from the job's files (`stamp`: what says they are the ones read before)."""
    row = dict.fromkeys(COLUMNS) | {"job": job_dir.name, "overrides": [], "dir": where}
    hydra = job_dir / ".hydra"
    try:
        if job_dir.is_symlink():  # another dir's run, wherever it is, is not this job's
            raise CorruptRecord("the job dir is a link")
        overrides = read_file(hydra / "overrides.yaml") if os.path.lexists(hydra / "overrides.yaml") else []
        if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
            raise CorruptRecord("overrides.yaml: not a list of overrides")
        row["overrides"] = [o for o in overrides if override_key(o) != "resume"]
        config = read_file(hydra / "config.yaml") if os.path.lexists(hydra / "config.yaml") else {}
        if not isinstance(config, dict):
            raise CorruptRecord("config.yaml: not a mapping")
        if os.path.lexists(job_dir / "metrics.json"):
            record = RunRecord.read(job_dir)
            # A config without `${...}` is what its run computed, as saved (compared as text: NaN equals itself).
            same = json.dumps(identity(config), sort_keys=True) == json.dumps(record.config, sort_keys=True)
            if config and "${" not in json.dumps(config) and not same:
                raise CorruptRecord("metrics.json: not the run of this job's .hydra/config.yaml")
        else:
            record = RunRecord.of(config, "missing", error="no metrics.json")  # type: ignore[arg-type]  # a dict serves
        fields, data = record.as_json(), record.data or {}
        row.update({k: fields[k] for k in COLUMNS if k in fields}, gap=record.gap)
    except CorruptRecord as err:
        return row | {"status": "corrupt", "error": one_line(err)}
    row.update({k: data.get(k) for k in ("deg", "delta", "bias")}, error=record.error and one_line(record.error))
    return row


def swept_keys(rows: list[dict[str, Any]]) -> list[str]:
    """Override keys whose value differs between jobs (or that some lack), in the jobs' order."""
    given = [{override_key(o): o for o in r["overrides"]} for r in rows if r["overrides"]]
    keys = dict.fromkeys(k for job in given for k in job)
    return [k for k in keys if len({job.get(k) for job in given}) > 1]


def failures(rows: list[dict[str, Any]]) -> dict[str, dict[str, list[str]]]:
    """The jobs without a result by status (in VERBS' order), then by error: `{"failed": {"boom": ["3", "7"]}}`."""
    groups: dict[str, dict[str, list[str]]] = {s: {} for s in VERBS}
    for r in rows:
        if r["status"] in VERBS:
            groups[r["status"]].setdefault(r["error"] or "no error recorded", []).append(r["job"])
    return {s: errors for s, errors in groups.items() if errors}


def jobs_label(names: list[str], limit: int = 0) -> str:
    """`#3`, or `jobs 0-15, 17` (runs of numbers as spans; at most `limit` pieces)."""
    numbers = [int(j) for j in names if j.isdigit()]
    spans = [[n for _, n in g] for _, g in itertools.groupby(enumerate(numbers), lambda t: t[1] - t[0])]
    pieces = [f"{s[0]}-{s[-1]}" if len(s) > 1 else str(s[0]) for s in spans] + [j for j in names if not j.isdigit()]
    pieces = pieces[:limit] + [f"… ({len(names)} in all)"] if 0 < limit < len(pieces) else pieces
    return f"#{names[0]}" if len(names) == 1 else "jobs " + ", ".join(pieces)


def n_jobs(n: int | None) -> str:
    """`1 job`, `48 jobs`."""
    return f"{'an unknown number of' if n is None else n} job{'s' * (n != 1)}"


def counts(rows: list[dict[str, Any]]) -> str:
    """`48 jobs: 46 ok, 2 failed`."""
    found = [f"{n} {s}" for s in STATUSES if (n := sum(r["status"] == s for r in rows))]
    return f"{n_jobs(len(rows))}: {', '.join(found)}"


def cell(value: Any) -> str:
    """A Markdown table cell: floats at 4 significant digits, lists in brackets, `|` escaped."""
    if isinstance(value, list):
        return "[" + ", ".join(map(cell, value)) + "]"
    return "" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value).replace("|", "\\|")


def to_markdown(sweep_dir: Path, rows: list[dict[str, Any]], swept: list[str]) -> str:
    """The counts, each failure once with its jobs, the table (a column for each swept key it lacks), the plots."""
    lines = [f"# Sweep {sweep_dir.name}", "", f"{counts(rows)}.", ""]
    failed = [
        f"- **{s}** {jobs_label(js)}: {cell(e)}" for s, errors in failures(rows).items() for e, js in errors.items()
    ]
    lines += [*failed, ""] if failed else []
    extra = [k for k in swept if k.rpartition(".")[2] not in MD_COLUMNS]  # data.deg is deg, model.lr lr
    columns = [*MD_COLUMNS[:6], *extra, *MD_COLUMNS[6:]]  # e.g. seed, as typed, after the columns of settings
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        status = f"**{r['status']}**" if r["status"] in VERBS else r["status"]
        status += f" at epoch {r['pruned_epoch']}" if r["pruned_epoch"] else ""
        given = {override_key(o): cell(o.partition("=")[2]) for o in r["overrides"]}
        cells = {**given, **{k: cell(r[k]) for k in MD_COLUMNS}, "status": status}
        lines.append("| " + " | ".join(cells.get(k, "") for k in columns) + " |")
    return "\n".join([*lines, "", *(f"![{name}]({name})" for name in PLOTS)]) + "\n"


def to_csv(rows: list[dict[str, Any]]) -> str:
    """Every column at full precision (floats round-trip to metrics.json's), lists as JSON, None empty."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        plain = {k: json.dumps(v) if isinstance(v, (list, dict)) else "" if v is None else v for k, v in r.items()}
        writer.writerow(plain | {"overrides": " ".join(r["overrides"])})
    return buf.getvalue()


def summarize(sweep_dir: Path) -> tuple[str, str | None]:
    """Write results.csv, results.md and the plots; the summary line, and the error line (None if all is well)."""
    from linreg.plots import mse_figure, png, weights_figure

    plan = read_plan(sweep_dir)
    rows = [job_row(d) for d in job_dirs(sweep_dir, plan["jobs"] if plan["grid"] else None)]  # Optuna's: by trial
    if not rows:
        return "0 jobs", f"error: sweep {sweep_dir}: no job dirs: no job left a result"
    swept, clauses, where = plan["swept"] or swept_keys(rows), [], f" -> {sweep_dir / 'results.md'}"
    for name, make in {  # in this order: the table first, so that a plot failing cannot cost it
        "results.csv": lambda: to_csv(rows).encode(),
        "results.md": lambda: to_markdown(sweep_dir, rows, swept).encode(),
        "mse.png": lambda: png(mse_figure(rows, swept)),
        "weights.png": lambda: png(weights_figure(rows, swept)),
    }.items():
        try:
            write_atomic(sweep_dir / name, make())
        except Exception as err:  # a full disk, a read-only dir; a plot that cannot be drawn must not cost the rest
            verb = "cannot write" if isinstance(err, OSError) else "could not make"
            why = (isinstance(err, OSError) and err.strerror) or one_line(f"{type(err).__name__}: {err}")
            clauses.append(f"{verb} {sweep_dir / name}: {why}")
            where = "" if name == "results.md" else where  # not pointing to an older table
            with contextlib.suppress(OSError):
                (sweep_dir / name).unlink(missing_ok=True)  # an older file would pass for this sweep's
    for status, errors in failures(rows).items():  # `2 of 4 jobs failed: A (#1); B (#2)`, the first few errors
        named = [f"{e if len(e) <= 120 else e[:119] + '…'} ({jobs_label(js, 6)})" for e, js in errors.items()]
        named = named[:3] + [f"{len(named) - 3} more in results.md"] * (len(named) > 3)
        n = sum(map(len, errors.values()))
        clauses.append(f"{n} of {n_jobs(len(rows))} {VERBS[status]}: {'; '.join(named)}")
    return counts(rows) + where, f"error: sweep {sweep_dir}: {'; '.join(clauses)}" if clauses else None


def announce(sweep_dir: Path, jobs: int | None, done: int = 0) -> None:
    """A sweep's first line, `sweep: 48 jobs -> DIR`, once its sweeper has taken it; `done`: of them, run before."""
    if done:  # a resumed study's trials: its progress lines count on from them
        with contextlib.suppress(OSError):
            write_json(sweep_dir / PLAN, read_plan(sweep_dir) | {"done": done})
    log.info(f"sweep: {n_jobs(jobs)} -> {sweep_dir}")


def stopped(sweep_dir: Path, err: Exception | str) -> str:
    """The line a sweep ends with when it cannot go on (a write or its launcher failed, a SIGTERM): after the table."""
    with contextlib.suppress(Exception):
        log.info(f"sweep: {summarize(sweep_dir)[0]}")
    why = err if isinstance(err, str) else f"its launcher failed: {type(err).__name__}: {first_line(err)}"
    if isinstance(err, OSError):
        why = f"cannot write {err.filename or sweep_dir}: {err.strerror or err}"
    return f"error: sweep {sweep_dir}: stopped: {why}; once it can, resume=true goes on"


def launch_failed(sweep_dir: Path, err: Exception) -> NoReturn:
    """A launch that raised (a dead worker, a timeout, a full disk): the table and one line; refused if no job began."""
    if full_error() or isinstance(err, (HydraException, OmegaConfBaseException)):  # a job's config: Hydra says why
        raise err
    began = any(p.is_dir() for p in sweep_dir.iterdir())  # a job's dir (its log at least), submitit's folder
    if not isinstance(err, OSError) and not began:  # a setting the launcher refuses: nothing is left
        refuse(ConfigError("hydra.launcher", None, f"{type(err).__name__}: {first_line(err)}"))
    raise SystemExit(stopped(sweep_dir, err)) from None


def main(argv: list[str] | None = None) -> int:
    """`python -m linreg.results DIR`: rebuild a sweep's table and plots; 1 when jobs failed, 2 for no sweep dir."""
    parser = argparse.ArgumentParser(prog="python -m linreg.results", description=main.__doc__)
    parser.add_argument("sweep_dir", type=Path, help="a multirun dir, e.g. outputs/multirun/<time>")
    d = parser.parse_args(argv).sweep_dir
    try:
        why = "no such directory" if not d.exists() else "not a directory" if not d.is_dir() else None
        hydra = None if why else read_or_none(d / "multirun.yaml")  # Hydra's record of the sweep: train's has a model
        if not why and not ((d / PLAN).is_file() or (isinstance(hydra, dict) and "model" in hydra)):
            why = "not a training sweep's dir (no sweep plan, nor a multirun.yaml of linreg.train)"  # e.g. evaluate -m
        if not why and is_locked(d):  # the sweep writes its own table when it ends
            why = "a sweep is still running there (it holds .lock); its table is written when it ends"
    except OSError as err:
        why = f"cannot read: {err.strerror}"
    if why:
        print(f"error: {d}: {why}", file=sys.stderr)
        return 2
    summary, error = summarize(d)
    print(summary)
    if error:
        print(error, file=sys.stderr)
    return 1 if error else 0


def planned(config: DictConfig) -> dict[str, Any]:
    """The job count (None when the sweeper cannot tell it ahead), whether it numbers a grid, the swept keys."""
    sweeper = config.hydra.sweeper
    params = OmegaConf.to_container(sweeper.params, resolve=False) if sweeper.get("params") else {}
    typed = OmegaConf.to_container(config.hydra.overrides.task, resolve=False)  # as typed: `${...}` is each job's
    lines = [f"{k}={v}" for k, v in params.items()] + list(typed)  # type: ignore[union-attr, arg-type]
    loader = GlobalHydra.instance().config_loader() if GlobalHydra.instance().is_initialized() else None
    try:
        parsed = OverridesParser.create(loader).parse_overrides(lines)
    except Exception:  # what the sweeper refuses itself
        parsed = None
    final = {override_key(o.get_key_element()): o for o in parsed or []}  # the command line's value wins over params
    swept = list(params) if parsed is None else [k for k, o in final.items() if o.is_sweep_override()]
    if sweeper.get("n_trials") is not None:  # Optuna: a job per trial, numbered by trial
        return {"jobs": int(sweeper.n_trials), "grid": False, "swept": swept}
    jobs = None
    with contextlib.suppress(Exception):  # an interval, or a glob without Hydra's loader: progress shows k/?
        if parsed is not None:
            jobs = math.prod(len(list(o.sweep_string_iterator())) for o in final.values() if o.is_sweep_override())
    return {"jobs": jobs, "grid": jobs is not None, "swept": swept}


def read_plan(sweep_dir: Path) -> dict[str, Any]:
    """What `on_multirun_start` recorded; unknowns (None, no swept keys) when it is missing or untrusted."""
    plan = read_or_none(sweep_dir / PLAN)
    plan = plan if isinstance(plan, dict) else {}
    jobs, swept, started, done = plan.get("jobs"), plan.get("swept"), plan.get("started"), plan.get("done")
    return {
        "jobs": jobs if is_int(jobs) and 0 <= jobs <= MAX_JOBS else None,
        "done": done if is_int(done) and 0 <= done <= MAX_JOBS else 0,
        "grid": plan.get("grid") is True,
        "swept": swept if isinstance(swept, list) and all(isinstance(k, str) for k in swept) else [],
        "started": started if is_number(started) else None,
    }


def duration(seconds: float) -> str:
    """`45s`, `2m05s`, `25m`, `1h05m`."""
    s = max(0, round(seconds))
    if s < 600:
        return f"{s}s" if s < 60 else f"{s // 60}m{s % 60:02d}s"
    return f"{round(s / 60)}m" if s < 3600 else f"{s // 3600}h{s % 3600 // 60:02d}m"


def progress_line(
    k: int, plan: dict[str, Any], out: Path, ret: JobReturn, now: float | None = None, before: int = 0
) -> str:
    """The k-th finished job: `[3/48 12s, ~2m05s left] model=linear data.deg=2: ok train_mse=0.000101`."""
    given = [o for o in ret.overrides or [] if override_key(o) != "resume"]
    named = [o for o in given if override_key(o) in plan["swept"]] or given or ["defaults"]
    named = [re.sub(r"=(-?\d+\.\d{7,}(e-?\d+)?)$", lambda m: f"={float(m[1]):.6g}", o) for o in named]  # Optuna's lr
    row = job_row(out)
    status = row["status"] + (f" ({row['error']})" if row["error"] and row["status"] != "missing" else "")
    status += f" at epoch {row['pruned_epoch']}" if row["pruned_epoch"] else ""
    mse = row["train_mse"]
    with contextlib.suppress(Exception):  # the dir may hold another run than this job's config
        if row["status"] in FINISHED and ret.cfg is not None and finished(out, ret.cfg) is None:
            status, mse = "refused (its dir holds another run)", None
    if ret.status == JobStatus.FAILED:  # raised past the task function: Hydra holds the error
        try:
            _ = ret.return_value  # re-raises what the job raised
        except Exception as err:
            status, mse = f"failed ({one_line(f'{type(err).__name__}: {err}')})", None
    clock, total, resumed = "", plan["jobs"], False
    if (started := plan["started"]) is not None:
        elapsed = (time.time() if now is None else now) - started
        clock = f" {duration(elapsed)}"
        with contextlib.suppress(OSError):  # finished before this sweep started: a resumed sweep kept it
            resumed = (out / "metrics.json").stat().st_mtime < started
        ran = k - before - resumed  # the pace is of jobs run now (`before`: earlier lines kept by a resume)
        if total and ran >= 3 and k < total and elapsed >= 5:  # before that the pace says nothing of what is left
            clock += f", ~{duration(elapsed / ran * (total - k))} left"
    mse = f"{mse:.6g}" if is_number(mse) else "n/a"
    return f"[{k or '?'}/{total or '?'}{clock}] {' '.join(named)}: {status} train_mse={mse}{' (done before)' * resumed}"


class SweepResults(Callback):
    """Progress lines while a sweep runs; the table and plots when it ends; exit 1 when jobs failed."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Record the plan for the jobs, which may run in other processes."""
        sweep_dir = Path(config.hydra.sweep.dir)
        plan = planned(config) | {"started": time.time()}
        try:
            write_json(sweep_dir / PLAN, plan)
            write_atomic(sweep_dir / PROGRESS, b"")  # a resumed sweep counts from 1 again
        except OSError as err:  # Hydra would make it a warning and run the sweep without its progress file
            refuse(ConfigError("hydra.sweep.dir", str(sweep_dir), f"cannot write {err.filename}: {err.strerror}"))
        if not config.hydra.sweeper._target_.startswith("hydra_plugins.linreg_"):  # ours announce once they accept
            announce(sweep_dir, plan["jobs"])

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        """One progress line, in the sweep's console and its progress.log."""
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        sweep_dir, out = sweep_dir_of(config.hydra), Path(config.hydra.runtime.output_dir)
        plan, line = read_plan(sweep_dir), None
        try:
            with open(sweep_dir / PROGRESS, "a+") as f:
                fcntl.flock(f, fcntl.LOCK_EX)  # parallel jobs (joblib, submitit) append to one file; closing unlocks
                f.seek(0)
                lines = f.read().splitlines()
                before = plan["done"] + sum(line.endswith(" (done before)") for line in lines)
                line = progress_line(plan["done"] + len(lines) + 1, plan, out, job_return, before=before)
                f.write(line + "\n")
        except OSError:  # a full disk: the console still has the line (the sweep's end says what was not written)
            line = line or progress_line(0, plan, out, job_return)
        log.info(line)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Write the table and plots; exit 1 with one line when jobs failed or a file could not be written."""
        sweep_dir = Path(config.hydra.sweep.dir)
        with contextlib.suppress(OSError):
            (sweep_dir / ".submitit" / "%j").rmdir()  # submitit's folder template, which it leaves empty
        try:
            if (sweep_dir / "optimization_results.yaml").is_file() and not job_dirs(sweep_dir):
                log.info(f"sweep: the study was already full; no trial ran in {sweep_dir}")
                return
            summary, error = summarize(sweep_dir)
        except Exception as err:  # Hydra would make it a warning and exit 0: the sweep would look fine
            raise SystemExit(f"error: sweep {sweep_dir}: no results table: {type(err).__name__}: {err}") from err
        if "submitit" in str(OmegaConf.select(config, "hydra.launcher._target_")):  # jobs print to .submitit/
            with contextlib.suppress(OSError):
                for line in (sweep_dir / PROGRESS).read_text().splitlines():
                    log.info(line)
        log.info(f"sweep: {summary}")
        if error:
            raise SystemExit(error)  # Hydra lets a SystemExit through: exit 1 with this line


if __name__ == "__main__":
    sys.exit(main())
