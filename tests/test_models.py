"""The two modules: the tutorial's pieces, the same training, convergence, several steps a call = one."""

import lightning as L
import pytest
import torch

from linreg.data import RegressionDataModule
from linreg.models import HandSGD, LinearRegression, ManualRegression, sgd, squared_loss


def fit(
    name: str,
    batches_per_call: int = 1,
    max_epochs: int = 3,
    deterministic: bool = False,
    **model_kwargs,
):
    """Fit one module on the tutorial's default data."""
    cls = {"manual": ManualRegression, "linear": LinearRegression}[name]
    dm = RegressionDataModule(ones_column=cls.uses_ones_column, batches_per_call=batches_per_call)
    dm.setup("fit")
    torch.manual_seed(0)
    model = cls(in_features=dm.in_features, **model_kwargs)
    trainer = L.Trainer(
        max_epochs=max_epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        accelerator="cpu",
        deterministic=deterministic,
    )
    trainer.fit(model, datamodule=dm)
    model.global_step_seen = trainer.global_step
    return model


def test_squared_loss_is_the_mean_squared_error():
    y_hat, y = torch.tensor([[1.0], [2.0], [4.0]]), torch.tensor([1.0, 0.0, 1.0])
    assert squared_loss(y_hat, y).item() == pytest.approx((0 + 4 + 9) / 3)


def test_sgd_updates_a_leaf_in_place_and_zeroes_its_gradient():
    w = torch.tensor([[1.0], [2.0]], requires_grad=True)
    (w**2).sum().backward()
    sgd([w], lr=0.1)
    assert w.is_leaf and w.requires_grad
    assert torch.allclose(w, torch.tensor([[0.8], [1.6]]))
    assert torch.equal(w.grad, torch.zeros(2, 1))
    opt = HandSGD([w], lr=0.5)
    (w.sum()).backward()
    opt.step()
    assert torch.allclose(w, torch.tensor([[0.3], [1.1]]))


def test_manual_and_linear_with_zero_init_end_with_the_same_weights():
    manual = fit("manual")
    linear = fit("linear", init="zeros")
    assert manual.weights() == pytest.approx(linear.weights(), abs=1e-5)
    assert manual.epoch_mse == pytest.approx(linear.epoch_mse, rel=1e-3)


@pytest.mark.parametrize("name", ["manual", "linear"])
def test_each_model_converges_to_the_true_weights_with_a_real_step_count(name):
    model = fit(name)
    assert model.weights() == pytest.approx([2, -1, 1], abs=0.01)
    assert len(model.epoch_mse) == 3 and model.epoch_mse[-1] < 2e-4
    assert model.global_step_seen == 300  # 3 epochs x 100 batches: every hand-written step counts
    assert model.diverged_epoch is None


@pytest.mark.parametrize("name", ["manual", "linear"])
def test_several_batches_per_call_give_exactly_the_plain_updates(name):
    plain, fast = fit(name, max_epochs=2), fit(name, batches_per_call=7, max_epochs=2)
    assert fast.weights() == plain.weights()
    assert fast.epoch_mse == plain.epoch_mse
    assert fast.global_step_seen == plain.global_step_seen == 200


def test_manual_weight_stays_a_leaf_on_the_lean_path_and_linear_uses_torch_parts(monkeypatch):
    monkeypatch.delenv("LINREG_FASTPATH", raising=False)  # the lean path, whatever the shell says
    manual = fit("manual", max_epochs=1)
    assert manual.lean_steps and manual.w.is_leaf and manual.w.requires_grad and manual.w.shape == (3, 1)
    assert manual.weights() == pytest.approx([2, -1, 1], abs=0.01)  # one epoch, on the lean path
    linear = LinearRegression(in_features=2)
    assert isinstance(linear.linear, torch.nn.Linear) and isinstance(linear.criterion, torch.nn.MSELoss)
    assert isinstance(linear.configure_optimizers(), torch.optim.SGD)
    assert LinearRegression(in_features=2, init="zeros").weights() == [0.0, 0.0, 0.0]
    assert ManualRegression(in_features=4).weights() == [0.0] * 4


def test_a_huge_learning_rate_is_recorded_as_divergence():
    model = fit("linear", lr=50.0)
    assert model.diverged_epoch == 0
    assert len(model.epoch_mse) == 1


def test_deterministic_mode_gives_the_same_bits():
    plain = fit("manual", batches_per_call=7, max_epochs=2)
    try:
        deterministic = fit("manual", deterministic=True, batches_per_call=7, max_epochs=2)
    finally:
        torch.use_deterministic_algorithms(False)  # Lightning leaves the process-wide flag on
    assert deterministic.weights() == plain.weights()
    assert deterministic.epoch_mse == plain.epoch_mse
