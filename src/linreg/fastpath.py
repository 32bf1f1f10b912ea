"""The fast path: the project's only uses of private library APIs, behind one switch.

`LINREG_FASTPATH=0` turns it off: every run then takes the public path, with the same numbers bit for bit.
A piece stays only while it carries a measured gain (benchmarks/README.md). Private uses (3 of at most 4):
`LightningOptimizer._on_before_step` and `._on_after_step`, OmegaConf's YAML dumper. Process-wide: the libraries'
import without garbage collection, then `gc.freeze`; torch's `EventFileWriter` name while a member's writers are made.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import io
import itertools
import os
import socket
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import yaml
from omegaconf import OmegaConf
from omegaconf._utils import get_omega_conf_dumper

if TYPE_CHECKING:
    import lightning as L
    from lightning.pytorch.core.optimizer import LightningOptimizer
    from torch import Tensor

SWITCH = "LINREG_FASTPATH"  # the environment variable: 0 (or false, off, no) turns the fast path off


def enabled() -> bool:
    """Whether the fast path is on: the default; `LINREG_FASTPATH=0` turns it off."""
    return os.environ.get(SWITCH, "1").strip().lower() not in {"0", "false", "off", "no"}


@contextlib.contextmanager
def importing() -> Iterator[None]:
    """Import the libraries without garbage collection, then `gc.freeze` them once a process."""
    # Their objects live as long as the process, and each full collection would walk them all.
    held = enabled() and gc.isenabled()
    if held:
        gc.disable()
    try:
        yield
    finally:
        if enabled() and gc.get_freeze_count() == 0:
            gc.freeze()
        if held:
            gc.enable()


@contextlib.contextmanager
def events_written_here() -> Iterator[None]:
    """TensorBoard writers made inside write in the calling thread, each flush's records in one write."""
    # A member's run is written whole at once: TensorBoard's writer would wake its thread and reopen its file an event.
    if not enabled():
        yield
        return
    from torch.utils.tensorboard import writer

    threaded = writer.EventFileWriter  # the writer torch's SummaryWriter makes (public: tensorboard's)
    writer.EventFileWriter = EventsHere
    try:
        yield
    finally:
        writer.EventFileWriter = threaded


class EventsHere:
    """TensorBoard's `EventFileWriter` for one thread: its records held and appended at each flush."""

    # A file name's last part: past TensorBoard's own count, whose writer empties a file of its name (`wb`).
    uids = itertools.count(10**9)

    def __init__(self, logdir: str, max_queue_size: Any = 10, flush_secs: Any = 120, filename_suffix: str = "") -> None:
        from tensorboard.compat.proto.event_pb2 import Event, SourceMetadata
        from tensorboard.summary.writer.record_writer import RecordWriter

        _ = max_queue_size > 0, time.time() + flush_secs  # what TensorBoard's writer and its thread refuse
        os.makedirs(logdir, exist_ok=True)
        self.logdir, self.held = logdir, io.BytesIO()
        self.records = RecordWriter(self.held)  # each event framed and checksummed, as TensorBoard writes them
        while True:
            name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.{next(self.uids)}"
            with contextlib.suppress(FileExistsError):
                self.file = open(os.path.join(logdir, name + filename_suffix), "xb")  # closed by close()
                break
        writer = SourceMetadata(writer="tensorboard.summary.writer.event_file_writer")
        self.add_event(Event(wall_time=time.time(), file_version="brain.Event:2", source_metadata=writer))
        self.flush()

    def get_logdir(self) -> str:
        return self.logdir

    def add_event(self, event: Any) -> None:
        self.records.write(event.SerializeToString())

    def flush(self) -> None:
        self.file.write(self.held.getvalue())
        self.file.flush()
        self.held.seek(0)
        self.held.truncate()

    def close(self) -> None:
        try:
            self.flush()
        finally:  # a full disk: the file is closed all the same
            self.file.close()


def lean_steps(trainer: L.Trainer) -> bool:
    """Whether a fit may take the lean step: fast path on, one device, 32-bit (no plugin needs the wrappers)."""
    from lightning.pytorch.plugins.precision import Precision
    from lightning.pytorch.strategies import SingleDeviceStrategy

    strategy = trainer.strategy
    return enabled() and isinstance(strategy, SingleDeviceStrategy) and type(strategy.precision_plugin) is Precision


def lean_backward_and_step(loss: Tensor, opt: LightningOptimizer, update: Callable[[], Any]) -> None:
    """`loss.backward()` and `update()` (the optimizer's step) inside the bookkeeping `LightningOptimizer.step` adds."""
    # The strategy's, precision plugin's and callbacks' wrappers change nothing on one device at 32-bit, at a cost.
    loss.backward()
    opt._on_before_step()  # private: the profiler's "optimizer_step" section opens
    update()
    opt._on_after_step()  # private: the step is counted (what `trainer.global_step` reads)


def is_plain(data: Any) -> bool:
    """Strings, numbers, bools and None, in lists and string-keyed dicts: what OmegaConf keeps as it is."""
    if isinstance(data, dict):
        return all(type(k) is str and is_plain(v) for k, v in data.items())
    if isinstance(data, list):
        return all(map(is_plain, data))
    return data is None or type(data) in (str, int, float, bool)


def unspaced(data: Any) -> bool:
    """Whether every string in plain data (keys too) is printable ASCII, short and without a space: written alike."""
    if isinstance(data, dict):
        return all(unspaced(k) and unspaced(v) for k, v in data.items())
    if isinstance(data, list):
        return all(map(unspaced, data))
    # Not over 120: PyYAML writes a key of 123-128 characters as `? key`, libyaml as it is.
    return not isinstance(data, str) or (len(data) <= 120 and data.isascii() and data.isprintable() and " " not in data)


@functools.cache
def dumper(libyaml: bool) -> type:
    """The dumper `OmegaConf.to_yaml` uses (its quoting of strings), on libyaml's emitter or on PyYAML's own."""
    omegaconf = get_omega_conf_dumper()  # private
    base = yaml.CDumper if libyaml and yaml.__with_libyaml__ else omegaconf
    # No anchors: OmegaConf copies data into nodes of its own, so an object held twice is written twice.
    return type(
        "Dumper", (base,), {"yaml_representers": omegaconf.yaml_representers, "ignore_aliases": lambda *_: True}
    )


def to_yaml(data: Any) -> str:
    """`OmegaConf.to_yaml(data)`, for plain data without building an OmegaConf object first."""
    if not (enabled() and isinstance(data, (dict, list)) and is_plain(data)):  # else as OmegaConf does
        return OmegaConf.to_yaml(data)
    # libyaml's emitter writes the same text where no string can be folded: the two fold long lines apart
    return yaml.dump(data, Dumper=dumper(unspaced(data)), default_flow_style=False, allow_unicode=True, sort_keys=False)
