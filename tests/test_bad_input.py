"""Bad input fails before any training time is spent, with a message naming the value and a fix."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest
from helpers import free_port, make_repo
from lightning_model import CsvData, TinyModel, make_trainer

from oxen_callbacks import PinnedDataset
from oxen_callbacks._util.processes import MAX_ENV_STRING_BYTES, check_can_start_processes
from oxen_callbacks.errors import ConfigurationError
from oxen_callbacks.lightning import OxenLightningCallback


def _cases(data, tmp, hanging_port):  # type: ignore[no-untyped-def]
    a = data.commits[0]
    cb = OxenLightningCallback
    not_a_repo = tmp / "plain"
    not_a_repo.mkdir(exist_ok=True)
    (tmp / "busy-folder").mkdir(exist_ok=True)
    (tmp / "busy-folder" / "notes.txt").write_text("mine")
    (tmp / "a-file").write_text("x")
    return [
        ("missing repo", lambda: PinnedDataset(tmp / "nope"), "does not exist"),
        ("not a repo", lambda: PinnedDataset(not_a_repo), "is not an Oxen repository"),
        ("repo sub-folder", lambda: PinnedDataset(data.path / ".oxen" / "history"), "pass the repository root"),
        ("unknown revision", lambda: PinnedDataset(data.path, revision="release-9"), "'release-9' was not found"),
        ("unknown commit id", lambda: PinnedDataset(data.path, revision="0123456789abcdef"), "was not found"),
        ("absolute path", lambda: PinnedDataset(data.path, a, paths=["/etc/passwd"]), "it is absolute"),
        ("escaping path", lambda: PinnedDataset(data.path, a, paths=["../secrets"]), "'..' would leave"),
        ("path not in commit", lambda: PinnedDataset(data.path, a, paths=["test.csv"]).pull(),
         "'test.csv' is not in commit"),
        ("dirty pinned path", lambda: _dirty(data), "uncommitted changes in the pinned paths: val.csv"),
        ("model repo inside dataset", lambda: cb(dataset=PinnedDataset(data.path, a), model_repo=data.path / "models"),
         "lies inside the dataset repository"),
        ("model repo is a user folder", lambda: cb(model_repo=tmp / "busy-folder", mlflow=False),
         "non-empty folder that is not an Oxen repository"),
        ("model repo is a file", lambda: cb(model_repo=tmp / "a-file", mlflow=False), "is a file"),
        ("token in remote URL", lambda: PinnedDataset("https://me:tok_123@hub.oxen.ai/ox/data"),
         "carries credentials"),
        ("token in model remote URL", lambda: cb(model_repo=tmp / "m1", mlflow=False,
                                                  remote_url="https://me:tok_123@hub.oxen.ai/ox/models"),
         "carries credentials"),
        ("bad URI scheme", lambda: PinnedDataset("s3://bucket/ox/data"), "scheme 's3' is not supported"),
        ("bad host", lambda: PinnedDataset("https://bad host/ox/data"), "not a valid host"),
        ("remote repo without namespace", lambda: PinnedDataset("https://hub.oxen.ai/data"), "namespace/name"),
        ("host refuses", lambda: PinnedDataset(f"http://127.0.0.1:{free_port()}/ox/data", remote_timeout=5),
         "Could not resolve revision"),
        ("host hangs", lambda: PinnedDataset(f"http://127.0.0.1:{hanging_port}/ox/data", remote_timeout=2),
         "no answer within 2s"),
        ("unknown remote name", lambda: _with_model_repo(tmp, lambda m: cb(model_repo=m, mlflow=False,
                                                                        remote="backup")),
         "remote='backup' is not a remote"),
        ("mlflow off but run id", lambda: cb(model_repo=tmp / "m2", mlflow=False, mlflow_run_id="abc"),
         "mlflow=False conflicts with mlflow_run_id"),
        ("tracking URI is a path", lambda: cb(model_repo=tmp / "m3", mlflow_tracking_uri="./mlruns"),
         "MLflow 3 opens a file store"),
        ("tracking URI of no store", lambda: cb(model_repo=tmp / "m3", mlflow_tracking_uri="bogus://me:tok_9@x/y"),
         "mlflow_tracking_uri='bogus://x/y' cannot be used: MLflow has no tracking store for the scheme 'bogus'"),
        ("tracking URI of a file store", lambda: cb(model_repo=tmp / "m3", mlflow_tracking_uri=f"file://{tmp}/mlruns"),
         "only with MLFLOW_ALLOW_FILE_STORE=true"),
        ("pin plus revision", lambda: cb(model_repo=tmp / "m4", dataset=PinnedDataset(data.path, a), revision="main"),
         "apply when dataset= is a repository path"),
        ("bad run name", lambda: cb(model_repo=tmp / "m5", mlflow=False, run_name="../../etc"),
         "cannot name a folder"),
        ("run name read with its newline", lambda: cb(model_repo=tmp / "m5", mlflow=False, run_name="nightly\n"),
         "run_name='nightly\\n' cannot name a folder"),
        ("negative timeout", lambda: cb(model_repo=tmp / "m6", mlflow=False, push_timeout=-1),
         "push_timeout=-1 must be a positive number"),
        ("unwritable cache", lambda: PinnedDataset(data.path, a, cache_dir=tmp / "a-file" / "c").pull(),
         "is not writable"),
        ("dataset path with a backslash", lambda: cb(model_repo=tmp / "m9", mlflow=False, dataset=_backslash_pin(tmp)),
         "The dataset path 'a\\\\b.csv' holds a backslash"),
        ("empty paths", lambda: PinnedDataset(data.path, a, paths=[]), "pass paths=None to pin the whole repository"),
        ("resume outside runs/", lambda: cb(model_repo=tmp / "m7", mlflow=False, resume_from="../../x"),
         "is not a plain run name"),
        ("resume by backslash path", lambda: cb(model_repo=tmp / "m7", mlflow=False, resume_from="..\\x"),
         "is not a plain run name"),
        ("token in URL query", lambda: PinnedDataset("https://hub.oxen.ai/ox/data?token=tok_456"),
         "carries a query or fragment"),
        ("token in model remote URL query", lambda: cb(model_repo=tmp / "m8", mlflow=False,
                                                        remote_url="https://hub.oxen.ai/ox/models#tok_789"),
         "carries a query or fragment"),
        ("token in query of a bad URL", lambda: PinnedDataset("s3://bucket?token=tok_012"), "carries a query"),
        ("model repo below a file", lambda: cb(model_repo=tmp / "a-file" / "models", mlflow=False),
         "which is a file"),
    ]


def _dirty(data):  # type: ignore[no-untyped-def]
    original = (data.path / "val.csv").read_bytes()
    (data.path / "val.csv").write_text("x0,x1,x2,x3,label\n")
    try:
        return PinnedDataset(data.path, paths=["val.csv"])
    finally:
        (data.path / "val.csv").write_bytes(original)


def _backslash_pin(tmp):  # type: ignore[no-untyped-def]
    """A pin of ``a\\b.csv``: one file on Linux, a path no lineage record may hold."""
    repo = make_repo(tmp / "data-with-backslash", [("init", {"a\\b.csv": "1\n"})])
    return PinnedDataset(repo.path, revision=repo.head, paths=["a\\b.csv"])


def _with_model_repo(tmp, make):  # type: ignore[no-untyped-def]
    repo = make_repo(tmp / "models-with-remote-check", [("init", {"README.md": "models"})])
    return make(repo.path)


def test_bad_input_table(dataset_repo, tmp_path, hanging_port):
    cases = _cases(dataset_repo, tmp_path, hanging_port)
    assert len(cases) >= 15
    failures = []
    for name, call, expected in cases:
        try:
            call()
        except ConfigurationError as exc:
            text = str(exc)
            if expected not in text or "HINT:" not in text and "does not exist" not in text:
                failures.append(f"{name}: message {text!r} lacks {expected!r} or a hint")
            if "tok_" in text:
                failures.append(f"{name}: message {text!r} shows the token")
        except Exception as exc:  # noqa: BLE001
            failures.append(f"{name}: raised {type(exc).__name__}: {exc}")
        else:
            failures.append(f"{name}: no error")
    assert not failures, "\n".join(failures)


def test_an_unusable_tracking_uri_in_the_environment_is_named_before_training(tmp_path, monkeypatch):
    """Before, ``MLFLOW_TRACKING_URI=bogus://x`` was found out only after training, by the MLflow side."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "bogus://x")
    with pytest.raises(ConfigurationError, match=r"MLFLOW_TRACKING_URI='bogus://x' cannot be used.*\nHINT: use e\.g\."):
        OxenLightningCallback(model_repo=tmp_path / "models")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    OxenLightningCallback(model_repo=tmp_path / "models")


def test_missing_path_stops_fit_before_the_first_step(dataset_repo, tmp_path):
    pin = PinnedDataset(dataset_repo.path, dataset_repo.commits[0], paths=["train.csv", "val.csv", "labels.csv"])
    model = TinyModel()
    with pytest.raises(ConfigurationError, match="'labels.csv' is not in commit"):
        make_trainer(tmp_path, [OxenLightningCallback(dataset=pin, model_repo=tmp_path / "models", mlflow=False)],
                     epochs=1).fit(model, datamodule=CsvData(pin))
    assert not model.labels_seen


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's limit on one environment string")
def test_the_environment_limit_is_the_kernels_to_the_byte():
    """A variable exactly at the limit starts a real process and passes the check; one byte more
    fails both (E2BIG), so the check refuses exactly what Linux refuses."""
    name = "AT_THE_LIMIT"
    for extra, starts in ((0, True), (1, False)):
        env = {"PATH": os.environ.get("PATH", ""), name: "x" * (MAX_ENV_STRING_BYTES - len(name) - 2 + extra)}
        try:
            subprocess.run([sys.executable, "-c", "pass"], env=env, check=True)
            started = True
        except OSError as exc:
            assert exc.errno == errno.E2BIG
            started = False
        assert started is starts
        if starts:
            check_can_start_processes(env)
        else:
            with pytest.raises(ConfigurationError, match=name):
                check_can_start_processes(env)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's limit on one environment string")
def test_an_environment_no_process_can_start_with_is_named_before_training(dataset_repo, tmp_path, monkeypatch):
    """One environment variable over Linux's limit (128 KiB with 4 KiB pages) makes every new
    process fail with E2BIG ("Argument list too long"): our helpers (dataset copy, commit worker,
    MLflow sink) could never start. The error says so and names the variable, never its value,
    whether the variable was there when the callback was built or set before fit()."""
    secret = "s3cr3t-" * (MAX_ENV_STRING_BYTES // 7 + 10)
    commit = dataset_repo.commits[0]

    def refused(call) -> str:  # type: ignore[no-untyped-def]
        with pytest.raises(ConfigurationError) as caught:
            call()
        text = str(caught.value)
        assert "HUGE_SECRET" in text and "Argument list too long" in text and "HINT:" in text
        assert "s3cr3t" not in text
        return text

    monkeypatch.setenv("HUGE_SECRET", secret)
    refused(lambda: PinnedDataset(dataset_repo.path, commit, cache_dir=tmp_path / "cache").pull())  # a child copies
    refused(lambda: OxenLightningCallback(model_repo=tmp_path / "models", mlflow=False))  # the worker starts here

    # set after the callback was built: its warm worker gets the environment through a pipe, but no
    # worker, push or sync could be started again after a fault, so the fit is refused before a step
    monkeypatch.delenv("HUGE_SECRET")
    pin = PinnedDataset(dataset_repo.path, commit, paths=["train.csv", "val.csv"], cache_dir=tmp_path / "cache")
    data = CsvData(pin)
    pin.pull()
    cb = OxenLightningCallback(model_repo=tmp_path / "models", mlflow=False)
    model = TinyModel()
    monkeypatch.setenv("HUGE_SECRET", secret)
    refused(lambda: make_trainer(tmp_path / "fit", [cb], epochs=1).fit(model, datamodule=data))
    assert not model.labels_seen  # not one training step
    assert not (tmp_path / "models" / "runs").exists()
