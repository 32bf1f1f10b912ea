"""The tutorial's data: the `tensorGenReg` generator and a DataModule that serves it."""

from collections.abc import Iterator, Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor


def tensorGenReg(
    num_examples: int = 1000,
    w: Sequence[float] = (2, -1, 1),
    bias: bool = True,
    delta: float = 0.01,
    deg: int = 1,
    generator: torch.Generator | None = None,
    ones_column: bool = True,
) -> tuple[Tensor, Tensor]:
    """The tutorial's `tensorGenReg`: y = pow(X, deg) @ w (+ intercept) + noise * delta."""
    w_all = torch.tensor(list(w), dtype=torch.float32).reshape(-1, 1)
    w_true = w_all[:-1] if bias else w_all
    # Two random draws in the tutorial's order (features, then noise): a seed gives its tensors bit for bit.
    features = torch.randn(num_examples, len(w_true), generator=generator)
    labels = torch.mm(torch.pow(features, deg), w_true)
    if bias:
        labels = labels + w_all[-1]
    labels = labels + torch.randn(labels.shape, generator=generator) * delta
    if bias and ones_column:  # `ones_column=False`: the features without it (the `linear` model's view)
        features = torch.cat((features, torch.ones(num_examples, 1)), 1)
    return features, labels


OLS_CHUNK = 1 << 18  # rows per chunk of the least-squares sums (6 MiB of float64 for 3 columns)


class EpochBatchSampler:
    """Index slices of a fresh permutation per epoch (a slice: one call's mini-batches); Lightning calls `set_epoch`."""

    def __init__(self, num_examples: int, size: int, seed: int) -> None:
        self.num_examples, self.size, self.seed = num_examples, size, seed  # size: rows a slice
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning's fit loop (also after a resume) with the epoch about to run."""
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-self.num_examples // self.size)

    def __iter__(self) -> Iterator[Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)  # a function of (seed, epoch) only
        # int32 where it fits: half the bytes, the same permutation (randperm's draws don't depend on the dtype).
        dtype = torch.int32 if self.num_examples < 2**31 else torch.int64
        perm = torch.randperm(self.num_examples, generator=g, dtype=dtype)
        starts = range(0, len(perm), self.size)  # sliced lazily: `perm.split()` makes every view up front
        for i in starts[:-1]:
            yield perm[i : i + self.size]
        if starts:
            # A copy, `perm` dropped: Lightning fetches it early, so the epoch-end evaluation runs without n indices.
            last = perm[starts[-1] :].clone() if starts[-1] else perm
            del perm
            yield last


class BatchLoader:
    """The mini-batches of one `training_step` call per item: the sampler's slice gathered at once, then split."""

    def __init__(self, x: Tensor, y: Tensor, sampler: EpochBatchSampler, batch_size: int) -> None:
        self.x, self.y, self.sampler, self.batch_size = x, y, sampler, batch_size

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[list[tuple[Tensor, Tensor]]]:
        for idx in self.sampler:
            xs, ys = self.x.index_select(0, idx), self.y.index_select(0, idx)
            yield list(zip(xs.split(self.batch_size), ys.split(self.batch_size)))


class FullBatch:
    """The whole data set as a single batch (a list would read as several loaders to Lightning)."""

    def __init__(self, x: Tensor, y: Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return 1

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        yield self.x, self.y


class RegressionDataModule(L.LightningDataModule):
    """Makes the tutorial's data once (in `setup`, as Lightning's hooks go) and serves seeded, shuffled mini-batches."""

    def __init__(
        self,
        num_examples: int = 1000,
        w: Sequence[float] = (2, -1, 1),
        bias: bool = True,
        delta: float = 0.01,
        deg: int = 1,
        batch_size: int = 10,
        seed: int = 420,
        ones_column: bool = True,
        batches_per_call: int = 1,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.features: Tensor | None = None
        self.labels: Tensor | None = None
        self.ols_cache: float | None = None

    @property
    def in_features(self) -> int:
        """Number of model inputs in the view this DataModule serves: the intercept's input only as a ones column."""
        return len(self.hparams.w) - bool(self.hparams.bias and not self.hparams.ones_column)

    def setup(self, stage: str | None = None) -> None:
        """Make the data once; later calls (fit after fit, resume) keep it."""
        if self.features is None:
            h = self.hparams
            # `manual` takes the ones column as its intercept input (linreg(X, w)); `linear` has nn.Linear's bias.
            g = torch.Generator().manual_seed(h.seed)
            self.features, self.labels = tensorGenReg(
                h.num_examples, h.w, h.bias, h.delta, h.deg, generator=g, ones_column=h.ones_column
            )

    def finite(self) -> bool:
        """Whether the generated data fits float32 (huge w, delta or deg overflow it)."""
        x, y = self.full_data()
        return bool(torch.isfinite(x).all() and torch.isfinite(y).all())

    def ols_mse(self) -> float:
        """The least-squares MSE, the floor of any linear model (once): float64 normal equations, a chunk at a time."""
        if self.ols_cache is not None:
            return self.ols_cache
        x_all, y_all = self.full_data()
        add_ones = bool(self.hparams.bias and not self.hparams.ones_column)
        k = x_all.shape[1] + add_ones
        gram = torch.zeros(k + 1, k + 1, dtype=torch.float64)  # [X y]'[X y]: X'X, X'y and y'y
        for i in range(0, len(x_all), OLS_CHUNK):
            x = x_all[i : i + OLS_CHUNK]
            parts = (x, torch.ones(len(x), 1)) if add_ones else (x,)
            z = torch.cat((*parts, y_all[i : i + OLS_CHUNK]), 1).double()
            gram += z.T @ z
        xtx, xty, yty = gram[:k, :k], gram[:k, k:], gram[k, k]
        coef = torch.linalg.lstsq(xtx, xty, driver="gelsd").solution  # min-norm even if rank-deficient
        # |Xc - y|^2 = y'y - 2c'X'y + c'X'Xc; clamped, as rounding can dip below an exact fit's zero.
        sse = yty - 2 * (coef.T @ xty).squeeze() + (coef.T @ xtx @ coef).squeeze()
        self.ols_cache = max(sse.item(), 0.0) / len(y_all)
        return self.ols_cache

    def full_data(self) -> tuple[Tensor, Tensor]:
        """The whole data set, for full-data evaluation."""
        assert self.features is not None and self.labels is not None, "call setup() first"
        return self.features, self.labels

    def train_dataloader(self) -> BatchLoader:
        """Shuffled mini-batches; the order depends only on (seed, epoch)."""
        x, y = self.full_data()
        h = self.hparams
        sampler = EpochBatchSampler(len(x), h.batch_size * h.batches_per_call, h.seed)  # a call's rows a slice
        return BatchLoader(x, y, sampler, h.batch_size)

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        # The data is made on the CPU: there, Lightning's walk over every tensor of every batch has nothing to move.
        if device.type == "cpu":
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def val_dataloader(self) -> FullBatch:
        """The full data set as one batch: the tutorial's per-epoch `loss(net(features, w), labels)`."""
        return FullBatch(*self.full_data())

    test_dataloader = val_dataloader  # the same batch for `Trainer.test` (linreg.evaluate)
