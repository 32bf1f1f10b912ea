"""The two modules: the tutorial's pieces, the same training, convergence, fast path = plain path."""

import lightning as L
import pytest
import torch

from linreg.data import RegressionDataModule
from linreg.models import MODELS, HandSGD, LinearRegression, ManualRegression, eval_squared_loss, sgd, squared_loss


def fit(
    name: str,
    steps_per_call: int = 1,
    max_epochs: int = 3,
    lean: bool = True,
    deterministic: bool = False,
    **model_kwargs,
):
    """Fit one module on the tutorial's default data (`lean=False`: every step through Lightning's wrappers)."""
    cls = MODELS[name]
    dm = RegressionDataModule(ones_column=cls.uses_ones_column, steps_per_call=steps_per_call)
    dm.setup("fit")
    torch.manual_seed(0)
    model = cls(in_features=dm.in_features, **model_kwargs)
    model.lean_steps_allowed = lean
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
def test_several_steps_per_call_give_exactly_the_plain_updates(name):
    plain, fast = fit(name, max_epochs=2), fit(name, steps_per_call=7, max_epochs=2)
    assert fast.weights() == plain.weights()
    assert fast.epoch_mse == plain.epoch_mse
    assert fast.global_step_seen == plain.global_step_seen == 200


def test_manual_weight_stays_a_leaf_and_linear_uses_torch_parts():
    manual = fit("manual", max_epochs=1)
    assert manual.w.is_leaf and manual.w.shape == (3, 1)
    linear = LinearRegression(in_features=2)
    assert isinstance(linear.linear, torch.nn.Linear) and isinstance(linear.criterion, torch.nn.MSELoss)
    assert isinstance(linear.configure_optimizers(), torch.optim.SGD)
    assert LinearRegression(in_features=2, init="zeros").weights() == [0.0, 0.0, 0.0]
    assert ManualRegression(in_features=4).weights() == [0.0] * 4


def test_a_huge_learning_rate_is_recorded_as_divergence():
    model = fit("linear", lr=50.0)
    assert model.diverged_epoch == 0
    assert len(model.epoch_mse) == 1


@pytest.mark.parametrize("name", ["manual", "linear"])
@pytest.mark.parametrize("steps_per_call", [1, 7])
def test_lean_steps_give_bit_identical_weights_and_the_same_step_count(name, steps_per_call):
    wrapped = fit(name, lean=False, steps_per_call=steps_per_call, max_epochs=2, log_every_n_steps=10)
    lean = fit(name, lean=True, steps_per_call=steps_per_call, max_epochs=2, log_every_n_steps=10)
    assert not wrapped.lean_steps and lean.lean_steps
    assert lean.weights() == wrapped.weights()
    assert lean.epoch_mse == wrapped.epoch_mse
    assert lean.global_step_seen == wrapped.global_step_seen == 200  # 2 epochs x 100 batches, each step counted


def test_manual_weight_stays_a_leaf_on_the_lean_path():
    model = fit("manual", lean=True, max_epochs=1)
    assert model.lean_steps and model.w.is_leaf and model.w.requires_grad
    assert model.weights() == pytest.approx([2, -1, 1], abs=0.01)


@pytest.mark.parametrize("n", [1, 7, 1000])
def test_eval_squared_loss_is_squared_loss_bit_for_bit(n):
    g = torch.Generator().manual_seed(n)
    y_hat, y = torch.randn(n, 1, generator=g), torch.randn(n, generator=g)
    expected = squared_loss(y_hat, y)
    assert eval_squared_loss(y_hat.clone(), y).item() == expected.item()


@pytest.mark.parametrize("name", ["manual", "linear"])
def test_deterministic_runs_without_the_nan_fill_give_the_same_bits(name):
    # run() turns torch's NaN fill of new tensors off under deterministic=True: it may cost time, never numbers.
    before = torch.utils.deterministic.fill_uninitialized_memory
    try:
        torch.utils.deterministic.fill_uninitialized_memory = True
        filled = fit(name, deterministic=True, steps_per_call=7, max_epochs=2)
        torch.utils.deterministic.fill_uninitialized_memory = False
        unfilled = fit(name, deterministic=True, steps_per_call=7, max_epochs=2)
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = before
        torch.use_deterministic_algorithms(False)
    assert unfilled.weights() == filled.weights()
    assert unfilled.epoch_mse == filled.epoch_mse
