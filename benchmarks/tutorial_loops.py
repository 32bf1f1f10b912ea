"""The tutorial's own training loops, as written there: the baselines the project is timed against.

§5.2 (manual): `data_iter` + `linreg` + `squared_loss` + `sgd`, a full-data loss after each epoch.
§5.3 (linear): `DataLoader(TensorDataset, shuffle=True)` + `nn.Linear` + `nn.MSELoss` + `optim.SGD`.
Kept apart from `linreg` on purpose: a speed-up there must not speed up the baseline, and the plain
process must not pay for importing Lightning.
"""

import random
from collections.abc import Iterator

import torch
from torch import Tensor, nn, optim
from torch.utils.data import DataLoader, TensorDataset


def tensor_gen_reg(num_examples: int = 1000, w=(2, -1, 1), bias=True, delta=0.01, deg=1, generator=None):
    """The tutorial's `tensorGenReg` as written (`linreg.data`'s allocates less, same bits: a test checks)."""
    w_all = torch.tensor(list(w), dtype=torch.float32).reshape(-1, 1)
    w_true = w_all[:-1] if bias else w_all
    features = torch.randn(num_examples, len(w_true), generator=generator)
    labels = torch.mm(torch.pow(features, deg), w_true)
    if bias:
        labels = labels + w_all[-1]
    labels = labels + torch.randn(labels.shape, generator=generator) * delta
    if bias:
        features = torch.cat((features, torch.ones(num_examples, 1)), 1)
    return features, labels


def data_iter(batch_size: int, features: Tensor, labels: Tensor) -> Iterator[tuple[Tensor, Tensor]]:
    """torchLearning's `data_iter`: a `random.shuffle`d index list, one `index_select` per batch."""
    num_examples = len(features)
    indices = list(range(num_examples))
    random.shuffle(indices)
    for i in range(0, num_examples, batch_size):
        j = torch.tensor(indices[i : min(i + batch_size, num_examples)])
        yield torch.index_select(features, 0, j), torch.index_select(labels, 0, j)


def linreg(X: Tensor, w: Tensor) -> Tensor:  # noqa: N803 (the tutorial's names)
    """The tutorial's model."""
    return torch.mm(X, w)


def squared_loss(y_hat: Tensor, y: Tensor) -> Tensor:
    """The tutorial's MSE."""
    num_ = y.numel()
    sse = torch.sum((y_hat.reshape(-1, 1) - y.reshape(-1, 1)) ** 2)
    return sse / num_


def sgd(params: Tensor, lr: float) -> None:
    """The tutorial's update, through `.data` as it writes it."""
    params.data -= lr * params.grad
    params.grad.zero_()


class LR(nn.Module):
    """The tutorial's §5.3 model."""

    def __init__(self, in_features: int = 2, out_features: int = 1) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x)


def make_data(num_examples: int, deg: int = 1, delta: float = 0.01, seed: int = 420) -> tuple[Tensor, Tensor]:
    """`torch.manual_seed(420); tensorGenReg(...)`: the tutorial's data (with its ones column)."""
    return tensor_gen_reg(num_examples, deg=deg, delta=delta, generator=torch.Generator().manual_seed(seed))


def manual_loop(features: Tensor, labels: Tensor, batch_size: int, lr: float, num_epochs: int) -> list[float]:
    """§5.2's training loop; returns the weights."""
    w = torch.zeros(features.shape[1], 1, requires_grad=True)
    net, loss = linreg, squared_loss
    for _epoch in range(num_epochs):
        for X, y in data_iter(batch_size, features, labels):  # noqa: N806
            l = loss(net(X, w), y)  # noqa: E741
            l.backward()
            sgd(w, lr)
        train_l = loss(net(features, w), labels)  # the tutorial prints it after each epoch
        train_l.item()
    return w.detach().flatten().tolist()


def linear_loop(features: Tensor, labels: Tensor, batch_size: int, lr: float, num_epochs: int) -> list[float]:
    """§5.3's `fit`, with the ones column dropped as there; returns the weights."""
    features = features[:, :-1]
    batch_data = DataLoader(TensorDataset(features, labels), batch_size=batch_size, shuffle=True)
    net = LR(features.shape[1])
    criterion = nn.MSELoss()
    optimizer = optim.SGD(net.parameters(), lr=lr)
    for _epoch in range(num_epochs):
        for X, y in batch_data:  # noqa: N806
            yhat = net.forward(X)
            loss = criterion(yhat, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return [*net.linear.weight.detach().flatten().tolist(), *net.linear.bias.detach().tolist()]


LOOPS = {"manual": manual_loop, "linear": linear_loop}


def train(model: str, num_examples: int, batch_size: int, lr: float, epochs: int, deg: int = 1, delta: float = 0.01):
    """Make the data and run one model's loop, seeded as the tutorial seeds it."""
    features, labels = make_data(num_examples, deg, delta)
    torch.manual_seed(420)
    random.seed(420)
    return LOOPS[model](features, labels, batch_size, lr, epochs)
