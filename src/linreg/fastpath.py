"""The fast path: the project's only uses of private library APIs, behind one switch.

`LINREG_FASTPATH=0` in the environment turns all of it off, and every run takes the public path with
the same numbers bit for bit (tests/test_fastpath.py compares the two). A piece is here only while it
carries a measured gain on a `make bench` target (benchmarks/README.md, "The fast path").

Private uses (2 of at most 4): `LightningOptimizer._on_before_step` and `LightningOptimizer._on_after_step`,
the step bookkeeping Lightning's manual-optimization loop installs on each optimizer (the lean step).
"""

import os
from collections.abc import Callable
from typing import Any

import lightning as L
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import SingleDeviceStrategy
from torch import Tensor

SWITCH = "LINREG_FASTPATH"  # the environment variable: 0 (or false, off, no) turns the fast path off
OFF = {"0", "false", "off", "no"}


def enabled() -> bool:
    """Whether the fast path is on: the default; `LINREG_FASTPATH=0` turns it off."""
    return os.environ.get(SWITCH, "1").strip().lower() not in OFF


def lean_steps(trainer: L.Trainer) -> bool:
    """Whether a fit may take the lean step: fast path on, one device, 32-bit (no plugin needs the wrappers)."""
    strategy = trainer.strategy
    single = isinstance(strategy, SingleDeviceStrategy) and type(strategy.precision_plugin) is Precision
    return enabled() and single


def lean_backward_and_step(loss: Tensor, opt: LightningOptimizer, update: Callable[[], Any]) -> None:
    """`loss.backward()` and `update()`, inside the bookkeeping `LightningOptimizer.step` adds around a step.

    The public path (`manual_backward` + `LightningOptimizer.step`) also runs the strategy's and precision
    plugin's wrappers and the callbacks' backward and optimizer-step hooks: on one device at 32-bit they
    change nothing here, and they cost more than the SGD step of a 3-parameter model. `update` is the
    optimizer's step, or its update alone without torch's per-step hook wrapper (`HandSGD.update`).
    """
    loss.backward()
    opt._on_before_step()  # private: the profiler's "optimizer_step" section opens
    update()
    opt._on_after_step()  # private: the step is counted (what `trainer.global_step` reads)
