"""A sweep's plots as PNG bytes: mse.png (each job's gap to the least-squares floor) and weights.png.

mse.png answers the sweep's question, "which settings reach the floor?": the gap against the learning rate
(or the first numeric swept key), one line per value of the next swept key (batch size), one panel per
combination of the other swept keys (model x deg x delta). Jobs without a result are marked, not dropped.
"""

import io
import itertools
import json
import math
import statistics
from dataclasses import dataclass
from typing import Any

from linreg.dashboard import override_key  # TEMP shim

GAP_FLOOR = 1e-9  # gaps below this (float32 training against a float64 floor) are drawn at it: log axis
MAX_PANELS = 24  # a 1,000-job sweep stays one readable figure; results.md lists every job
MAX_TICKS = 8  # swept values as x ticks up to this many, matplotlib's own ticks beyond
PANEL_COLUMNS = 4
MAX_LEGEND = 10  # line values named in the legend (the colours run small to large)
LEGEND_COLUMNS = 8
MIN_WIDTH = 8.5  # inches: room for the title and the legend over one or two panels
REPEATS = ("seed",)  # swept keys that repeat a setting rather than change it
# Override keys whose value is a column of the results table; other swept keys are read from the overrides.
COLUMN_OF = {
    "model": "model",
    "model._target_": "model",
    "data.deg": "deg",
    "data.delta": "delta",
    "model.lr": "lr",
    "data.batch_size": "batch_size",
    "trainer": "accelerator",
    "trainer.accelerator": "accelerator",
    "seed": "seed",
    "trainer.max_epochs": "epochs",
}


def pyplot() -> Any:
    """matplotlib.pyplot on the headless Agg backend (imported late: it takes a second)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a cluster node or in CI
    import matplotlib.pyplot as plt

    return plt


def png_bytes(fig: Any) -> bytes:
    """The figure as PNG bytes; the figure is closed."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    pyplot().close(fig)
    return buf.getvalue()


def as_float(value: Any) -> float | None:
    """A finite number as a float; None for anything else (None, strings, bools, NaN, ints beyond float range)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def parse_value(text: str) -> Any:
    """An override's value as the number it spells, else the text."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def value_of(row: dict[str, Any], key: str) -> Any:
    """The row's value for a swept override key: its table column, else (a job without a record) its override."""
    value = row[COLUMN_OF[key]] if key in COLUMN_OF else None
    if value is not None:
        return value
    for override in row["overrides"]:
        if override_key(override) == key:
            return parse_value(override.partition("=")[2])
    return None


def label_of(key: str) -> str:
    """A short axis name: the table's column name (`lr`) when there is one."""
    return COLUMN_OF.get(key, key)


def ident(value: Any) -> str:
    """A hashable name for any row value (lists, dicts, numbers and text alike)."""
    return json.dumps(value, sort_keys=True)


def distinct(rows: list[dict[str, Any]], key: str) -> list[Any]:
    """The values `key` takes in the rows (None aside): numbers in order, then text in job order (as swept)."""
    seen = {ident(v): v for r in rows if (v := value_of(r, key)) is not None}
    order = {k: i for i, k in enumerate(seen)}
    numbers = sorted((v for v in seen.values() if as_float(v) is not None), key=as_float)
    return numbers + sorted((v for v in seen.values() if as_float(v) is None), key=lambda v: order[ident(v)])


def is_numeric(rows: list[dict[str, Any]], key: str) -> bool:
    """Whether every value of `key` (None aside) is a finite number."""
    values = distinct(rows, key)
    return bool(values) and all(as_float(v) is not None for v in values)


@dataclass
class Layout:
    """What goes where in mse.png: the x key and its positions, the line key and its values, the panel keys."""

    x: str
    line: str | None
    panel_keys: list[str]
    positions: dict[str, float]  # ident(x value) -> x coordinate
    log_x: bool
    line_values: list[Any]
    numeric_lines: bool

    def colour(self, i: int) -> Any:
        """Line colours: a sequential map for numeric line values (small to large), distinct colours otherwise."""
        n = len(self.line_values)
        return pyplot().get_cmap("viridis")(0.85 * i / (n - 1)) if self.numeric_lines and n > 1 else f"C{i % 10}"

    def shifted(self, pos: float, i: int) -> float:
        """Line i's x position: the lines side by side around the value, not on top of each other."""
        n = len(self.line_values)
        offset = (i - (n - 1) / 2) / max(n - 1, 1)  # -0.5 .. 0.5
        if self.log_x:
            return pos * 1.15**offset
        span = max(self.positions.values(), default=1) - min(self.positions.values(), default=0)
        return pos + 0.1 * (span or 1) * offset


def x_positions(values: list[Any]) -> tuple[dict[str, float], bool]:
    """Where each x value sits (the number itself, or its rank when any is text), and whether the axis is log."""
    numbers = [as_float(v) for v in values]
    if values and all(n is not None for n in numbers):
        return dict(zip(map(ident, values), numbers)), min(numbers) > 0 and max(numbers) >= 10 * min(numbers)
    return {ident(v): float(i) for i, v in enumerate(values)}, False


def layout(rows: list[dict[str, Any]], swept: list[str]) -> Layout:
    """x: lr if swept, else the first numeric swept key; lines: the next swept key; panels: the rest."""
    varying = [k for k in dict.fromkeys(swept) if len(distinct(rows, k)) > 1]
    # Seeds repeat a setting: their jobs are the dots around one median line, not lines or panels of their own.
    keys = [k for k in varying if k not in REPEATS] or varying
    numeric = [k for k in keys if is_numeric(rows, k)]
    x = "model.lr" if "model.lr" in numeric or not keys else (numeric or keys)[0]
    rest = [k for k in keys if k != x]
    after = keys[keys.index(x) + 1 :] if x in keys else []
    line = (after or rest[-1:] or [None])[0]
    positions, log_x = x_positions(distinct(rows, x))
    return Layout(
        x=x,
        line=line,
        panel_keys=[k for k in rest if k != line],
        positions=positions,
        log_x=log_x,
        line_values=distinct(rows, line) if line else [None],
        numeric_lines=line is not None and is_numeric(rows, line),
    )


def placed(rows: list[dict[str, Any]], lay: Layout) -> list[dict[str, Any]]:
    """The rows with a value for every key of the layout (a job without a record may have none)."""
    keys = [lay.x, *([lay.line] if lay.line else []), *lay.panel_keys]
    return [r for r in rows if all(value_of(r, k) is not None for k in keys)]


def panels(rows: list[dict[str, Any]], keys: list[str]) -> dict[tuple[Any, ...], list[dict[str, Any]]]:
    """Rows grouped by their values of the panel keys, in the keys' value order."""
    ranks = {k: {ident(v): i for i, v in enumerate(distinct(rows, k))} for k in keys}
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in sorted(rows, key=lambda r: [ranks[k][ident(value_of(r, k))] for k in keys]):
        groups.setdefault(tuple(value_of(r, k) for k in keys), []).append(r)
    return groups or {(): []}


def floor_and_noise(rows: list[dict[str, Any]]) -> tuple[float | None, float | None]:
    """A panel's least-squares floor (the median of its jobs') and its noise variance δ² (when one delta)."""
    floors = [f for r in rows if (f := as_float(r["ols_mse"])) is not None]
    deltas = {as_float(value_of(r, "data.delta")) for r in rows} - {None}
    delta = deltas.pop() if len(deltas) == 1 else None
    return (statistics.median(floors) if floors else None), (None if delta is None else delta**2)


def panel_title(keys: list[str], combo: tuple[Any, ...], rows: list[dict[str, Any]]) -> str:
    """`model=manual, deg=2, delta=0.01` and, below it, the panel's floor and noise level."""
    head = ", ".join(f"{label_of(k)}={v}" for k, v in zip(keys, combo)) or "all jobs"
    floor, noise = floor_and_noise(rows)
    if floor is None:
        return head
    return f"{head}\nfloor {floor:.4g}" + ("" if noise is None else f", noise δ²={noise:.4g}")


def misfit_note(ax: Any, rows: list[dict[str, Any]]) -> None:
    """Say so in the panel when its floor is well above the noise: no linear model fits that data."""
    floor, noise = floor_and_noise(rows)
    if floor is not None and noise and floor > 1.5 * noise:
        ratio = f"{floor / noise:,.0f}" if floor >= 10 * noise else f"{floor / noise:.2g}"
        text = f"floor {ratio}× the noise:\nno linear model fits this data"
        ax.text(0.03, 0.04, text, transform=ax.transAxes, fontsize=8, color="firebrick", va="bottom")


def draw_line(ax: Any, rows: list[dict[str, Any]], lay: Layout, i: int) -> None:
    """Line i of a panel: a dot per ok job, the median per x value, a marker at the top for each job without a gap."""
    colour = lay.colour(i)
    top = ax.get_xaxis_transform()  # x in data, y in axes fractions: the markers sit at the panel's top
    points: dict[float, list[float]] = {}
    marks: dict[str, list[float]] = {"x": [], "s": []}  # diverged; failed, missing or corrupt
    for r in rows:
        pos = lay.shifted(lay.positions[ident(value_of(r, lay.x))], i)
        gap = as_float(r["gap"])
        if r["status"] == "ok" and gap is not None:
            points.setdefault(pos, []).append(max(gap, GAP_FLOOR))
        else:
            marks["x" if r["status"] == "diverged" else "s"].append(pos)
    for marker, xs in marks.items():
        if xs:
            ax.plot(xs, [0.95] * len(xs), marker, ls="", mfc="none" if marker == "s" else colour, color=colour,
                    ms=6 if marker == "x" else 5, transform=top)  # fmt: skip
    xs = sorted(points)
    dots = [(p, g) for p in xs for g in points[p]]
    ax.plot([p for p, _ in dots], [g for _, g in dots], "o", color=colour, ms=3.5, alpha=0.7)
    ax.plot(xs, [statistics.median(points[p]) for p in xs], "-", color=colour, lw=1.5)


def draw_panel(ax: Any, combo: tuple[Any, ...], rows: list[dict[str, Any]], lay: Layout) -> None:
    """One panel: its lines, the 1%-of-the-floor reference, its title and, for misfit data, a note."""
    for i, value in enumerate(lay.line_values):
        mine = [r for r in rows if lay.line is None or ident(value_of(r, lay.line)) == ident(value)]
        draw_line(ax, mine, lay, i)
    floor, _ = floor_and_noise(rows)
    if floor:
        ax.axhline(0.01 * floor, color="grey", ls="--", lw=1)
    misfit_note(ax, rows)
    ax.set_title(panel_title(lay.panel_keys, combo, rows), fontsize=9, y=1.0)  # a fixed height: no tick measuring
    ax.grid(True, alpha=0.3)


def format_axes(axes: Any, lay: Layout, ys: list[float]) -> None:
    """Shared axes: log x for a wide numeric range, the swept values as ticks, log y in decades spanning `ys`."""
    from matplotlib.ticker import FormatStrFormatter, NullLocator

    ax0 = axes[0][0]
    if lay.log_x:
        ax0.set_xscale("log")
    if len(lay.positions) <= MAX_TICKS:
        labels = {p: str(json.loads(v)) for v, p in lay.positions.items()}
        ax0.set_xticks(list(labels), list(labels.values()))
        ax0.xaxis.set_minor_locator(NullLocator())
    if ys:
        ax0.set_yscale("log")
        # Decades only, plainly labelled: a log axis's minor ticks and 10^k mathtext labels are slow to draw.
        ax0.yaxis.set_minor_locator(NullLocator())
        ax0.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        decades = math.log10(max(ys) / min(ys))
        # Headroom above the highest dot for the no-result markers along the top.
        ax0.set_ylim(min(ys) / 10 ** max(0.3, 0.05 * decades), max(ys) * 10 ** max(0.6, 0.15 * decades))
    for ax in axes[-1]:
        ax.set_xlabel(label_of(lay.x))
    for row_axes in axes:
        row_axes[0].set_ylabel("train MSE − floor")


def y_values(shown: list[tuple[tuple[Any, ...], list[dict[str, Any]]]]) -> list[float]:
    """Every y the panels draw: the ok jobs' gaps (clamped) and each panel's 1%-of-the-floor line."""
    rows = [r for _, panel_rows in shown for r in panel_rows]
    gaps = [max(g, GAP_FLOOR) for r in rows if r["status"] == "ok" and (g := as_float(r["gap"])) is not None]
    floors = [0.01 * f for _, panel_rows in shown if (f := floor_and_noise(panel_rows)[0])]
    return gaps + floors if gaps else []


def legend_handles(lay: Layout) -> list[Any]:
    """A legend entry per line value (at most MAX_LEGEND, with the last), and the markers' meanings."""
    from matplotlib.lines import Line2D

    label = "jobs" if lay.line is None else label_of(lay.line)
    entries = list(enumerate(lay.line_values))
    if len(entries) > MAX_LEGEND:
        entries = [*entries[: MAX_LEGEND - 1], entries[-1]]
    handles = [
        Line2D([], [], color=lay.colour(i), marker="o", ms=4, label=label if v is None else f"{label}={v}")
        for i, v in entries
    ]
    return [
        *handles,
        Line2D([], [], color="grey", ls="--", lw=1, label="1% of the floor (below: at the floor)"),
        Line2D([], [], color="k", marker="x", ls="", label="diverged"),
        Line2D([], [], color="k", marker="s", mfc="none", ls="", label="failed / missing / corrupt"),
    ]


def figure_title(rows: list[dict[str, Any]], lay: Layout, shown: int, panels: int, unplaced: int) -> str:
    """What the figure shows, and what it leaves to the table."""
    by = f" per {label_of(lay.line)}" if lay.line else ""
    title = f"{len(rows)} jobs: final train MSE above the least-squares floor, by {label_of(lay.x)}{by}"
    notes = [f"a dot a job, lines through the medians, gaps < {GAP_FLOOR:g} drawn at {GAP_FLOOR:g}"]
    if shown < panels:
        notes.append(f"{shown} of {panels} panels shown, results.md has every job")
    if unplaced:
        notes.append(f"{unplaced} jobs not drawn (no record of their settings)")
    return f"{title}\n{'; '.join(notes)}"


def mse_figure(rows: list[dict[str, Any]], swept: list[str]) -> bytes:
    """mse.png (see `draw_mse`)."""
    return png_bytes(draw_mse(rows, swept))


def draw_mse(rows: list[dict[str, Any]], swept: list[str]) -> Any:
    """The gap to the least-squares floor against the x key, a line per line value, a panel per other setting."""
    lay = layout(rows, swept)
    drawn = placed(rows, lay)
    groups = panels(drawn, lay.panel_keys)
    shown = list(itertools.islice(groups.items(), MAX_PANELS))
    cols = min(len(shown), PANEL_COLUMNS)
    nrows = math.ceil(len(shown) / cols)
    handles = legend_handles(lay)
    legend_rows = math.ceil(len(handles) / LEGEND_COLUMNS)
    width, head = max(1.0 + 3.4 * cols, MIN_WIDTH), 1.0 + 0.2 * legend_rows
    height = head + 0.5 + 2.75 * nrows
    fig, axes = pyplot().subplots(nrows, cols, figsize=(width, height), sharex=True, sharey=True, squeeze=False)
    # Fixed margins: tight_layout measures every label of every panel (seconds for a 24-panel figure).
    fig.subplots_adjust(
        left=0.85 / width, right=1 - 0.15 / width, bottom=0.55 / height, top=1 - head / height, wspace=0.08, hspace=0.38
    )
    for ax, (combo, panel_rows) in zip(axes.flat, shown):
        draw_panel(ax, combo, panel_rows, lay)
    for ax in list(axes.flat)[len(shown) :]:
        ax.set_visible(False)
    format_axes(axes, lay, y_values(shown))
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 1 - 0.5 / height), ncol=LEGEND_COLUMNS,
               fontsize=8, frameon=False)  # fmt: skip
    fig.suptitle(
        figure_title(rows, lay, len(shown), len(groups), len(rows) - len(drawn)), fontsize=10, y=1 - 0.06 / height
    )
    return fig


def weights_figure(rows: list[dict[str, Any]]) -> bytes:
    """weights.png (see `draw_weights`)."""
    return png_bytes(draw_weights(rows))


def draw_weights(rows: list[dict[str, Any]]) -> Any:
    """Learned coefficients of the ok jobs against the true ones (the diagonal is a perfect fit), a colour a model."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    done = [r for r in rows if r["status"] == "ok" and isinstance(r["true_weights"], list)]
    pairs = {
        r["job"]: [
            (t, w)
            for t, w in zip(r["true_weights"], r["weights"])
            if as_float(t) is not None and as_float(w) is not None
        ]
        for r in done
    }
    models = sorted({str(r["model"]) for r in done})
    for i, model in enumerate(models):
        pts = [p for r in done if str(r["model"]) == model for p in pairs[r["job"]]]
        if pts:
            jitter = 0.04 * (i - (len(models) - 1) / 2)
            ax.scatter([t + jitter for t, _ in pts], [w for _, w in pts], alpha=0.6, label=model)
    truths = sorted({t for p in pairs.values() for t, _ in p})
    if truths:
        lo, hi = truths[0] - 0.5, truths[-1] + 0.5
        ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="learned = true")
        ax.legend()
    ax.set_xlabel("true coefficient")
    ax.set_ylabel("learned coefficient")
    ax.set_title(f"coefficients of {sum(1 for p in pairs.values() if p)} ok jobs", y=1.0)
    ax.grid(True, alpha=0.3)
    fig.subplots_adjust(left=0.14, right=0.97, bottom=0.11, top=0.93)
    return fig
