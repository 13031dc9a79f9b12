"""``log_models=False``: no MLflow logged model per checkpoint, every other pointer as before.

A user with thousands of saves, or one who finds a logged model per checkpoint too much for the
experiment's Models tab, turns them off; the run's tags, ``oxen/lineage.json``, the dataset input
and a registered version must still lead to the commits, and ``sync`` after a kill must not make
the models the run was asked not to make.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
from helpers import (
    assert_every_saved_checkpoint_committed,
    killed_as_fit_returns_then_synced,
    logged_models_of_run,
)
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import MLFlowLogger
from lightning_model import CsvData, TinyModel, make_trainer
from mlflow import MlflowClient

from oxen_callbacks import PinnedDataset, read_lineage
from oxen_callbacks.errors import ConfigurationError
from oxen_callbacks.lightning import OxenLightningCallback

SCRIPT = Path(__file__).parent / "fit_script.py"


def _pointer(uri: str, run_id: str, into: Path) -> dict:  # type: ignore[type-arg]
    path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="oxen/lineage.json",
                                               dst_path=str(into), tracking_uri=uri)
    return json.loads(Path(path).read_text())


def test_a_run_without_logged_models_keeps_every_pointer_to_its_commits(dataset_repo, tmp_path):
    """Sharing an MLFlowLogger's run (the MLflow calls made in the training process), with a monitored
    metric and a registered model: no logged model, and every other way to the commits still there."""
    uri = mlflow.get_tracking_uri()
    pin = PinnedDataset(dataset_repo.path, revision=dataset_repo.commits[0], paths=["train.csv", "val.csv"])
    cb = OxenLightningCallback(dataset=pin, model_repo=tmp_path / "models", run_name="plain",
                               register_model="plain-clf", log_models=False)
    best = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_loss", save_top_k=2, save_last=True)
    logger = MLFlowLogger(experiment_name="no-models", tracking_uri=uri, log_model=False)
    make_trainer(tmp_path / "fit", [best, cb], epochs=3, logger=logger).fit(TinyModel(), datamodule=CsvData(pin))
    record = cb.lineage
    run_id = record["run"]["mlflow_run_id"]
    assert run_id == logger.run_id and len(record["checkpoints"]) >= 3

    assert logged_models_of_run(uri, run_id) == []
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.data.tags["oxen.model.commit"] == record["model"]["commit"]
    assert run.data.tags["oxen.model.path"] == record["model"]["path"]
    assert run.data.tags["oxen.dataset.commit"] == dataset_repo.commits[0]
    assert not run.outputs or not run.outputs.model_outputs
    pointer = _pointer(uri, run_id, tmp_path / "pointer")
    assert [(c["commit"], c["path"]) for c in pointer["checkpoints"]] == [
        (c["commit"], c["path"]) for c in record["checkpoints"]]
    [dataset_input] = run.inputs.dataset_inputs  # the Datasets panel, logged at the end instead
    assert json.loads(dataset_input.dataset.source)["commit"] == dataset_repo.commits[0]
    [version] = client.search_model_versions("name = 'plain-clf'")
    assert version.source == f"runs:/{run_id}/oxen" and version.run_id == run_id
    assert version.tags["oxen.model.commit"] == record["model"]["commit"]
    assert_every_saved_checkpoint_committed(tmp_path / "models", record, tmp_path / "ckpt", tmp_path / "read")


@pytest.mark.timeout(600)
def test_sync_after_a_kill_makes_no_logged_model_either(dataset_repo, tmp_path):
    """SIGKILL the moment fit() returns (the end of the run still to log), then `sync`: the run is
    finished from its commits, and the models the run was asked not to make are not made there."""
    killed_as_fit_returns_then_synced(dataset_repo, tmp_path, "--no-log-models")
    uri = mlflow.get_tracking_uri()
    client = MlflowClient(uri)
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    record = read_lineage(tmp_path / "models" / "runs" / run.data.tags["oxen.run"] / "lineage.json")
    assert record["checkpoints"] and run.data.tags["oxen.model.commit"] == record["model"]["commit"]
    assert _pointer(uri, run.info.run_id, tmp_path / "pointer")["checkpoints"] == record["checkpoints"]
    assert logged_models_of_run(uri, run.info.run_id) == []
    [dataset_input] = run.inputs.dataset_inputs  # the end that logs it never came: `sync` logged it
    assert json.loads(dataset_input.dataset.source)["commit"] == dataset_repo.commits[0]


def test_a_fit_without_models_takes_the_final_mark_off_the_fit_it_continued(dataset_repo, tmp_path):
    """Fit A made logged models and marked its last one final; fit B continues the run with
    log_models=False. A's model is no longer the run's final one: its marks come off (a search for
    the run's final model must not answer A's checkpoint)."""
    uri = mlflow.get_tracking_uri()
    pin = PinnedDataset(dataset_repo.path, revision=dataset_repo.commits[0], paths=["train.csv", "val.csv"])
    first = OxenLightningCallback(dataset=pin, model_repo=tmp_path / "models", run_name="cont", experiment_name="cont")
    make_trainer(tmp_path / "a", [ModelCheckpoint(dirpath=tmp_path / "a" / "ckpt", monitor="val_loss"), first],
                 epochs=1).fit(TinyModel(), datamodule=CsvData(pin))
    final = first.lineage["model"]["path"]  # (waits for the end of A's MLflow logging)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("cont").experiment_id

    def marked() -> dict[str, list[str]]:
        models = client.search_logged_models([experiment], filter_string="tags.`oxen.run` = 'cont'")
        return {tag: [m.tags["oxen.model.path"] for m in models if m.tags.get(tag) == "true"]
                for tag in ("oxen.model.final", "oxen.model.best")}

    assert marked() == {"oxen.model.final": [final], "oxen.model.best": [final]}
    again = OxenLightningCallback(model_repo=tmp_path / "models", run_name="cont", resume_from="cont",
                                  experiment_name="cont", log_models=False)
    make_trainer(tmp_path / "b", [ModelCheckpoint(dirpath=tmp_path / "b" / "ckpt", monitor="val_loss"), again],
                 epochs=2).fit(TinyModel(), datamodule=CsvData(again.dataset), ckpt_path=again.ckpt_path)
    assert again.lineage["status"] == "FINISHED" and len(again.lineage["checkpoints"]) > len(first.lineage["checkpoints"])
    assert marked() == {"oxen.model.final": [], "oxen.model.best": []}


@pytest.mark.parametrize("option", ["log_models", "log_dataset_input", "log_lineage_graph", "mlflow"])
def test_a_switch_that_is_not_true_or_false_is_refused_before_training(dataset_repo, tmp_path, option):
    """``log_models="no"`` would be truthy: refused at construction, naming the value and the fix."""
    pin = PinnedDataset(dataset_repo.path, revision=dataset_repo.commits[0], paths=["train.csv"])
    with pytest.raises(ConfigurationError, match=rf"(?s){option}='no' is not True or False.*HINT: pass {option}=True"):
        OxenLightningCallback(dataset=pin, model_repo=tmp_path / "models", **{option: "no"})
    assert not (tmp_path / "models").exists()


@pytest.mark.parametrize("first_options", [{"log_models": False, "experiment_name": "cont"}, {"mlflow": False}],
                         ids=["no-models", "no-mlflow"])
def test_a_fit_with_models_makes_none_for_the_checkpoints_of_the_fit_it_continued(dataset_repo, tmp_path,
                                                                                   first_options):
    """Fit A kept no logged models (``log_models=False``, or no MLflow at all); fit B continues the
    run with them. B's MLflow run gets a model for each of B's checkpoints and none for A's: A's
    were not made by B's run, and A was asked for none."""
    uri = mlflow.get_tracking_uri()
    pin = PinnedDataset(dataset_repo.path, revision=dataset_repo.commits[0], paths=["train.csv", "val.csv"])
    first = OxenLightningCallback(dataset=pin, model_repo=tmp_path / "models", run_name="cont", **first_options)
    make_trainer(tmp_path / "a", [ModelCheckpoint(dirpath=tmp_path / "a" / "ckpt", monitor="val_loss"), first],
                 epochs=1).fit(TinyModel(), datamodule=CsvData(pin))
    earlier = {(c["commit"], c["path"]) for c in first.lineage["checkpoints"]}
    again = OxenLightningCallback(model_repo=tmp_path / "models", run_name="cont", resume_from="cont",
                                  experiment_name="cont")
    make_trainer(tmp_path / "b", [ModelCheckpoint(dirpath=tmp_path / "b" / "ckpt", monitor="val_loss"), again],
                 epochs=2).fit(TinyModel(), datamodule=CsvData(again.dataset), ckpt_path=again.ckpt_path)
    record = again.lineage
    own = {(c["commit"], c["path"]) for c in record["checkpoints"]} - earlier
    assert earlier and own and record["earlier_fits"]
    models = logged_models_of_run(uri, record["run"]["mlflow_run_id"])
    assert {(m.tags["oxen.model.commit"], m.tags["oxen.model.path"]) for m in models} == own
    experiment = MlflowClient(uri).get_experiment_by_name("cont").experiment_id
    everywhere = MlflowClient(uri).search_logged_models([experiment], filter_string="tags.`oxen.run` = 'cont'")
    assert not earlier & {(m.tags["oxen.model.commit"], m.tags["oxen.model.path"]) for m in everywhere}
    [final] = [m for m in models if m.tags.get("oxen.model.final") == "true"]
    assert (final.tags["oxen.model.commit"], final.tags["oxen.model.path"]) == (
        record["checkpoints"][-1]["commit"], record["checkpoints"][-1]["path"])
