"""The run record: one dataclass for metrics.json, its rows and HParams; a run's identity defined once."""

import dataclasses
import json

import pytest

from linreg.dashboard import run_label
from linreg.record import CorruptRecord, RunRecord, identity_overrides, job_config, model_name
from linreg.results import COLUMNS, job_row
from linreg.train import run

SMALL = ("data.num_examples=100", "trainer.max_epochs=1")


def test_metrics_json_is_the_record_field_for_field(make_cfg, tmp_path):
    returned = run(make_cfg(*SMALL))
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert list(written) == [f.name for f in dataclasses.fields(RunRecord)]  # the schema, in its order
    assert written == returned
    assert RunRecord.parse(written).as_json() == written


def test_a_row_is_the_record_plus_where_it_came_from(make_cfg, tmp_path):
    metrics = run(make_cfg(*SMALL))
    row = job_row(tmp_path / "run")
    assert list(row) == COLUMNS
    assert {k: row[k] for k in ("model", "lr", "batch_size", "seed", "epochs", "status", "steps")} == {
        "model": "manual", "lr": 0.03, "batch_size": 10, "seed": 420, "epochs": 1, "status": "ok", "steps": 10
    }  # fmt: skip
    assert (row["deg"], row["delta"]) == (1, 0.01)
    assert row["gap"] == pytest.approx(metrics["train_mse"] - metrics["ols_mse"])


def test_failed_and_missing_records_carry_the_config(make_cfg):
    cfg = make_cfg("model=linear", "model.lr=0.5", *SMALL)
    failed = RunRecord.failed(cfg, RuntimeError("boom"))
    assert (failed.status, failed.model, failed.lr, failed.error) == ("failed", "linear", 0.5, "RuntimeError: boom")
    assert failed.config == job_config(cfg) and failed.true_weights == [2, -1, 1]
    assert failed.hparams()["model"] == "linear" and failed.gap is None


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"status": "done"}, "status is a string"),
        ({"train_mse": "0.1"}, "train_mse is a string"),
        ({"train_mse": None}, "train_mse is null, not a finite number"),
        ({"data": {"deg": "two"}}, "deg is a string"),
    ],
)
def test_a_record_that_cannot_be_trusted_is_refused(make_cfg, change, says):
    good = run(make_cfg(*SMALL))
    with pytest.raises(CorruptRecord, match=says):
        RunRecord.parse({**good, **change})
    with pytest.raises(CorruptRecord, match="holds a list"):
        RunRecord.parse([good])


def test_resume_is_not_part_of_a_runs_identity(make_cfg):
    assert job_config(make_cfg("resume=true")) == job_config(make_cfg())
    assert job_config(make_cfg("seed=1")) != job_config(make_cfg())
    given = ["resume=true", "+resume=false", "~resume", "seed=1"]
    assert identity_overrides(given) == ["seed=1"]
    assert run_label(given) == run_label(["seed=1"]) == "seed=1"


def test_a_models_name_is_its_class_less_regression():
    assert model_name("linreg.models.ManualRegression") == "manual"
    assert model_name("linreg.models.LinearRegression") == "linear"
    assert model_name("mypkg.Ridge") == "ridge" and model_name(None) is None
