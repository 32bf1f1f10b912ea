"""The fast path (linreg.fastpath): each private use against the public path, bit for bit, and its one switch."""

import os
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path

import lightning as L
import pytest
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from linreg import fastpath
from tests.test_dashboard import run
from tests.test_models import fit

SRC = Path(fastpath.__file__).resolve().parent
PRIVATE = re.compile(r"\._[A-Za-z]\w*")  # an attribute whose name starts with one underscore
OWN_NAMES = {"_target_", "_exit"}  # Hydra's `_target_` key and `os._exit` (public, documented)


def code_lines(path: Path) -> list[str]:
    """A module's lines without comments and docstring lines (what the names in them say is not a use)."""
    lines, in_doc = [], False
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith('"""'):
            in_doc = not (len(stripped) > 3 and stripped.endswith('"""')) and not in_doc
            continue
        if in_doc:
            if stripped.endswith('"""'):
                in_doc = False
            continue
        lines.append(line.split("#", 1)[0])
    return lines


def private_names(path: Path) -> set[str]:
    """The single-underscore attribute names a module's code uses."""
    return {m.group()[1:] for line in code_lines(path) for m in PRIVATE.finditer(line)}


def events(run_dir: Path) -> EventAccumulator:
    """Every event of the one TensorBoard run under `run_dir`, loaded."""
    (folder,) = {p.parent for p in run_dir.rglob("events.out.tfevents.*")}
    ea = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    ea.Reload()
    return ea


def scalars(ea: EventAccumulator) -> dict[str, list[tuple[int, float]]]:
    """Each scalar tag's (step, value) points."""
    return {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}


@pytest.mark.parametrize(("value", "on"), [(None, True), ("1", True), ("0", False), ("false", False), (" OFF ", False)])
def test_one_switch_in_the_environment(monkeypatch, value, on):
    if value is None:
        monkeypatch.delenv(fastpath.SWITCH, raising=False)
    else:
        monkeypatch.setenv(fastpath.SWITCH, value)
    assert fastpath.enabled() is on


@pytest.mark.parametrize("name", ["manual", "linear"])
@pytest.mark.parametrize("batches_per_call", [1, 7])
def test_lean_step_gives_the_public_paths_weights_bit_for_bit(monkeypatch, name, batches_per_call):
    # _on_before_step/_on_after_step: the lean step against manual_backward + LightningOptimizer.step.
    monkeypatch.setenv(fastpath.SWITCH, "0")
    public = fit(name, batches_per_call, max_epochs=2, log_every_sgd_steps=10)
    monkeypatch.setenv(fastpath.SWITCH, "1")
    lean = fit(name, batches_per_call, max_epochs=2, log_every_sgd_steps=10)
    lean_steps, public_steps = lean.global_step_seen, public.global_step_seen
    assert not public.lean_steps and lean.lean_steps
    assert lean.weights() == public.weights()
    assert lean.epoch_mse == public.epoch_mse
    assert lean_steps == public_steps == 200  # 2 epochs x 100 batches: every lean step counted in global_step


def test_the_lean_step_is_for_one_device_at_32_bit_only():
    # Mixed precision needs its plugin's backward (loss scaling): the public path there.
    trainer = L.Trainer(accelerator="cpu", precision="bf16-mixed", logger=False, enable_progress_bar=False)
    assert not fastpath.lean_steps(trainer)
    assert fastpath.lean_steps(L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False))


@pytest.mark.parametrize("model", ["manual", "linear"])
def test_a_whole_run_is_the_same_bits_with_the_fast_path_off(make_cfg, tmp_path, monkeypatch, model):
    overrides = (f"model={model}", "data.num_examples=300", "data.batches_per_call=4")
    monkeypatch.setenv(fastpath.SWITCH, "0")
    public = run(make_cfg(*overrides, run_dir=tmp_path / "public"))
    monkeypatch.setenv(fastpath.SWITCH, "1")
    fast = run(make_cfg(*overrides, run_dir=tmp_path / "fast"))
    public.pop("fit_seconds"), fast.pop("fit_seconds")
    assert fast == public  # weights, epoch_mse, steps: every float bit for bit
    public_events, fast_events = events(tmp_path / "public"), events(tmp_path / "fast")
    assert scalars(fast_events) == scalars(public_events)  # every curve, at the same steps
    assert fast_events.Graph() == public_events.Graph()
    (public_image,), (fast_image,) = public_events.Images("train_end/fit"), fast_events.Images("train_end/fit")
    assert fast_image.encoded_image_string == public_image.encoded_image_string


def test_events_written_here_are_the_writer_threads_records(tmp_path, monkeypatch):
    from torch.utils.tensorboard import SummaryWriter, writer
    from torch.utils.tensorboard.summary import hparams

    def write(folder: str) -> tuple[str, list[bytes], int]:
        with fastpath.events_written_here():
            summaries, threads = SummaryWriter(tmp_path / folder), threading.active_count()
        for step in range(5):
            summaries.add_scalar("train/mse", 1 / (step + 1), step, walltime=1.0)
            summaries.flush()  # each flush appends what it holds
        for summary in hparams({"lr": 0.1}, {"train_end/mse": 0.2}):  # as linreg.dashboard writes them
            summaries.file_writer.add_summary(summary, 4)
        summaries.close()
        (file,) = (tmp_path / folder).glob("events.out.tfevents.*")
        events = list(EventFileLoader(str(file)).Load())
        for event in events:
            event.wall_time = 0  # the writer's first event and the HParams record's say when they were made
        return file.name, [event.SerializeToString() for event in events], threads

    threaded = writer.EventFileWriter
    monkeypatch.setenv(fastpath.SWITCH, "0")
    public_name, public, threads_public = write("public")
    monkeypatch.setenv(fastpath.SWITCH, "1")
    name, here, threads_here = write("here")
    assert here == public and len(public) == 9  # the file's version, 5 scalars and the HParams record's 3 events
    assert threads_here == threads_public - 1  # no writer thread
    named = rf"events\.out\.tfevents\.\d{{10}}\.{re.escape(socket.gethostname())}\.{os.getpid()}\.\d+"
    assert re.fullmatch(named, name) and re.fullmatch(named, public_name)
    assert int(name.rpartition(".")[2]) >= 10**9 > int(public_name.rpartition(".")[2])  # TensorBoard's writer, made
    # later in this dir and second, empties a file of its name: its count never reaches these
    assert writer.EventFileWriter is threaded  # writers made after it are TensorBoard's again


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the writer thread's, raised
@pytest.mark.parametrize("switch", ["0", "1"])
@pytest.mark.parametrize("bad", [{"max_queue": "abc"}, {"max_queue": None}, {"flush_secs": None}])
def test_writer_settings_the_writer_thread_refuses_are_refused_here_too(tmp_path, monkeypatch, switch, bad):
    from torch.utils.tensorboard import SummaryWriter

    monkeypatch.setenv(fastpath.SWITCH, switch)
    with pytest.raises(TypeError), fastpath.events_written_here():
        SummaryWriter(tmp_path, **bad).close()
    for thread in threading.enumerate():  # the writer thread ends with its error here, not in a later test
        if getattr(thread, "exception", None) is not None:  # a writer thread that raised, ending
            thread.join(5)


def test_the_seam_holds_every_private_use_and_at_most_four():
    assert private_names(SRC / "fastpath.py") == {"_on_before_step", "_on_after_step", "_utils"}
    outside = {p.name: private_names(p) - OWN_NAMES for p in sorted(SRC.glob("*.py")) if p.name != "fastpath.py"}
    assert {name: names for name, names in outside.items() if names} == {}, "move private uses into fastpath.py"


def test_yaml_is_the_text_omegaconf_writes(monkeypatch):
    monkeypatch.delenv(fastpath.SWITCH, raising=False)
    strings = ["true", "1", "1e5", "${a.b}", "ü ✓", "a: b", "", "null", "on", "0x10", "~", " x", "two\nlines", "'q'"]
    numbers = [1, -2.5, 1e-7, 1e20, float("nan"), float("-inf"), True, None]
    unspaced = "yes 1_000 .inf -x a:b #x [1] {a} &x *y !t %p @a ? | ''".split() + ["x" * 120]  # libyaml emits them
    shared = [1, {"y": "z"}]  # held twice: written twice, as OmegaConf does (no YAML anchor)
    for data in (
        {"s": strings, "n": numbers, "d": {"e": {}, "l": [], "x": [[1], {"y": "z"}]}},
        {"u": unspaced, "n": numbers, "k" * 300: {"e": {}, "x": [[1], shared]}, "again": shared},
        {"k" * n: "v" * n for n in range(115, 135)},  # PyYAML writes a key of 123-128 characters as `? key`
        ["seed=1"],
        [],
    ):
        assert fastpath.to_yaml(data) == OmegaConf.to_yaml(data)
    assert fastpath.unspaced(unspaced) and not fastpath.unspaced(strings) and not fastpath.unspaced(["x" * 121])


def test_the_heap_is_frozen_once_and_only_on_the_fast_path():
    # gc is process-wide: looked at in a fresh interpreter, the switch read at each call as a run reads it.
    code = (
        "import gc, os; from linreg import fastpath\n"
        "def held(): return not gc.isenabled()\n"
        "os.environ[fastpath.SWITCH] = '0'\n"
        "with fastpath.importing(): a = held()\n"
        "off = gc.get_freeze_count()\n"
        "os.environ[fastpath.SWITCH] = '1'\n"
        "with fastpath.importing(): import lightning; b = held()\n"
        "on = gc.get_freeze_count()\n"
        "try:\n    with fastpath.importing(): raise ValueError\nexcept ValueError: pass\n"
        "assert gc.isenabled()\n"
        "gc.disable()\n"
        "with fastpath.importing(): pass\n"
        "print(a, b, gc.isenabled(), off, on, gc.get_freeze_count())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split()[:3] == ["False", "True", "False"]  # held on the fast path only; a user's gc.disable() kept
    off, on, again = map(int, out.split()[3:])
    assert off == 0 and on > 100_000 and again == on  # the imported libraries, frozen once
