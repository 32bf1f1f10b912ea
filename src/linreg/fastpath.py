"""The fast path: the project's only uses of private library APIs, behind one switch.

`LINREG_FASTPATH=0` turns it off: every run then takes the public path, with the same numbers bit for bit
(tests/test_fastpath.py). A piece stays only while it carries a measured gain (benchmarks/README.md).
Private uses (2 of at most 4): `LightningOptimizer._on_before_step` and `._on_after_step`.
Process-wide (1): `gc.freeze` once the libraries are imported.
"""

import gc
import os
from collections.abc import Callable
from typing import Any

import lightning as L
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import SingleDeviceStrategy
from torch import Tensor

SWITCH = "LINREG_FASTPATH"  # the environment variable: 0 (or false, off, no) turns the fast path off


def enabled() -> bool:
    """Whether the fast path is on: the default; `LINREG_FASTPATH=0` turns it off."""
    return os.environ.get(SWITCH, "1").strip().lower() not in {"0", "false", "off", "no"}


def freeze_imports() -> None:
    """`gc.freeze` once a process: the imported libraries (~370,000 objects) left out of every later collection."""
    # Each full collection walks them all, and Python runs several as it exits (~1 s a run here).
    if enabled() and gc.get_freeze_count() == 0:
        gc.freeze()


def lean_steps(trainer: L.Trainer) -> bool:
    """Whether a fit may take the lean step: fast path on, one device, 32-bit (no plugin needs the wrappers)."""
    strategy = trainer.strategy
    return enabled() and isinstance(strategy, SingleDeviceStrategy) and type(strategy.precision_plugin) is Precision


def lean_backward_and_step(loss: Tensor, opt: LightningOptimizer, update: Callable[[], Any]) -> None:
    """`loss.backward()` and `update()` (the optimizer's step) inside the bookkeeping `LightningOptimizer.step` adds.

    Without the strategy's, precision plugin's and callbacks' wrappers and hooks of the public path: on one device
    at 32-bit they change nothing here, and cost more than the SGD step of a 3-parameter model.
    """
    loss.backward()
    opt._on_before_step()  # private: the profiler's "optimizer_step" section opens
    update()
    opt._on_after_step()  # private: the step is counted (what `trainer.global_step` reads)
