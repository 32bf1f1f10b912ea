"""The benchmark's baselines are the tutorial's loops, on the project's data, and they train (no timing here).

`system` tests (make test-all): they check the benchmark's code, not what a user of linreg meets.
"""

import pytest
import torch

from benchmarks.tutorial_loops import data_iter, make_data, train
from linreg.data import tensorGenReg

pytestmark = pytest.mark.system


def test_data_iter_visits_every_sample_once_per_epoch():
    features, labels = make_data(95)
    seen = torch.cat([x for x, _ in data_iter(10, features, labels)])
    assert len(seen) == 95
    assert torch.allclose(seen.sum(0), features.sum(0))


def test_the_baselines_train_on_the_projects_data():
    # The tutorial's own draws (first row etc.) are tests/test_data.py's: here only "the same as the project's".
    for ours, theirs in zip(make_data(1000), tensorGenReg(generator=torch.Generator().manual_seed(420))):
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("model", ["manual", "linear"])
def test_each_plain_loop_learns_the_true_weights(model):
    assert train(model, 1000, 10, 0.03, 3) == pytest.approx([2, -1, 1], abs=0.01)
