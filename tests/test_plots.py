"""plots.py on hand-made result rows: what goes on which axis, which panels, what is marked, what stays inside."""

import io
import itertools

import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from PIL import Image

from linreg.plots import GAP_FLOOR, MAX_PANELS, layout, mse_figure, png, weights_figure
from linreg.results import COLUMNS

TUTORIAL = {  # conf/sweep/tutorial.yaml, in its order
    "model": ["manual", "linear"],
    "data.deg": [1, 2],
    "data.delta": [0.01, 2],
    "model.lr": [0.003, 0.03, 0.1],
    "data.batch_size": [10, 100],
}


def row(job: int, status: str = "ok", gap: float = 0.01, **values) -> dict:
    """A results row: `values` by override key (`model.lr`), the floor 1 + delta², train MSE floor + gap."""
    values = {k.replace("__", "."): v for k, v in values.items()}
    r = dict.fromkeys(COLUMNS) | {
        "job": str(job),
        "status": status,
        "overrides": [f"{k}={v}" for k, v in values.items()],
    }
    r.update(deg=values.get("data.deg", 1), delta=values.get("data.delta", 0.01), bias=True, ols_mse=1.0)
    if status == "ok":
        r.update(gap=gap, train_mse=1 + gap, weights=[2.0 + gap, -1.0, 1.0], true_weights=[2.0, -1.0, 1.0])
    return r


def grid(values: dict[str, list]) -> list[dict]:
    """One ok row per combination, the gap growing with the job number."""
    combos = itertools.product(*values.values())
    return [
        row(i, gap=1e-3 * (i + 1), **{k.replace(".", "__"): v for k, v in zip(values, c)}) for i, c in enumerate(combos)
    ]


def panels(fig) -> list:
    return [ax for ax in fig.axes if ax.get_visible()]


def test_the_tutorial_grid_is_lr_by_batch_size_in_a_panel_per_model_deg_and_delta():
    rows = grid(TUTORIAL)
    assert layout(rows, list(TUTORIAL)) == ("model.lr", "data.batch_size", ["model", "data.deg", "data.delta"])
    fig = mse_figure(rows, list(TUTORIAL))
    axes = panels(fig)
    assert len(axes) == 8
    assert axes[0].get_title() == "model=manual, deg=1, delta=0.01\nfloor 1"
    assert axes[7].get_title().startswith("model=linear, deg=2, delta=2\n")
    assert axes[0].get_xscale() == "log" and axes[0].get_yscale() == "log"
    assert list(axes[0].get_xticks()) == [0.003, 0.03, 0.1]  # the swept values
    medians = [line for line in axes[0].lines if line.get_linestyle() == "-"]  # jobs 0-5: lr x batch size
    assert [list(line.get_ydata()) for line in medians] == [[1e-3, 3e-3, 5e-3], [2e-3, 4e-3, 6e-3]]
    assert [t.get_text() for t in fig.legends[0].get_texts()][:2] == ["batch_size=10", "batch_size=100"]


def test_jobs_without_a_result_are_marked_along_the_top_and_tiny_gaps_drawn_at_the_clamp():
    rows = [row(0, gap=-1e-12, model__lr=0.03), row(1, "diverged", model__lr=100)]
    rows += [row(2, "failed", model__lr=0.1), row(3, "missing", model__lr=1), row(4, "corrupt")]
    rows += [row(5, "pruned", model__lr=0.01)]  # an Optuna trial its pruner stopped: marked as such, not a failure
    fig = mse_figure(rows, ["model.lr"])
    (ax,) = panels(fig)
    top = {line.get_marker(): list(line.get_xdata()) for line in ax.lines if line.get_marker() in ("x", "v", "s")}
    assert top == {"x": [100], "v": [0.01], "s": [0.1, 1]}
    legend = {h.get_marker(): t.get_text() for h, t in zip(fig.legends[0].legend_handles, fig.legends[0].get_texts())}
    assert legend["v"] == "pruned" and legend["s"] == "failed / missing / corrupt"
    assert [list(line.get_ydata()) for line in ax.lines if line.get_marker() == "o"] == [[GAP_FLOOR]]
    assert "1 jobs not drawn (their settings are unknown)" in mse_figure(rows, ["model.lr"]).get_suptitle()


def test_seeds_are_dots_around_one_median_not_lines_or_panels():
    rows = [row(i, gap=(i % 5 + 1) * 1e-3, seed=i % 5, model__lr=[0.01, 0.1][i // 5]) for i in range(10)]
    assert layout(rows, ["seed", "model.lr"]) == ("model.lr", None, [])
    (ax,) = panels(mse_figure(rows, ["seed", "model.lr"]))
    (dots,) = [line for line in ax.lines if line.get_marker() == "o"]
    (median,) = [line for line in ax.lines if line.get_linestyle() == "-"]
    assert len(dots.get_xdata()) == 10 and list(median.get_ydata()) == [3e-3, 3e-3]
    (ax,) = panels(fig := mse_figure(rows, ["seed"]))  # seeds alone: dots, no line from one draw to the next
    assert not [line for line in ax.lines if line.get_linestyle() == "-"]
    assert "jobs=None" not in [t.get_text() for t in fig.legends[0].get_texts()]


def test_panels_are_capped_and_the_title_says_so():
    rows = grid({"model.lr": [0.01, 0.1], "data.batch_size": [10, 100], "data.deg": list(range(1, 31))})
    fig = mse_figure(rows, ["model.lr", "data.batch_size", "data.deg"])
    assert len(panels(fig)) == MAX_PANELS and f"{MAX_PANELS} of 30 panels shown" in fig.get_suptitle()


def test_a_text_only_sweep_places_its_values_in_job_order():
    (ax,) = panels(mse_figure([row(0, model="manual"), row(1, model="linear")], ["model"]))
    assert [t.get_text() for t in ax.get_xticklabels()] == ["manual", "linear"] and ax.get_xscale() == "linear"


def test_weights_are_a_panel_per_coefficient_a_colour_per_data_setting_ok_jobs_only():
    rows = grid({"model.lr": [0.01, 0.1], "data.deg": [1, 2]}) + [row(9, "diverged", model__lr=0.1)]
    fig = weights_figure(rows, ["model.lr", "data.deg"])
    axes = panels(fig)
    assert [ax.get_title() for ax in axes] == ["w1", "w2", "b"]
    dots = [line for line in axes[0].lines if line.get_marker() == "o"]
    assert [len(line.get_xdata()) for line in dots] == [2, 2] and dots[0].get_color() != dots[1].get_color()
    assert [line.get_ydata()[0] for line in axes[0].lines if line.get_linestyle() == "--"] == [2.0]  # the true w1
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [
        "deg=1, delta=0.01",
        "deg=2, delta=0.01",
        "true value",
        "best job (smallest gap)",
    ]


def optuna(trials: int = 12) -> list[dict]:
    """An Optuna search's rows: lr sampled on a log scale, 4 batch sizes, one panel; job 5's gap the smallest."""
    return [
        row(i, gap=1e-3 if i == 5 else 0.1 + i / 100, model__lr=0.3 * 0.7**i, data__batch_size=[10, 20, 50, 100][i % 4])
        for i in range(trials)
    ]


def test_the_best_job_is_starred_on_both_plots():
    rows, swept = optuna(), ["model.lr", "data.batch_size"]
    (ax,) = panels(mse_figure(rows, swept))
    (star,) = [line for line in ax.lines if line.get_marker() == "*"]
    assert list(star.get_ydata()) == [1e-3] and star.get_xdata()[0] == pytest.approx(0.3 * 0.7**5, rel=0.2)
    for ax in panels(weights_figure(rows, swept)):  # at the best job's coefficients: w1 2.001, w2 -1, b 1
        (star,) = [line for line in ax.lines if line.get_marker() == "*"]
        assert star.get_ydata()[0] == {"w1": 2.001, "w2": -1.0, "b": 1.0}[ax.get_title()]


SWEEP_ROWS = {  # the tutorial grid, an Optuna search, a 300-job seed sweep
    "tutorial": (grid(TUTORIAL), list(TUTORIAL)),
    "optuna": (optuna(), ["model.lr", "data.batch_size"]),
    "seeds": ([row(i, gap=1 + i / 1000, seed=i) for i in range(300)], ["seed"]),
}


@pytest.mark.parametrize("figure", [mse_figure, weights_figure])
@pytest.mark.parametrize("sweep", SWEEP_ROWS)
def test_titles_legends_and_labels_stay_inside_the_figure(figure, sweep):
    fig = figure(*SWEEP_ROWS[sweep])
    FigureCanvasAgg(fig).draw()
    drawn, page = fig.get_tightbbox(), fig.bbox_inches  # everything drawn, in inches, against the page
    assert page.x0 <= drawn.x0 and drawn.x1 <= page.x1 and page.y0 <= drawn.y0 and drawn.y1 <= page.y1
    boxes = [fig.legends[0].get_window_extent(), *(ax.get_tightbbox() for ax in panels(fig))]  # each with its labels
    assert not [(a, b) for a, b in itertools.combinations(boxes, 2) if a.overlaps(b)]


@pytest.mark.parametrize("figure", [mse_figure, weights_figure])
def test_sampled_values_are_ticked_readably(figure):
    rows = [row(i, gap=0.1, model__lr=0.006051920355612678 * 1.37**i) for i in range(6)]  # an Optuna search's lr
    fig = figure(rows, ["model.lr"])
    FigureCanvasAgg(fig).draw()
    ax = panels(fig)[-1]
    lo, hi = ax.get_xlim()
    ticks = [t for t in ax.get_xticklabels() + ax.get_xticklabels(minor=True) if t.get_text()]
    ticks = [t for t in ticks if lo <= t.get_position()[0] <= hi]  # those drawn
    assert ticks and all(len(t.get_text().strip("$")) <= 12 for t in ticks)  # not 0.006051920355612678
    boxes = [t.get_window_extent() for t in ticks]
    assert not [(a, b) for a, b in itertools.combinations(boxes, 2) if a.overlaps(b)]


def test_nothing_finished_still_draws_a_png():
    data = png(mse_figure([row(0, "failed", model__lr="abc"), row(1, "corrupt")], ["model.lr"]))
    with Image.open(io.BytesIO(data)) as img:
        assert img.format == "PNG"
