"""Records, tags and deployment files written by someone else, fed back to the CLI.

Anyone who can write a model repository or an MLflow store can write what `lineage`, `trace`
and `reproduce` print. A malformed one must not crash a query about other runs, a control
character must not rewrite the terminal, and a quote must not hide a run from a search.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from helpers import make_repo, sync_until_nothing_pending
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning_model import CsvData, TinyModel, make_trainer
from mlflow import MlflowClient

from oxen_callbacks import PinnedDataset
from oxen_callbacks._mlflow.journal import MlflowJournal, journals
from oxen_callbacks._mlflow.query import check_tracking_uri
from oxen_callbacks._ops import sync
from oxen_callbacks.cli import main
from oxen_callbacks.errors import ConfigurationError
from oxen_callbacks.lightning import OxenLightningCallback
from oxen_callbacks.model_repo import endpoint_tag

MODEL_COMMIT = "e3b0c44298fc1c149afbf4c8996fb924"
DATA_COMMIT = "5d0c4b1e2f3a49586776859a4b3c2d1f"
ESC = "\x1b]0;owned\x07\x1b[2J\r\u202e"
UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def _record(repo: str, *, name: str, **changes: object) -> dict:  # type: ignore[type-arg]
    record = {
        "schema": "oxen-callbacks/lineage/v1",
        "dataset": {"repo": "/data/reviews", "revision": "main", "commit": DATA_COMMIT, "paths": ["train.csv"]},
        "model": {"repo": repo, "commit": MODEL_COMMIT, "path": f"runs/{name}/checkpoints/last.ckpt"},
        "checkpoints": [{"commit": MODEL_COMMIT, "path": f"runs/{name}/checkpoints/last.ckpt", "step": 4, "epoch": 1,
                         "metrics": {"val_loss": 0.25}}],
        "run": {"name": name, "mlflow_run_id": None, "mlflow_tracking_uri": None},
        "code": {"git_commit": None, "git_dirty": None},
        "framework": {"name": "lightning", "version": "2"},
        "status": "FINISHED",
    }
    for path, value in changes.items():
        *keys, last = path.split("__")
        target = record
        for key in keys:
            target = target[int(key)] if key.isdigit() else target[key]  # type: ignore[index]
        target[last] = value  # type: ignore[index]
    return record


@pytest.fixture
def models(tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")  # the model repository alone
    repo = make_repo(tmp_path / "models", [("ckpt", {"runs/r/checkpoints/last.ckpt": "weights"})])
    return repo.path


def _write_run(models, name: str, record: dict) -> None:  # type: ignore[no-untyped-def,type-arg]
    (models / "runs" / name).mkdir(parents=True, exist_ok=True)
    (models / "runs" / name / "lineage.json").write_text(json.dumps(record))


def test_control_characters_in_a_record_are_shown_escaped(models, capsys):
    """An escape sequence in a record would clear the screen or retitle the terminal; a newline in a
    value would print a fake line (here: another dataset commit)."""
    _write_run(models, "r", _record(str(models), name="r", dataset__repo=f"/data{ESC}",
                                    dataset__revision=f"main\ndataset      /data/clean @ {'0' * 32}",
                                    code__git_commit=f"abc{ESC}", checkpoints__0__metrics={f"loss{ESC}": 0.5}))
    deployments = models / "deployments"
    deployments.mkdir()
    (deployments / "x.json").write_text(json.dumps({
        "schema": "oxen-callbacks/deployment/v1", "endpoint": f"https://svc{ESC}/v1", "slug": "x",
        "model": {"repo": str(models), "commit": MODEL_COMMIT, "path": "runs/r/checkpoints/last.ckpt"},
        "run": {"name": "r", "mlflow_run_id": None}, "dataset": None, "deployed_at": None}))
    for argv in (["lineage", "--model-repo", str(models), "r"], ["trace", "--model-repo", str(models), MODEL_COMMIT],
                 ["trace", "--model-repo", str(models), "runs/r/checkpoints/last.ckpt"]):
        assert main(argv) == 0
        out, err = capsys.readouterr()
        assert not UNSAFE.search(out + err), (argv, out)
        assert "\\x1b]0;owned\\x07\\x1b[2J\\r\\u202e" in out  # shown, escaped
        assert not any(line.lstrip().startswith("dataset      /data/clean") for line in out.splitlines())
        assert "serves" in out or argv[0] == "lineage"
    assert main(["lineage", "--model-repo", str(models), "r", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["dataset"]["repo"] == f"/data{ESC}"  # JSON keeps the value exact


@pytest.mark.parametrize("resumed_from", [
    {"run_name": f"r{ESC}", "model_repo": f"/m{ESC}", "commit": f"{'a' * 32}{ESC}", "path": "p\nresumed from /evil",
     "step": f"4{ESC}", "file": None},
    {"run_name": ["a", "b"], "model_repo": {"x": 1}, "commit": ["c"], "path": {"p": ESC}, "step": {"s": 1}},
    {"file": {"f": [1]}, "step": None},
    {"commit": None, "file": f"/tmp/last{ESC}.ckpt"},
    f"runs/other{ESC}", ["runs/other"], 7,
], ids=["escapes", "containers-for-strings", "file-not-a-string", "no-commit", "string", "list", "number"])
def test_a_tampered_resumed_from_is_shown_escaped_or_skipped(models, capsys, resumed_from):
    """``resumed_from`` names where a resumed fit's weights came from; one written by someone else
    (control characters, containers where strings belong, not a mapping at all) must neither crash
    ``lineage``/``trace`` nor rewrite the terminal nor fake a line."""
    _write_run(models, "r", _record(str(models), name="r", resumed_from=resumed_from))
    for argv in (["lineage", "--model-repo", str(models), "r"], ["trace", "--model-repo", str(models), MODEL_COMMIT]):
        assert main(argv) == 0, argv
        out, err = capsys.readouterr()
        assert not UNSAFE.search(out + err), (argv, out)
        assert MODEL_COMMIT in out  # the rest of the run is still shown
        faked = [line for line in out.splitlines() if line.lstrip().startswith("resumed from /evil")]
        assert not faked, out
        if isinstance(resumed_from, dict) and resumed_from.get("run_name") == f"r{ESC}":
            assert "\\x1b]0;owned\\x07" in out  # shown, escaped
    assert main(["lineage", "--model-repo", str(models), "r", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["resumed_from"] == resumed_from  # JSON keeps the value exact


@pytest.mark.parametrize("deployment", [[1], "x", {"schema": "oxen-callbacks/deployment/v1", "slug": "x"},
                                        {"schema": "oxen-callbacks/deployment/v1", "endpoint": "e", "slug": "x",
                                         "model": "m", "run": {"name": "r"}}], ids=["list", "string", "no-fields",
                                                                                    "model-not-an-object"])
def test_a_malformed_deployment_record_is_skipped_with_a_warning(models, capsys, deployment):
    _write_run(models, "r", _record(str(models), name="r"))
    (models / "deployments").mkdir()
    (models / "deployments" / "x.json").write_text(json.dumps(deployment))
    (models / "deployments" / "y.json").write_text("{not json")
    assert main(["lineage", "--model-repo", str(models), "r"]) == 0
    out, err = capsys.readouterr()
    assert f"{MODEL_COMMIT}" in out and "endpoint" not in out
    assert main(["trace", "--model-repo", str(models), "https://svc/v1"]) == 1  # nothing found, no traceback
    assert "no run found" in capsys.readouterr().out


def test_json_nested_thousands_deep_is_a_damaged_file_never_a_crash(models, store, capsys, caplog):
    """A record, a deployment file and an MLflow lineage artifact nested 100,000 deep (Python's parser
    gives up past ~1,000: RecursionError), and a readable record with a value nested 900 deep: every
    query answers, the unreadable files are skipped or refused by name."""
    deep = "[" * 100_000 + "]" * 100_000
    _write_run(models, "r", _record(str(models), name="r", extra=[[[[]]]]))
    _write_run(models, "deep", _record(str(models), name="deep"))
    (models / "runs" / "deep" / "lineage.json").write_text(deep)
    _write_run(models, "wide", _record(str(models), name="wide", extra=json.loads("[" * 900 + "]" * 900)))
    (models / "deployments").mkdir()
    (models / "deployments" / "x.json").write_text(deep)
    assert main(["trace", MODEL_COMMIT, "--model-repo", str(models), "--json"]) == 0
    assert sorted(r["run"]["name"] for r in json.loads(capsys.readouterr().out)["runs"]) == ["r", "wide"]
    assert main(["lineage", "--model-repo", str(models), "r"]) == 0
    assert MODEL_COMMIT in capsys.readouterr().out
    assert main(["lineage", "--model-repo", str(models), "wide"]) == 0
    assert "run          wide" in capsys.readouterr().out
    assert main(["lineage", "--model-repo", str(models), "deep"]) != 0
    assert "Traceback" not in capsys.readouterr().err
    assert "lineage.json: JSON nested too deeply to read" in caplog.text
    uri, client, experiment = store
    run = client.create_run(experiment, tags=_tags("m", MODEL_COMMIT)).info.run_id
    client.log_text(run, deep, "oxen/lineage.json")
    assert main(["lineage", run, "--tracking-uri", uri, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["source"] == "mlflow-tags"


@pytest.mark.parametrize("metric", ["nan-ish", None, [1, 2], True])
def test_a_metric_that_is_not_a_number_is_shown_as_it_is(models, capsys, metric):
    _write_run(models, "r", _record(str(models), name="r", checkpoints__0__metrics={"val_loss": metric, "acc": 0.91234}))
    assert main(["lineage", "--model-repo", str(models), "r"]) == 0
    out = capsys.readouterr().out
    assert f"val_loss={metric}" in out and "acc=0.9123" in out


# -- MLflow ----------------------------------------------------------------------------------------
@pytest.fixture
def store(tmp_path):  # type: ignore[no-untyped-def]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("hostile", artifact_location=str(tmp_path / "artifacts"))
    return uri, client, experiment


def _tags(name: str, commit: str, **more: str) -> dict[str, str]:
    return {"oxen.run": name, "oxen.model.repo": "/nowhere/models", "oxen.model.commit": commit,
            "oxen.model.path": f"runs/{name}/checkpoints/last.ckpt", "oxen.dataset.repo": "/data/x",
            "oxen.dataset.commit": DATA_COMMIT, **more}


def test_a_malformed_mlflow_run_never_crashes_a_query(store, capsys):
    """Tags of the wrong shape and a lineage artifact that is not JSON: the run is shown from what can be
    read, and the other runs of the answer are all there."""
    uri, client, experiment = store
    shapes = {"list-of-numbers": "[1]", "json-string": '"train.csv"', "not-json": "train.csv,val.csv", "empty-list": "[]"}
    ids = {}
    for i, (name, paths) in enumerate(shapes.items()):
        run = client.create_run(experiment, tags=_tags(name, f"{i:032x}", **{"oxen.dataset.paths": paths}))
        ids[name] = run.info.run_id
    client.log_text(ids["not-json"], "{this is not json", "oxen/lineage.json")
    client.log_text(ids["empty-list"], json.dumps({"schema": "something/else"}), "oxen/lineage.json")
    for name, paths in shapes.items():
        assert main(["lineage", ids[name], "--tracking-uri", uri]) == 0, name
        out, err = capsys.readouterr()
        assert f"paths: {paths}" in out, out
        assert "(read from MLflow tags: the model repository is not on this machine)" in out
    assert main(["trace", DATA_COMMIT, "--tracking-uri", uri, "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert sorted(r["run"]["mlflow_run_id"] for r in found["runs"]) == sorted(ids.values())


@pytest.mark.parametrize("swap", ["another-mlflow-run", "another-oxen-run"])
def test_a_lineage_artifact_that_is_another_runs_record_is_not_taken_for_this_runs(store, capsys, swap):
    """Run B's oxen/lineage.json replaced by run A's record (copied, or edited to name B's MLflow run but
    A's Oxen run): `lineage B` must not answer with A's data and checkpoint; B's own tags say what it is."""
    uri, client, experiment = store
    a = client.create_run(experiment, tags=_tags("a", MODEL_COMMIT)).info.run_id
    b = client.create_run(experiment, tags=_tags("b", "f" * 32)).info.run_id
    taken = _record("/nowhere/models", name="a", run__mlflow_run_id=a if swap == "another-mlflow-run" else b)
    client.log_text(b, json.dumps(taken), "oxen/lineage.json")
    assert main(["lineage", b, "--tracking-uri", uri, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["run"]["name"] == "b" and shown["model"]["commit"] == "f" * 32
    assert shown["source"] == "mlflow-tags"
    assert MODEL_COMMIT not in json.dumps(shown)


@pytest.mark.parametrize("endpoint", ["https://svc.example.com/o'brien/v1", "https://svc.example.com/a\\b",
                                      "https://svc.example.com/q\"uote'd"], ids=["apostrophe", "backslash", "both"])
def test_an_endpoint_with_quotes_is_found_and_only_it(store, capsys, endpoint):
    uri, client, experiment = store
    key = endpoint_tag(endpoint)
    serving = client.create_run(experiment, tags=_tags("serving", "a" * 32, **{key: endpoint})).info.run_id
    # under the same tag key, a value one character off (where a `LIKE` search would match it too)
    decoy = endpoint.replace('"', "y") if '"' in endpoint else endpoint.replace("'", "x").replace("\\", "z")
    client.create_run(experiment, tags=_tags("decoy", "b" * 32, **{key: decoy}))
    assert main(["trace", endpoint, "--tracking-uri", uri, "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert [r["run"]["mlflow_run_id"] for r in found["runs"]] == [serving]


def test_an_mlflow_error_never_prints_the_password(capsys, monkeypatch):
    """With a client certificate (or an auth plugin) the CLI reads through MLflow's own client, whose
    errors quote the tracking URI, password included."""
    monkeypatch.setenv("MLFLOW_TRACKING_CLIENT_CERT_PATH", "/nonexistent/client.pem")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    for extra in ([], ["--json"]):
        code = main(["trace", MODEL_COMMIT, "--tracking-uri", "https://alice:S3cretPW@127.0.0.1:1", *extra])
        out, err = capsys.readouterr()
        assert code == 1 and "error" in (out + err)
        assert "S3cretPW" not in out + err


@pytest.mark.parametrize("uri, error", [("bogus://u:S3cretPW@x", "MLflow has no tracking store for the scheme 'bogus'"),
                                        ("http://u:S3cretPW@[::1", "is not a valid URI"),
                                        ("./mlruns", "opens a file store")])
def test_an_unusable_tracking_uri_is_a_clear_error(capsys, uri, error):
    assert main(["trace", MODEL_COMMIT, "--tracking-uri", uri]) == 2
    out, err = capsys.readouterr()
    assert "--tracking-uri=" in err and error in err and "Traceback" not in err and "S3cretPW" not in err


def test_reproduce_refusing_a_hostile_model_path_leaves_no_half_copy(store, dataset_repo, tmp_path, capsys):
    """Tags name a real dataset commit and a model path outside the repository: refused before the data
    is copied (before, the data was copied, then the model path refused, and the folder left behind)."""
    uri, client, experiment = store
    tags = _tags("r", MODEL_COMMIT, **{"oxen.dataset.repo": str(dataset_repo.path),
                                       "oxen.dataset.commit": dataset_repo.commits[0],
                                       "oxen.dataset.paths": '["train.csv"]', "oxen.model.path": "../../etc/passwd"})
    run_id = client.create_run(experiment, tags=tags).info.run_id
    kit = tmp_path / "kit"
    assert main(["reproduce", run_id, "--to", str(kit), "--tracking-uri", uri]) == 2
    assert "would leave the repository" in capsys.readouterr().err and not kit.exists()
    kit.mkdir()  # an empty folder the user made stays, empty
    assert main(["reproduce", run_id, "--to", str(kit), "--tracking-uri", uri]) == 2
    assert kit.is_dir() and not any(kit.iterdir())


@pytest.mark.parametrize("missing", ["oxen.model.repo", "oxen.dataset.repo"])
def test_reproduce_of_a_run_whose_repository_tag_is_gone_names_it(store, tmp_path, capsys, missing):
    """A run whose tags name a commit but not the repository holding it (a tag deleted or never written):
    `reproduce` says which repository is missing and how to go on, no traceback, no folder left."""
    uri, client, experiment = store
    gone = {missing} | ({"oxen.dataset.commit"} if missing == "oxen.model.repo" else set())  # (checked first)
    tags = {k: v for k, v in _tags("r", MODEL_COMMIT, **{"oxen.dataset.paths": '["train.csv"]'}).items() if k not in gone}
    run_id = client.create_run(experiment, tags=tags).info.run_id
    kit = tmp_path / "kit"
    assert main(["reproduce", run_id, "--to", str(kit), "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err
    what = missing.split(".")[1]
    assert f"but no {what} repository" in err and "Traceback" not in err and not kit.exists()


@pytest.mark.parametrize("target", ["runs/" + "x" * 5000 + "/last.ckpt", "y" * 5000], ids=["path", "word"])
def test_a_target_no_file_system_can_hold_is_simply_not_found(models, capsys, target):
    assert main(["trace", "--model-repo", str(models), target]) == 1
    assert "no run found" in capsys.readouterr().out


def test_a_target_climbing_with_backslashes_is_one_name_never_a_path_out(models, capsys):
    """On POSIX a backslash is part of a file name (e4eff41): this names one file in the repository
    that no run saved, never /etc/passwd."""
    assert main(["trace", "--model-repo", str(models), "runs\\..\\..\\..\\etc\\passwd"]) == 1
    out = capsys.readouterr().out
    assert "no run found" in out and "root:" not in out


def test_a_tags_only_run_says_why_its_checkpoints_are_not_listed(store, models, capsys):
    """Before, it always said the model repository was not on this machine, also when it was."""
    uri, client, experiment = store
    run_id = client.create_run(experiment, tags=_tags("elsewhere", MODEL_COMMIT,
                                                      **{"oxen.model.repo": str(models)})).info.run_id
    assert main(["lineage", run_id, "--tracking-uri", uri]) == 0
    assert "(read from MLflow tags: the model repository on this machine holds no record of this run)" in \
        capsys.readouterr().out


def test_a_tracking_store_that_cannot_be_opened_is_one_line(tmp_path, capsys):
    """A file that is not a database, or a database whose driver is not installed (or that refuses)."""
    not_a_db = tmp_path / "notes.db"
    not_a_db.write_text("these are my notes, not a database\n")
    for uri, says in ((f"sqlite:///{not_a_db}", "file is not a database"),
                      ("postgresql://u:S3cretPW@127.0.0.1:1/db", "")):
        assert main(["trace", MODEL_COMMIT, "--tracking-uri", uri]) == 1
        out, err = capsys.readouterr()
        assert "error:" in err and says in err and "Traceback" not in err and "S3cretPW" not in out + err


@pytest.mark.parametrize("uri", ["databricks", "databricks://scope:prefix", "postgresql+psycopg2://u:pa/ss@db/x",
                                 "HTTP://127.0.0.1:5000", "mssql://db/x",
                                 "arn:aws:sagemaker:us-east-1:123456789012:mlflow-tracking-server/x"])
def test_every_tracking_uri_mlflow_opens_is_accepted(uri):
    """A check that refused a store MLflow opens would stop good fits: forms MLflow documents pass."""
    check_tracking_uri(uri, given_as="mlflow_tracking_uri")


@pytest.mark.parametrize("uri", ["/tmp/mlruns", "file:/tmp/mlruns", "C:\\mlruns"])
def test_a_file_store_passes_when_mlflow_is_told_to_open_one(uri, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    check_tracking_uri(uri, given_as="mlflow_tracking_uri")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")
    with pytest.raises(ConfigurationError, match="MLFLOW_ALLOW_FILE_STORE=true"):
        check_tracking_uri(uri, given_as="mlflow_tracking_uri")


def test_a_model_repo_tag_no_file_system_can_hold_is_not_a_crash(store, capsys):
    uri, client, experiment = store
    run_id = client.create_run(experiment, tags=_tags("long", MODEL_COMMIT,
                                                      **{"oxen.model.repo": "/tmp/" + "y" * 300})).info.run_id
    assert main(["lineage", run_id, "--tracking-uri", uri]) == 0
    assert main(["trace", MODEL_COMMIT, "--tracking-uri", uri]) == 0
    assert "the model repository is not on this machine" in capsys.readouterr().out


def test_a_lone_surrogate_in_a_record_is_shown_escaped(models, capsys):
    text = json.dumps(_record(str(models), name="r")).replace('"/data/reviews"', '"/data/\\ud800x"')
    (models / "runs" / "r" / "lineage.json").write_text(text, errors="surrogatepass")
    assert main(["lineage", "--model-repo", str(models), "r"]) == 0
    out = capsys.readouterr().out
    assert "/data/\\ud800x" in out
    out.encode("utf-8")  # printable on any UTF-8 terminal


@pytest.mark.parametrize("repo", ["/home/o'brien/models", '/srv/q"uote\'d/models', "/srv/back\\slash\\"])
def test_logged_models_of_a_repository_with_quotes_are_found(store, repo):
    """MLflow's logged-model search strips single quotes and nothing else: such a repository's models
    were never found, so a resumed run could not clear its earlier final/best marks."""
    from oxen_callbacks._mlflow.model_search import find, models_of

    uri, client, experiment = store
    tags = {"oxen.model.repo": repo, "oxen.run": "r'1", "oxen.model.commit": MODEL_COMMIT,
            "oxen.model.path": "runs/r'1/checkpoints/last.ckpt"}
    made = client.create_logged_model(experiment, name="m", tags=tags).model_id
    client.create_logged_model(experiment, name="decoy", tags={**tags, "oxen.model.repo": repo + "x"})
    assert list(models_of(client, [experiment], repo, "r'1")) == [f"{MODEL_COMMIT}:runs/r'1/checkpoints/last.ckpt"]
    assert models_of(client, [experiment], repo, "r'1")[f"{MODEL_COMMIT}:runs/r'1/checkpoints/last.ckpt"].model_id == made
    assert find(client, [experiment], repo, MODEL_COMMIT, "runs/r'1/checkpoints/last.ckpt").model_id == made


@pytest.mark.timeout(600)
@pytest.mark.parametrize("hostile", [5, "runs", [7, {"mlflow_run_id": 7}, {"mlflow_run_id": "no-such-run"}]])
def test_a_hand_edited_list_of_earlier_mlflow_runs_neither_stops_the_fit_that_continues_the_run(
        dataset_repo, tmp_path, hostile):
    """The record's ``earlier_mlflow_runs`` (where a continued run's earlier fits logged their models)
    edited by hand into something else: the next fit of the run commits its checkpoints, marks its
    last one final, and keeps only well-formed entries."""
    pin = PinnedDataset(dataset_repo.path, revision=dataset_repo.commits[0], paths=["train.csv", "val.csv"])
    models = tmp_path / "models"
    first = OxenLightningCallback(dataset=pin, model_repo=models, run_name="nightly")
    make_trainer(tmp_path / "a", [ModelCheckpoint(dirpath=tmp_path / "a" / "ckpt"), first], epochs=1).fit(
        TinyModel(), datamodule=CsvData(pin))
    assert first.lineage["status"] == "FINISHED"  # (waits for the final record)
    path = models / "runs" / "nightly" / "lineage.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "earlier_mlflow_runs": hostile}))
    again = OxenLightningCallback(model_repo=models, run_name="nightly", resume_from="nightly")
    make_trainer(tmp_path / "b", [ModelCheckpoint(dirpath=tmp_path / "b" / "ckpt"), again], epochs=2).fit(
        TinyModel(), datamodule=CsvData(again.dataset), ckpt_path=again.ckpt_path)
    record = again.lineage
    own = [c for c in record["checkpoints"] if c["fit_id"] == record["fit_id"]]
    assert record["status"] == "FINISHED" and own and all(c["commit"] for c in own)
    assert all(isinstance(r, dict) for r in record["earlier_mlflow_runs"])
    client = MlflowClient(mlflow.get_tracking_uri())
    finals = [m.tags["oxen.model.commit"] for m in client.search_logged_models(
        [e.experiment_id for e in client.search_experiments()], filter_string="tags.`oxen.run` = 'nightly'")
        if m.tags.get("oxen.model.final") == "true"]
    assert finals == [own[-1]["commit"]]


@pytest.mark.timeout(600)
def test_a_hand_edited_model_name_to_register_does_not_keep_sync_failing(dataset_repo, tmp_path):
    """A journal whose ``register_model`` was edited into a name MLflow refuses: ``sync`` finishes the
    killed run all the same (ended, its picture logged), registering nothing, and says why."""
    script = Path(__file__).parent / "fit_script.py"
    cmd = [sys.executable, str(script), "--dataset", str(dataset_repo.path), "--revision", dataset_repo.commits[0],
           "--model-repo", str(tmp_path / "models"), "--root", str(tmp_path / "fit"), "--epochs", "1", "--mlflow",
           "--logger", "--after-fit", "kill", "--register-model", "killed-clf"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL, check=False)
    assert done.returncode == -9, done.stderr[-3000:]
    [folder] = journals(Path(os.environ["OXEN_CALLBACKS_CACHE"]))
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["register_model"] == "killed-clf"
    (folder / "meta.json").write_text(json.dumps({**meta, "register_model": "team/clf"}))
    sync_until_nothing_pending()
    client = MlflowClient(mlflow.get_tracking_uri())
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED" and run.data.tags["oxen.lineage.status"] == "FINISHED"
    assert "oxen/lineage.svg" in {a.path for a in client.list_artifacts(run.info.run_id, "oxen")}
    assert client.search_registered_models() == []


def test_a_journaled_end_whose_model_name_was_edited_by_hand_does_not_keep_sync_failing(store, tmp_path):
    """The end's journaled ``publish_extras`` operation with ``register_model`` edited into a name MLflow
    refuses: ``sync`` logs the picture, registers nothing and leaves nothing pending."""
    uri, client, experiment = store
    run = client.create_run(experiment)
    journal = MlflowJournal.create(tmp_path / "cache", {"tracking_uri": uri, "run_id": run.info.run_id})
    journal.put(1, {"op": "publish_extras", "record": _record("/nowhere/models", name="r"), "register_model": "team/clf",
                    "graph": True, "dataset_input": False})
    journal.mark_ended()
    assert sync.sync_all(tmp_path / "cache", model_repos=[])["pending"] == 0
    assert "oxen/lineage.svg" in {a.path for a in client.list_artifacts(run.info.run_id, "oxen")}
    assert client.search_registered_models() == []


def test_a_damaged_record_is_refused_by_name_and_skipped_by_latest(dataset_repo, tmp_path):
    """Run `nightly`'s committed record was cut off (a full disk). resume_from="nightly" is refused at
    construction with the file named and a fix, not a JSON traceback; resume_from="latest" skips it
    and resumes the newest run it can read (not an older one), and so does a checkpoint commit id."""
    pin = PinnedDataset(dataset_repo.path, revision=dataset_repo.commits[0], paths=["train.csv", "val.csv"])
    models = tmp_path / "models"
    records = {}
    for run in ("oldest", "other", "nightly"):
        cb = OxenLightningCallback(dataset=pin, model_repo=models, run_name=run, mlflow=False)
        make_trainer(tmp_path / run, [ModelCheckpoint(dirpath=tmp_path / run / "ckpt"), cb], epochs=1).fit(
            TinyModel(), datamodule=CsvData(pin))
        records[run] = cb.lineage
    damaged = models / "runs" / "nightly" / "lineage.json"
    damaged.write_text('{"run": {"name": "nigh')

    with pytest.raises(ConfigurationError, match=rf"(?s)resume_from='nightly': the lineage record {damaged} of that "
                                                 r"run cannot be read.*HINT: restore the file"):
        OxenLightningCallback(model_repo=models, resume_from="nightly", mlflow=False)
    latest = OxenLightningCallback(model_repo=models, resume_from="latest", mlflow=False)
    other_last = [c for c in records["other"]["checkpoints"] if c["commit"]][-1]
    saved = tmp_path / "other" / "ckpt" / Path(other_last["path"]).name  # what run `other` last committed
    assert Path(latest.ckpt_path).read_bytes() == saved.read_bytes()
    assert Path(latest.ckpt_path).parent.parent.name == "other", latest.ckpt_path  # runs/other/checkpoints/...
    by_commit = OxenLightningCallback(model_repo=models, resume_from=other_last["commit"][:12], mlflow=False)
    assert Path(by_commit.ckpt_path).read_bytes() == saved.read_bytes()  # (the damaged newest record is skipped)


def test_a_journal_naming_a_store_with_credentials_never_shows_them(tmp_path, capsys, monkeypatch):
    """A journal written elsewhere (another version, by hand) whose tracking URI holds a password, its
    server down: neither `sync`'s lines nor its ``--json`` show the password (they did: the URI came
    out as the journal held it)."""
    import socket

    with socket.socket() as free:  # a port nothing listens on: connections are refused
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    uri = f"http://alice:hunter2pw@127.0.0.1:{port}"
    journal = MlflowJournal.create(tmp_path / "cache", {"tracking_uri": uri, "run_id": "0" * 32})
    journal.put(1, {"op": "set_tags", "tags": {"oxen.run": "r"}})
    journal.mark_ended()
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    for args in (["sync"], ["sync", "--json"]):
        assert main([*args, "--cache-dir", str(tmp_path / "cache")]) == 1  # (still pending)
        out = capsys.readouterr()
        assert f"127.0.0.1:{port}" in out.out and "hunter2pw" not in out.out + out.err, out


def test_a_token_in_a_tracking_uris_query_reaches_no_output_and_no_file(tmp_path):
    """A tracking URI with its token in the query (``?access_token=``), the server down: urllib3's retry
    warnings quote it as a bare path (``url: /?access_token=...``), which went out as it was, to
    `sync`'s stderr and into the journal's files. The real CLI, in a process of its own."""
    import socket

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    secret = "QsEcReT4242xyz"
    journal = MlflowJournal.create(tmp_path / "cache", {"tracking_uri": f"http://127.0.0.1:{port}/?access_token={secret}",
                                                        "run_id": "0" * 32})
    journal.put(1, {"op": "set_tags", "tags": {"oxen.run": "r"}})
    journal.mark_ended()
    env = {**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0"}
    for args in (["sync"], ["sync", "--json"]):
        done = subprocess.run([sys.executable, "-m", "oxen_callbacks.cli", *args, "--cache-dir", str(tmp_path / "cache")],
                              capture_output=True, text=True, timeout=300, env=env)
        assert done.returncode == 1, done.stderr[-2000:]
        assert "Retrying" in done.stderr and "access_token=***" in done.stdout + done.stderr, done.stderr[-2000:]
        assert secret not in done.stdout + done.stderr
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and p.name != "meta.json" and secret.encode() in p.read_bytes()]


def test_a_picture_of_a_hostile_run_is_drawn_as_written(store, tmp_path, capsys):
    """A run known from its tags alone, its paths only counted (too many for a tag, the artifact gone), its
    name holding matplotlib's math markup and a character XML forbids: `lineage --graph` draws it in
    every format (it crashed: ", ".join(None), a math parse error) and the SVG is well-formed XML."""
    import xml.etree.ElementTree as ET

    uri, client, experiment = store
    name = "r$\\frac{$\x0c<b>"
    run = client.create_run(experiment, tags=_tags(name, MODEL_COMMIT, **{
        "oxen.dataset.paths": json.dumps({"count": 1402, "listed_in": "oxen/lineage.json"})})).info.run_id
    for suffix in ("svg", "html", "png"):
        graph = tmp_path / f"g.{suffix}"
        assert main(["lineage", run, "--tracking-uri", uri, "--graph", str(graph)]) == 0, capsys.readouterr().err
        assert graph.stat().st_size > 0
    svg = (tmp_path / "g.svg").read_text()
    ET.fromstring(svg)
    assert "paths not listed" in svg and "<b>" not in svg and "\\x0c" in svg


def test_a_journal_of_a_run_its_user_deleted_is_dropped_once_said(store, tmp_path, capsys):
    """The end of a fit left journaled (MLflow was down), then the user deleted the run: every `sync`
    failed on it ("must be in the 'active' state") and exited 1 for good. It is dropped now, said by
    name; a run that cannot be reached or found stays journaled as before."""
    uri, client, experiment = store
    run = client.create_run(experiment)
    journal = MlflowJournal.create(tmp_path / "cache", {"tracking_uri": uri, "run_id": run.info.run_id})
    journal.put(1, {"op": "set_tags", "tags": {"oxen.run": "r"}})
    journal.put(2, {"op": "end_run", "status": "FINISHED"})
    journal.mark_ended()
    missing = MlflowJournal.create(tmp_path / "cache", {"tracking_uri": uri, "run_id": "f" * 32})
    missing.put(1, {"op": "set_tags", "tags": {"oxen.run": "r"}})
    missing.mark_ended()
    client.delete_run(run.info.run_id)

    assert main(["sync", "--cache-dir", str(tmp_path / "cache")]) == 1  # (the missing run's journal is kept)
    out = capsys.readouterr().out
    assert f"MLflow run {run.info.run_id}" in out and "2 operation(s) dropped" in out and "was deleted" in out
    assert [p.name for p in journals(tmp_path / "cache")] == [missing.folder.name]
    report = sync.sync_all(tmp_path / "cache", model_repos=[])
    assert report["pending"] == 1 and [m["status"] for m in report["mlflow"]] == ["failed"]
