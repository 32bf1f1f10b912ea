"""The run's own callbacks: EndWithSweep tells a live sweep from a gone one."""

import subprocess
import sys

import pytest

from linreg.callbacks import EndWithSweep, SweepGone


def test_a_live_sweep_keeps_its_job_and_a_gone_one_ends_it():
    sweep = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        watch = EndWithSweep(sweep.pid)
        watch.check()  # alive: nothing happens
    finally:
        sweep.kill()
        sweep.wait()
    with pytest.raises(SweepGone, match=f"pid {sweep.pid}"):
        watch.check()


def test_a_sweep_gone_before_the_job_starts_ends_it_at_once():
    sweep = subprocess.Popen([sys.executable, "-c", "pass"])
    sweep.wait()
    with pytest.raises(SweepGone):
        EndWithSweep(sweep.pid).check()
