"""The generator matches the tutorial's; the DataModule's batches depend on (seed, epoch) only."""

import weakref

import pytest
import torch

from benchmarks.tutorial_loops import tensor_gen_reg as tutorial_tensorGenReg  # the benchmark's copy
from linreg.data import EpochBatchSampler, RegressionDataModule, tensorGenReg


def reference_tensorGenReg(num_examples=1000, w=(2, -1, 1), bias=True, delta=0.01, deg=1):
    """The tutorial's torchLearning.tensorGenReg, re-derived as written (global RNG)."""
    if bias:
        num_inputs = len(w) - 1
        features_true = torch.randn(num_examples, num_inputs)
        w_true = torch.tensor(w[:-1]).reshape(-1, 1).float()
        b_true = torch.tensor(w[-1]).float()
        if num_inputs == 1:
            labels_true = torch.pow(features_true, deg) * w_true + b_true
        else:
            labels_true = torch.mm(torch.pow(features_true, deg), w_true) + b_true
        features = torch.cat((features_true, torch.ones(len(features_true), 1)), 1)
        labels = labels_true + torch.randn(size=labels_true.shape) * delta
    else:
        num_inputs = len(w)
        features = torch.randn(num_examples, num_inputs)
        w_true = torch.tensor(w).reshape(-1, 1).float()
        if num_inputs == 1:
            labels_true = torch.pow(features, deg) * w_true
        else:
            labels_true = torch.mm(torch.pow(features, deg), w_true)
        labels = labels_true + torch.randn(size=labels_true.shape) * delta
    return features, labels


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"deg": 2},
        {"delta": 2},
        {"w": (1.5, -2, 0.5, 3)},
        {"w": (3, 1), "bias": True},
        {"w": (2, -1), "bias": False},
        {"w": (4,), "bias": False, "deg": 3},
        {"num_examples": 7, "delta": 0.5, "deg": 2, "w": (1, 2, 3, 4, 5)},
    ],
)
def test_generator_matches_tutorial_bit_for_bit(kwargs):
    torch.manual_seed(420)
    ref_x, ref_y = reference_tensorGenReg(**kwargs)
    x, y = tensorGenReg(**kwargs, generator=torch.Generator().manual_seed(420))
    assert torch.equal(x, ref_x) and torch.equal(y, ref_y)
    torch.manual_seed(420)  # the global RNG gives the same tensors as a seeded generator
    gx, gy = tensorGenReg(**kwargs)
    assert torch.equal(gx, ref_x) and torch.equal(gy, ref_y)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_examples": 1},
        {"num_examples": 15},
        {"num_examples": 17, "deg": 2},
        {"num_examples": 1001, "bias": False},
        {"num_examples": 999, "delta": 0},
        {"num_examples": 40_005},
        {"num_examples": 40_003, "deg": 3, "w": (1.5, -2, 0.5, 3)},
        {"num_examples": 65_537, "w": (4, -1), "delta": 0.3},
        {"num_examples": 13, "w": (-2.5,), "bias": False, "deg": 2},
        {"num_examples": 9, "w": (7,)},
        {"num_examples": 0},
    ],
)
@pytest.mark.parametrize("seed", [0, 420])
def test_generator_matches_the_benchmarks_copy_bit_for_bit(kwargs, seed):
    ref_x, ref_y = tutorial_tensorGenReg(**kwargs, generator=torch.Generator().manual_seed(seed))
    x, y = tensorGenReg(**kwargs, generator=torch.Generator().manual_seed(seed))
    assert x.is_contiguous() and torch.equal(x, ref_x) and torch.equal(y, ref_y)
    # without the ones column: the same numbers, the column never made
    lx, ly = tensorGenReg(**kwargs, generator=torch.Generator().manual_seed(seed), ones_column=False)
    ref_lx = ref_x[:, :-1] if kwargs.get("bias", True) else ref_x
    assert lx.is_contiguous() and torch.equal(lx, ref_lx) and torch.equal(ly, ref_y)


def test_generator_gives_the_tutorials_first_row():
    torch.manual_seed(420)
    x, y = tensorGenReg()
    assert torch.allclose(x[0], torch.tensor([-0.00704, 0.50445, 1.0]), atol=1e-5)
    assert y[0].item() == pytest.approx(0.47349, abs=1e-5)


def test_generator_shapes_and_dtypes():
    x, y = tensorGenReg(50, w=(1, 2, 3, 4))
    assert x.shape == (50, 4) and y.shape == (50, 1)
    assert x.dtype == y.dtype == torch.float32
    assert torch.equal(x[:, -1], torch.ones(50))
    x, y = tensorGenReg(50, w=(1, 2, 3, 4), bias=False)
    assert x.shape == (50, 4) and y.shape == (50, 1)


def epoch_labels(dm: RegressionDataModule, epoch: int) -> list[torch.Tensor]:
    """The label batches of one epoch, flattened out of their chunks."""
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(epoch)
    return [y for chunk in loader for _, y in chunk]


def make_dm(**kwargs) -> RegressionDataModule:
    dm = RegressionDataModule(**{"num_examples": 95, "batch_size": 10, **kwargs})
    dm.setup("fit")
    return dm


def test_batch_order_depends_on_seed_and_epoch_only():
    a, b = make_dm(), make_dm()
    assert all(torch.equal(p, q) for p, q in zip(epoch_labels(a, 0), epoch_labels(b, 0)))
    # re-asking an epoch gives it again: order is not a function of how many epochs ran before
    assert all(torch.equal(p, q) for p, q in zip(epoch_labels(a, 1), epoch_labels(a, 1)))
    assert not torch.equal(torch.cat(epoch_labels(a, 0)), torch.cat(epoch_labels(a, 1)))
    other_seed = make_dm(seed=421)
    assert not torch.equal(torch.cat(epoch_labels(a, 0)), torch.cat(epoch_labels(other_seed, 0)))


def test_one_datamodule_serves_both_models_with_the_same_batches():
    manual, linear = make_dm(ones_column=True), make_dm(ones_column=False)
    assert manual.in_features == 3 and linear.in_features == 2
    assert manual.full_data()[0].shape[1] == 3 and linear.full_data()[0].shape[1] == 2
    assert torch.equal(manual.full_data()[0][:, :2], linear.full_data()[0])
    assert all(torch.equal(p, q) for p, q in zip(epoch_labels(manual, 2), epoch_labels(linear, 2)))
    assert manual.ols_mse() == pytest.approx(linear.ols_mse())


def test_batches_cover_every_sample_once_with_a_short_last_batch():
    dm = make_dm()
    sizes = [len(y) for y in epoch_labels(dm, 0)]
    assert sizes == [10] * 9 + [5]
    assert torch.equal(
        torch.sort(torch.cat(epoch_labels(dm, 0)).flatten()).values, torch.sort(dm.full_data()[1].flatten()).values
    )


def test_batches_per_call_chunks_the_same_batches():
    plain, chunked = make_dm(), make_dm(batches_per_call=4)
    loader = chunked.train_dataloader()
    assert len(loader) == 3 and [len(c) for c in loader] == [4, 4, 2]
    plain_batches, chunked_batches = epoch_labels(plain, 1), epoch_labels(chunked, 1)
    assert [len(y) for y in chunked_batches] == [10] * 9 + [5]
    assert len(plain_batches) == len(chunked_batches)
    assert all(torch.equal(p, q) for p, q in zip(plain_batches, chunked_batches))


def test_setup_makes_the_data_once():
    dm = make_dm()
    x = dm.full_data()[0]
    dm.setup("fit")
    assert dm.full_data()[0] is x


@pytest.mark.parametrize("num_examples, batch_size", [(95, 10), (100, 10), (7, 10), (1, 1), (0, 4)])
def test_sampler_slices_the_seeded_permutation(num_examples, batch_size):
    sampler = EpochBatchSampler(num_examples, batch_size, seed=3)
    sampler.set_epoch(2)
    batches = list(sampler)
    g = torch.Generator().manual_seed(3 * 1_000_003 + 2)
    perm = torch.randperm(num_examples, generator=g)  # int64, as before
    expected = [perm[i : i + batch_size] for i in range(0, num_examples, batch_size)]
    assert len(batches) == len(expected) == len(sampler)
    assert all(torch.equal(b.long(), e) for b, e in zip(batches, expected))


def test_last_index_batch_does_not_keep_the_permutation():
    batches = iter(EpochBatchSampler(10, 4, seed=0))
    first = next(batches)
    perm = weakref.ref(first._base)  # the batches before the last are views of the permutation
    expected = first._base[8:].clone()
    del first
    next(batches)
    last = next(batches)
    assert perm() is None  # the generator let go of it before the epoch's last step
    assert torch.equal(last, expected)
