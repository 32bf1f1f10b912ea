"""TensorBoard dashboards: the event files read back, and a real TensorBoard server over a sweep."""

import json
import math
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from linreg.dashboard import (
    HEADLINE_HPARAMS,
    HP_METRICS,
    BufferedTensorBoardLogger,
    fit_figure,
    param_names,
    run_label,
)
from linreg.run import run_callbacks
from tests.conftest import REPO, run_cli


def run(cfg) -> dict:
    """A run in its config's run dir; its metrics.json content."""
    from linreg.run import run as run_in

    return run_in(cfg, Path(cfg.hydra.run.dir)).as_json()


HPARAM_KEYS = {"model", "deg", "delta", "lr", "batch_size", "accelerator", "seed", "num_examples", "epochs"}


def event_dirs(root: Path) -> list[Path]:
    """Every folder under `root` that holds a TensorBoard event file (a run, to TensorBoard)."""
    return sorted({p.parent for p in root.rglob("events.out.tfevents.*")})


def accumulator(run_dir: Path) -> EventAccumulator:
    """All of a run's events loaded (no sampling)."""
    ea = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    ea.Reload()
    return ea


def session_hparams(ea: EventAccumulator) -> dict[str, object]:
    """The hyperparameters of a run's HParams session-start record."""
    content = ea.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    info = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    return {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind")) for k, v in info.hparams.items()}


@pytest.mark.parametrize(("model", "batches_per_call"), [("manual", 1), ("linear", 1), ("manual", 5)])
def test_event_file_holds_every_dashboard(make_cfg, tmp_path, model, batches_per_call):
    # 1000 samples / batch 10 = 100 SGD steps an epoch, 300 in all; sampled every 25 of them.
    cfg = make_cfg(f"model={model}", "model.log_every_sgd_steps=25", f"data.batches_per_call={batches_per_call}")
    metrics = run(cfg)
    (run_dir,) = event_dirs(tmp_path / "run" / "tensorboard")
    ea = accumulator(run_dir)
    tags = ea.Tags()
    assert {"train/mse", "train/loss", "params/w1", "params/w2", "params/b", *HP_METRICS} <= set(tags["scalars"])
    assert tags["images"] == ["train_end/fit"] and tags["graph"]
    # Time Series sorts tag groups by name and opens the first two: the curves, not the end results or the image.
    assert sorted({t.split("/")[0] for t in tags["scalars"] + tags["images"]}) == ["params", "train", "train_end"]

    def values(tag: str) -> list[float]:
        return [e.value for e in ea.Scalars(tag)]

    def steps(tag: str) -> list[int]:
        return [e.step for e in ea.Scalars(tag)]

    # One axis for every curve, SGD steps, whatever batches_per_call is.
    assert steps("train/mse") == [100, 200, 300] and values("train/mse")[-1] == pytest.approx(metrics["train_mse"])
    assert steps("train/loss") == list(range(0, 300, 25))  # the loss of steps 0, 25, ...
    for name in ("w1", "w2", "b"):
        assert steps(f"params/{name}") == list(range(0, 301, 25))  # the weights after 0, 25, ..., 300 steps
    ends = [values(f"params/{name}")[-1] for name in ("w1", "w2", "b")]
    assert ends == pytest.approx([2, -1, 1], abs=0.01)
    assert ends == pytest.approx(metrics["weights"])

    # HParams: real final values (not a -1 placeholder) and the same keys as every other job.
    assert steps("train_end/mse") == steps("train_end/ols_gap") == [300]  # once, at the end: a result, not a curve
    assert values("train_end/mse") == pytest.approx([metrics["train_mse"]])
    assert values("train_end/ols_gap") == pytest.approx([metrics["train_mse"] - metrics["ols_mse"]], abs=1e-9)
    assert "hp_metric" not in tags["scalars"]
    hparams = session_hparams(ea)
    assert set(hparams) == HPARAM_KEYS
    assert hparams["model"] == model and hparams["lr"] == pytest.approx(0.03) and hparams["deg"] == 1


def test_wide_weights_get_a_curve_each_and_csv_logs_them_too(make_cfg, tmp_path):
    run(make_cfg("data.w=[1,2,3,4,5]", "data.num_examples=100", "trainer.max_epochs=1", "logger=tensorboard_csv"))
    (run_dir,) = event_dirs(tmp_path / "run" / "tensorboard")
    params = sorted(t for t in accumulator(run_dir).Tags()["scalars"] if t.startswith("params/"))
    assert params == ["params/b", "params/w1", "params/w2", "params/w3", "params/w4"]
    header = (tmp_path / "run" / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/mse", "params/w4", "params/b", *HP_METRICS} <= set(header)


def test_deg2_fit_figure_is_an_image(make_cfg, tmp_path):
    run(make_cfg("experiment=deg2", "data.num_examples=200", "trainer.max_epochs=1"))
    (run_dir,) = event_dirs(tmp_path / "run" / "tensorboard")
    (image,) = accumulator(run_dir).Images("train_end/fit")
    assert image.encoded_image_string.startswith(b"\x89PNG") and image.width > image.height > 100


def test_scalars_are_held_until_a_save_and_kept_when_a_run_fails(tmp_path):
    logger = BufferedTensorBoardLogger(save_dir=str(tmp_path), name="tb", version="run", write_every_s=3600)
    logged_at = time.time()
    logger.log_metrics({"a": 1.0}, step=0)
    time.sleep(0.2)  # held a while before it is written
    logger.log_metrics({"a": 2.0, "b": 3.0}, step=5)
    assert event_dirs(tmp_path) == []  # nothing handed to TensorBoard's writer yet

    def scalars(tag: str) -> list[tuple[int, float]]:
        return [(e.step, e.value) for e in accumulator(tmp_path / "tb" / "run").Scalars(tag)]

    logger.save()  # each epoch's end
    assert scalars("a") == [(0, 1.0), (5, 2.0)] and scalars("b") == [(5, 3.0)]
    logger.log_metrics({"a": 4.0}, step=9)
    logger.log_metrics({"t": torch.tensor(2.5)}, step=9)  # a tensor, as Lightning's self.log may pass one
    with pytest.raises(ValueError, match="b='x'"):
        logger.log_metrics({"b": "x"}, step=9)  # refused at the call that logs it: the rest is kept
    logger.finalize("failed")  # Lightning's call when fit raises
    assert scalars("a") == [(0, 1.0), (5, 2.0), (9, 4.0)] and scalars("t") == [(9, 2.5)]
    # A point keeps the wall time it was logged at, not the time it was written (TensorBoard's Wall axis).
    assert accumulator(tmp_path / "tb" / "run").Scalars("a")[0].wall_time - logged_at < 0.1

    live = BufferedTensorBoardLogger(save_dir=str(tmp_path), name="tb", version="live", write_every_s=0)
    live.log_metrics({"a": 1.0}, step=0)  # write_every_s has passed: saved to the event file at once
    assert [(e.step, e.value) for e in accumulator(tmp_path / "tb" / "live").Scalars("a")] == [(0, 1.0)]
    live.finalize("success")
    live.log_metrics({"a": 2.0, "b": 3.0}, step=1)  # after a finalize (a fit, then a test with the same logger)
    live.finalize("success")
    assert [(e.step, e.value) for e in accumulator(tmp_path / "tb" / "live").Scalars("b")] == [(1, 3.0)]


def test_a_prefix_names_the_tags_as_lightnings_logger_does(tmp_path):
    logger = BufferedTensorBoardLogger(save_dir=str(tmp_path), name="tb", version="p", prefix="fold1")
    logger.log_metrics({"a": 1.0}, step=0)
    logger.finalize("success")
    assert accumulator(tmp_path / "tb" / "p").Tags()["scalars"] == ["fold1-a"]


def fit_data(seed: int, scale: float, diverged: bool = False) -> tuple[torch.Tensor, ...]:
    """Features with a ones column, labels and predictions for a fit figure."""
    g = torch.Generator().manual_seed(seed)
    x = torch.cat((torch.randn(300, 2, generator=g) * scale, torch.ones(300, 1)), 1)
    y = x[:, 0] ** 2 + torch.randn(300, generator=g)
    y_hat = torch.full((300,), torch.nan) if diverged else x[:, 0] * 0.5
    return x, y, y_hat


def fit_pixels(x: torch.Tensor, y: torch.Tensor, y_hat: torch.Tensor, mse: float) -> np.ndarray:
    """The fit figure as RGB pixels, drawn as TensorBoard's add_figure draws it."""
    canvas = FigureCanvasAgg(fit_figure(x, y, y_hat, mse))
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3]


def test_the_fit_figure_shows_the_data_and_a_diverged_fit_draws_no_points():
    fitted = fit_pixels(*fit_data(1, 1.0), mse=0.5)
    assert fitted.dtype == np.uint8 and fitted.shape[2] == 3 and fitted.shape[1] > fitted.shape[0] > 100
    assert not np.array_equal(fitted, fit_pixels(*fit_data(2, 10.0), mse=0.5))  # other data, another picture
    diverged = fit_pixels(*fit_data(4, 1.0, diverged=True), mse=float("nan"))
    assert diverged.shape == fitted.shape


def test_no_logger_means_no_dashboard_cost(make_cfg, tmp_path):
    from linreg.dashboard import Dashboard

    def dashboards(*overrides: str) -> int:
        callbacks = run_callbacks(make_cfg(*overrides), tmp_path, progress=False, in_sweep=False, bar=False)
        return sum(isinstance(c, Dashboard) for c in callbacks)

    assert dashboards("~logger") == dashboards("logger.tensorboard=null") == 0
    assert dashboards("logger=csv") == 1


def test_graph_and_fit_image_can_be_turned_off(make_cfg, tmp_path):
    run(make_cfg("data.num_examples=100", "trainer.max_epochs=1", "logger.tensorboard.fit_figure=false",
                 "logger.tensorboard.log_graph=false"))  # fmt: skip
    (run_dir,) = event_dirs(tmp_path / "run" / "tensorboard")
    tags = accumulator(run_dir).Tags()
    assert tags["images"] == [] and not tags["graph"] and "train/mse" in tags["scalars"]


def test_a_logger_of_your_own_is_a_target(make_cfg, tmp_path):
    # Lightning's own TensorBoardLogger in place of ours: a config value, no code (no fit image: ours draws it).
    run(make_cfg("data.num_examples=100", "trainer.max_epochs=1", "logger=tensorboard_csv",
                 "logger.tensorboard._target_=lightning.pytorch.loggers.TensorBoardLogger",
                 "~logger.tensorboard.fit_figure", "~logger.tensorboard.write_every_s"))  # fmt: skip
    (run_dir,) = event_dirs(tmp_path / "run" / "tensorboard")
    tags = accumulator(run_dir).Tags()
    assert {"train/mse", "params/b", *HP_METRICS} <= set(tags["scalars"]) and tags["graph"] and tags["images"] == []
    assert (tmp_path / "run" / "csv" / "metrics.csv").exists()


def test_run_labels_are_one_path_part_and_ignore_resume():
    assert run_label(["model=linear", "data.deg=2"]) == "data.deg=2,model=linear"
    assert run_label(["model=linear", "resume=true", "logger=tensorboard_csv"]) == "model=linear"
    assert run_label(["model=linear", "logger.tensorboard.write_every_s=5"]) == "model=linear"  # a resume may change it
    assert "/" not in run_label(["data.w=[1,2]", "+note=a/b c"]) and run_label([]) == "defaults"
    assert len(run_label([f"k{i}=value{i}" for i in range(100)])) <= 120
    # in a sweep, what every job shares names no run
    label = run_label(["sweep=smoke", "model=linear", "model.lr=0.1"], ["model", "model.lr"])
    assert label == "model.lr=0.1,model=linear"


def test_param_names_follow_the_tutorial_order():
    assert param_names(3, bias=True) == ["w1", "w2", "b"]
    assert param_names(2, bias=False) == ["w1", "w2"]


# --- a real TensorBoard server over a real 4-job sweep ----------------------------------------------

SWEEP = ["model=manual,linear", "data.deg=1,2", "data.num_examples=200", "trainer.max_epochs=2"]


def free_port() -> int:
    """A port nothing listens on right now (127.0.0.1)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url: str, body: dict | None = None) -> object:
    """GET (or POST `body` as JSON) and decode the JSON answer."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory) -> Path:
    """A 4-job sweep (manual/linear x deg 1/2), as a user runs it."""
    out = tmp_path_factory.mktemp("dashboard") / "sweep"
    proc = run_cli("-m", "linreg.train", "-m", f"hydra.sweep.dir={out}", *SWEEP)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def tensorboard_url(sweep_dir: Path) -> Iterator[str]:
    """`tensorboard --logdir <sweep>` on 127.0.0.1, answering with all 4 runs; stopped by its pid."""
    port = free_port()
    exe = REPO / ".venv" / "bin" / "tensorboard"
    cmd = [str(exe), "--logdir", str(sweep_dir), "--host", "127.0.0.1", "--port", str(port), "--reload_interval", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            try:
                if len(http_json(f"{url}/data/runs")) == 4:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "tensorboard did not list the 4 runs in 120 s"
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # its own session: the server and nothing else
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.system
def test_tensorboard_server_shows_every_job(sweep_dir, tensorboard_url):
    runs = http_json(f"{tensorboard_url}/data/runs")
    # One run per job, named by the job's number and overrides, directly under the sweep dir.
    assert sorted(r.split("/")[0] for r in runs) == ["0", "1", "2", "3"]
    assert all(r.startswith(f"{r.split('/')[0]}/tensorboard/") and "model=" in r and "data.deg=" in r for r in runs)
    assert not any("num_examples" in r for r in runs)  # shared by every job: it names none

    scalars = http_json(f"{tensorboard_url}/data/plugin/scalars/tags")
    graphs = http_json(f"{tensorboard_url}/data/plugin/graphs/info")
    images = http_json(f"{tensorboard_url}/data/plugin/images/tags")
    for r in runs:
        assert {"train/mse", "train/loss", "params/w1", "params/w2", "params/b"} <= scalars[r].keys()
        assert graphs[r]["run_graph"], r
        assert not images.get(r)  # no per-job fit image in a sweep: its plots answer it


@pytest.mark.system
def test_tensorboard_hparams_table_has_real_metrics_for_every_job(tensorboard_url):
    experiment = http_json(f"{tensorboard_url}/data/plugin/hparams/experiment", {"experimentName": ""})
    assert {h["name"] for h in experiment["hparamInfos"]} == HPARAM_KEYS
    # The table opens on its first five columns: the headline ones (model, deg, delta, lr, batch_size).
    assert {h["name"] for h in experiment["hparamInfos"][:5]} == set(HEADLINE_HPARAMS)
    assert {m["name"]["tag"] for m in experiment["metricInfos"]} == set(HP_METRICS)

    cols = [{"hparam": k, "includeInResult": True} for k in sorted(HPARAM_KEYS)]
    cols += [{"metric": {"tag": t, "group": ""}, "includeInResult": True} for t in HP_METRICS]
    request = {"experimentName": "", "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS"], "colParams": cols}
    groups = http_json(f"{tensorboard_url}/data/plugin/hparams/session_groups", {**request, "sliceSize": 100})
    sessions = groups["sessionGroups"]
    assert len(sessions) == 4
    seen = set()
    for group in sessions:
        assert set(group["hparams"]) == HPARAM_KEYS
        seen.add((group["hparams"]["model"], group["hparams"]["deg"]))
        values = {m["name"]["tag"]: m["value"] for m in group["metricValues"]}
        assert set(values) == set(HP_METRICS) and all(math.isfinite(v) for v in values.values())
        assert 0 <= values["train_end/ols_gap"] < values["train_end/mse"]
        # deg=2 is the tutorial's lesson: a linear model stays far above zero error.
        assert (values["train_end/mse"] > 5) == (group["hparams"]["deg"] == 2)
    assert seen == {("manual", 1), ("manual", 2), ("linear", 1), ("linear", 2)}


def test_every_epoch_has_a_loss_point_whatever_the_batch_size(make_cfg, tmp_path):
    # batch 100 of 1000 samples: 10 SGD steps an epoch, fewer than the 50 between samples
    run(make_cfg("data.batch_size=100", "trainer.max_epochs=3"))
    (run_dir,) = event_dirs(tmp_path / "run" / "tensorboard")
    assert [e.step for e in accumulator(run_dir).Scalars("train/loss")] == [0, 10, 20]
