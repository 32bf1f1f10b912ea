"""The lean step path (torch called directly) makes exactly the updates of Lightning's own wrappers."""

import lightning as L
import pytest
import torch

from linreg.data import RegressionDataModule
from linreg.models import MODELS


def fit(name: str, lean: bool, steps_per_call: int = 1, max_epochs: int = 2):
    """Fit one module on the tutorial's data, through the lean path or Lightning's wrappers."""
    cls = MODELS[name]
    dm = RegressionDataModule(ones_column=cls.uses_ones_column, steps_per_call=steps_per_call)
    torch.manual_seed(0)
    model = cls(in_features=3 if cls.uses_ones_column else 2, log_every_n_steps=10)
    model.lean_steps_allowed = lean
    trainer = L.Trainer(
        max_epochs=max_epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        accelerator="cpu",
    )
    trainer.fit(model, datamodule=dm)
    return model, trainer


@pytest.mark.parametrize("name", ["manual", "linear"])
@pytest.mark.parametrize("steps_per_call", [1, 7])
def test_lean_steps_give_bit_identical_weights_and_the_same_step_count(name, steps_per_call):
    wrapped, t_wrapped = fit(name, lean=False, steps_per_call=steps_per_call)
    lean, t_lean = fit(name, lean=True, steps_per_call=steps_per_call)
    assert not wrapped.lean_steps and lean.lean_steps
    assert lean.weights() == wrapped.weights()
    assert lean.epoch_mse == wrapped.epoch_mse
    assert t_lean.global_step == t_wrapped.global_step == 200  # 2 epochs x 100 batches, each step counted


def test_manual_weight_stays_a_leaf_on_the_lean_path():
    model, _ = fit("manual", lean=True, max_epochs=1)
    assert model.w.is_leaf and model.w.requires_grad
    assert model.weights() == pytest.approx([2, -1, 1], abs=0.01)
