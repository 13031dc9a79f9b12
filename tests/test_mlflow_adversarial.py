"""The MLflow side against an unlucky or hostile user: what a user must never see.

Real MLflow stores (SQLite, or one real tracking server for the module), real Oxen repositories and
real tiny Lightning fits; a fault is injected only where it cannot be produced on cue.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from helpers import sync_until_nothing_pending
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning_model import CsvData, TinyModel, make_trainer
from losing_proxy import LosingProxy
from mlflow import MlflowClient
from mlflow.entities import ViewType
from mlflow_server import mlflow_server  # noqa: F401  (module-scoped fixture)

from oxen_callbacks import PinnedDataset
from oxen_callbacks._mlflow.journal import MlflowJournal
from oxen_callbacks._ops import sync
from oxen_callbacks.lightning import OxenLightningCallback

SCRIPT = Path(__file__).parent / "fit_script.py"


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
    or a CI log, nor the escape sequences of a run name (anyone who can write the store names runs)."""
    password = "pw-Zq81xk4Lr0"
    run = MlflowClient(mlflow_server.uri).create_run("0", run_name="nightly\x1b[2K\r\x1b[32mall good: verified")
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
    assert "View run nightly\\x1b[2K\\r\\x1b[32mall good" in err and "\x1b" not in out + err, err


def test_a_run_made_twice_by_a_retried_create_leaves_one_run(mlflow_server, dataset_repo, tmp_path):  # noqa: F811
    """The server makes our run, but a gateway loses its answer (503): MLflow's HTTP client sends the
    create again and the server makes a second run of that name. The experiment must list one run, the
    one the lineage names, not a twin left RUNNING forever beside it."""
    pin = PinnedDataset(dataset_repo.path, revision=dataset_repo.commits[0], paths=["train.csv", "val.csv"])
    with LosingProxy(mlflow_server.uri, "/api/2.0/mlflow/runs/create") as proxy:
        cb = OxenLightningCallback(dataset=pin, model_repo=tmp_path / "models", run_name="twice",
                                   mlflow_tracking_uri=proxy.uri, experiment_name="lost-answer")
        make_trainer(tmp_path / "fit", [ModelCheckpoint(dirpath=tmp_path / "ckpt"), cb], epochs=1).fit(
            TinyModel(), datamodule=CsvData(pin))
        record = cb.lineage
    assert proxy.lost == 1  # the fault happened: the server made the run twice
    client = MlflowClient(mlflow_server.uri)
    experiment = client.get_experiment_by_name("lost-answer").experiment_id
    [run] = client.search_runs([experiment])
    assert (run.info.run_id, run.info.run_name, run.info.status) == (record["run"]["mlflow_run_id"], "twice", "FINISHED")
    assert run.data.tags["oxen.model.commit"] == record["model"]["commit"]
    [twin] = client.search_runs([experiment], run_view_type=ViewType.DELETED_ONLY)  # deleted, not lost
    assert twin.info.run_name == "twice" and twin.data.tags["oxen.creation"] == run.data.tags["oxen.creation"]


@pytest.mark.parametrize("token", ["x' AND tags.`keep` = 'me", 7, "%"])
def test_a_hand_edited_create_token_deletes_no_run(mlflow_server, tmp_path, monkeypatch, token):  # noqa: F811
    """A journal's create op edited by hand (its token a filter fragment, a number, a wildcard), fed to
    `sync`: the run is made and ended, and no other run of the experiment is deleted."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    client = MlflowClient(mlflow_server.uri)
    experiment = client.create_experiment(f"hand-edited-{abs(hash(str(token)))}")
    others = [client.create_run(experiment, tags={"keep": "me", "oxen.creation": "%"}).info.run_id for _ in range(2)]
    journal = MlflowJournal.create(tmp_path / "cache", {"tracking_uri": mlflow_server.uri, "run_id": None})
    journal.put(1, {"op": "create_run", "run_name": "edited", "experiment_id": experiment, "token": token})
    journal.put(2, {"op": "end_run", "status": "FINISHED"})
    journal.mark_ended()
    journal.release_trainer()
    assert sync.sync_all(tmp_path / "cache", model_repos=[])["pending"] == 0
    runs = {r.info.run_id: r for r in client.search_runs([experiment])}
    assert set(others) < set(runs) and len(runs) == 3
    assert [r.info.status for r in runs.values() if r.info.run_name == "edited"] == ["FINISHED"]


def test_a_logged_model_made_twice_by_a_retried_create_leaves_one_model(mlflow_server, dataset_repo, tmp_path):  # noqa: F811
    """The same with a checkpoint's logged model: its twin would stay PENDING in the Models tab, a second
    model of one checkpoint. Each checkpoint keeps exactly one, ready."""
    pin = PinnedDataset(dataset_repo.path, revision=dataset_repo.commits[0], paths=["train.csv", "val.csv"])
    with LosingProxy(mlflow_server.uri, "/api/2.0/mlflow/logged-models") as proxy:
        cb = OxenLightningCallback(dataset=pin, model_repo=tmp_path / "models", run_name="model-twice",
                                   mlflow_tracking_uri=proxy.uri, experiment_name="lost-model-answer")
        make_trainer(tmp_path / "fit", [ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1), cb], epochs=2).fit(
            TinyModel(), datamodule=CsvData(pin))
        record = cb.lineage
    assert proxy.lost == 1
    client = MlflowClient(mlflow_server.uri)
    models = [m for m in client.search_logged_models([client.get_experiment_by_name("lost-model-answer").experiment_id])
              if m.source_run_id == record["run"]["mlflow_run_id"]]
    keys = sorted((m.tags["oxen.model.commit"], m.tags["oxen.model.path"]) for m in models)
    assert keys == sorted((c["commit"], c["path"]) for c in record["checkpoints"])  # one each, no twin
    assert {m.status for m in models} == {"READY"}


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


def test_an_end_retried_after_a_fault_registers_one_version_in_a_name_others_use(dataset_repo, tmp_path, monkeypatch):
    """A fit inside a nested active run registers into a name that already holds another model's
    version; the tracking store fails once after the version is made (the lineage picture's upload:
    a server restarting). The retried end makes no second version, and the version, like every tag
    and logged model, names the nested run and its commits, the other model's version untouched."""
    from mlflow.exceptions import MlflowException

    client = MlflowClient(mlflow.get_tracking_uri())
    client.create_registered_model("shared")
    other = client.create_run(client.create_experiment("others"))
    client.create_model_version("shared", source="s3://elsewhere/model", run_id=other.info.run_id)
    real_log_artifact, failed = MlflowClient.log_artifact, []

    def log_artifact(self, run_id, local_path, artifact_path=None):  # type: ignore[no-untyped-def]
        if local_path.endswith(".svg") and not failed:
            failed.append(local_path)
            raise MlflowException("API request failed: connection reset (server restarting)")
        return real_log_artifact(self, run_id, local_path, artifact_path)

    monkeypatch.setattr(MlflowClient, "log_artifact", log_artifact)
    pin = PinnedDataset(dataset_repo.path, revision=dataset_repo.commits[0], paths=["train.csv", "val.csv"])
    cb = OxenLightningCallback(dataset=pin, model_repo=tmp_path / "models", register_model="shared")
    with mlflow.start_run() as parent, mlflow.start_run(nested=True) as child:
        make_trainer(tmp_path, [ModelCheckpoint(dirpath=tmp_path / "ckpt"), cb], epochs=1).fit(
            TinyModel(), datamodule=CsvData(pin))
        record = cb.lineage
    assert failed  # the fault happened, after the version was registered
    assert record["run"]["mlflow_run_id"] == child.info.run_id
    versions = client.search_model_versions("name = 'shared'")
    ours = [v for v in versions if v.run_id == child.info.run_id]
    assert len(ours) == 1 and len(versions) == 2, [(v.version, v.run_id) for v in versions]
    assert ours[0].tags["oxen.model.commit"] == record["model"]["commit"]
    assert ours[0].tags["oxen.dataset.commit"] == dataset_repo.commits[0]
    assert client.get_model_version("shared", "1").run_id == other.info.run_id
    assert "oxen.model.commit" not in client.get_run(parent.info.run_id).data.tags
    assert client.get_run(child.info.run_id).data.tags["oxen.model.commit"] == record["model"]["commit"]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("uri, store", [("sqlite:///mlflow.db", "mlflow.db"), ("file:./mlruns", "mlruns")])
def test_a_relative_store_is_finished_by_sync_run_from_another_folder(dataset_repo, tmp_path, monkeypatch, uri, store):
    """`export MLFLOW_TRACKING_URI=sqlite:///mlflow.db` (MLflow's own quickstart), or ``file:./mlruns`` (a
    file store, Lightning's ``MLFlowLogger`` default: it was journaled relative, found by a review), a fit
    in folder a killed right after fit(), then `sync` from folder b with the same environment: the run in
    a's store is finished, and no other store is made or written."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # (MLflow 3 refuses a file store unless told)
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    cmd = [sys.executable, str(SCRIPT), "--dataset", str(dataset_repo.path), "--revision", dataset_repo.commits[0],
           "--model-repo", str(tmp_path / "models"), "--root", str(tmp_path / "fit"), "--epochs", "1", "--mlflow",
           "--logger", "--after-fit", "kill"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL, check=False,
                          env=env, cwd=a)
    assert done.returncode == -9, done.stderr[-3000:]
    monkeypatch.chdir(b)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    sync_until_nothing_pending()
    assert not (b / store).exists()
    client = MlflowClient(f"sqlite:///{a / store}" if uri.startswith("sqlite") else f"file://{a / store}")
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.data.tags["oxen.lineage.status"] == "FINISHED"  # journaled before the kill
    assert run.data.tags["oxen.model.commit"] and run.info.status != "RUNNING"
