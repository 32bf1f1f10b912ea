"""The benchmark's baselines are the tutorial's loops, and they train (no timing here)."""

import pytest
import torch

from benchmarks.tutorial_loops import data_iter, make_data, train
from linreg.data import tensor_gen_reg


def test_data_iter_visits_every_sample_once_per_epoch():
    features, labels = make_data(95)
    seen = torch.cat([x for x, _ in data_iter(10, features, labels)])
    assert len(seen) == 95
    assert torch.allclose(seen.sum(0), features.sum(0))


def test_tutorial_data_is_the_tutorials_and_the_projects():
    features, labels = make_data(1000)
    for ours, theirs in zip((features, labels), tensor_gen_reg(generator=torch.Generator().manual_seed(420))):
        assert torch.equal(ours, theirs)
    assert features[0].tolist() == pytest.approx([-0.00704, 0.50445, 1.0], abs=1e-5)
    assert labels[0].item() == pytest.approx(0.47349, abs=1e-5)


@pytest.mark.parametrize("model", ["manual", "linear"])
def test_each_plain_loop_learns_the_true_weights(model):
    assert train(model, 1000, 10, 0.03, 3) == pytest.approx([2, -1, 1], abs=0.01)
