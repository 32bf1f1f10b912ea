"""linreg.checks beyond the refusals tested through the command line (tests/test_config.py)."""

import logging
import threading

import pytest

from linreg.checks import one_report_per_write_error, own_sweep_dir, separate_job_dirs
from linreg.config import ConfigError


def test_a_threads_write_error_leaves_no_traceback_and_other_errors_reach_the_hook_set_before(monkeypatch):
    seen: list[str] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: seen.append(args.exc_type.__name__))
    monkeypatch.setattr(logging, "raiseExceptions", True)  # restored after: the call turns it off
    one_report_per_write_error()
    one_report_per_write_error()  # a sweep's next job: installed once, still chained

    def fail(exc: type[Exception]) -> None:
        raise exc("boom")

    for exc in (OSError, ValueError):
        thread = threading.Thread(target=fail, args=(exc,))
        thread.start()
        thread.join()
    assert seen == ["ValueError"]  # the OSError is the run's to report, at its next flush
    assert logging.raiseExceptions is False


def test_a_sweep_dir_holding_files_that_are_not_a_sweeps_is_refused_untouched(make_cfg, tmp_path):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "results.md").write_text("notes")  # a sweep would write its table over it
    with pytest.raises(ConfigError, match="holds files that are not a run's or a sweep's; use a new dir") as err:
        own_sweep_dir(make_cfg(), sweep)
    assert err.value.key == "hydra.sweep.dir"
    assert [(p.name, p.read_text()) for p in sweep.iterdir()] == [("results.md", "notes")]  # no .lock either


@pytest.mark.parametrize(
    "given",
    [
        "logger.tensorboard.name=x/../../../escaped",
        "hydra.sweeper.params={logger.tensorboard.name:'a/b,c'}",
        "hydra.job.config.override_dirname.item_sep=/",
    ],
)
def test_a_dir_named_by_overrides_holding_a_slash_is_refused(make_cfg, given):
    subdir = "hydra.sweep.subdir=${hydra.job.override_dirname}"
    separate_job_dirs(make_cfg(subdir, "model.lr=0.1", "resume=true"))  # `/` nowhere: one level down
    with pytest.raises(ConfigError, match=r"holds '/'.*use \$\{hydra.job.num\}") as err:
        separate_job_dirs(make_cfg(subdir, "model.lr=0.1", given))
    assert err.value.key == "hydra.sweep.subdir"


@pytest.mark.parametrize(
    ("plant", "says"),
    [
        ({"notes.txt": "mine"}, "holds files that are not a run's or a sweep's; use a new dir"),  # e.g. hydra.run.dir=.
        ({"metrics.json": '{"my": "precious"}', ".hydra/config.yaml": "x: 1"}, "its metrics.json: not a run record"),
        ({"../.sweep.json": "{}"}, ", a run's or a sweep's dir; use a dir of its own"),  # its table would count it
        ({"../../checkpoints/config.json": "{}"}, ", a run's or a sweep's dir; use a dir of its own"),  # however deep
        ({"../../metrics.json": "{}", "../../checkpoints/last.ckpt": ""}, None),  # a project's own: no sign of ours
        ({"eval.json": "{}", ".hydra/config.yaml": "ckpt_path: x"}, "a dir of another kind"),  # an evaluation's
        ({"{job}.log": ""}, None),  # Hydra's log of a run killed before its lock: its dir is still a run's
    ],
)
def test_a_run_dir_that_is_not_a_runs_own_is_refused_untouched(make_cfg, tmp_path, capsys, plant, says):
    from linreg.checks import CheckConfig

    out = tmp_path / "sweep" / "run"
    cfg = make_cfg(run_dir=out)
    for name, text in plant.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name.format(job=cfg.hydra.job.name)).write_text(text)
    out.mkdir(exist_ok=True)
    before = sorted((p, p.read_bytes()) for p in tmp_path.rglob("*") if p.is_file())
    if says is None:
        CheckConfig().on_run_start(cfg)
        return
    with pytest.raises(SystemExit) as exit_:
        CheckConfig().on_run_start(cfg)
    assert exit_.value.code == 2 and says in capsys.readouterr().err
    assert sorted((p, p.read_bytes()) for p in tmp_path.rglob("*") if p.is_file()) == before


@pytest.mark.parametrize(
    "given",
    [
        ["hydra.sweeper.params={model.lr:'0.1,0.2,0.1'}"],  # a value listed twice
        ["sweep=optuna"],  # a point its sampler draws twice
        ["hydra.sweeper.params={resume:'true,false'}"],  # a key the dir's name leaves out
    ],
)
def test_jobs_named_by_overrides_that_could_repeat_are_refused(make_cfg, given):
    subdir = "hydra.sweep.subdir=${hydra.job.override_dirname}"
    with pytest.raises(ConfigError, match="two jobs could get one dir") as err:
        separate_job_dirs(make_cfg(subdir, *given))
    assert err.value.key == "hydra.sweep.subdir"
    separate_job_dirs(make_cfg(subdir, "hydra.sweeper.params={model.lr:'0.1,0.2'}"))  # each job its own


def test_a_refusal_never_removes_a_dir_it_did_not_make(make_cfg, tmp_path):
    from linreg.checks import CheckConfig

    (tmp_path / "proj").mkdir()
    (tmp_path / "proj" / "notes.txt").write_text("mine")
    cfg = make_cfg(run_dir=tmp_path / "proj" / "missing" / "..")  # leads to proj, which is there
    with pytest.raises(SystemExit):
        CheckConfig().on_run_start(cfg)  # refused: proj holds files that are not a run's
    assert (tmp_path / "proj" / "notes.txt").read_text() == "mine"
    (tmp_path / "proj" / ".sweep.json").write_text("{}")
    with pytest.raises(SystemExit):  # inside a sweep's dir: refused, and the dirs it made for it go, parents too
        CheckConfig().on_run_start(make_cfg(run_dir=tmp_path / "proj" / "new" / "run"))
    assert sorted(p.name for p in (tmp_path / "proj").iterdir()) == [".sweep.json", "notes.txt"]


def test_a_second_ctrl_c_while_a_stopped_sweep_writes_its_table_changes_nothing(tmp_path, monkeypatch, capsys):
    import os
    import signal
    import sys

    from linreg import checks, results

    tables: list[str] = []

    def stopped(sweep_dir, why):  # the table of what finished being written: the key is pressed again
        tables.append(why)
        os.kill(os.getpid(), signal.SIGINT)
        return f"error: sweep {sweep_dir}: stopped: {why}"

    monkeypatch.setattr(results, "stopped", stopped)
    monkeypatch.setattr(logging, "shutdown", lambda: None)
    monkeypatch.setattr(os, "_exit", sys.exit)  # its exit, as an exception here
    kept = {s: signal.getsignal(s) for s in checks.STOP_SIGNALS}
    half = tmp_path / ".metrics.json.1.tmp"  # a write the signal interrupted: its own cleanup will not run
    half.write_text("{")
    checks.WRITING.add(half)
    try:  # as a sweep's process has it (CheckConfig.on_multirun_start)
        signal.signal(signal.SIGINT, lambda signum, _: checks.end_sweep(tmp_path, signum))
        with pytest.raises(SystemExit) as ended:
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        checks.WRITING.discard(half)
        for s, handler in kept.items():
            signal.signal(s, handler)
    assert ended.value.code == 1 and tables == ["by SIGINT (Ctrl-C)"]  # once: not again from the second
    assert not half.exists()
    assert capsys.readouterr().err == f"error: sweep {tmp_path}: stopped: by SIGINT (Ctrl-C)\n"
