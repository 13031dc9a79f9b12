"""The MLflow side against an unlucky or hostile user: what a user must never see.

Real MLflow stores (SQLite, or one real tracking server for the module), real Oxen repositories and
real tiny Lightning fits; a fault is injected only where it cannot be produced on cue.
"""

from __future__ import annotations

from mlflow import MlflowClient
from mlflow_server import mlflow_server  # noqa: F401  (module-scoped fixture)

from oxen_callbacks._mlflow.journal import MlflowJournal
from oxen_callbacks._ops import sync


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

