"""plots.py on hand-made result rows: what goes on which axis, which panels, what is marked, what is left out."""

import io
import itertools
import json
import statistics

from PIL import Image

from linreg.plots import GAP_FLOOR, MAX_PANELS, draw_mse, draw_weights, layout, mse_figure
from linreg.results import COLUMNS
from tests.conftest import run_cli

TUTORIAL = {  # conf/sweep/tutorial.yaml, in its order
    "model": ["manual", "linear"],
    "data.deg": [1, 2],
    "data.delta": [0.01, 2],
    "model.lr": [0.003, 0.03, 0.1],
    "data.batch_size": [10, 100],
}
COLUMN = {"model": "model", "data.deg": "deg", "data.delta": "delta", "model.lr": "lr", "data.batch_size": "batch_size"}
COLUMN |= {"seed": "seed"}


def row(job: int, status: str = "ok", gap: float | None = 0.01, **values) -> dict:
    """A results row: `values` by override key (model.lr=...), the floor 1 + delta², train MSE floor + gap."""
    r = dict.fromkeys(COLUMNS)
    r.update(job=str(job), status=status, overrides=[f"{k}={v}" for k, v in values.items()])
    for key, value in values.items():
        r[COLUMN.get(key, "unused")] = value
    r.pop("unused", None)
    r["ols_mse"] = 1 + (r["delta"] or 0) ** 2
    if status == "ok":
        r.update(gap=gap, train_mse=r["ols_mse"] + gap, weights=[2.0, -1.0, 1.0], true_weights=[2, -1, 1])
    return r


def grid(values: dict[str, list], **fixed) -> list[dict]:
    """One ok row per combination, the gap growing with the job number."""
    combos = itertools.product(*values.values())
    return [row(i, gap=1e-3 * (i + 1), **dict(zip(values, c)), **fixed) for i, c in enumerate(combos)]


def data_lines(ax) -> list:
    return [line for line in ax.lines if line.get_transform() == ax.transData]


def top_markers(ax, marker: str) -> list:
    return [line for line in ax.lines if line.get_marker() == marker and line.get_transform() != ax.transData]


def test_the_tutorial_grid_is_lr_by_batch_size_in_a_panel_per_model_deg_and_delta():
    rows = grid(TUTORIAL)
    lay = layout(rows, list(TUTORIAL))
    assert (lay.x, lay.line, lay.panel_keys) == ("model.lr", "data.batch_size", ["model", "data.deg", "data.delta"])
    fig = draw_mse(rows, list(TUTORIAL))
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert len(axes) == 8
    assert axes[0].get_title() == "model=manual, deg=1, delta=0.01\nfloor 1, noise δ²=0.0001"
    assert axes[7].get_title().startswith("model=linear, deg=2, delta=2\n")
    assert axes[0].get_xscale() == "log" and axes[0].get_yscale() == "log"
    assert list(axes[0].get_xticks()) == [0.003, 0.03, 0.1]  # the swept values
    # One median line and one set of dots per batch size; the first panel holds jobs 0-5 (lr x batch size).
    medians = [line for line in data_lines(axes[0]) if line.get_linestyle() == "-"]
    assert [list(line.get_ydata()) for line in medians] == [[1e-3, 3e-3, 5e-3], [2e-3, 4e-3, 6e-3]]
    assert [line.get_label() for line in fig.legends[0].get_lines()][:2] == ["batch_size=10", "batch_size=100"]


def test_a_floor_far_above_the_noise_is_said_in_the_panel():
    rows = grid({"model.lr": [0.1, 0.3], "data.batch_size": [10, 100], "data.deg": [1, 2]}, **{"data.delta": 0.01})
    for r in rows:
        r["ols_mse"] = 1e-4 if r["deg"] == 1 else 10.04
    axes = draw_mse(rows, ["model.lr", "data.batch_size", "data.deg"]).axes
    notes = [[t.get_text() for t in ax.texts] for ax in axes]
    assert notes == [[], ["floor 100,400× the noise:\nno linear model fits this data"]]


def test_diverged_and_failed_jobs_are_marked_at_the_top_not_dropped():
    rows = [
        row(0, **{"model.lr": 0.03}),
        row(1, "diverged", **{"model.lr": 100}),
        row(2, "failed", **{"model.lr": 0.1}),
        row(3, "missing", **{"model.lr": 1}),
    ]
    (ax,) = draw_mse(rows, ["model.lr"]).axes
    assert [list(line.get_xdata()) for line in top_markers(ax, "x")] == [[100]]
    assert [list(line.get_xdata()) for line in top_markers(ax, "s")] == [[0.1, 1]]
    assert all(set(line.get_ydata()) == {0.95} for line in top_markers(ax, "x") + top_markers(ax, "s"))
    assert ax.get_ylim()[1] > 3 * 0.01  # headroom above the one dot, for the markers


def test_seeds_are_dots_around_one_median_not_lines_or_panels():
    rows = [row(i, gap=(i % 5 + 1) * 1e-3, **{"seed": i % 5, "model.lr": [0.01, 0.1][i // 5]}) for i in range(10)]
    lay = layout(rows, ["seed", "model.lr"])
    assert (lay.x, lay.line, lay.panel_keys) == ("model.lr", None, [])
    (ax,) = draw_mse(rows, ["seed", "model.lr"]).axes
    dots, median = [line for line in data_lines(ax) if line.get_marker() == "o"], data_lines(ax)[-1]
    assert len(dots[0].get_xdata()) == 10
    assert list(median.get_ydata()) == [statistics.median([1e-3, 2e-3, 3e-3, 4e-3, 5e-3])] * 2


def test_tiny_and_negative_gaps_are_drawn_at_the_clamp():
    rows = [row(0, gap=-1e-12, **{"model.lr": 0.1}), row(1, gap=0.0, **{"model.lr": 0.3})]
    (ax,) = draw_mse(rows, ["model.lr"]).axes
    assert list(data_lines(ax)[0].get_ydata()) == [GAP_FLOOR, GAP_FLOOR]


def test_panels_are_capped_and_the_title_says_the_table_has_the_rest():
    rows = grid({"model.lr": [0.01, 0.1], "data.batch_size": [10, 100], "data.deg": list(range(1, 31))})
    fig = draw_mse(rows, ["model.lr", "data.batch_size", "data.deg"])
    assert sum(ax.get_visible() for ax in fig.axes) == MAX_PANELS
    assert f"{MAX_PANELS} of 30 panels shown, results.md has every job" in fig.get_suptitle()


def test_jobs_without_their_settings_are_counted_not_drawn_in_a_panel_of_nones():
    rows = grid({"model.lr": [0.1, 0.3], "data.batch_size": [10, 100], "model": ["manual", "linear"]})
    rows.append({**dict.fromkeys(COLUMNS), "job": "8", "status": "missing", "overrides": []})
    fig = draw_mse(rows, ["model.lr", "data.batch_size", "model"])
    assert [ax.get_title().split("\n")[0] for ax in fig.axes if ax.get_visible()] == ["model=manual", "model=linear"]
    assert "1 jobs not drawn (no record of their settings)" in fig.get_suptitle()


def test_a_text_only_sweep_places_its_values_in_job_order():
    rows = [row(0, **{"model": "manual"}), row(1, **{"model": "linear"})]
    (ax,) = draw_mse(rows, ["model"]).axes
    assert [t.get_text() for t in ax.get_xticklabels()] == ["manual", "linear"]
    assert ax.get_xscale() == "linear"


def test_nothing_finished_still_draws_a_figure():
    rows = [row(0, "failed", **{"model.lr": "abc"}), row(1, "corrupt")]
    png = mse_figure(rows, ["model.lr"])
    with Image.open(io.BytesIO(png)) as img:
        assert img.format == "PNG"


def test_weights_plot_shows_only_ok_jobs():
    rows = [row(0, **{"model.lr": 0.1}), row(1, "diverged", **{"model.lr": 100})]
    rows[1].update(weights=[1e30, None, 3.0], true_weights=[2, -1, 1])
    (ax,) = draw_weights(rows).axes
    assert ax.get_title() == "coefficients of 1 ok jobs"
    assert max(ax.collections[0].get_offsets()[:, 1]) == 2.0


def test_the_cli_reads_the_swept_keys_from_the_sweep_plan(tmp_path):
    from tests.test_results import fake_job

    widths = []
    for order in (["model.lr", "data.batch_size", "data.deg"], ["data.batch_size", "data.deg", "model.lr"]):
        d = tmp_path / str(len(widths))
        for i, (lr, bs, deg) in enumerate(itertools.product([0.01, 0.1], [10, 100, 1000], [1, 2])):
            data = {"deg": deg, "delta": 0.01}
            fake_job(
                d, i, [f"model.lr={lr}", f"data.batch_size={bs}", f"data.deg={deg}"], lr=lr, batch_size=bs, data=data
            )
        (d / ".sweep-plan.json").write_text(json.dumps({"jobs": 12, "swept": order, "started": 0}))
        proc = run_cli("-m", "linreg.results", str(d))
        assert proc.returncode == 0, proc.stderr
        with Image.open(d / "mse.png") as img:
            widths.append(img.size[0])
    # Lines per the key after lr: batch size (a panel per deg, 2), else the last one, deg (a panel per batch size, 3).
    assert widths[1] > widths[0]
