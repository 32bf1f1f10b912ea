"""A sweep's plots as PNG bytes: mse.png (each job's gap to the least-squares floor) and weights.png."""

import io
import json
import math
import statistics
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import NullLocator

from linreg.config import override_key
from linreg.record import is_number, param_names

GAP_FLOOR = 1e-9  # gaps below this (float32 training against a float64 floor) are drawn at it: a log axis
MAX_PANELS = 24  # a 1,000-job sweep stays one readable figure; results.md lists every job
MAX_TICKS = 8  # swept values as the x ticks up to this many, matplotlib's own beyond
Row = dict[str, Any]
BEST = {"color": "k", "marker": "*", "mfc": "none", "ls": "", "ms": 10, "label": "best job (smallest gap)"}


def num(value: Any) -> float | None:
    """A finite number as a float, else None (text, bools, NaN, an integer past float's range)."""
    return float(value) if is_number(value) else None


def value_of(row: Row, key: str | None) -> Any:
    """The job's value of a swept key: its override's, else its table column's (lr for model.lr); number or text."""
    given = {override_key(o): o.partition("=")[2] for o in row["overrides"]}
    try:
        value = json.loads(given[key]) if key in given else row.get(label(key))
    except ValueError:
        value = given[key]
    return value if value is None or num(value) is not None else str(given.get(key, value))


def distinct(rows: list[Row], key: str | None) -> list[Any]:
    """The values `key` takes: numbers in order, then text in job order (as swept)."""
    seen = list(dict.fromkeys(v for r in rows if (v := value_of(r, key)) is not None))
    return sorted((v for v in seen if num(v) is not None), key=num) + [v for v in seen if num(v) is None]  # type: ignore


def best(rows: list[Row]) -> Row | None:
    """The ok job with the smallest gap to its floor (the first of equals), if any."""
    ok = [r for r in rows if r["status"] == "ok" and num(r["gap"]) is not None]
    return min(ok, key=lambda r: r["gap"], default=None)


def label(key: str | None) -> str:
    """A key's short name: `lr` for model.lr."""
    return key.rpartition(".")[2] if key else "jobs"


def layout(rows: list[Row], swept: list[str]) -> tuple[str, str | None, list[str]]:
    """x: lr if swept, else the first numeric swept key; lines: the key after it; panels: the rest."""
    keys = [k for k in dict.fromkeys(swept) if len(distinct(rows, k)) > 1]
    keys = [k for k in keys if k != "seed"] or keys  # seeds repeat a setting: dots around one median line
    numeric = [k for k in keys if all(num(v) is not None for v in distinct(rows, k))]
    x = "model.lr" if "model.lr" in numeric or not keys else (numeric or keys)[0]
    rest = [k for k in keys if k != x]
    line = ((keys[keys.index(x) + 1 :] if x in keys else []) or rest[-1:] or [None])[0]
    return x, line, [k for k in rest if k != line]


def figure(rows: list[Row], x: str, panels: int, ylabel: str, sharey: bool) -> tuple[Figure, list[Any], Any]:
    """`panels` panels in rows of 4, and `at(i, n)`: each x value's place for the i-th of n series (a rank for text)."""
    values = distinct(rows, x)
    numeric = all(num(v) is not None for v in values)
    pos = {v: num(v) if numeric else float(i) for i, v in enumerate(values)}
    log_x = numeric and bool(pos) and min(pos.values()) > 0 and max(pos.values()) >= 10 * min(pos.values())  # type: ignore
    cols = min(panels, 4)
    fig = Figure(figsize=(max(3.4 * cols, 7.5), 1.4 + 2.8 * math.ceil(panels / cols)), layout="constrained")
    axes = list(fig.subplots(math.ceil(panels / cols), cols, sharex=True, sharey=sharey, squeeze=False).flat)
    for j, ax in enumerate(axes):
        ax.set_visible(j < panels)
        ax.grid(True, alpha=0.3)
        ax.set_ylabel(ylabel if j % cols == 0 or not sharey else "")
        if panels - cols <= j < panels:  # no panel below: the x axis is labelled here
            ax.set_xlabel(label(x))
            ax.tick_params(labelbottom=True)
    if log_x:
        axes[0].set_xscale("log")
        axes[0].xaxis.set_major_formatter("{x:g}")  # 0.01, not 10^-2
    typed = all(num(v) is None or float(f"{num(v):.4g}") == num(v) for v in pos)  # a grid's, not sampled values
    if len(pos) <= MAX_TICKS and typed:  # else matplotlib's own ticks: sampled values would overprint
        axes[0].set_xticks(list(pos.values()), [str(v) for v in pos])  # type: ignore[arg-type]
        axes[0].xaxis.set_minor_locator(NullLocator())
    return fig, axes[:panels], lambda i, n: {v: p * 1.1 ** (i - (n - 1) / 2) if log_x else p for v, p in pos.items()}


def png(fig: Figure) -> bytes:
    """The figure as PNG bytes, drawn by Agg (no pyplot: no global state, nothing to close)."""
    buf = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf)
    return buf.getvalue()


def mse_figure(rows: list[Row], swept: list[str]) -> Figure:
    """The gap to the least-squares floor against the x key, a line per line value, a panel per other setting."""
    x, line, panel_keys = layout(rows, swept)
    placed = [r for r in rows if all(value_of(r, k) is not None for k in (x, line, *panel_keys) if k)]
    ranks = {k: {v: i for i, v in enumerate(distinct(placed, k))} for k in panel_keys}
    groups: dict[tuple[Any, ...], list[Row]] = {}
    for r in sorted(placed, key=lambda r: [ranks[k][value_of(r, k)] for k in panel_keys]):
        groups.setdefault(tuple(value_of(r, k) for k in panel_keys), []).append(r)
    shown = list(groups.items())[:MAX_PANELS] or [((), [])]
    lines = distinct(placed, line) or [None]
    fig, axes, at = figure(placed, x, len(shown), "train MSE − floor", True)
    ys = []
    for ax, (combo, panel) in zip(axes, shown):
        for i, value in enumerate(lines):
            ys += draw_jobs(ax, [r for r in panel if value_of(r, line) == value], at(i, len(lines)), x, f"C{i % 10}")
        if top := best(panel):
            pos = at(lines.index(value_of(top, line)), len(lines))[value_of(top, x)]
            ax.plot(pos, max(top["gap"], GAP_FLOOR), "*", color="k", mfc="none", ms=12)
        floors = [f for r in panel if (f := num(r["ols_mse"])) is not None]
        floor = statistics.median(floors) if floors else None
        if floor:
            ax.axhline(0.01 * floor, color="grey", ls="--", lw=1)
            ys.append(0.01 * floor)
        title = ", ".join(f"{label(k)}={v}" for k, v in zip(panel_keys, combo)) or "all jobs"
        ax.set_title(title + ("" if floor is None else f"\nfloor {floor:.4g}"), fontsize=9)
    if ys:  # headroom above the highest dot for the markers along the top
        axes[0].set_yscale("log")
        axes[0].yaxis.set_minor_locator(NullLocator())  # decades, plainly labelled: quicker to draw than 10^k
        axes[0].yaxis.set_major_formatter("{x:g}")
        axes[0].set_ylim(min(ys) / 3, max(ys) * 30)
    handles = [Line2D([], [], color=f"C{i % 10}", marker="o", label=f"{label(line)}={v}") for i, v in enumerate(lines)]
    handles = handles[:10] * (line is not None) + [
        Line2D([], [], **BEST),
        Line2D([], [], color="grey", ls="--", label="1% of the floor (below: at the floor)"),
        Line2D([], [], color="k", marker="x", ls="", label="diverged"),
        Line2D([], [], color="k", marker="s", mfc="none", ls="", label="failed / missing / corrupt"),
    ]
    if any(r["status"] == "pruned" for r in rows):  # an Optuna search's trials its pruner stopped: no failure
        handles.insert(-1, Line2D([], [], color="k", marker="v", mfc="none", ls="", label="pruned"))
    fig.legend(handles=handles, loc="outside lower center", ncols=4, fontsize=8, frameon=False)
    notes = [f"a dot a job, lines through the medians, gaps below {GAP_FLOOR:g} drawn at it"]
    notes += [f"{len(shown)} of {len(groups)} panels shown (results.md has every job)"] * (len(groups) > len(shown))
    notes += [f"{len(rows) - len(placed)} jobs not drawn (their settings are unknown)"] * (len(rows) > len(placed))
    by = f"{label(x)}" + (f" per {label(line)}" if line else "")
    fig.suptitle(f"{len(rows)} jobs: final train MSE above the least-squares floor, by {by}\n{'; '.join(notes)}")
    return fig


def draw_jobs(ax: Any, rows: list[Row], pos: dict[Any, float], x: str, colour: str) -> list[float]:
    """A dot per ok job, a line through the medians, a marker along the top per job without a gap; the gaps."""
    points: dict[float, list[float]] = {}
    marks: dict[str, list[float]] = {"x": [], "v": [], "s": []}  # diverged; pruned; failed, missing or corrupt
    for r in rows:
        if r["status"] == "ok" and (gap := num(r["gap"])) is not None:
            points.setdefault(pos[value_of(r, x)], []).append(max(gap, GAP_FLOOR))
        else:
            marks[{"diverged": "x", "pruned": "v"}.get(r["status"], "s")].append(pos[value_of(r, x)])
    for marker, xs in marks.items():  # x in data, y in axes fractions
        ax.plot(xs, [0.95] * len(xs), marker, color=colour, mfc="none", ls="", transform=ax.get_xaxis_transform())
    xs = sorted(points)
    ax.plot([p for p in xs for _ in points[p]], [g for p in xs for g in points[p]], "o", color=colour, ms=3, alpha=0.7)
    if x != "seed":  # seeds are draws of one setting: no trend to follow from one to the next
        ax.plot(xs, [statistics.median(points[p]) for p in xs], "-", color=colour, lw=1.5)
    return [g for gs in points.values() for g in gs]


def weights_figure(rows: list[Row], swept: list[str]) -> Figure:
    """The ok jobs' coefficients against the x key, a panel each with its true value dashed, a colour a data setting."""
    x = layout(rows, swept)[0]
    ok = [r for r in rows if r["status"] == "ok" and value_of(r, x) is not None and isinstance(r["weights"], list)]
    count = min(max((len(r["weights"]) for r in ok), default=1), MAX_PANELS)
    names = param_names(count, bool(ok) and all(r["bias"] is not False for r in ok))
    settings = list(dict.fromkeys(f"deg={r['deg']}, delta={r['delta']}" for r in ok))
    fig, axes, at = figure(ok, x, count, "learned coefficient", False)
    for j, ax in enumerate(axes):
        for i, setting in enumerate(settings):
            mine = [r for r in ok if f"deg={r['deg']}, delta={r['delta']}" == setting and j < len(r["weights"])]
            pts = [(at(i, len(settings))[value_of(r, x)], w) for r in mine if (w := num(r["weights"][j])) is not None]
            ax.plot([p for p, _ in pts], [w for _, w in pts], "o", color=f"C{i % 10}", ms=4, alpha=0.7)
            if (top := best(mine)) and (w := num(top["weights"][j])) is not None:
                ax.plot(at(i, len(settings))[value_of(top, x)], w, "*", color="k", mfc="none", ms=12)
        for truth in {num(t[j]) for r in ok if isinstance(t := r["true_weights"], list) and j < len(t)} - {None}:
            ax.axhline(truth, color="k", ls="--", lw=1)
        ax.set_title(names[j], fontsize=9)
    handles = [Line2D([], [], color=f"C{i % 10}", marker="o", ls="", label=s) for i, s in enumerate(settings)]
    handles += [Line2D([], [], color="k", ls="--", label="true value"), Line2D([], [], **BEST)]
    fig.legend(handles=handles, loc="outside lower center", ncols=4, fontsize=8, frameon=False)
    fig.suptitle(f"learned coefficients of {len(ok)} ok jobs, by {label(x)}")
    return fig
