"""linreg.checks beyond the refusals tested through the command line (tests/test_config.py)."""

import logging
import os
import threading

import pytest
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.types import RunMode

from linreg.checks import CheckConfig, one_report_per_write_error, own_sweep_dir, separate_job_dirs, swept_keys
from linreg.config import CONFIG_DIR, ConfigError


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
    with pytest.raises(ConfigError, match="holds files that are not a sweep's; use a new dir") as err:
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


@pytest.fixture
def quiet_hooks(monkeypatch):
    """The process-wide hooks `one_report_per_write_error` sets, restored after the test."""
    monkeypatch.setattr(threading, "excepthook", threading.excepthook)
    monkeypatch.setattr(logging, "raiseExceptions", True)


@pytest.mark.parametrize(
    ("given", "says"),
    [
        ("+logger.tensorboard.foo=1", "unexpected keyword argument 'foo'"),  # SummaryWriter's: only made at fit
        ("+logger.tensorboard.flush_secs=abc", "TypeError"),  # raised in the writer's thread
        ("logger.tensorboard.max_queue=abc", "TypeError"),
        ("+logger.tensorboard.filename_suffix=7", "TypeError"),
        ("logger.tensorboard._target_=builtins.dict", "builtins.dict is not a Lightning logger"),  # it builds
    ],
)
def test_a_bad_logger_argument_is_one_line_before_the_run(make_cfg, given, says, capsys, quiet_hooks):
    cfg = make_cfg("data.num_examples=100", given)
    with pytest.raises(SystemExit) as exit_:
        CheckConfig().on_run_start(cfg)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("error: logger.tensorboard: ") and err.count("\n") == 1, err
    assert says in err
    assert not os.path.exists(cfg.hydra.run.dir)


def multirun_cfg(*overrides: str):
    """The config `python -m linreg.train -m OVERRIDES` starts its sweep with."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        return loader.load_configuration("train", overrides=list(overrides), run_mode=RunMode.MULTIRUN)


def test_a_sweep_checks_its_loggers_once_unless_it_varies_them(tmp_path, capsys, quiet_hooks):
    sweep = f"hydra.sweep.dir={tmp_path / 'sweep'}"
    with pytest.raises(SystemExit) as exit_:
        CheckConfig().on_multirun_start(multirun_cfg("seed=1,2", "+logger.tensorboard.foo=1", sweep))
    assert exit_.value.code == 2 and capsys.readouterr().err.startswith("error: logger.tensorboard: TypeError")
    assert not (tmp_path / "sweep").exists()
    varied = multirun_cfg("logger.tensorboard.max_queue=abc,5", "hydra.sweeper.params={data.deg:'1,2'}")
    assert swept_keys(varied) == ["data.deg", "logger.tensorboard.max_queue"]  # each job's to check: a row
