"""`hydra/launcher=vectorized`: stacked groups give every job the basic launcher's numbers, files and rows."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf

from linreg.data import EpochBatchSampler
from linreg.stacked import StackedSampler, group_key, split_groups
from tests.conftest import REPO, run_cli

VECTORIZED = ["hydra/launcher=vectorized"]
NUMBERS = ("train_mse", "epoch_mse", "weights")
EXACT = ("status", "steps", "diverged_epoch", "ols_mse", "config", "model", "lr", "seed", "batch_size")


def sweep(tmp_path: Path, name: str, *args: str) -> tuple[Path, Any]:
    """Run a multirun into tmp_path/name; its dir and the finished process."""
    out = tmp_path / name
    return out, run_cli("--multirun", *args, f"hydra.sweep.dir={out}")


def records(sweep_dir: Path) -> dict[str, dict[str, Any]]:
    """Every job's metrics.json, by job number."""
    return {p.parent.name: json.loads(p.read_text()) for p in sweep_dir.glob("[0-9]*/metrics.json")}


def close(a: Any, b: Any, rel: float) -> bool:
    """Numbers (or lists, nulls included) equal within `rel`, relative."""
    if isinstance(a, list) or isinstance(b, list):
        return (
            isinstance(a, list) and isinstance(b, list) and len(a) == len(b) and all(map(close, a, b, [rel] * len(a)))
        )
    if a is None or b is None:
        return a is b
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-30)


def assert_same_runs(vec: dict[str, dict], basic: dict[str, dict], rel: float = 1e-5) -> None:
    """Every job of both sweeps: the same outcome, steps and config; its numbers within `rel`."""
    assert vec.keys() == basic.keys()
    for job, b in basic.items():
        v = vec[job]
        assert {k: v[k] for k in EXACT} == {k: b[k] for k in EXACT}, job
        for key in NUMBERS:
            assert close(v[key], b[key], rel), (job, key, v[key], b[key])


# ---------------------------------------------------------------- pieces, no CLI


def test_group_key_splits_on_shape_not_numbers():
    base = OmegaConf.create(
        {"seed": 1, "resume": False, "threads": 1,
         "model": {"_target_": "linreg.models.LinearRegression", "lr": 0.1, "init": "default"},
         "data": {"num_examples": 100, "w": [2, -1, 1], "bias": True, "delta": 0.01, "deg": 1, "batch_size": 10,
                  "batches_per_call": 10},
         "trainer": {"max_epochs": 3}, "logger": {"csv": {}}}
    )  # fmt: skip

    def key(**changes: Any) -> str:
        cfg = base.copy()
        for k, v in changes.items():
            OmegaConf.update(cfg, k.replace("__", "."), v)
        return group_key(cfg)

    same = [key(seed=2), key(model__lr=3.0), key(data__delta=2), key(data__deg=2), key(data__w=[1, 1, 0])]
    same += [key(model__init="zeros"), key(logger=None), key(resume=True)]
    assert set(same) == {key()}
    other = [key(model___target_="linreg.models.ManualRegression"), key(data__batch_size=20)]
    other += [key(data__num_examples=50), key(data__w=[1, 0])]
    other += [key(trainer__max_epochs=2), key(data__batches_per_call=1), key(threads=2)]
    assert len({key(), *other}) == len(other) + 1


def test_groups_split_within_budget():
    assert split_groups(list(range(10)), 100, 350, None) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    assert split_groups(list(range(5)), 100, 10**9, 2) == [[0, 1], [2, 3], [4]]
    assert split_groups([0, 1], 1000, 10, None) == [[0], [1]]  # a member over the budget still trains, alone


def test_each_member_gets_its_single_run_batch_order():
    seeds, n, size = [420, 1, 7], 23, 10
    sampler = StackedSampler(n, size, seeds)
    for epoch in (0, 2):
        sampler.set_epoch(epoch)
        stacked = torch.cat(list(sampler), 1)
        for j, seed in enumerate(seeds):
            single = EpochBatchSampler(n, size, seed)
            single.set_epoch(epoch)
            assert torch.equal(stacked[j] - j * n, torch.cat(list(single)).long())


# ---------------------------------------------------------------- through the CLI


@pytest.mark.slow
def test_tutorial_grid_matches_the_basic_launcher(tmp_path):
    args = ["sweep=tutorial", "~logger"]
    vec_dir, vec = sweep(tmp_path, "vec", *VECTORIZED, *args)
    assert vec.returncode == 0, vec.stderr[-2000:]
    basic_dir, basic = sweep(tmp_path, "basic", *args)
    assert basic.returncode == 0, basic.stderr[-2000:]
    assert "Launching 48 jobs as 4 stacked groups" in vec.stdout
    assert_same_runs(records(vec_dir), records(basic_dir))
    table = (vec_dir / "results.csv").read_text().splitlines()
    assert len(table) == 49 and table[1:] != []
    assert (vec_dir / "mse.png").exists() and (vec_dir / "results.md").exists()
    for job in ("0", "47"):
        assert {p.name for p in (vec_dir / job / ".hydra").iterdir()} == {"config.yaml", "hydra.yaml", "overrides.yaml"}
        assert (vec_dir / job / "train.log").exists()
    assert vec.stdout.count(": ok train_mse=") == 48  # one progress line a job


@pytest.mark.slow
@pytest.mark.parametrize("model", ["manual", "linear"])
def test_a_diverging_member_leaves_its_neighbours_alone(tmp_path, model):
    common = [f"model={model}", "data.num_examples=200", "~logger"]
    with_it, proc = sweep(tmp_path, "with", *VECTORIZED, *common, "model.lr=0.03,100,0.1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    without, proc = sweep(tmp_path, "without", *VECTORIZED, *common, "model.lr=0.03,0.1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    basic, proc = sweep(tmp_path, "basic", *common, "model.lr=0.03,100,0.1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    got, alone = records(with_it), records(without)
    assert [got["0"][k] for k in (*NUMBERS, "steps")] == [alone["0"][k] for k in (*NUMBERS, "steps")]
    assert [got["2"][k] for k in (*NUMBERS, "steps")] == [alone["1"][k] for k in (*NUMBERS, "steps")]
    diverged = got["1"]
    assert diverged["status"] == "diverged" and diverged["diverged_epoch"] == 0 and diverged["train_mse"] is None
    assert diverged["steps"] == 20  # it stopped at the end of its first epoch, as its single run does
    assert_same_runs(got, records(basic))


@pytest.mark.slow
def test_a_member_that_fails_validation_is_a_failed_row(tmp_path):
    out, proc = sweep(tmp_path, "bad", *VECTORIZED, "data.num_examples=100", "data.batch_size=10,0,20", "~logger")
    assert proc.returncode == 1
    assert "1 of 3 jobs failed" in proc.stderr and "data.batch_size=0" in proc.stderr
    got = records(out)
    assert got["1"]["status"] == "failed" and "must be a positive integer" in got["1"]["error"]
    assert got["0"]["status"] == got["2"]["status"] == "ok"
    assert "failed" in (out / "results.csv").read_text()


def scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    """A TensorBoard run's scalar series, tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run), size_guidance={"scalars": 0})
    ea.Reload()
    return {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}


@pytest.mark.slow
def test_every_job_has_the_single_runs_tensorboard_run(tmp_path):
    args = ["sweep=smoke"]
    vec_dir, proc = sweep(tmp_path, "vec", *VECTORIZED, *args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    basic_dir, proc = sweep(tmp_path, "basic", *args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for job in ("0", "3"):
        [vec_run] = (vec_dir / job / "tensorboard").iterdir()
        [basic_run] = (basic_dir / job / "tensorboard").iterdir()
        assert vec_run.name == basic_run.name  # the same run name in TensorBoard
        got, want = scalars(vec_run), scalars(basic_run)
        assert got.keys() == want.keys() >= {"train/mse", "train/loss", "params/w1", "params/b", "hp/train_mse"}
        for tag, series in want.items():
            assert [s for s, _ in got[tag]] == [s for s, _ in series], tag
            assert close([v for _, v in got[tag]], [v for _, v in series], 1e-5), tag
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        ea = EventAccumulator(str(vec_run))
        ea.Reload()
        assert "hparams" in ea.PluginTagToContent("hparams") or ea.PluginTagToContent("hparams")  # the HParams row
        assert (vec_run / "hparams.yaml").exists()


@pytest.mark.slow
@pytest.mark.parametrize("sweeper", ["grid", "basic"])  # grid skips finished jobs itself; basic leaves it to us
def test_resume_skips_finished_jobs_and_redoes_the_rest(tmp_path, sweeper):
    grid = ["model=manual,linear", "model.lr=0.03,0.1"]
    args = [*VECTORIZED, f"hydra/sweeper={sweeper}", "data.num_examples=200", *grid, "~logger"]
    out, proc = sweep(tmp_path, "sweep", *args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    first = records(out)
    # A kill mid-way: the linear group (jobs 2, 3) never wrote its records.
    for job in ("2", "3"):
        (out / job / "metrics.json").unlink()
    before = {j: (out / j / "metrics.json").stat().st_mtime_ns for j in ("0", "1")}
    _, proc = sweep(tmp_path, "sweep", *args, "resume=true")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("(done before)") == 2
    assert {j: (out / j / "metrics.json").stat().st_mtime_ns for j in ("0", "1")} == before
    again = records(out)
    for job in ("2", "3"):
        assert {k: again[job][k] for k in (*NUMBERS, "steps")} == {k: first[job][k] for k in (*NUMBERS, "steps")}
    assert "as 1 stacked group\n" in proc.stdout  # the two unfinished jobs, one group


@pytest.mark.slow
def test_a_killed_sweep_resumes_to_the_same_numbers(tmp_path):
    # Four groups (one per batch size) of 3 seeds, each group ~1 s: the kill lands after the first group.
    grid = ["data.num_examples=20000", "data.batch_size=10,20,50,100", "seed=1,2,3", "~logger"]
    whole, proc = sweep(tmp_path, "whole", *VECTORIZED, *grid)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "linreg.train", "-m", *VECTORIZED, *grid, f"hydra.sweep.dir={out}"]
    killed = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (out / "progress.log").exists() or not (out / "progress.log").read_text().strip():
            assert time.monotonic() < deadline and killed.poll() is None, "no job finished before the end"
            time.sleep(0.05)
    finally:
        os.kill(killed.pid, signal.SIGKILL)
        killed.wait()
    done = records(out)
    assert 0 < len(done) < 12  # killed mid-way
    _, proc = sweep(tmp_path, "killed", *VECTORIZED, *grid, "resume=true")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("(done before)") == len(done)
    want, got = records(whole), records(out)
    assert got.keys() == want.keys()
    for job in want:
        assert [got[job][k] for k in (*NUMBERS, "steps", "status")] == [
            want[job][k] for k in (*NUMBERS, "steps", "status")
        ]


@pytest.mark.slow
def test_groups_split_by_size_give_the_same_numbers(tmp_path):
    args = ["data.num_examples=200", "seed=1,2,3,4,5", "~logger"]
    whole, proc = sweep(tmp_path, "whole", *VECTORIZED, *args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    split, proc = sweep(tmp_path, "split", *VECTORIZED, "hydra.launcher.max_group_size=2", *args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "as 3 stacked groups\n" in proc.stdout
    tiny, proc = sweep(tmp_path, "tiny", *VECTORIZED, "hydra.launcher.memory_budget_gb=0.00001", *args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "as 5 stacked groups" in proc.stdout  # 200 samples x 36 bytes: one member per 10 kB group
    a, b, c = records(whole), records(split), records(tiny)
    for job in a:
        assert [a[job][k] for k in NUMBERS] == [b[job][k] for k in NUMBERS] == [c[job][k] for k in NUMBERS]


@pytest.mark.slow
def test_optuna_batches_train_stacked(tmp_path):
    args = ["sweep=optuna", "hydra.sweeper.n_trials=4", "hydra.sweeper.n_jobs=2", "data.num_examples=200", "~logger"]
    out, proc = sweep(tmp_path, "optuna", *VECTORIZED, *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("Launching 2 jobs as") == 2  # one launch per batch of 2 trials
    assert len(records(out)) == 4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_stacked_groups_train_on_a_gpu(tmp_path):
    args = ["model=manual,linear", "model.lr=0.03,100", "seed=1,2", "data.num_examples=500", "~logger"]
    gpu_dir, proc = sweep(tmp_path, "gpu", *VECTORIZED, "trainer=gpu", *args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    cpu_dir, proc = sweep(tmp_path, "cpu", *VECTORIZED, *args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    gpu, cpu = records(gpu_dir), records(cpu_dir)
    for job, c in cpu.items():
        g = gpu[job]
        assert g["accelerator"] == "gpu" and g["status"] == c["status"] and g["steps"] == c["steps"], job
        for key in NUMBERS:
            assert close(g[key], c[key], 1e-4), (job, key)


@pytest.mark.slow
def test_members_hold_their_run_dir_locks_while_the_group_trains(tmp_path):
    from linreg.record import lock_holder

    out = tmp_path / "sweep"
    busy = out / "3"
    busy.mkdir(parents=True)
    (busy / "notes.txt").write_text("another run's\n")
    holder = subprocess.Popen(  # another run, alive, holding job 3's dir
        [sys.executable, "-c", f"import fcntl,time; f=open({str(busy / '.lock')!r},'w'); fcntl.flock(f, fcntl.LOCK_EX);"
         " f.write('4242'); f.flush(); print('held', flush=True); time.sleep(300)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout.readline() == "held\n"
    grid = ["data.num_examples=20000", "trainer.max_epochs=10", "seed=1,2,3,4", "~logger"]
    cmd = [sys.executable, "-m", "linreg.train", "-m", *VECTORIZED, *grid, f"hydra.sweep.dir={out}"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while lock_holder(out / "0") is None:  # the group is training: the launcher holds every member's dir
            assert time.monotonic() < deadline and proc.poll() is None, "the group never started"
            time.sleep(0.02)
        assert [lock_holder(out / j) for j in "012"] == [str(proc.pid)] * 3
        assert not (out / "0" / "metrics.json").exists()
        output, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
        holder.kill()
        holder.wait()
    assert proc.returncode == 1, output[-2000:]  # one job could not run: a row, and a non-zero exit
    assert output.strip().endswith("error: sweep " + str(out) + ": 1 of 4 jobs did not finish: #3 (no metrics.json)")
    assert [lock_holder(out / j) for j in "012"] == [None] * 3  # released once the records are written
    assert sorted(records(out)) == ["0", "1", "2"]
    assert "job refused: hydra.run.dir=" in output and "another run (pid 4242)" in output
    assert sorted(p.name for p in busy.iterdir()) == [".lock", "notes.txt"]  # nothing written into job 3's dir
