"""`hydra/launcher=vectorized`: stacked groups give every job its single run's numbers, files and locks."""

import fcntl
import json
import math
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from hydra_plugins.linreg_vectorized.vectorized_launcher import Job, VectorizedLauncher
from linreg.stacked import group_key, member_bytes
from tests.conftest import run_cli

# Two groups (manual, linear) of 4: lr 100 diverges in the first of two epochs (frozen there), seeds differ (one by
# an interpolation: those jobs' configs are composed, the others' values set on their kind's).
# train/loss every 4 SGD steps, params/* at the end of the 3-step call that passes one: at steps of their own.
GRID = ["model=manual,linear", "model.lr=0.03,100", "seed=1,${data.num_examples}", "data.num_examples=100"]
GRID += ["trainer.max_epochs=2", "data.batches_per_call=3", "model.log_every_sgd_steps=4"]
VECTORIZED = ["hydra/launcher=vectorized", "+hydra.callbacks.probe._target_=tests.test_vectorized.LockProbe"]
NUMBERS = ("train_mse", "epoch_mse", "weights")


class LockProbe(Callback):
    """A Hydra callback that notes, as each job starts, whether its run dir is locked (by the group training it)."""

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        from linreg.record import is_locked

        out = Path(config.hydra.runtime.output_dir)
        with open(Path(config.hydra.sweep.dir) / "probe.txt", "a") as f:
            f.write(f"{config.hydra.job.num} {is_locked(out)}\n")


def sweep(out: Path, *args: str, code: int = 0) -> Any:
    """A multirun of GRID into `out` that must exit with `code`; the finished process."""
    proc = run_cli("--multirun", *GRID, *args, f"hydra.sweep.dir={out}")
    assert proc.returncode == code, proc.stderr[-3000:]
    return proc


def records(out: Path) -> dict[str, dict[str, Any]]:
    """Every job's metrics.json, by job number."""
    return {p.parent.name: json.loads(p.read_text()) for p in out.glob("[0-9]*/metrics.json")}


def close(a: Any, b: Any, rel: float = 1e-5) -> bool:
    """Numbers (or lists of them, nulls included) equal within `rel`."""
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(close(x, y, rel) for x, y in zip(a, b))
    if a is None or b is None:
        return a is b
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-30)


def same_runs(got: dict[str, Any], want: dict[str, Any]) -> None:
    """The same outcome, steps and config; the numbers within 1e-5."""
    for key in ("status", "steps", "diverged_epoch", "ols_mse", "config"):
        assert got[key] == want[key], key
    for key in NUMBERS:
        assert close(got[key], want[key]), (key, got[key], want[key])


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The grid with the basic launcher and with the vectorized one, into their own sweep dirs."""
    tmp = tmp_path_factory.mktemp("vectorized")
    return {name: (tmp / name, sweep(tmp / name, *args)) for name, args in (("basic", []), ("vec", VECTORIZED))}


def test_every_job_gets_its_single_runs_numbers_and_files(runs):
    (basic, basic_proc), (vec, vec_proc) = runs["basic"], runs["vec"]
    want, got = records(basic), records(vec)
    assert sorted(got, key=int) == [str(j) for j in range(8)] and got.keys() == want.keys()
    for job in want:
        same_runs(got[job], want[job])
    # lr 100 overflows the MSE in epoch 1 of 2: stopped there with its weights of then, as its single run.
    assert [(got[j]["status"], got[j]["steps"]) for j in "0123"] == [("ok", 20)] * 2 + [("diverged", 10)] * 2
    for job in ("0", "5"):  # what Hydra's run_job writes: the same job config and overrides, its Hydra config
        assert {p.name for p in (vec / job / ".hydra").iterdir()} == {"config.yaml", "hydra.yaml", "overrides.yaml"}
        for name in ("config.yaml", "overrides.yaml"):
            assert (vec / job / ".hydra" / name).read_text() == (basic / job / ".hydra" / name).read_text()
        got, want = (OmegaConf.load(d / job / ".hydra" / "hydra.yaml").hydra for d in (vec, basic))
        assert got.job == want.job and got.runtime.output_dir == str(vec / job)
        logs = [re.sub(r"\[[\d:, -]+\]|\[\d+/8 [^]]*\]", "", (d / job / "train.log").read_text()) for d in (vec, basic)]
        assert logs[0] == logs[1] != ""  # its lines, less times and finishing ranks
    lines = vec_proc.stdout + vec_proc.stderr
    assert "#0 :" not in lines  # no per-job `#N : overrides` line (issue 20): the console is the basic launcher's
    assert len(lines.splitlines()) == len((basic_proc.stdout + basic_proc.stderr).splitlines())
    # Each member's dir is locked while its group trains and its record is written.
    assert sorted((vec / "probe.txt").read_text().splitlines()) == sorted(f"{j} True" for j in range(8))


def test_every_job_has_its_single_runs_tensorboard_run(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
        ea = EventAccumulator(str(run), size_guidance={"scalars": 0})
        ea.Reload()
        series = {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}
        return {**series, "tensors": ea.Tags()["tensors"]}  # the Custom Scalars layout

    for job in ("2", "5"):  # a diverged manual job, a linear one
        [vec] = (runs["vec"][0] / job / "tensorboard").iterdir()
        [basic] = (runs["basic"][0] / job / "tensorboard").iterdir()
        assert vec.name == basic.name  # the same run name in TensorBoard
        got, want = scalars(vec), scalars(basic)
        assert got.keys() == want.keys() >= {"train/loss", "train/mse", "params/w1", "params/b", "train_end/mse"}
        assert got.pop("tensors") == want.pop("tensors") == ["custom_scalars__config__"]
        for tag, series in want.items():
            steps = [s for s, _ in got[tag]]
            assert steps == [s for s, _ in series] and steps == sorted(set(steps)), tag  # in step order, once each
            assert close([v for _, v in got[tag]], [v for _, v in series]), tag
        assert (vec / "hparams.yaml").read_text() == (basic / "hparams.yaml").read_text()


def test_resume_skips_finished_jobs_and_a_locked_dir_is_refused(runs, tmp_path):
    vec, _ = runs["vec"]
    (vec / "6" / "metrics.json").unlink()  # a job a kill interrupted: trained again
    [hparams] = (vec / "6" / "tensorboard").glob("*/hparams.yaml")
    hparams.unlink()
    hparams.symlink_to(tmp_path / "precious.txt")  # a link there is neither followed nor replaced
    (tmp_path / "precious.txt").write_text("mine\n")
    shutil.copytree(runs["basic"][0] / "6" / "checkpoints", vec / "6" / "checkpoints")  # the killed attempt's
    (vec / "6" / "checkpoints" / "link.ckpt").symlink_to(tmp_path / "precious.txt")
    busy = vec / "7"  # another run's dir, in use: nothing may be written there
    for p in sorted(busy.rglob("*"), reverse=True):
        p.rmdir() if p.is_dir() else p.unlink()
    (busy / "notes.txt").write_text("another run's\n")
    kept = {j: (vec / j / "metrics.json").stat().st_mtime_ns for j in "012345"}
    with open(busy / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        proc = sweep(vec, *VECTORIZED, "resume=true", code=1)  # a job without a result: exit 1
    assert {j: (vec / j / "metrics.json").stat().st_mtime_ns for j in "012345"} == kept
    assert sorted(p.name for p in busy.iterdir()) == [".lock", "notes.txt"]
    assert "job refused: hydra.run.dir=" in proc.stdout + proc.stderr
    assert hparams.is_symlink() and (tmp_path / "precious.txt").read_text() == "mine\n"
    assert not (vec / "6" / "checkpoints").exists()  # retrained from scratch: no earlier model passes for it
    same_runs(records(vec)["6"], records(runs["basic"][0])["6"])
    assert len(list(hparams.parent.glob("events.out.tfevents.*"))) == 1  # the retrained run's, not both attempts'


def test_jobs_group_by_shape_and_split_by_budget():
    base = OmegaConf.create(
        {"seed": 1, "resume": False, "threads": 1, "logger": {"csv": {}}, "trainer": {"max_epochs": 3},
         "model": {"_target_": "linreg.models.LinearRegression", "lr": 0.1, "init": "default"},
         "data": {"num_examples": 100, "w": [2, -1, 1], "delta": 0.01, "deg": 1, "batch_size": 10}}
    )  # fmt: skip

    def key(**changes: Any) -> str:
        cfg = base.copy()
        for k, v in changes.items():
            OmegaConf.update(cfg, k.replace("__", "."), v)
        return group_key(cfg)

    same = [key(seed=2), key(model__lr=3.0), key(model__init="zeros"), key(data__delta=2), key(data__deg=2)]
    same += [key(data__w=[1, 1, 0]), key(logger=None), key(resume=True)]
    assert set(same) == {key()}
    other = [key(data__batch_size=20), key(data__num_examples=50), key(data__w=[1, 0]), key(trainer__max_epochs=2)]
    other += [key(model___target_="linreg.models.ManualRegression"), key(threads=2)]
    assert len({key(), *other}) == len(other) + 1

    def groups(budget_members: float, max_size: int | None, keys: str) -> list[list[int]]:
        launcher = VectorizedLauncher(budget_members * member_bytes(base) / 2**30, max_size)
        return [
            [job.num for job in g]
            for g in launcher.groups([Job(j, (), [], [], Path(), cfg=base, key=k) for j, k in enumerate(keys)])
        ]

    assert groups(3.5, None, "aaaaaaaaaa") == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    assert groups(10**6, 2, "ababa") == [[0, 2], [4], [1, 3]]  # in the order of each key's first job
    assert groups(0.1, None, "aa") == [[0], [1]]  # a member over the budget still trains, alone


def test_hydra_yaml_is_the_text_hydra_writes(make_cfg):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    launcher = VectorizedLauncher()
    launcher.templates = {}
    for seed, lr in ((3, "0.5"), (4, "'1e3'"), (5, "[1, 2]")):  # the kind's text once, each job's values dumped in
        overrides = [f"seed={seed}", f"data.w={lr}" if "[" in lr else f"model.lr={lr}"]
        cfg = make_cfg("hydra/launcher=vectorized", *overrides, run_dir=Path("run"))
        plain = OverridesParser.create().parse_overrides(overrides)
        job = Job(seed, ("kind", "[" in lr), plain, plain, Path())
        want = [OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), OmegaConf.masked_copy(cfg, "hydra")]
        assert launcher.texts(job, cfg) == tuple(map(OmegaConf.to_yaml, want))
    assert all(launcher.templates.values())  # every kind took the template


def test_a_job_of_a_kind_without_interpolations_is_not_composed(make_cfg):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from linreg.config import plain

    kind = make_cfg("model.lr=0.5", "seed=3", run_dir=Path("run"))
    launcher = VectorizedLauncher()
    launcher.kinds, launcher.held = {"kind": kind}, {}
    launcher.bases = {"kind": ({k: v for k, v in plain(kind).items()}, "/sweep")}
    launcher.compose = None  # the kind's config is not composed again
    overrides = ["model.lr=1", "seed=4", "data.w=[1,2]"]  # the schema makes lr a float: 1.0
    job = Job(7, "kind", [], OverridesParser.create().parse_overrides(overrides))
    assert launcher.resolved(job) == plain(make_cfg(*overrides)) and job.out == Path("/sweep/7")


def test_a_dir_that_interpolates_and_mapping_values_are_each_jobs_own(tmp_path):
    # Job dirs named by the seed (the sweep's own dir, its table, by the default seed); a mapping merges into a
    # logger's config, each job's into its own.
    sweep_dir = f"{tmp_path}/s${{seed}}"
    args = ["seed=1,2", "logger.tensorboard={write_every_s:5},{max_queue:9}", "data.num_examples=50"]
    run_cli("--multirun", "hydra/launcher=vectorized", "trainer.max_epochs=1", *args, f"hydra.sweep.dir={sweep_dir}")
    dirs = sorted(p.parent.relative_to(tmp_path) for p in tmp_path.glob("s*/*/metrics.json"))
    assert dirs == [Path("s1/0"), Path("s1/1"), Path("s2/2"), Path("s2/3")]
    tb = [OmegaConf.load(tmp_path / d / ".hydra" / "config.yaml").logger.tensorboard for d in dirs]
    assert [(t.write_every_s, t.max_queue) for t in tb] == [(5, 1000), (10, 9)] * 2


def test_values_filled_in_without_the_dumper_are_as_it_writes_them():
    from hydra_plugins.linreg_vectorized.vectorized_launcher import plain_text

    values = [0, -3, 10**30, True, 1.5, None, "a", "/tmp/x/3", "model.lr=0.1,seed=3", "data.w=[1,2]", "a b", "a: b"]
    values += ["1e3", "1_0", "0x1F", "0o7", "inf", "-.inf", "NaN", "yes", "Off", "y", "null", "~", "", "-x", "é", "#c"]
    values += ["5", "007", "١٢", "/1e3", "=", "a=", "/yes", "a/ b", "a=#", "x=1:2", "/tmp/" + "x" * 200]
    for value in values:
        text = plain_text(value)
        assert text is None or OmegaConf.to_yaml({"key": value}) == f"key: {text}\n", value
    fast = [plain_text(v) is not None for v in (7, "12", "/tmp/x/3", "seed=3", "1e3", "yes", "a b")]
    assert fast == [True] * 4 + [False] * 3


# Optuna trials 4 a batch, stacked 2 a group; the median pruner (from epoch 2) stops the slow ones of batch 2 there.
PRUNED = [
    "sweep=optuna",
    "hydra.sweeper.n_trials=8",
    "hydra.sweeper.n_jobs=4",
    "hydra/sweeper/pruner=median",
    "hydra.sweeper.pruner.n_startup_trials=1",
    "hydra.sweeper.pruner.n_warmup_steps=2",  # no pruning before epoch 2
    "hydra.sweeper.sampler._target_=optuna.samplers.RandomSampler",
    "hydra.sweeper.sampler.seed=5",
    "model.lr=tag(log,interval(0.0001,1))",
    "data.batch_size=10",
    "data.num_examples=100",
    "trainer.max_epochs=3",
]


@pytest.mark.system  # ~17 s: one seeded study twice, basic and vectorized
def test_pruned_members_stop_where_their_single_runs_do(tmp_path):
    import optuna
    from optuna.trial import TrialState

    for name, *launcher in (("basic",), ("vec", "hydra/launcher=vectorized", "hydra.launcher.max_group_size=2")):
        proc = run_cli("--multirun", *PRUNED, *launcher, f"hydra.sweep.dir={tmp_path / name}")
        assert proc.returncode == 0, proc.stderr[-3000:]
    want, got = records(tmp_path / "basic"), records(tmp_path / "vec")
    assert got.keys() == want.keys() == {str(j) for j in range(8)}
    for job in want:
        same_runs(got[job], want[job])
        assert got[job]["pruned_epoch"] == want[job]["pruned_epoch"]
    trials = optuna.load_study(study_name="linreg", storage=f"sqlite:///{tmp_path / 'vec' / 'optuna.db'}").trials
    pruned = [t.number for t in trials if t.state == TrialState.PRUNED]
    assert pruned == [4, 6, 7]  # group (4, 5) goes on with 5 alone; group (6, 7) stops with none left
    assert [got[str(j)]["status"] for j in range(8)] == ["ok"] * 4 + ["pruned", "ok", "pruned", "pruned"]
    for t in trials:
        m = got[str(t.number)]
        assert t.intermediate_values == dict(enumerate(m["epoch_mse"], start=1))  # each member reported its own
        stop = (2, 20) if t.number in pruned else (None, 30)  # pruned after epoch 2 of 3 (10 steps an epoch)
        assert (m["pruned_epoch"], m["steps"]) == stop
