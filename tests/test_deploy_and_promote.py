"""`record-deploy` and `promote` on unlucky repositories and stores, as an attacker would try them.

A command that only records a pointer must never damage the history it points into, never keep an
endpoint's credentials, never leave a stage's branch and its MLflow alias naming two models, and
say what it already did when MLflow fails half-way.
"""

from __future__ import annotations

import json

import pytest
from helpers import commit_files, free_port, make_repo
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from oxen_callbacks import PinnedDataset
from oxen_callbacks._oxen import child as oxen_child
from oxen_callbacks._oxen.repo import LocalRepo
from oxen_callbacks._oxen.tree import PathNotInCommit, files_at
from oxen_callbacks._util.fs import write_json_atomically
from oxen_callbacks.cli import main
from oxen_callbacks.model_repo import DEPLOY_SCHEMA, deployment_path, endpoint_slug, read_deployments

SECRET = "Hunter2Secret"
CKPT = "runs/r/checkpoints/last.ckpt"


def _record(models, commit: str, mlflow_run_id: str | None = None) -> None:  # type: ignore[no-untyped-def]
    record = {"schema": "oxen-callbacks/lineage/v1", "dataset": None,
              "model": {"repo": str(models), "commit": commit, "path": CKPT},
              "checkpoints": [{"commit": commit, "path": CKPT, "step": 4, "epoch": 1, "metrics": {}}],
              "run": {"name": "r", "mlflow_run_id": mlflow_run_id, "mlflow_tracking_uri": None},
              "code": {"git_commit": None, "git_dirty": None}, "framework": {"name": "lightning", "version": "2"},
              "status": "FINISHED"}
    (models / "runs" / "r" / "lineage.json").write_text(json.dumps(record))


@pytest.fixture
def models(tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    repo = make_repo(tmp_path / "models", [("ckpt", {CKPT: "weights-v1"})])
    _record(repo.path, repo.head)
    return repo


def test_record_deploy_refuses_a_head_that_would_start_a_second_history(models, tmp_path, capsys):
    """.oxen/HEAD naming a branch the repository lacks (`echo master > .oxen/HEAD` where the branch is
    main): a commit there would be parentless, and Oxen would rewrite tree nodes the model commit shares."""
    (models.path / ".oxen" / "HEAD").write_text("master")
    assert main(["record-deploy", "https://api.example.com/v1", "--model-commit", models.head,
                 "--model-repo", str(models.path)]) == 2
    assert "HEAD" in capsys.readouterr().err
    assert LocalRepo(models.path).commit_ids() == [models.head] and not (models.path / "deployments").exists()
    pin = PinnedDataset(models.path, revision=models.head, paths=[CKPT], cache_dir=tmp_path / "read")
    assert pin.file(CKPT).read_bytes() == b"weights-v1"


@pytest.mark.parametrize("endpoint", [f"admin:{SECRET}@api.example.com:8443/v1/predict",
                                      f"api.example.com/v1/predict?api_key={SECRET}",
                                      f"https://api.example.com/v1/predict#access_token={SECRET}"],
                         ids=["user-info-without-scheme", "query-without-scheme", "fragment"])
def test_record_deploy_keeps_no_endpoint_credentials(tmp_path, endpoint, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("x")).info.run_id
    models = make_repo(tmp_path / "models", [("ckpt", {CKPT: "w"})])
    _record(models.path, models.head, run_id)
    assert main(["record-deploy", endpoint, "--model-commit", models.head, "--model-repo", str(models.path),
                 "--tracking-uri", uri]) == 0
    out, err = capsys.readouterr()
    [deployment] = (models.path / "deployments").glob("*.json")
    assert "api.example.com" in deployment.read_text() and "api-example-com" in deployment.name
    places = {"output": out + err, "file name": deployment.name, "file": deployment.read_text(),
              "commit messages": " ".join(c["message"] for c in oxen_child.log(models.path)),
              "MLflow tags": json.dumps(client.get_run(run_id).data.tags)}
    assert not [where for where, text in places.items() if SECRET.lower() in text.lower()]


def test_record_deploy_where_deployments_is_a_file_is_a_one_line_error(models, capsys):
    (models.path / "deployments").write_text("not a folder")
    assert main(["record-deploy", "https://e.example.com", "--model-commit", models.head,
                 "--model-repo", str(models.path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "deployments" in err and len(oxen_child.log(models.path)) == 1


def test_promote_to_an_unregistered_commit_takes_the_alias_off_the_old_model(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("x")).info.run_id
    models = make_repo(tmp_path / "models", [("v1", {"runs/a/checkpoints/last.ckpt": "weights-a"})])
    first = models.head
    second = commit_files(models, "v2", {"runs/b/checkpoints/last.ckpt": "weights-b"})  # never registered
    client.create_registered_model("clf")
    client.create_model_version("clf", source="runs:/x/oxen", run_id=run_id, tags={"oxen.model.commit": first})
    client.create_registered_model("other")  # another repository's model under the same alias: not ours
    client.create_model_version("other", source="runs:/x/oxen", run_id=run_id, tags={"oxen.model.commit": "f" * 32})
    client.set_registered_model_alias("other", "production", "1")
    assert main(["promote", str(models.path), first, "--stage", "production", "--tracking-uri", uri]) == 0
    assert client.get_model_version_by_alias("clf", "production").tags["oxen.model.commit"] == first

    assert main(["promote", str(models.path), second, "--stage", "production", "--tracking-uri", uri]) == 0

    assert oxen_child.branches(models.path)["stage/production"] == second
    with pytest.raises(MlflowException):
        client.get_model_version_by_alias("clf", "production")  # not the old model any more
    assert str(client.get_model_version_by_alias("other", "production").version) == "1"
    assert "taken off clf v1" in capsys.readouterr().out


def test_promote_and_record_deploy_say_what_they_did_when_mlflow_fails_half_way(models, capsys):
    down = f"http://127.0.0.1:{free_port()}"
    assert main(["promote", str(models.path), models.head, "--stage", "production", "--tracking-uri", down]) == 1
    err = capsys.readouterr().err
    assert oxen_child.branches(models.path)["stage/production"] == models.head
    assert f"stage/production of {str(models.path)!r} now names {models.head}" in err and "again" in err

    _record(models.path, models.head, "0" * 32)
    assert main(["record-deploy", "https://e.example.com", "--model-commit", models.head,
                 "--model-repo", str(models.path), "--tracking-uri", down]) == 1
    err = capsys.readouterr().err
    [deployment_commit, _model_commit] = oxen_child.log(models.path)
    assert f"committed in {deployment_commit['id']}" in err and "not tagged" in err
    # the same command again, MLflow still down: nothing committed twice
    assert main(["record-deploy", "https://e.example.com", "--model-commit", models.head,
                 "--model-repo", str(models.path), "--tracking-uri", down]) == 1
    assert "already recorded" in capsys.readouterr().err and len(oxen_child.log(models.path)) == 2


def _killed_before_its_commit(models, endpoint: str, commit: str) -> None:  # type: ignore[no-untyped-def]
    """What `record-deploy` killed between writing its record and committing it leaves: the file, uncommitted."""
    slug = endpoint_slug(endpoint)
    write_json_atomically(models.path / deployment_path(slug), {
        "schema": DEPLOY_SCHEMA, "endpoint": endpoint, "slug": slug,
        "model": {"repo": str(models.path), "commit": commit, "path": CKPT}, "run": {"name": "r", "mlflow_run_id": None},
        "dataset": None, "deployed_at": "2026-12-05T00:00:00+0000"}, indent=2, make_parents=True)


def _committed(models, endpoint: str) -> str | None:  # type: ignore[no-untyped-def]
    """The model commit HEAD's deployment record of ``endpoint`` names."""
    rel = deployment_path(endpoint_slug(endpoint))
    head = oxen_child.log(models.path)[0]["id"]
    try:
        files_at(models.path, head, [rel])
    except PathNotInCommit:
        return None
    oxen_child.materialize(models.path, head, [rel], models.path.parent / "read")
    return json.loads((models.path.parent / "read" / rel).read_text())["model"]["commit"]


def test_record_deploy_after_one_killed_before_its_commit_commits_the_record(models, capsys):
    """The file a killed `record-deploy` left in the working tree is no record: running the command
    again must commit it, not answer "unchanged" with nothing committed."""
    endpoint = "https://api.example.com/v1"
    _killed_before_its_commit(models, endpoint, models.head)

    assert main(["record-deploy", endpoint, "--model-commit", models.head, "--model-repo", str(models.path)]) == 0

    assert "(unchanged)" not in capsys.readouterr().out
    assert _committed(models, endpoint) == models.head and len(oxen_child.log(models.path)) == 2
    assert main(["record-deploy", endpoint, "--model-commit", models.head, "--model-repo", str(models.path)]) == 0
    assert "(unchanged)" in capsys.readouterr().out and len(oxen_child.log(models.path)) == 2


def test_record_deploy_of_the_committed_commit_puts_back_a_record_a_killed_one_left(models, capsys):
    """Serving v1 (committed), a `record-deploy` of v2 killed before its commit: the working tree says
    v2. Recording v1 again says unchanged and puts v1's record back, so `trace` reads the truth."""
    endpoint, first = "https://api.example.com/v1", models.head
    assert main(["record-deploy", endpoint, "--model-commit", first, "--model-repo", str(models.path)]) == 0
    second = commit_files(models, "v2", {"runs/r/checkpoints/epoch=2.ckpt": "weights-v2"})
    _killed_before_its_commit(models, endpoint, second)
    capsys.readouterr()

    assert main(["record-deploy", endpoint, "--model-commit", first, "--model-repo", str(models.path)]) == 0

    assert "(unchanged)" in capsys.readouterr().out
    [record] = read_deployments(models.path)
    assert record["model"]["commit"] == first == _committed(models, endpoint)


def test_record_deploy_takes_a_stage_branch_or_a_prefix_and_records_the_full_commit(models, tmp_path):
    """The README's deploy step names the model by its stage's branch (or a short id): the record must
    hold the commit it stood for then, not the name (the branch moves on with the next promote)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["promote", str(models.path), models.head[:10], "--stage", "production", "--tracking-uri", uri]) == 0
    assert main(["record-deploy", "https://api.example.com/v1", "--model-commit", "stage/production",
                 "--model-repo", str(models.path), "--tracking-uri", uri]) == 0
    assert main(["record-deploy", "https://api.example.com/v2", "--model-commit", models.head[:10],
                 "--model-repo", str(models.path), "--tracking-uri", uri]) == 0
    assert {d["endpoint"]: (d["model"]["commit"], d["model"]["path"]) for d in read_deployments(models.path)} == {
        "https://api.example.com/v1": (models.head, CKPT), "https://api.example.com/v2": (models.head, CKPT)}
