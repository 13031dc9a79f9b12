"""The MLflow side against an unlucky or hostile user: what a user must never see.

Real MLflow stores (SQLite, or one real tracking server for the module), real Oxen repositories and
real tiny Lightning fits; a fault is injected only where it cannot be produced on cue.
"""

from __future__ import annotations

import shutil

import mlflow
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning_model import CsvData, TinyModel, make_trainer
from mlflow import MlflowClient
from mlflow_server import mlflow_server  # noqa: F401  (module-scoped fixture)

from oxen_callbacks import PinnedDataset
from oxen_callbacks._mlflow.journal import MlflowJournal
from oxen_callbacks._ops import sync
from oxen_callbacks.lightning import OxenLightningCallback


def _fit(pin, root, models, run_name, epochs=1, **kwargs):  # type: ignore[no-untyped-def]
    cb = OxenLightningCallback(dataset=pin if "resume_from" not in kwargs else None, model_repo=models,
                               run_name=run_name, experiment_name="same-path", **kwargs)
    make_trainer(root, [ModelCheckpoint(dirpath=root / "ckpt"), cb], epochs=epochs).fit(
        TinyModel(), datamodule=CsvData(cb.dataset), ckpt_path=getattr(cb, "ckpt_path", None))
    return cb.lineage


def test_a_password_in_the_tracking_uri_never_reaches_syncs_output(mlflow_server, tmp_path, monkeypatch,  # noqa: F811
                                                                   capsys):
    """`sync` ends a run on a server whose URI (in the user's environment) holds a password: MLflow
    prints a link to the run as it ends it, and that link must not carry the password to the screen
    or a CI log."""
    password = "pw-Zq81xk4Lr0"
    run = MlflowClient(mlflow_server.uri).create_run("0")
    journal = MlflowJournal.create(tmp_path / "cache", {"tracking_uri": mlflow_server.uri, "run_id": run.info.run_id})
    journal.put(1, {"op": "end_run", "status": "FINISHED"})
    journal.mark_ended()
    journal.release_trainer()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri.replace("http://", f"http://alice:{password}@"))
    report = sync.sync_all(tmp_path / "cache", model_repos=[])
    assert report["pending"] == 0, report
    assert MlflowClient(mlflow_server.uri).get_run(run.info.run_id).info.status == "FINISHED"
    out, err = capsys.readouterr()
    assert password not in out + err
    assert password not in str(report)


def test_a_new_repository_at_an_old_path_leaves_the_old_runs_marks_alone(dataset_repo, tmp_path):
    """A model repository made again at the same path (`rm -rf models`, a container's fixed path) with a
    run name used before, in the same experiment: the old run's final model keeps its mark when the
    new run, continued by a second fit, moves its own final mark."""
    pin = PinnedDataset(dataset_repo.path, revision=dataset_repo.commits[0], paths=["train.csv", "val.csv"])
    models = tmp_path / "models"
    old = _fit(pin, tmp_path / "a", models, "nightly")
    shutil.rmtree(models)
    _fit(pin, tmp_path / "b", models, "nightly")
    new = _fit(pin, tmp_path / "c", models, "nightly", epochs=2, resume_from="nightly")
    client = MlflowClient(mlflow.get_tracking_uri())
    experiment = client.get_experiment_by_name("same-path").experiment_id
    finals = [(m.tags["oxen.model.commit"], m.tags["oxen.model.path"])
              for m in client.search_logged_models([experiment]) if m.tags.get("oxen.model.final") == "true"]
    old_last, new_last = old["checkpoints"][-1], new["checkpoints"][-1]
    assert sorted(finals) == sorted([(old_last["commit"], old_last["path"]), (new_last["commit"], new_last["path"])])
