"""`run(cfg)` and the CLI: metrics.json, the tutorial's bands, presets, any number of features."""

import gc
import json
import os
import re
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path

import pytest
import torch

from linreg.data import RegressionDataModule
from linreg.record import model_name
from linreg.train import CONFIG_DIR, RunDirBusy, run
from tests.conftest import REPO, run_cli

METRIC_KEYS = {
    "status", "model", "seed", "data", "lr", "batch_size", "epochs", "accelerator", "epoch_mse", "train_mse",
    "weights", "true_weights", "ols_mse", "steps", "fit_seconds", "error",
}  # fmt: skip


@pytest.mark.parametrize("model", ["manual", "linear"])
def test_run_reproduces_the_tutorial_at_the_defaults(make_cfg, tmp_path, model):
    metrics = run(make_cfg(f"model={model}"))
    assert METRIC_KEYS <= metrics.keys()
    assert metrics["status"] == "ok" and metrics["error"] is None
    assert metrics["weights"] == pytest.approx([2, -1, 1], abs=0.01)
    assert metrics["true_weights"] == [2, -1, 1]
    assert len(metrics["epoch_mse"]) == 3 and metrics["train_mse"] == metrics["epoch_mse"][-1]
    assert 5e-5 < metrics["train_mse"] < 2e-4
    assert metrics["ols_mse"] <= metrics["train_mse"]
    assert metrics["steps"] == 300 and metrics["fit_seconds"] > 0
    on_disk = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert on_disk == metrics


@pytest.mark.parametrize(("experiment", "low", "high"), [("deg2", 9.9, 10.9), ("delta2", 3.9, 4.25)])
def test_the_limits_of_a_linear_model(make_cfg, experiment, low, high):
    metrics = run(make_cfg(f"experiment={experiment}"))
    assert low <= metrics["train_mse"] <= high
    assert metrics["ols_mse"] <= metrics["train_mse"]


def test_any_number_of_features(make_cfg):
    for model in ("manual", "linear"):
        metrics = run(make_cfg(f"model={model}", "data.w=[1.5,-2,0.5,3]", "trainer.max_epochs=5"))
        assert metrics["weights"] == pytest.approx([1.5, -2, 0.5, 3], abs=0.01)
    metrics = run(make_cfg("model=manual", "data.w=[1.5,-2]", "data.bias=false"))
    assert metrics["weights"] == pytest.approx([1.5, -2], abs=0.01)


# experiment preset -> (model, deg, delta): the tutorial's four experiments
PRESETS = {
    "tutorial_manual": ("manual", 1, 0.01),
    "tutorial_linear": ("linear", 1, 0.01),
    "deg2": ("linear", 2, 0.01),
    "delta2": ("linear", 1, 2),
}


@pytest.mark.parametrize("preset", sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("*.yaml")))
def test_every_experiment_preset_composes(make_cfg, preset):
    cfg = make_cfg(f"experiment={preset}")
    expected = PRESETS[preset]
    assert (model_name(cfg.model._target_), cfg.data.deg, cfg.data.delta) == expected
    assert (cfg.data.num_examples, cfg.data.batch_size, cfg.model.lr, cfg.trainer.max_epochs) == (1000, 10, 0.03, 3)


def test_the_cli_runs_end_to_end_and_writes_metrics(tmp_path):
    out = tmp_path / "cli"
    proc = run_cli("model=linear", "data.num_examples=200", "trainer.max_epochs=1", f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model"] == "linear" and metrics["epochs"] == 1 and metrics["steps"] == 20
    assert "linear: status=ok" in proc.stdout
    assert list((out / "tensorboard").rglob("events.out.tfevents.*"))


def test_reproduction_prints_the_table(tmp_path):
    proc = run_cli("-m", "linreg.reproduce", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    for name in ("tutorial_manual", "tutorial_linear", "deg2", "delta2"):
        row = next(line for line in lines if line.startswith(name))
        assert row.rstrip().endswith("yes")
    assert "10.1555" in proc.stdout and "4.0763" in proc.stdout
    assert len(list((tmp_path / "outputs" / "reproduce").glob("*/*/metrics.json"))) == 4
    # the table, a blank line and the two lines saying where the runs are: nothing else, on either stream
    assert len(lines) == 9 and proc.stderr == "", proc.stdout + proc.stderr
    hint = lines[-1].split()
    assert hint[0] == "Dashboard:" and Path(hint[1]).name == "tensorboard" and Path(hint[1]).exists()


def test_same_config_gives_bit_identical_numbers(make_cfg, tmp_path):
    a = run(make_cfg("model=linear", "data.num_examples=300", run_dir=tmp_path / "a"))
    b = run(make_cfg("model=linear", "data.num_examples=300", run_dir=tmp_path / "b"))
    a.pop("fit_seconds"), b.pop("fit_seconds")
    assert a == b  # exact equality: every float bit for bit


def test_finished_runs_leave_their_data_to_the_gc(make_cfg, tmp_path, monkeypatch):
    # A sweep's process runs job after job: nothing may keep a finished job's data (a Trainer/DataModule cycle).
    made: list[weakref.ref] = []
    setup = RegressionDataModule.setup

    def tracked_setup(self: RegressionDataModule, stage: str | None = None) -> None:
        if not any(ref() is self for ref in made):  # run() and Trainer.fit both call setup
            made.append(weakref.ref(self))
        setup(self, stage)

    monkeypatch.setattr(RegressionDataModule, "setup", tracked_setup)
    for i in range(3):
        run(make_cfg("data.num_examples=100", "trainer.max_epochs=1", run_dir=tmp_path / str(i)))
    gc.collect()
    assert len(made) == 3 and [ref() for ref in made] == [None, None, None]


def test_a_run_leaves_torchs_process_flags_as_it_found_them(make_cfg):
    # Deterministic mode is Lightning's (trainer.deterministic); nothing of the project's stays set after a run.
    torch.set_num_threads(2)
    run(make_cfg("data.num_examples=100", "trainer.max_epochs=1", "threads=1"))
    assert torch.get_num_threads() == 2  # the run's own thread count is restored
    assert torch.utils.deterministic.fill_uninitialized_memory is True
    assert torch.are_deterministic_algorithms_enabled()  # what Lightning's deterministic=True sets


def test_a_diverging_run_is_an_outcome_not_a_crash(make_cfg):
    metrics = run(make_cfg("model=linear", "model.lr=100", "data.num_examples=200"))
    assert metrics["status"] == "diverged" and metrics["diverged_epoch"] == 0
    assert metrics["train_mse"] is None and metrics["epoch_mse"] == [None]  # never a NaN reported as a result
    assert metrics["error"] is None


def test_resume_returns_a_finished_run_without_training(make_cfg, tmp_path):
    d = tmp_path / "run"
    first = run(make_cfg("data.num_examples=200", "trainer.max_epochs=1", run_dir=d))
    mtime = (d / "metrics.json").stat().st_mtime_ns
    again = run(make_cfg("data.num_examples=200", "trainer.max_epochs=1", "resume=true", run_dir=d))
    assert again == first and (d / "metrics.json").stat().st_mtime_ns == mtime
    # more epochs with resume=true: not finished, so it continues from the 1-epoch checkpoint
    more = run(make_cfg("data.num_examples=200", "trainer.max_epochs=2", "resume=true", run_dir=d))
    assert more["epochs"] == 2 and more["epoch_mse"][0] == first["epoch_mse"][0] and more["steps"] == 40


def test_resume_never_continues_a_checkpoint_of_another_config(make_cfg, tmp_path):
    d = tmp_path / "run"
    run(make_cfg("data.num_examples=200", "trainer.max_epochs=2", run_dir=d))
    (d / "metrics.json").unlink()  # as if killed after its last checkpoint
    before = {p: p.read_bytes() for p in (d / "checkpoints").iterdir()}
    with pytest.raises(RunDirBusy, match="checkpoint of another config"):
        run(make_cfg("data.num_examples=200", "trainer.max_epochs=2", "model.lr=0.001", "resume=true", run_dir=d))
    assert {p: p.read_bytes() for p in (d / "checkpoints").iterdir()} == before


def test_a_finished_run_is_never_trained_over(make_cfg, tmp_path):
    d = tmp_path / "run"
    run(make_cfg("data.num_examples=200", "trainer.max_epochs=2", run_dir=d))
    kept = (d / "metrics.json").read_bytes()
    with pytest.raises(RunDirBusy, match="holds a finished run"):
        run(make_cfg("data.num_examples=200", "trainer.max_epochs=2", "model.lr=0.1", run_dir=d))
    with pytest.raises(RunDirBusy, match="finished run of another config"):
        run(make_cfg("data.num_examples=200", "trainer.max_epochs=2", "model.lr=0.1", "resume=true", run_dir=d))
    assert (d / "metrics.json").read_bytes() == kept


def test_write_json_atomic_never_leaves_a_truncated_file(tmp_path, monkeypatch):
    from linreg import record as train

    path = tmp_path / "metrics.json"
    train.write_json_atomic(path, {"status": "ok", "train_mse": 1.0})

    def crash(self, data):
        with open(self, "wb") as f:
            f.write(data[:10])  # half the bytes, then the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_bytes", crash)
    with pytest.raises(KeyboardInterrupt):
        train.write_json_atomic(path, {"status": "ok", "train_mse": 2.0})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"status": "ok", "train_mse": 1.0}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temp file left either


def test_a_failed_write_leaves_no_temp_file(tmp_path):
    from linreg.record import write_atomic

    (tmp_path / "metrics.json").mkdir()  # the rename cannot replace a directory: as a full or read-only disk fails
    with pytest.raises(OSError):
        write_atomic(tmp_path / "metrics.json", b"{}")
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_sigkill_mid_run_then_resume_matches_an_uninterrupted_run(tmp_path):
    args = ["model=linear", "data.num_examples=10000", "trainer.max_epochs=3", "~logger"]
    whole = tmp_path / "whole"
    assert run_cli(*args, f"hydra.run.dir={whole}").returncode == 0
    expected = json.loads((whole / "metrics.json").read_text())

    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "linreg.train", *args, f"hydra.run.dir={killed}"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not (killed / "checkpoints" / "last.ckpt").exists() and proc.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (killed / "metrics.json").exists(), "the run finished before it could be killed"

    resumed = run_cli(*args, "resume=true", f"hydra.run.dir={killed}")
    assert resumed.returncode == 0, resumed.stderr
    got = json.loads((killed / "metrics.json").read_text())
    assert got["weights"] == pytest.approx(expected["weights"], abs=1e-6)
    assert got["epoch_mse"] == pytest.approx(expected["epoch_mse"], rel=1e-6)
    assert got["steps"] == expected["steps"] == 3 * 1000


def test_resuming_a_diverged_run_from_its_checkpoint_stays_diverged(make_cfg, tmp_path):
    args = ("model=linear", "model.lr=100", "data.num_examples=100", "trainer.max_epochs=3")
    first = run(make_cfg(*args, run_dir=tmp_path / "run"))
    (tmp_path / "run" / "metrics.json").unlink()  # only last.ckpt is left
    again = run(make_cfg(*args, "resume=true", run_dir=tmp_path / "run"))
    assert first["status"] == again["status"] == "diverged"
    assert again["diverged_epoch"] == first["diverged_epoch"] == 0 and again["steps"] == first["steps"] == 10


SMALL = ("data.num_examples=100", "trainer.max_epochs=1")


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The single `error: ...` line of a refused command (exit 2, no traceback)."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def test_a_diverging_run_exits_0_through_the_cli(tmp_path):
    proc = run_cli("model.lr=100", *SMALL, f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 0, proc.stderr
    assert "status=diverged" in proc.stdout and "diverged in epoch 1 of 1" in proc.stdout
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "diverged"


def test_a_single_run_prints_the_tutorials_epoch_lines_once(tmp_path):
    proc = run_cli("data.num_examples=200", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 0, proc.stderr
    lines = (proc.stdout + proc.stderr).splitlines()
    epochs = [line for line in lines if "] - epoch " in line]
    assert [line.split(" - ")[1].split(",")[0] for line in epochs] == ["epoch 1", "epoch 2", "epoch 3"]
    assert all(re.search(r"epoch \d, loss \d+\.\d{6}$", line) for line in epochs)
    assert len(lines) == 4 and lines[-1].startswith("manual: status=ok"), lines  # nothing else: no banner, no tip
    log = (tmp_path / "run" / "train.log").read_text()
    assert log.count("epoch 1, loss") == 1


def test_lightning_lines_reach_the_job_log_once_in_hydras_format(tmp_path):
    proc = run_cli(*SMALL, "trainer.max_epochs=2", "+trainer.enable_progress_bar=false", f"hydra.run.dir={tmp_path}/r")
    assert proc.returncode == 0, proc.stderr
    assert "INFO: " not in proc.stderr and "Tip" not in proc.stdout + proc.stderr
    assert "GPU available" not in proc.stdout + proc.stderr  # no device banners without a GPU


def test_a_second_run_into_a_busy_dir_is_refused(tmp_path):
    import fcntl

    d = tmp_path / "run"
    d.mkdir()
    with open(d / ".lock", "w") as held:  # what a running job holds for its whole life
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("4242\n")
        held.flush()
        line = one_error_line(run_cli(*SMALL, f"hydra.run.dir={d}"))
    assert "another run (pid 4242) is using it" in line and str(d) in line
    assert not (d / "metrics.json").exists()


def test_a_rerun_into_a_finished_run_keeps_it(tmp_path):
    d = tmp_path / "run"
    assert run_cli(*SMALL, "trainer.max_epochs=4", f"hydra.run.dir={d}").returncode == 0
    kept = {p: p.read_bytes() for p in d.rglob("*") if p.is_file() and p.name != ".lock"}
    line = one_error_line(run_cli(*SMALL, "model.lr=0.1", f"hydra.run.dir={d}"))
    assert "holds a finished run" in line
    line = one_error_line(run_cli(*SMALL, "trainer.max_epochs=2", "resume=true", f"hydra.run.dir={d}"))
    assert line.startswith("error: trainer.max_epochs=2:") and "already has 4 epochs" in line
    assert {p: p.read_bytes() for p in kept} == kept
    again = run_cli(*SMALL, "trainer.max_epochs=4", "resume=true", f"hydra.run.dir={d}")
    assert again.returncode == 0 and "already finished" in again.stdout + again.stderr


@pytest.mark.parametrize("damage", ["truncated", "empty", "random", "directory", "not_lightnings"])
def test_a_corrupt_checkpoint_gives_one_warning_and_a_fresh_start(tmp_path, damage):
    d = tmp_path / "run"
    assert run_cli(*SMALL, "trainer.max_epochs=2", f"hydra.run.dir={d}").returncode == 0
    expected = json.loads((d / "metrics.json").read_text())
    (d / "metrics.json").unlink()  # killed before its record
    ckpt = d / "checkpoints" / "last.ckpt"
    data = ckpt.read_bytes()
    ckpt.unlink()
    if damage == "directory":
        ckpt.mkdir()
    elif damage == "not_lightnings":
        torch.save({"a": torch.zeros(1)}, ckpt)  # loads with weights_only=True, but holds no Lightning state
    else:
        ckpt.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "random": os.urandom(4096)}[damage])
    proc = run_cli(*SMALL, "trainer.max_epochs=2", "resume=true", f"hydra.run.dir={d}")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    warnings = [line for line in (proc.stdout + proc.stderr).splitlines() if "WARNING" in line]
    assert len(warnings) == 1 and "training from scratch" in warnings[0], warnings
    if damage != "directory":
        assert json.loads((d / "metrics.json").read_text())["epoch_mse"] == expected["epoch_mse"]


def test_a_malformed_record_is_no_reason_for_a_traceback(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    (d / "metrics.json").write_text("[1, 2, 3]")
    proc = run_cli(*SMALL, "resume=true", f"hydra.run.dir={d}")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((d / "metrics.json").read_text())["status"] == "ok"


def test_data_that_overflows_float32_is_refused_before_training(tmp_path):
    line = one_error_line(run_cli(*SMALL, "data.w=[3e38,1]", f"hydra.run.dir={tmp_path / 'run'}"))
    assert line.startswith("error: data.w=") and "overflows float32" in line
    assert not (tmp_path / "run").exists()


def test_a_failed_attempt_never_replaces_a_finished_result(make_cfg, tmp_path, monkeypatch):
    from linreg.record import RunRecord, write_failure

    d = tmp_path / "run"
    first = run(make_cfg(*SMALL, run_dir=d))
    write_failure(d, RunRecord("failed", error="boom"))
    assert json.loads((d / "metrics.json").read_text()) == first
    assert json.loads((d / "failed.json").read_text())["error"] == "boom"


@pytest.fixture
def tiny_disk(tmp_path):
    """A 40 KiB filesystem of its own (a tmpfs), to fill up; skipped where mounting is not allowed."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def test_a_full_disk_is_one_line_and_leaves_no_temp_file(tiny_disk):
    proc = run_cli(*SMALL, f"hydra.run.dir={tiny_disk / 'run'}")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: cannot write ") and "No space left" in lines[0]
    assert not [p for p in tiny_disk.rglob("*.tmp")]


def run_on_a_terminal(*args: str) -> str:
    """The CLI with a pseudo-terminal as stdout and stderr (what a user at a shell has); returns what it showed."""
    import fcntl
    import pty
    import struct
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))  # a terminal has a size
    cmd = [sys.executable, "-m", "linreg.train", *args]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=follower, stderr=follower, stdin=subprocess.DEVNULL)
    os.close(follower)
    shown = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the follower side closed: the process is done
            break
        if not chunk:
            break
        shown += chunk
    os.close(leader)
    assert proc.wait(timeout=300) == 0, shown.decode(errors="replace")[-2000:]
    return shown.decode(errors="replace")


@pytest.mark.slow
def test_a_long_single_run_on_a_terminal_shows_lightnings_progress_bar(tmp_path):
    long = ["data.num_examples=200000", "trainer.max_epochs=1", "~logger"]  # 20,000 SGD steps
    assert "Epoch 0" in run_on_a_terminal(*long, f"hydra.run.dir={tmp_path / 'long'}")
    short = run_on_a_terminal(*SMALL, f"hydra.run.dir={tmp_path / 'short'}")
    assert "Epoch 0" not in short and "epoch 1, loss" in short
    piped = run_cli(*long, f"hydra.run.dir={tmp_path / 'piped'}")  # not a terminal: no bar
    assert piped.returncode == 0 and "Epoch 0" not in piped.stdout + piped.stderr
    swept = run_on_a_terminal("-m", *long, "seed=1", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert "Epoch 0" not in swept
