"""One run, in-process and from the command line: the tutorial's numbers, the record, resume, one writer per dir."""

import json
import os
import stat
from pathlib import Path

import pytest
import torch
from torch.utils.tensorboard import SummaryWriter

from linreg.config import ConfigError
from linreg.record import RunDirBusy, RunRecord
from linreg.run import run
from tests.conftest import run_cli

SMALL = ("data.num_examples=100", "trainer.max_epochs=1")


def train(cfg) -> RunRecord:
    """`linreg.run.run` in the config's run dir."""
    return run(cfg, Path(cfg.hydra.run.dir))


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file below `folder` and its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("model", ["manual", "linear"])
def test_the_defaults_reproduce_the_tutorial(make_cfg, model):
    cfg = make_cfg(f"model={model}")
    record = train(cfg)
    assert record.status == "ok" and record.weights == pytest.approx([2, -1, 1], abs=0.01)
    assert len(record.epoch_mse) == 3 and record.train_mse == record.epoch_mse[-1]
    assert record.ols_mse <= record.train_mse < 2e-4 and record.steps == 300
    assert RunRecord.read(Path(cfg.hydra.run.dir)) == record


@pytest.mark.parametrize(("experiment", "low", "high"), [("deg2", 9.9, 10.9), ("delta2", 3.9, 4.25)])
def test_the_limits_of_a_linear_model(make_cfg, experiment, low, high):
    record = train(make_cfg(f"experiment={experiment}"))
    assert low <= record.train_mse <= high and record.ols_mse <= record.train_mse


def test_any_number_of_features(make_cfg):
    record = train(make_cfg("model=linear", "data.w=[1.5,-2,0.5,3]", "trainer.max_epochs=5"))
    assert record.weights == pytest.approx([1.5, -2, 0.5, 3], abs=0.01)
    record = train(make_cfg("data.w=[1.5,-2]", "data.bias=false"))
    assert record.weights == pytest.approx([1.5, -2], abs=0.01)


def test_a_diverged_run_is_an_outcome(make_cfg):
    record = train(make_cfg("model.lr=1e30", *SMALL))
    assert record.status == "diverged" and record.diverged_epoch == 0 and record.train_mse is None


def test_data_that_overflows_is_refused_and_leaves_no_dir(tmp_path):
    proc = run_cli("data.w=[3e38,3e38,1]", *SMALL, f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2 and "error: data.w=" in proc.stderr and "overflows float32" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_a_full_disk_is_one_line_and_leaves_nothing(small_disk):
    disk = small_disk("1m")  # less than a run starts with (linreg.record.ROOM)
    proc = run_cli(*SMALL, f"hydra.run.dir={disk}/run")
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    why = "1024 KiB free there; a run needs 2 MiB (disk full?)"
    assert proc.stderr.splitlines() == [f"error: hydra.run.dir='{disk}/run': {why}"]
    assert list(disk.iterdir()) == []


@pytest.mark.parametrize(
    ("given", "says"),
    [
        ("+logger.tensorboard.foo=1", "unexpected keyword argument 'foo'"),  # SummaryWriter's, made at once
        ("logger.tensorboard._target_=builtins.dict", "builtins.dict is not a Lightning logger"),  # it builds
        ("~logger.tensorboard._target_", "needs a _target_"),  # the same line from the vectorized launcher
    ],
)
def test_a_bad_logger_argument_is_refused_before_the_run_writes(make_cfg, given, says):
    cfg = make_cfg("data.num_examples=100", "trainer.max_epochs=1", given)
    with pytest.raises(ConfigError, match=says) as err:
        run(cfg)
    assert err.value.key == "logger.tensorboard"
    assert not (Path(cfg.hydra.run.dir) / "metrics.json").exists()  # the command line then removes the new dir


def test_a_logger_argument_that_fails_in_its_writer_thread_is_one_line(tmp_path):
    proc = run_cli(*SMALL, "+logger.tensorboard.flush_secs=abc", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    why = "unsupported operand type(s) for +: 'float' and 'str'"  # in TensorBoard's writer thread, handed to the run
    assert proc.stderr.splitlines() == [f"error: logger.tensorboard: {why}"]
    assert not (tmp_path / "run").exists()


def test_the_cli_prints_the_result_and_the_run_dir(tmp_path):
    out = tmp_path / "run"
    proc = run_cli("model=linear", *SMALL, f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr
    assert "linear: status=ok train_mse=" in proc.stdout and f"run dir: {out}" in proc.stdout
    assert {"metrics.json", "checkpoints", "tensorboard", ".hydra"} <= {p.name for p in out.iterdir()}
    # A second run into a finished run's dir is refused before Hydra rewrites anything there.
    before = snapshot(out)
    again = run_cli("model=linear", *SMALL, f"hydra.run.dir={out}")
    assert again.returncode == 2 and "holds a finished run" in again.stderr
    assert snapshot(out) == before


def test_a_dir_another_run_holds_is_refused(make_cfg, tmp_path):
    from linreg.record import RunDirLock

    cfg = make_cfg(*SMALL)
    out = Path(cfg.hydra.run.dir)
    out.mkdir()
    with RunDirLock(out), pytest.raises(RunDirBusy, match="another run"):
        train(cfg)
    assert {p.name for p in out.iterdir()} == {".lock"}


def csv_rows(out: Path) -> list[tuple[int, str]]:
    """The CSV logger's (step, tags logged) rows, values left out (the wall-clock columns differ)."""
    import csv

    with open(out / "csv" / "metrics.csv", newline="") as f:
        return [
            (int(r["step"]), ",".join(sorted(k for k, v in r.items() if v and k != "step"))) for r in csv.DictReader(f)
        ]


def tb_scalars(out: Path, walls: bool = False) -> dict[str, list[tuple[float, ...]]]:
    """Each TensorBoard tag's (step, value) points (or wall times), as TensorBoard's Python loader reads them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    [run_dir] = (out / "tensorboard").iterdir()
    ea = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    ea.Reload()
    return {
        tag: [(e.wall_time,) if walls else (e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]
    }


def append_csv_row(out: Path, row: dict[str, float]) -> None:
    """Add a row to the CSV logger's metrics.csv, as a run killed after a flush leaves it."""
    import csv

    with open(out / "csv" / "metrics.csv", newline="") as f:
        reader = csv.DictReader(f)
        rows, fields = list(reader), reader.fieldnames
    with open(out / "csv" / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        writer.writerows([*rows, row])


def test_resume_continues_to_the_same_numbers(make_cfg, tmp_path):
    whole_cfg = make_cfg("data.num_examples=200", "trainer.max_epochs=2", "logger=tensorboard_csv")
    whole, whole_dir = train(whole_cfg), Path(whole_cfg.hydra.run.dir)
    cut = make_cfg("data.num_examples=200", "trainer.max_epochs=1", "logger=tensorboard_csv")
    train(cut)
    out = Path(cut.hydra.run.dir)
    append_csv_row(out, {"step": 20, "train/loss": 0.5})  # epoch 2's first point, flushed before a kill -9
    [tb_dir] = (out / "tensorboard").iterdir()
    with SummaryWriter(str(tb_dir)) as killed:  # an attempt's points past the checkpoint (step 20), in its own file
        killed.add_scalar("train/loss", 0.5, 20)
        killed.add_scalar("params/b", 7.0, 25)
    kept_times = tb_scalars(out, walls=True)["train/mse"]  # epoch 1's point, logged before the kill
    resumed = train(
        make_cfg("data.num_examples=200", "trainer.max_epochs=2", "logger=tensorboard_csv", "resume=true", run_dir=out)
    )
    assert resumed.weights == whole.weights and resumed.epoch_mse == whole.epoch_mse
    assert tb_scalars(out, walls=True)["train/mse"][:1] == kept_times  # at its own time
    # The history is whole across the resume: the CSV rows and TensorBoard points an uninterrupted run writes.
    assert csv_rows(out) == csv_rows(whole_dir)
    assert tb_scalars(out) == tb_scalars(whole_dir) and len(list(tb_dir.glob("events.out.tfevents.*"))) == 1
    # Resuming a finished run of the same config trains nothing; another config is refused.
    again = make_cfg(
        "data.num_examples=200", "trainer.max_epochs=2", "logger=tensorboard_csv", "resume=true", run_dir=out
    )
    assert train(again) == resumed
    before = snapshot(out)  # another logger is no reason to train a finished run again, nor to rewrite its record
    only_logger = make_cfg("data.num_examples=200", "trainer.max_epochs=2", "~logger", "resume=true", run_dir=out)
    assert train(only_logger) == resumed and snapshot(out) == before
    with pytest.raises(RunDirBusy, match="another config"):
        train(make_cfg("data.num_examples=200", "trainer.max_epochs=2", "seed=1", "resume=true", run_dir=out))


def test_a_resume_to_fewer_epochs_than_its_checkpoint_holds_is_refused_untouched(make_cfg):
    cfg = make_cfg("data.num_examples=100", "trainer.max_epochs=2")
    out = Path(cfg.hydra.run.dir)
    train(cfg)
    (out / "metrics.json").unlink()  # killed after its last checkpoint
    before = snapshot(out)
    with pytest.raises(RunDirBusy, match="the checkpoint in .* already has 2 epochs") as err:
        train(make_cfg("data.num_examples=100", "trainer.max_epochs=1", "resume=true", run_dir=out))
    assert err.value.key == "trainer.max_epochs" and snapshot(out) == before


def test_a_resume_with_nothing_left_to_train_keeps_its_logs_whole(make_cfg):
    args = ("data.num_examples=100", "trainer.max_epochs=1", "logger=tensorboard_csv")
    out = Path(make_cfg(*args).hydra.run.dir)
    whole = train(make_cfg(*args, run_dir=out))
    (out / "metrics.json").unlink()  # killed after its last checkpoint, before its record
    logged = tb_scalars(out), csv_rows(out)
    assert "train_end/mse" in logged[0]
    assert train(make_cfg(*args, "resume=true", run_dir=out)).epoch_mse == whole.epoch_mse
    assert (tb_scalars(out), csv_rows(out)) == logged


def test_a_run_leaves_the_event_files_of_a_tensorboard_dir_outside_its_own(make_cfg, tmp_path):
    shared = ("data.num_examples=100", "trainer.max_epochs=1", f"logger.tensorboard.name={tmp_path / 'tb'}")
    for _ in range(2):  # two runs, one TensorBoard dir of the user's: each keeps its file
        train(make_cfg(*shared, "+logger.tensorboard.version=all"))
    assert len(list((tmp_path / "tb" / "all").glob("events.out.tfevents.*"))) == 2


def test_an_unreadable_checkpoint_is_a_fresh_start(make_cfg, caplog):
    cfg = make_cfg(*SMALL)
    out = Path(cfg.hydra.run.dir)
    train(cfg)
    (out / "metrics.json").unlink()
    (out / "checkpoints" / "last.ckpt").write_bytes(os.urandom(100))
    record = train(make_cfg(*SMALL, "resume=true", run_dir=out))
    assert record.status == "ok" and "training from scratch" in caplog.text


def test_the_checkpoint_carries_its_config(make_cfg):
    cfg = make_cfg(*SMALL)
    train(cfg)
    ckpt = Path(cfg.hydra.run.dir) / "checkpoints"
    state = torch.load(ckpt / "last.ckpt", weights_only=True)
    assert state["linreg_config"] == json.loads((ckpt / "config.json").read_text())
    assert state["linreg_config"]["seed"] == 420 and "max_epochs" not in state["linreg_config"]["trainer"]


def sweep_cli(*args: str, lrs: str = "model.lr=0.01,0.1"):
    """A 2-job sweep of 100 samples, 1 epoch, each job seeded by its number."""
    return run_cli("--multirun", lrs, "seed=${hydra:job.num}", *SMALL, *args)


def test_one_sweep_owns_its_dir(tmp_path):
    sweep = f"hydra.sweep.dir={tmp_path / 'sweep'}"
    proc = sweep_cli(sweep)
    assert proc.returncode == 0, proc.stderr
    seeds = [json.loads((tmp_path / "sweep" / str(j) / "metrics.json").read_text())["seed"] for j in (0, 1)]
    assert seeds == [0, 1]  # Hydra's resolvers work in a sweep
    before = snapshot(tmp_path / "sweep")
    for again, says in [
        (sweep_cli(sweep), "holds a sweep's runs; resume=true continues it"),
        (sweep_cli(sweep, "resume=true", lrs="model.lr=0.01,0.3"), "holds another sweep"),
        (sweep_cli(sweep, "resume=true", "hydra.sweep.subdir=same"), "hydra.sweep.subdir='same': must give each job"),
        (sweep_cli(sweep, "resume=true", "hydra.sweep.subdir=${now:%f}_${hydra.job.num}"), "no ${now:}"),
        (sweep_cli(sweep, "trainer=glob(c*)"), "holds a sweep's runs"),  # a group's glob: the checks still run
        (sweep_cli(sweep, "hydra.sweeper.max_batch_size=${oc.env:LINREG_UNSET}"), "hydra.sweeper.max_batch_size: "),
    ]:
        assert again.returncode == 2 and says in again.stderr, again.stderr
    assert snapshot(tmp_path / "sweep") == before


@pytest.mark.parametrize(
    "subdir", ["${hydra.job.num}/../same", "x/${hydra.job.num}", "${hydra.job.override_dirname}", "same"]
)
def test_jobs_that_would_share_a_dir_are_refused(make_cfg, subdir, tmp_path):
    from linreg.checks import separate_job_dirs

    extra = ["hydra.job.config.override_dirname.exclude_keys=[model.lr]"] if "override" in subdir else []
    with pytest.raises(ConfigError, match="must give each job a dir of its own"):
        separate_job_dirs(make_cfg(f"hydra.sweep.subdir={subdir}", *extra))


def test_a_sweep_preset_without_multirun_is_refused(make_cfg):
    from linreg.checks import CheckConfig

    with pytest.raises(SystemExit):
        CheckConfig().on_run_start(make_cfg("sweep=tutorial"))


def test_resume_trusts_the_config_saved_with_the_weights(make_cfg):
    cfg = make_cfg(*SMALL)
    out = Path(cfg.hydra.run.dir)
    train(cfg)
    (out / "metrics.json").unlink()
    (out / "checkpoints" / "config.json").write_text("{")  # torn, or forged to another config: not trusted
    with pytest.raises(RunDirBusy, match="checkpoint of another config"):
        train(make_cfg(*SMALL, "model.lr=0.5", "resume=true", run_dir=out))
    os.remove(out / "checkpoints" / "last.ckpt")
    os.mkfifo(out / "checkpoints" / "last.ckpt")  # would block torch.load, and no checkpoint could be saved there
    with pytest.raises(RunDirBusy, match="last.ckpt is not a file"):
        train(make_cfg(*SMALL, "resume=true", run_dir=out))
    assert stat.S_ISFIFO(os.lstat(out / "checkpoints" / "last.ckpt").st_mode)  # left as it was


@pytest.mark.system  # ~10 s each: a run long enough to be stopped after its first checkpoint
@pytest.mark.parametrize(("sig", "by"), [("SIGTERM", "SIGTERM"), ("SIGINT", "SIGINT (Ctrl-C)")])
def test_a_run_stopped_by_sigterm_or_sigint_says_so_and_exits_128_plus_it(tmp_path, sig, by):
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import REPO

    out = tmp_path / "run"
    args = ["data.num_examples=200000", "trainer.max_epochs=5", "~logger", f"hydra.run.dir={out}"]
    cmd = [sys.executable, "-m", "linreg.train", *args]
    proc = subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.PIPE, text=True, start_new_session=True)
    while not (out / "checkpoints" / "last.ckpt").exists() and proc.poll() is None:
        time.sleep(0.1)
    os.killpg(proc.pid, getattr(signal, sig))  # Lightning stops at the next step; alone it would exit 0 (SIGINT: 1)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + getattr(signal, sig) and "Traceback" not in err, err[-2000:]
    assert err.strip().splitlines() == [f"error: {out}: stopped by {by}; resume=true continues it"]  # one line
    assert not (out / "metrics.json").exists() and (out / "checkpoints" / "last.ckpt").is_file()  # resume=true's


@pytest.mark.parametrize(("sig", "code", "says"), [("Sigint", 130, "SIGINT (Ctrl-C)"), ("Sigterm", 143, "SIGTERM")])
def test_a_run_stopped_before_its_fit_says_so_and_exits_128_plus_the_signal(tmp_path, sig, code, says):
    out = tmp_path / "1"  # the logger sends its process the signal as the run builds it
    logger = f"logger.csv._target_=tests.user_classes.{sig}CSVLogger"
    proc = run_cli(*SMALL, "logger=csv", logger, f"hydra.run.dir={out}")
    assert proc.returncode == code and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.splitlines() == [f"error: {out}: stopped by {says}; resume=true continues it"]
