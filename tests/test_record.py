"""The run record and the one bounded reader: what is read back is a regular file, small, and trusted only if sane."""

import json
import os
from pathlib import Path

import pytest

from linreg.record import CorruptRecord, RunRecord, read_file, write_atomic

OK = {"status": "ok", "train_mse": 0.1, "ols_mse": 0.05, "weights": [2.0, -1.0, 1.0], "true_weights": [2, -1, 1]}


def plant(path: Path, kind: str) -> None:
    """A file that must not be read as a record."""
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "link":
        path.symlink_to("/dev/zero")
    elif kind == "huge":
        path.write_text(json.dumps({**OK, "weights": [1.0] * 200_000}))
    elif kind == "deep":
        path.write_text("[" * 100_000 + "]" * 100_000)
    elif kind == "dir":
        path.mkdir()


@pytest.mark.parametrize("kind", ["fifo", "link", "huge", "deep", "dir"])
def test_the_reader_refuses_what_is_not_a_small_regular_file(tmp_path, kind):
    plant(tmp_path / "metrics.json", kind)
    with pytest.raises(CorruptRecord):
        RunRecord.read(tmp_path)


@pytest.mark.parametrize(
    "text",
    [
        b"[" * 100_000 + b"]" * 100_000,
        b"- " * 101 + b"a\n",  # block sequences on one line
        b"[a: " * 51 + b"1" + b"]" * 51,  # a mapping in each flow sequence
        b"".join(b" " * i + b"k:\r" for i in range(101)) + b" " * 101 + b"k: 1\r",  # mappings, CR line breaks
        "".join(" " * i + "k:\u2028" for i in range(101)).encode("utf-16"),  # Unicode line breaks, UTF-16
    ],
)
def test_deep_yaml_is_refused_too(tmp_path, text):
    (tmp_path / "overrides.yaml").write_bytes(text)
    with pytest.raises(CorruptRecord):
        read_file(tmp_path / "overrides.yaml")
    (tmp_path / "ok.yaml").write_bytes(b"a:\n  b: [1, {c: -2}]\n  d: '*'\n")  # a `*` in a string: walked, kept
    assert read_file(tmp_path / "ok.yaml") == {"a": {"b": [1, {"c": -2}], "d": "*"}}


@pytest.mark.parametrize(
    "change",
    [
        {"status": "fine"},
        {"train_mse": "0.1"},
        {"train_mse": None},
        {"train_mse": 10**400},  # an integer past float's range (JSON has them)
        {"epoch_mse": [0.1, -(10**400)]},
        {"weights": [2.0, "x", 1.0]},
        {"weights": [2.0] * 50},  # shapes disagree with the true weights
        {"steps": 1.5},
        {"data": [1]},
    ],
)
def test_a_record_that_cannot_be_trusted_is_corrupt(change):
    with pytest.raises(CorruptRecord):
        RunRecord.parse({**OK, **change})


def test_a_run_refused_for_a_nan_value_reads_back_as_failed(make_cfg, tmp_path):
    RunRecord.failed(make_cfg("model.lr=nan"), ValueError("model.lr=nan: must be a finite number > 0")).write(tmp_path)
    assert RunRecord.read(tmp_path).status == "failed"


def test_a_failure_never_replaces_a_finished_record(make_cfg, tmp_path):
    RunRecord.parse(OK).write(tmp_path)
    RunRecord.failed(make_cfg(), RuntimeError("boom")).write(tmp_path)
    assert RunRecord.read(tmp_path).status == "ok"
    assert json.loads((tmp_path / "failed.json").read_text())["error"] == "RuntimeError: boom"


def test_an_atomic_write_that_fails_leaves_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    target.write_text("old")

    def full_disk(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError):
        write_atomic(target, b"new")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_yaml_aliases_are_refused(tmp_path):
    (tmp_path / "config.yaml").write_text("a: &a [1, 2]\nb: [*a, *a]\n")
    with pytest.raises(CorruptRecord, match="aliases"):
        read_file(tmp_path / "config.yaml")


@pytest.mark.parametrize("text", ["seed: 2001-12-14", "2001-12-14: x", "a: !!binary aGVsbG8=", "a: !!set {x}"])
def test_yaml_that_is_no_plain_data_is_refused(tmp_path, text):
    (tmp_path / "config.yaml").write_text(text)
    with pytest.raises(CorruptRecord):
        read_file(tmp_path / "config.yaml")


@pytest.mark.parametrize("kind", ["fifo", "link"])
def test_a_planted_lock_file_neither_blocks_nor_leads_elsewhere(tmp_path, kind):
    from linreg.record import RunDirBusy, RunDirLock, is_locked

    victim = tmp_path / "victim"
    os.mkfifo(tmp_path / ".lock") if kind == "fifo" else (tmp_path / ".lock").symlink_to(victim)
    assert not is_locked(tmp_path)
    if kind == "link":
        with pytest.raises(RunDirBusy):
            RunDirLock(tmp_path).__enter__()
        assert not victim.exists()
