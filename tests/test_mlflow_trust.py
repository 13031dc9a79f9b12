"""MLflow bookkeeping never fails a run that worked, never leaves a run RUNNING, never creates a store by reading."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import logged_models_of_run, process_tree, stop_processes, wait_until_released
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning_model import CsvData, TinyModel, make_trainer
from mlflow import MlflowClient

from oxen_callbacks import PinnedDataset, cli, read_lineage
from oxen_callbacks._mlflow.sink import MlflowSink
from oxen_callbacks._mlflow.sink_thread import SinkThread
from oxen_callbacks._mlflow.warm_sink import WarmSinkProcess
from oxen_callbacks._oxen.repo import LocalRepo
from oxen_callbacks.lightning import OxenLightningCallback
from oxen_callbacks.run import LineageRun


def _wait_until_gone(folder: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while folder.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not folder.exists(), "the sink process never finished its journal"


def test_journal_folder_deleted_between_listing_and_reading(tmp_path, monkeypatch):
    """The worst moment, made certain: the training side has seen the journal folder, then the real
    sink process finishes and deletes it before the folder is listed. Nothing may raise."""
    sink = MlflowSink.attach(cache_dir=tmp_path / "cache", run_name="race")
    sink.set_tags({"oxen.test": "1"})
    sink.log_lineage({"status": "FINISHED"})
    run_id = sink.wait_for_run(120)  # as finish() does before its last operations
    ops = sink.journal.folder / "ops"
    real_scandir, real_listdir = os.scandir, os.listdir

    def after_the_sink_is_done(real):  # type: ignore[no-untyped-def]
        def listing(path="."):  # type: ignore[no-untyped-def]
            if Path(path) == ops:
                _wait_until_gone(sink.journal.folder)  # the real sink process deletes it meanwhile
            return real(path)
        return listing

    sink.end("FINISHED")
    with monkeypatch.context() as patched:
        patched.setattr(os, "scandir", after_the_sink_is_done(real_scandir))
        patched.setattr(os, "listdir", after_the_sink_is_done(real_listdir))
        assert sink.flush(timeout=120)
        sink.close()
    assert sink.journal.is_empty() and sink.journal.pending() == [] and sink.journal.status() == {}
    assert sink.run_id == run_id  # remembered after the folder is gone
    run = MlflowClient().get_run(run_id)
    assert run.data.tags["oxen.test"] == "1" and run.info.status == "FINISHED"
    assert "not yet done: nothing" in sink.why_pending()


def test_many_short_runs_end_without_error(tmp_path):
    """attach -> log -> end -> flush -> close, again and again on one warm sink process (the notebook case)."""
    client = MlflowClient()
    for i in range(5):
        sink = MlflowSink.attach(cache_dir=tmp_path / "cache", run_name=f"short-{i}", warm=WarmSinkProcess())
        sink.set_tags({"oxen.i": str(i)})
        run_id = sink.wait_for_run(120)
        sink.end("FINISHED")
        assert sink.flush(timeout=120)
        sink.close()
        assert sink.journal.is_empty()
        assert client.get_run(run_id).data.tags["oxen.i"] == str(i)


def test_journal_removed_mid_run_is_made_again(tmp_path, caplog):
    """Someone empties the cache while the model trains: the checkpoints are committed, finish() returns,
    and the training side journals again, so the run still gets its final lineage."""
    run = LineageRun(dataset=None, model_repo=tmp_path / "models", framework=("test", "1"),
                     author=("T", "t@example.com"), mlflow_timeout=30)
    run.start()
    ckpt = tmp_path / "e0.ckpt"
    ckpt.write_bytes(b"weights")
    run.checkpoint_saved(ckpt, step=1, epoch=0)
    assert run.sink.wait_for_run(120)
    while run.sink.journal.folder.exists():  # as `rm -rf` again would: the sink process may be writing in it
        shutil.rmtree(run.sink.journal.folder, ignore_errors=True)
    with caplog.at_level(logging.WARNING):
        record = run.finish("FINISHED")
    assert record is not None and record["checkpoints"] and record["checkpoints"][0]["commit"]
    assert "Could not journal the MLflow" not in caplog.text
    client = MlflowClient()
    run_id = record["run"]["mlflow_run_id"]
    assert client.get_run(run_id).info.status == "FINISHED"
    logged = json.loads(Path(client.download_artifacts(run_id, "oxen/lineage.json", str(tmp_path / "dl"))).read_text())
    assert logged["model"]["commit"] == record["model"]["commit"]


def test_slow_mlflow_warning_says_why(tmp_path, caplog):
    """The fit-end warning names the sink process's state and the operations not yet done."""
    sink = MlflowSink.attach(cache_dir=tmp_path / "cache", run_name="slow")
    assert sink.wait_for_run(120)
    sink._proc.kill()  # the sink process dies (OOM killer): nothing more is done
    sink._proc.wait()
    sink.set_tags({"oxen.test": "1"})
    sink.end("FINISHED")
    assert not sink.flush(timeout=1)
    why = sink.why_pending()
    assert f"exited with code {sink._proc.returncode}" in why and "set_tags, end_run" in why

    run = LineageRun(dataset=None, model_repo=tmp_path / "models", framework=("test", "1"),
                     author=("T", "t@example.com"), mlflow_timeout=1)
    run.start()
    assert run.sink.wait_for_run(120)
    run.sink._proc.kill()
    run.sink._proc.wait()
    with caplog.at_level(logging.WARNING):
        run.finish("FINISHED")
    warning = next(r.getMessage() for r in caplog.records if "has not taken the lineage" in r.getMessage())
    assert "None" not in warning and "exited with code" in warning and "end_run" in warning
    waited = float(re.search(r"after (\d+\.\d) s", warning)[1])  # the time it waited: none, the sink being dead
    assert waited < run.mlflow_timeout
    assert str(run.sink.journal.folder) in warning


def _committed_run(tmp_path: Path) -> tuple[Path, dict]:
    """A model repository with one run (no MLflow) and one committed checkpoint."""
    run = LineageRun(dataset=None, model_repo=tmp_path / "models", framework=("test", "1"), mlflow=False,
                     run_name="no-mlflow", author=("T", "t@example.com"))
    run.start()
    ckpt = tmp_path / "e0.ckpt"
    ckpt.write_bytes(b"weights")
    run.checkpoint_saved(ckpt, step=1, epoch=0)
    record = run.finish("FINISHED")
    assert record is not None
    return tmp_path / "models", record


def test_queries_never_create_a_missing_sqlite_store(tmp_path, monkeypatch, capsys):
    models, record = _committed_run(tmp_path)
    store = tmp_path / "absent" / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    commit = record["checkpoints"][0]["commit"]

    assert cli.main(["lineage", "--model-repo", str(models), "no-mlflow", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["checkpoints"][0]["commit"] == commit
    assert cli.main(["trace", commit, "--model-repo", str(models), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["runs"][0]["run"]["name"] == "no-mlflow"
    assert cli.main(["trace", "0123456789abcdef", "--model-repo", str(models)]) == 1
    assert f"the MLflow store {store} does not exist" in capsys.readouterr().out
    assert cli.main(["lineage", "0123456789abcdef0123456789abcdef", "--model-repo", str(models)]) == 2
    assert f"the MLflow store {store} does not exist" in capsys.readouterr().err
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///relative.db")  # relative to the current folder (tmp_path)
    assert cli.main(["trace", commit, "--model-repo", str(models), "--json"]) == 0
    capsys.readouterr()
    assert not store.exists() and not store.parent.exists() and not (tmp_path / "relative.db").exists()

    probe = ("import sys; from oxen_callbacks import cli; "
             f"code = cli.main(['trace', {commit!r}, '--model-repo', {str(models)!r}]); "
             "sys.exit(code or ('mlflow' in sys.modules and 'mlflow imported'))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store}"})
    assert done.returncode == 0, done.stderr
    assert not store.exists()


def test_refused_hf_resume_ends_transformers_run_as_failed(tmp_path, monkeypatch):
    """report_to="mlflow": transformers starts its run before our on_train_begin refuses the resume."""
    import mlflow
    from helpers import commit_files, make_repo
    from hf_model import jsonl, make_trainer

    from oxen_callbacks import PinnedDataset
    from oxen_callbacks.errors import DatasetMismatchError
    from oxen_callbacks.huggingface import OxenTrainerCallback

    paths = ["train.jsonl", "eval.jsonl"]
    reviews = make_repo(tmp_path / "reviews", [("A", {"train.jsonl": jsonl(0), "eval.jsonl": jsonl(0, rows=8, seed=1)})])
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "hf-refused")
    pin_a = PinnedDataset(reviews.path, revision="main", paths=paths)
    first = OxenTrainerCallback(dataset=pin_a, model_repo=tmp_path / "models", mlflow=False)
    trainer, _ = make_trainer(tmp_path / "out", pin_a.load_dataset()["train"], [first], max_steps=2, save_steps=2)
    trainer.train()
    commit_files(reviews, "B", {"train.jsonl": jsonl(1)})

    pin_b = PinnedDataset(reviews.path, revision="main", paths=paths)
    user_run = mlflow.start_run(run_name="the user's own")  # left alone: not ours to end
    refused = OxenTrainerCallback(dataset=pin_b, model_repo=tmp_path / "models")
    trainer, _ = make_trainer(tmp_path / "out2", pin_b.load_dataset()["train"], [refused], max_steps=4,
                              report_to="mlflow")
    with pytest.raises(DatasetMismatchError):
        trainer.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    assert mlflow.active_run().info.run_id == user_run.info.run_id
    mlflow.end_run()

    refused = OxenTrainerCallback(dataset=pin_b, model_repo=tmp_path / "models")  # the run started after the
    trainer, _ = make_trainer(tmp_path / "out2b", pin_b.load_dataset()["train"], [refused], max_steps=4,  # Trainer
                              report_to="mlflow")
    later_run = mlflow.start_run(run_name="the user's own, later")  # (it was ended FAILED: found by a review)
    with pytest.raises(DatasetMismatchError):
        trainer.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    assert mlflow.active_run().info.run_id == later_run.info.run_id
    assert MlflowClient().get_run(later_run.info.run_id).info.status == "RUNNING"
    mlflow.end_run()

    refused = OxenTrainerCallback(dataset=pin_b, model_repo=tmp_path / "models")
    trainer, collator = make_trainer(tmp_path / "out3", pin_b.load_dataset()["train"], [refused], max_steps=4,
                                     report_to="mlflow")
    with pytest.raises(DatasetMismatchError):
        trainer.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    assert collator.labels == []
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("hf-refused").experiment_id])
    statuses = {run.info.run_name: run.info.status for run in runs}
    assert statuses.pop("the user's own") == statuses.pop("the user's own, later") == "FINISHED"
    assert list(statuses.values()) == ["FAILED"]  # transformers' run for the refused train()
    assert mlflow.active_run() is None


def _background_busy(cache: Path, models: Path) -> bool:
    """A sink process still holds an MLflow journal, or a commit worker a queue of the model repository."""
    from oxen_callbacks._mlflow.journal import MlflowJournal, journals
    from oxen_callbacks._publish.queue import all_queues
    from oxen_callbacks._util.locks import is_locked

    sinks = [MlflowJournal(folder) for folder in journals(cache)]
    return (any(is_locked(j.lock_path) or j.sink_alive() for j in sinks)
            or any(not q.is_orphan() for q in all_queues(models)))


@pytest.mark.timeout(600)
def test_sigkilled_training_run_is_finished_by_sync(dataset_repo, tmp_path, capsys):
    from oxen_callbacks._oxen.repo import LocalRepo
    from oxen_callbacks.lineage import read_lineage

    models, cache = tmp_path / "models", tmp_path / "cache"
    script = Path(__file__).parent / "fit_script.py"
    proc = subprocess.Popen([sys.executable, str(script), "--dataset", str(dataset_repo.path), "--revision",
                             dataset_repo.commits[0], "--model-repo", str(models), "--root", str(tmp_path / "fit"),
                             "--run-name", "killed", "--every-n-steps", "1", "--step-sleep", "0.2", "--epochs", "5",
                             "--mlflow"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lineage = models / "runs" / "killed" / "lineage.json"
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:  # at least one checkpoint committed
        if lineage.is_file() and any(c["commit"] for c in read_lineage(lineage)["checkpoints"]):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "training ended before it could be killed"
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 300
    while _background_busy(cache, models) and time.monotonic() < deadline:
        time.sleep(0.2)  # the worker commits what was frozen, the sink process logs what was journaled

    assert cli.main(["sync"]) == 0
    report = capsys.readouterr().out
    assert "its training process died without ending it: lineage status KILLED" in report, report
    record = read_lineage(lineage)
    last = record["checkpoints"][-1]
    assert last["commit"] in LocalRepo(models).commit_ids()
    client = MlflowClient()
    run = client.search_runs([e.experiment_id for e in client.search_experiments()])[0]
    assert run.info.status == "KILLED"
    assert run.data.tags["oxen.lineage.status"] == "KILLED"
    assert run.data.tags["oxen.model.commit"] == last["commit"] and run.data.tags["oxen.model.path"] == last["path"]
    logged = read_lineage(client.download_artifacts(run.info.run_id, "oxen/lineage.json", str(tmp_path / "dl")))
    assert logged["status"] == "KILLED" and logged["model"]["commit"] == last["commit"]
    assert [c["commit"] for c in logged["checkpoints"]] == [c["commit"] for c in record["checkpoints"]]
    assert logged["run"]["mlflow_run_id"] == run.info.run_id
    assert cli.main(["sync"]) == 0 and "nothing left to do" in capsys.readouterr().out
    # the model repository gives the same answer as MLflow: committed KILLED, naming the MLflow run
    from helpers import file_at

    from oxen_callbacks._oxen import child as oxen_child

    head = oxen_child.branches(models)["main"]
    committed = read_lineage(file_at(models, head, "runs/killed/lineage.json", tmp_path / "read-cache"))
    assert committed["status"] == "KILLED" and committed["run"]["mlflow_run_id"] == run.info.run_id
    assert committed["model"] == logged["model"] and committed["checkpoints"] == logged["checkpoints"]
    # the trainer named no best (no monitored metric): sync names none either, in the record or in MLflow
    assert committed["model"].get("best") is not True
    found = logged_models_of_run(os.environ["MLFLOW_TRACKING_URI"], run.info.run_id)
    assert found and not [m for m in found if "oxen.model.best" in m.tags]
    assert cli.main(["lineage", run.info.run_id, "--model-repo", str(models), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "KILLED"
    assert cli.main(["trace", last["commit"], "--model-repo", str(models), "--json"]) == 0
    assert [r["run"]["mlflow_run_id"] for r in json.loads(capsys.readouterr().out)["runs"]] == [run.info.run_id]


def test_abandoned_run_waits_while_a_live_worker_commits_its_checkpoints(tmp_path):
    from oxen_callbacks._mlflow.journal import ABANDONED_SEQ, MlflowJournal
    from oxen_callbacks._ops import sync
    from oxen_callbacks._publish.queue import JobQueue
    from oxen_callbacks._util.locks import FileLock

    client = MlflowClient()
    run_id = client.create_run(client.create_experiment("abandoned")).info.run_id
    models = tmp_path / "models"
    queue = JobQueue.create(models, "r1", {})
    queue.put(1, "checkpoint", {"run": "r1", "dest": "runs/r1/checkpoints/c.ckpt", "staged_name": "c.ckpt", "record": {},
                                "metrics": {}, "step": 1, "epoch": 0})
    journal = MlflowJournal.create(tmp_path / "cache", {"tracking_uri": os.environ["MLFLOW_TRACKING_URI"],
                                                        "run_id": run_id, "model_repo": str(models), "oxen_run": "r1"})
    journal.put(ABANDONED_SEQ, {"op": "finish_abandoned"})
    with FileLock(queue.worker_lock):  # a worker still draining the dead process's queue
        [busy] = sync.sync_mlflow(tmp_path / "cache")
    assert busy["status"] == "busy" and "r1" in busy["waiting_for"]
    assert client.get_run(run_id).info.status == "RUNNING"

    [done] = sync.sync_mlflow(tmp_path / "cache")  # the worker is gone: finished from what was committed
    assert done["status"] == "done" and done["abandoned"]["checkpoints"] == 0
    run = client.get_run(run_id)
    assert run.info.status == "KILLED" and run.data.tags["oxen.lineage.status"] == "KILLED"


@pytest.mark.timeout(600)
def test_whole_job_sigkilled_at_once_is_finished_by_sync(dataset_repo, tmp_path):
    """A cgroup OOM kill or scancel: the trainer, its sink process, its worker and commit child die
    together. No sink process lives to journal finish_abandoned: `sync` must see it is abandoned."""
    from oxen_callbacks._ops import sync

    client = MlflowClient()
    lineage = _kill_whole_job_once_tagged(dataset_repo, tmp_path, "victim")

    report = sync.sync_all()
    [entry] = report["mlflow"]
    assert entry["status"] == "done" and entry["abandoned"]["status"] == "KILLED", report
    assert report["pending"] == 0
    record = read_lineage(lineage)  # as `sync` committed the orphan queue
    committed = [c for c in record["checkpoints"] if c["commit"]]
    run = client.search_runs(["0"])[0]
    assert run.info.status == "KILLED" and run.data.tags["oxen.lineage.status"] == "KILLED"
    assert run.data.tags["oxen.model.commit"] == committed[-1]["commit"]
    logged = read_lineage(client.download_artifacts(run.info.run_id, "oxen/lineage.json", str(tmp_path / "dl")))
    assert [c["commit"] for c in logged["checkpoints"]] == [c["commit"] for c in committed]


def _kill_whole_job_once_tagged(dataset_repo, tmp_path: Path, run: str,  # type: ignore[no-untyped-def]
                                mlflow_run_id: str | None = None, *, logger: bool = True) -> Path:
    """Train run ``run`` (its own MLflow run, or with ``mlflow_run_id`` an ``MLFlowLogger``'s of that
    existing run; without ``logger``, the run ``$MLFLOW_RUN_ID`` names) in a process; once a checkpoint is
    committed and the run tagged with it, SIGKILL the process and all its helpers at once; its lineage
    file, locks released."""
    models = tmp_path / "models"
    script = Path(__file__).parent / "fit_script.py"
    logging_to = ["--logger", "--logger-run-id", mlflow_run_id] if mlflow_run_id and logger else []
    proc = subprocess.Popen([sys.executable, str(script), "--dataset", str(dataset_repo.path), "--revision",
                             dataset_repo.commits[0], "--model-repo", str(models), "--root", str(tmp_path / "fit"),
                             "--run-name", run, "--mlflow", "--step-sleep", "0.3", "--epochs", "60",
                             "--every-n-steps", "6", *logging_to], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lineage = models / "runs" / run / "lineage.json"
    client = MlflowClient()
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:  # a checkpoint committed, the run tagged with it
        runs = [client.get_run(mlflow_run_id)] if mlflow_run_id else client.search_runs(["0"])
        if (lineage.is_file() and any(c["commit"] for c in read_lineage(lineage)["checkpoints"])
                and runs and "oxen.model.commit" in runs[0].data.tags):
            break
        time.sleep(0.2)
    assert proc.poll() is None, "training ended before it could be killed"
    _kill_whole_tree(proc)
    # a killed process lets go of its locks a moment later
    assert not wait_until_released(models, Path(os.environ["OXEN_CALLBACKS_CACHE"]))
    return lineage


def _kill_whole_tree(proc: subprocess.Popen) -> None:  # type: ignore[type-arg]
    """SIGKILL a process and every process it started, at once (a cgroup OOM kill, scancel)."""
    frozen = stop_processes(lambda: process_tree(proc.pid))  # stopped first: none can start a child the kill would miss
    for pid in frozen:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.timeout(600)
def test_sync_of_a_killed_fit_leaves_the_record_of_a_fit_that_continued_the_run_alone(dataset_repo, tmp_path):
    """Fit A (its own MLflow run) is killed with all its helpers; fit B continues the run under its name
    without MLflow and finishes. `sync` then ends A's MLflow run KILLED, but runs/<run>/lineage.json is
    B's record: it must not be amended with A's status or MLflow run."""
    from oxen_callbacks._ops import sync

    models, client = tmp_path / "models", MlflowClient()
    lineage = _kill_whole_job_once_tagged(dataset_repo, tmp_path, "nightly")
    assert sync.sync_all(mlflow=False)["pending"] == 0  # (A's queued saves committed; its MLflow left)
    killed_fit = read_lineage(lineage)

    b = OxenLightningCallback(model_repo=models, run_name="nightly", resume_from="nightly", mlflow=False)
    epochs = 1 + max(c["epoch"] or 0 for c in killed_fit["checkpoints"])  # (A got further on a slow machine)
    make_trainer(tmp_path / "b", [ModelCheckpoint(dirpath=tmp_path / "b" / "ckpt"), b], epochs=epochs + 1).fit(
        TinyModel(), datamodule=CsvData(b.dataset), ckpt_path=b.ckpt_path)
    mine = b.lineage
    report = sync.sync_all()
    assert report["pending"] == 0, [(m.get("status"), m.get("error")) for m in report["mlflow"]]
    record = read_lineage(lineage)
    assert record["fit_id"] == mine["fit_id"] and record["status"] == "FINISHED"
    assert record["run"]["mlflow_run_id"] is None and record["model"] == mine["model"]
    [run] = client.search_runs(["0"])  # A's MLflow run is ended KILLED, with A's checkpoints only
    assert run.info.status == "KILLED" and run.data.tags["oxen.lineage.status"] == "KILLED"
    logged = read_lineage(client.download_artifacts(run.info.run_id, "oxen/lineage.json", str(tmp_path / "dl")))
    assert logged["fit_id"] == killed_fit["fit_id"] != mine["fit_id"]
    assert [c["commit"] for c in logged["checkpoints"]] == [c["commit"] for c in killed_fit["checkpoints"] if c["commit"]]
    assert run.data.tags["oxen.model.commit"] == logged["checkpoints"][-1]["commit"]


def test_sync_of_a_killed_fit_leaves_the_mlflow_run_a_later_fit_continued_in_alone(dataset_repo, tmp_path):
    """Fit A logs through an ``MLFlowLogger`` of an existing MLflow run and is killed with all its helpers;
    fit B resumes the Oxen run in the same MLflow run (the same logger run id) and finishes. `sync` of A's
    journal then must not write A's end over B's: the run's status, tags and ``oxen/lineage.json`` stay
    B's, as the model repository says (found by an adversarial review: they became A's, KILLED)."""
    from lightning.pytorch.loggers import MLFlowLogger

    from oxen_callbacks._ops import sync

    models, client = tmp_path / "models", MlflowClient()
    run_id = client.create_run(client.create_experiment("shared")).info.run_id
    lineage = _kill_whole_job_once_tagged(dataset_repo, tmp_path, "nightly", mlflow_run_id=run_id)
    assert sync.sync_all(mlflow=False)["pending"] == 0  # (A's queued saves committed; its MLflow left)
    killed_fit = read_lineage(lineage)

    b = OxenLightningCallback(model_repo=models, run_name="nightly", resume_from="nightly")
    epochs = 1 + max(c["epoch"] or 0 for c in killed_fit["checkpoints"])
    logger = MLFlowLogger(run_id=run_id, tracking_uri=os.environ["MLFLOW_TRACKING_URI"], log_model=False)
    make_trainer(tmp_path / "b", [ModelCheckpoint(dirpath=tmp_path / "b" / "ckpt"), b], epochs=epochs + 1,
                 logger=logger).fit(TinyModel(), datamodule=CsvData(b.dataset), ckpt_path=b.ckpt_path)
    mine = b.lineage
    assert mine["run"]["mlflow_run_id"] == run_id and killed_fit["fit_id"] in mine["earlier_fits"]
    report = sync.sync_all()
    assert report["pending"] == 0, [(m.get("status"), m.get("error")) for m in report["mlflow"]]
    [ended] = [m["abandoned"] for m in report["mlflow"] if m.get("abandoned")]
    assert ended["continued_by"] == mine["fit_id"]  # (what the report says)
    assert read_lineage(lineage) == mine
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["oxen.lineage.status"] == "FINISHED"
    assert (run.data.tags["oxen.model.commit"], run.data.tags["oxen.model.path"]) == (
        mine["model"]["commit"], mine["model"]["path"])
    logged = read_lineage(client.download_artifacts(run_id, "oxen/lineage.json", str(tmp_path / "dl")))
    assert logged == mine


def _fit_a_new_oxen_run_into(dataset_repo, tmp_path: Path, run_id: str) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """Fit B: a new Oxen run of ``tmp_path / "models"`` logging to MLflow run ``run_id`` through an
    ``MLFlowLogger`` (Lightning's way to go on in a run); its lineage."""
    from lightning.pytorch.loggers import MLFlowLogger

    pin = PinnedDataset(dataset_repo.path, revision=dataset_repo.commits[0], paths=["train.csv", "val.csv"])
    b = OxenLightningCallback(dataset=pin, model_repo=tmp_path / "models")
    logger = MLFlowLogger(run_id=run_id, tracking_uri=os.environ["MLFLOW_TRACKING_URI"], log_model=False)
    make_trainer(tmp_path / "b", [ModelCheckpoint(dirpath=tmp_path / "b" / "ckpt"), b], logger=logger).fit(
        TinyModel(), datamodule=CsvData(pin))
    return b.lineage


def test_sync_of_a_killed_fit_leaves_the_mlflow_run_a_fit_of_another_oxen_run_went_on_in_alone(dataset_repo, tmp_path):
    """Fit A logs through an ``MLFlowLogger`` of an existing MLflow run and is killed with all its helpers;
    fit B, a new Oxen run, logs to the same MLflow run (``MLFlowLogger(run_id=...)``, Lightning's way to go
    on in a run) and finishes. `sync` of A's journal then wrote A's KILLED lineage and model tags over B's,
    and left two models marked final (found by a review: the model repository's record of A's Oxen run
    cannot tell). The run's ``oxen.fit`` tag names the fit that logs to it now: the run stays B's, A's
    checkpoints get their logged models, unmarked."""
    from oxen_callbacks._ops import sync

    client, uri = MlflowClient(), os.environ["MLFLOW_TRACKING_URI"]
    run_id = client.create_run(client.create_experiment("shared")).info.run_id
    lineage = _kill_whole_job_once_tagged(dataset_repo, tmp_path, "nightly", mlflow_run_id=run_id)
    assert sync.sync_all(mlflow=False)["pending"] == 0  # (A's queued saves committed; its MLflow left)
    killed_fit = read_lineage(lineage)

    mine = _fit_a_new_oxen_run_into(dataset_repo, tmp_path, run_id)
    assert mine["run"]["name"] != "nightly" and mine["run"]["mlflow_run_id"] == run_id
    report = sync.sync_all()
    assert report["pending"] == 0, [(m.get("status"), m.get("error")) for m in report["mlflow"]]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["oxen.lineage.status"] == "FINISHED"
    assert (run.data.tags["oxen.run"], run.data.tags["oxen.model.commit"], run.data.tags["oxen.model.path"]) == (
        mine["run"]["name"], mine["model"]["commit"], mine["model"]["path"])
    assert read_lineage(client.download_artifacts(run_id, "oxen/lineage.json", str(tmp_path / "dl"))) == mine
    models_logged = logged_models_of_run(uri, run_id)
    finals = [m.tags.get("oxen.model.path") for m in models_logged if m.tags.get("oxen.model.final") == "true"]
    assert finals == [mine["model"]["path"]]
    theirs = {m.tags.get("oxen.model.commit") for m in models_logged if m.tags.get("oxen.run") == "nightly"}
    assert theirs >= {c["commit"] for c in killed_fit["checkpoints"] if c["commit"]}  # A's models made all the same
    assert read_lineage(lineage)["status"] == "KILLED"  # A's own record in the model repository: ended, not RUNNING


@pytest.mark.timeout(600)
def test_a_fit_that_ends_after_another_processes_later_fit_in_its_mlflow_run_leaves_the_run_to_that_fit(
        dataset_repo, tmp_path):
    """Fit A (a process, model repository A) logs to an MLflow run through an ``MLFlowLogger(run_id=...)``;
    while it trains, fit B (a new Oxen run, another repository) joins the same run and finishes. A ended
    last and wrote its model tags, lineage and final mark over B's: the run named B's Oxen run and
    repository with A's commit, which that repository does not hold (found by an adversarial review).
    The run is the later fit's, as `sync` already made it: A's end leaves B's tags, lineage and marks."""
    client, uri = MlflowClient(), os.environ["MLFLOW_TRACKING_URI"]
    run_id = client.create_run(client.create_experiment("shared-live")).info.run_id
    gate = tmp_path / "gate"
    script = Path(__file__).parent / "fit_script.py"
    first = subprocess.Popen([sys.executable, str(script), "--dataset", str(dataset_repo.path), "--revision",
                              dataset_repo.commits[0], "--model-repo", str(tmp_path / "models-a"), "--root",
                              str(tmp_path / "fit-a"), "--run-name", "first", "--mlflow", "--logger",
                              "--logger-run-id", run_id, "--gate", str(gate), "--out", str(tmp_path / "a.json")],
                             stdout=subprocess.DEVNULL, stderr=(tmp_path / "a.err").open("w"))
    try:
        deadline = time.monotonic() + 300
        while not gate.with_suffix(".reached").exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert gate.with_suffix(".reached").exists(), (tmp_path / "a.err").read_text()[-3000:]
        later = _fit_a_new_oxen_run_into(dataset_repo, tmp_path, run_id)
    finally:
        gate.touch()
        first.wait(timeout=300)
    assert first.returncode == 0, (tmp_path / "a.err").read_text()[-3000:]
    earlier = json.loads((tmp_path / "a.json").read_text())["lineage"]
    assert earlier["status"] == "FINISHED" and earlier["model"]["commit"]  # A's own lineage, in its repository
    tags = client.get_run(run_id).data.tags
    assert (tags["oxen.run"], tags["oxen.model.repo"], tags["oxen.model.commit"], tags["oxen.model.path"]) == (
        later["run"]["name"], later["model"]["repo"], later["model"]["commit"], later["model"]["path"])
    assert tags["oxen.model.commit"] in LocalRepo(later["model"]["repo"]).commit_ids()
    assert read_lineage(client.download_artifacts(run_id, "oxen/lineage.json", str(tmp_path / "dl"))) == later
    models = logged_models_of_run(uri, run_id)
    assert [(m.tags["oxen.run"], m.tags["oxen.model.path"]) for m in models if m.tags.get("oxen.model.final")] == [
        (later["run"]["name"], later["model"]["path"])]
    assert {m.tags["oxen.model.commit"] for m in models if m.tags["oxen.run"] == "first"} >= {
        c["commit"] for c in earlier["checkpoints"] if not c.get("same_model_as")}  # A's models, made all the same


@pytest.mark.timeout(600)
def test_a_run_a_fit_created_is_ended_by_it_though_a_later_fit_joined_it_through_mlflow_run_id(
        dataset_repo, tmp_path, monkeypatch):
    """Fit A (a process) creates its MLflow run; while it trains, fit B joins that run through
    ``$MLFLOW_RUN_ID`` (an orchestrator's hand-over: B never ends it) and finishes. A's end left the run's
    tags and lineage to B, and its end too: the run stayed RUNNING for good, `sync` included (found by a
    review of the fix above). A ends the run it created; the tags and lineage stay B's."""
    from oxen_callbacks._ops import sync

    client, gate = MlflowClient(), tmp_path / "gate"
    script = Path(__file__).parent / "fit_script.py"
    first = subprocess.Popen([sys.executable, str(script), "--dataset", str(dataset_repo.path), "--revision",
                              dataset_repo.commits[0], "--model-repo", str(tmp_path / "models-a"), "--root",
                              str(tmp_path / "fit-a"), "--run-name", "first", "--mlflow", "--gate", str(gate)],
                             stdout=subprocess.DEVNULL, stderr=(tmp_path / "a.err").open("w"))
    try:
        deadline, runs = time.monotonic() + 300, []
        while time.monotonic() < deadline and first.poll() is None and not (
                gate.with_suffix(".reached").exists() and (runs := client.search_runs(
                    [e.experiment_id for e in client.search_experiments()], "tags.`oxen.run` = 'first'"))):
            time.sleep(0.1)
        assert runs, (tmp_path / "a.err").read_text()[-3000:]
        run_id = runs[0].info.run_id
        monkeypatch.setenv("MLFLOW_RUN_ID", run_id)
        pin = PinnedDataset(dataset_repo.path, revision=dataset_repo.commits[0], paths=["train.csv", "val.csv"])
        later = OxenLightningCallback(dataset=pin, model_repo=tmp_path / "models")
        make_trainer(tmp_path / "b", [ModelCheckpoint(dirpath=tmp_path / "b" / "ckpt"), later]).fit(
            TinyModel(), datamodule=CsvData(pin))
        record = later.lineage
        assert client.get_run(run_id).info.status == "RUNNING"  # (B joined it: never ends it)
    finally:
        gate.touch()
        first.wait(timeout=300)
    assert first.returncode == 0, (tmp_path / "a.err").read_text()[-3000:]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert (run.data.tags["oxen.run"], run.data.tags["oxen.model.commit"]) == (record["run"]["name"],
                                                                              record["model"]["commit"])
    assert sync.sync_all()["pending"] == 0 and client.get_run(run_id).info.status == "FINISHED"


def test_a_fit_of_another_oxen_run_that_joins_a_synced_killed_fits_run_takes_its_marks(dataset_repo, tmp_path):
    """As above, with `sync` run before fit B: A's run ends KILLED, its last model marked final; then B,
    a new Oxen run, joins that MLflow run and finishes. The run's final mark is B's alone (A's stayed:
    two final models in one run, found by a review of the fix above)."""
    from oxen_callbacks._ops import sync

    client, uri = MlflowClient(), os.environ["MLFLOW_TRACKING_URI"]
    run_id = client.create_run(client.create_experiment("shared")).info.run_id
    _kill_whole_job_once_tagged(dataset_repo, tmp_path, "nightly", mlflow_run_id=run_id)
    assert sync.sync_all()["pending"] == 0
    assert [m.tags.get("oxen.run") for m in logged_models_of_run(uri, run_id)
            if m.tags.get("oxen.model.final") == "true"] == ["nightly"]

    mine = _fit_a_new_oxen_run_into(dataset_repo, tmp_path, run_id)
    finals = [(m.tags.get("oxen.run"), m.tags.get("oxen.model.path")) for m in logged_models_of_run(uri, run_id)
              if m.tags.get("oxen.model.final") == "true"]
    assert finals == [(mine["run"]["name"], mine["model"]["path"])]


def test_a_killed_fits_run_deleted_in_mlflow_still_ends_its_record_in_the_model_repository(dataset_repo, tmp_path):
    """The whole job killed, then the user deletes its MLflow run: `sync` drops the journal (nothing can
    log to a deleted run), but the model repository's record of the run ends KILLED all the same (it
    stayed RUNNING when an operation on the run, a tag the kill left journaled, failed first: found by
    a review). That journaled tag is written into the journal here: the kill cannot be timed to it."""
    from oxen_callbacks._mlflow.journal import MlflowJournal, journals
    from oxen_callbacks._ops import sync

    client = MlflowClient()
    lineage = _kill_whole_job_once_tagged(dataset_repo, tmp_path, "nightly")
    [folder] = journals(Path(os.environ["OXEN_CALLBACKS_CACHE"]))
    MlflowJournal(folder).put(900_000, {"op": "set_tags", "tags": {"oxen.model.path": "runs/nightly/late"}})
    [run] = client.search_runs(["0"])
    client.delete_run(run.info.run_id)
    report = sync.sync_all()
    assert report["pending"] == 0 and [m["status"] for m in report["mlflow"]] == ["dropped"], report
    record = read_lineage(lineage)
    assert record["status"] == "KILLED" and record["checkpoints"] and all(c["commit"] for c in record["checkpoints"])


def test_sync_never_ends_the_run_mlflow_run_id_handed_over(dataset_repo, tmp_path, monkeypatch):
    """A run an orchestrator started and handed over in ``$MLFLOW_RUN_ID`` is ended by that orchestrator
    ("never ended by us"), also after a killed training process: `sync` logs its lineage, KILLED, and
    leaves the run RUNNING (it terminated it KILLED: found by a review)."""
    from oxen_callbacks._ops import sync

    client = MlflowClient()
    run_id = client.create_run(client.create_experiment("pipeline")).info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", run_id)  # (the killed fit's process inherits it)
    _kill_whole_job_once_tagged(dataset_repo, tmp_path, "nightly", mlflow_run_id=run_id, logger=False)
    monkeypatch.delenv("MLFLOW_RUN_ID")
    report = sync.sync_all()
    assert report["pending"] == 0, [(m.get("status"), m.get("error")) for m in report["mlflow"]]
    [ended] = [m["abandoned"] for m in report["mlflow"] if m.get("abandoned")]
    assert ended["status"] == "KILLED" and ended["terminated"] is None
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING" and run.data.tags["oxen.lineage.status"] == "KILLED"


def test_sync_of_an_earlier_fits_journaled_end_leaves_the_mlflow_run_a_later_fit_continued_in_alone(
        dataset_repo, tmp_path, monkeypatch):
    """Notebook style: fit A shares an ``MLFlowLogger``'s run and MLflow fails it at the end (its end stays
    journaled, given up); fit B continues the Oxen run through the same logger run and ends well. A later
    `sync` of A's journal must not write A's end (tags, ``oxen/lineage.json``) over B's. (The store failing
    for longer than the sink's retries is injected: real, it takes minutes.)"""
    from lightning.pytorch.loggers import MLFlowLogger
    from mlflow.exceptions import MlflowException

    from oxen_callbacks._mlflow import sink_process
    from oxen_callbacks._ops import sync

    client = MlflowClient()
    run_id = client.create_run(client.create_experiment("shared")).info.run_id
    failing = {"on": False}
    applying = sink_process.apply_unless_superseded

    def apply(client, journal, meta, op, later):  # type: ignore[no-untyped-def]
        if failing["on"]:
            raise MlflowException("the store is down")
        return applying(client, journal, meta, op, later)

    monkeypatch.setattr(sink_process, "apply_unless_superseded", apply)
    monkeypatch.setattr(sink_process, "RETRY_DELAYS_S", (0.05,))

    class StoreDownAtTheEnd(Callback):
        def on_train_end(self, trainer, pl_module) -> None:  # type: ignore[no-untyped-def]
            failing["on"] = True

    def fit(name: str, epochs: int, *extra: Callback, **how: Any) -> dict[str, Any]:
        cb = OxenLightningCallback(model_repo=tmp_path / "models", run_name="nightly", mlflow_timeout=10, **how)
        logger = MLFlowLogger(run_id=run_id, tracking_uri=os.environ["MLFLOW_TRACKING_URI"], log_model=False)
        trainer = make_trainer(tmp_path / name, [ModelCheckpoint(dirpath=tmp_path / name / "ckpt"), cb, *extra],
                               epochs=epochs, logger=logger)
        trainer.fit(TinyModel(), datamodule=CsvData(cb.dataset), ckpt_path=cb.ckpt_path)
        return cb.lineage

    first = fit("a", 1, StoreDownAtTheEnd(), dataset=PinnedDataset(
        dataset_repo.path, revision=dataset_repo.commits[0], paths=["train.csv", "val.csv"]))
    failing["on"] = False
    assert client.get_run(run_id).data.tags.get("oxen.lineage.status") != "FINISHED"  # (A's end: journaled)
    second = fit("b", 2, resume_from="nightly")
    assert first["fit_id"] in second["earlier_fits"] and second["run"]["mlflow_run_id"] == run_id
    assert client.get_run(run_id).data.tags["oxen.model.commit"] == second["model"]["commit"]

    report = sync.sync_all()
    assert report["pending"] == 0, [(m.get("status"), m.get("error")) for m in report["mlflow"]]
    assert any(m.get("status") == "done" for m in report["mlflow"])  # (A's journal was there, and replayed)
    tags = client.get_run(run_id).data.tags
    assert (tags["oxen.model.commit"], tags["oxen.lineage.status"]) == (second["model"]["commit"], "FINISHED")
    assert read_lineage(client.download_artifacts(run_id, "oxen/lineage.json", str(tmp_path / "dl"))) == second


@pytest.mark.parametrize("fits, expected", [
    ([("B", "R1")], "B"),  # B went on from A in A's MLflow run
    ([("B", "R2")], None),  # B has its own MLflow run: R1 is still A's to end
    ([("B", "R1"), ("C", "R2")], "B"),  # ... and C after B, in a run of its own: R1 stays B's
    ([("B", "R2"), ("C", "R1")], "C"),
    ([("B", None), ("C", "R2")], None),  # (B without MLflow)
])
def test_which_later_fit_an_mlflow_run_went_on_with(tmp_path, fits, expected):
    """A killed fit A logged to MLflow run R1; the later fits that continued its Oxen run are listed in
    the repository's record (``earlier_fits``, ``earlier_mlflow_runs``, the record's own): the one that
    went on in R1, if any, owns R1's end (a review found a fit after it hid it)."""
    from oxen_callbacks._mlflow.abandoned import continued_by
    from oxen_callbacks.lineage import new_record

    models = tmp_path / "models"
    *before, (fit, run_id) = fits
    record = new_record(dataset=None, model_repo=str(models), framework={"name": "x", "version": "1"},
                        run={"name": "r", "mlflow_run_id": run_id, "mlflow_tracking_uri": "sqlite:///x.db"})
    record.update(fit_id=fit, earlier_fits=["A", *[f for f, _ in before]], earlier_mlflow_runs=[
        {"mlflow_run_id": r, "mlflow_tracking_uri": "sqlite:///x.db", "fit_id": f}
        for f, r in [("A", "R1"), *before] if r])
    (models / "runs" / "r").mkdir(parents=True)
    (models / "runs" / "r" / "lineage.json").write_text(json.dumps(record))
    assert continued_by({"model_repo": str(models), "oxen_run": "r", "run_id": "R1"}, "A") == expected


# A continuing fit whose start fails, or that is killed, after its MLflow run was opened and before
# its lineage record exists: the commit worker cannot start (a fork refused by a process limit, which
# root on this machine is not held to) or the process is killed there (an OOM kill: not timeable).
_START_FAILS = ("import os, runpy, signal, sys\n"
                "from oxen_callbacks._publish import publisher\n"
                "how = sys.argv[1]\n"
                "def start_worker(self):\n"
                "    if how == 'killed':\n"
                "        os.kill(os.getpid(), signal.SIGKILL)\n"
                "    raise OSError(11, 'Resource temporarily unavailable')\n"
                "publisher.CheckpointPublisher._start_worker = start_worker\n"
                "sys.argv = sys.argv[2:]\n"
                "sys.path.insert(0, os.path.dirname(sys.argv[0]))\n"
                "runpy.run_path(sys.argv[0], run_name='__main__')\n")


@pytest.mark.parametrize("how", ["raises", "killed"])
def test_a_continuing_fit_that_never_started_never_takes_the_earlier_fits_model(dataset_repo, tmp_path, how):
    """Its MLflow run ended FINISHED, tagged and logged with the earlier fit's record and model: a run
    that trained no step claimed a model (found by an adversarial review)."""
    from oxen_callbacks._ops import sync

    models, script = tmp_path / "models", Path(__file__).parent / "fit_script.py"
    common = ["--model-repo", str(models), "--run-name", "nightly", "--mlflow", "--epochs", "1"]
    subprocess.run([sys.executable, str(script), "--dataset", str(dataset_repo.path), "--revision",
                    dataset_repo.commits[0], "--root", str(tmp_path / "a"), *common], check=True, capture_output=True)
    earlier = read_lineage(models / "runs" / "nightly" / "lineage.json")
    fit_b = subprocess.run([sys.executable, "-c", _START_FAILS, how, str(script), "--root", str(tmp_path / "b"),
                            "--resume-from", "nightly", *common], capture_output=True, text=True, timeout=300)
    assert fit_b.returncode == (-signal.SIGKILL if how == "killed" else 1), fit_b.stderr[-2000:]
    deadline = time.monotonic() + 300
    while _background_busy(tmp_path / "cache", models) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert sync.sync_all()["pending"] == 0

    client = MlflowClient()
    runs = {r.info.run_id: r for r in client.search_runs([e.experiment_id for e in client.search_experiments()])}
    first = runs.pop(earlier["run"]["mlflow_run_id"])
    assert first.info.status == "FINISHED" and first.data.tags["oxen.model.commit"] == earlier["model"]["commit"]
    [(run_id, never_started)] = runs.items()
    assert never_started.info.status == ("KILLED" if how == "killed" else "FAILED")
    assert "oxen.model.commit" not in never_started.data.tags
    assert never_started.data.tags.get("oxen.lineage.status") in (None, "KILLED")
    for artifact in client.list_artifacts(run_id, "oxen"):
        if artifact.path.endswith("lineage.json"):
            logged = read_lineage(client.download_artifacts(run_id, artifact.path, str(tmp_path / "dl")))
            assert logged["fit_id"] != earlier["fit_id"] and logged["status"] == "KILLED"
            assert logged["checkpoints"] == [] and logged["model"]["commit"] is None
    assert read_lineage(models / "runs" / "nightly" / "lineage.json") == earlier


class _KillSinkThenSync(Callback):
    """Mid-fit, once the sink process has applied everything so far: kill it, then run `sync` (a cron job)."""

    def __init__(self, oxen_cb: OxenLightningCallback) -> None:
        self.oxen_cb, self.sync_report = oxen_cb, None

    def on_train_epoch_end(self, trainer, pl_module) -> None:  # type: ignore[no-untyped-def]
        from oxen_callbacks._ops import sync

        if self.sync_report is not None:
            return
        sink = self.oxen_cb.run.sink
        deadline = time.monotonic() + 120
        while (sink.run_id is None or not sink.journal.is_empty()) and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(sink._proc.pid, signal.SIGKILL)
        sink._proc.wait()
        self.sync_report = sync.sync_all()


def test_sync_while_training_lives_leaves_its_journal(dataset_repo, tmp_path):
    """`sync` during training never takes the live run's journal: what training logs after it is kept."""
    from oxen_callbacks._ops import sync

    pin = PinnedDataset(dataset_repo.path, revision=dataset_repo.commits[0], paths=["train.csv", "val.csv"])
    cb = OxenLightningCallback(dataset=pin, model_repo=tmp_path / "models", run_name="live")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    killer = _KillSinkThenSync(cb)
    make_trainer(tmp_path, [ckpt, cb, killer], epochs=2).fit(TinyModel(), datamodule=CsvData(pin))
    cb.run.wait()  # the final lineage commit and MLflow logging fit() did not wait for
    assert cb.run.sink.journal.folder.exists()  # left alone
    assert all(entry["status"] == "busy" for entry in killer.sync_report["mlflow"])

    [entry] = sync.sync_all()["mlflow"]
    assert entry["status"] == "done" and "abandoned" not in entry
    client = MlflowClient()
    run = client.get_run(cb.lineage["run"]["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["oxen.lineage.status"] == "FINISHED"
    assert run.data.tags["oxen.model.commit"] == cb.lineage["model"]["commit"]
    logged = read_lineage(client.download_artifacts(run.info.run_id, "oxen/lineage.json", str(tmp_path / "dl")))
    assert logged["model"]["commit"] == cb.lineage["model"]["commit"]


def test_stalled_publishing_finished_by_sync_gets_the_final_lineage(dataset_repo, tmp_path, capsys):
    """Commit processes keep dying: finish() cannot commit the final lineage. `sync` commits it later,
    and only then is the MLflow run tagged, logged and ended FINISHED from it, not from the partial record."""
    from test_trust import CommitProcessKiller, _fit, _pin

    pin = _pin(dataset_repo)
    cb = OxenLightningCallback(dataset=pin, model_repo=tmp_path / "models")
    killer = CommitProcessKiller(cb, every=(0.01, 0.02), limit=10_000, through_fit_end=True)
    try:
        _fit(tmp_path, pin, cb, killer, epochs=2)
        cb.run.wait()  # the final lineage commit fit() did not wait for, tried while commits still die
    finally:
        killer.stop()
    assert cb.run.publisher.stalled
    client = MlflowClient()
    run_id = cb.lineage["run"]["mlflow_run_id"]
    assert client.get_run(run_id).info.status == "RUNNING"  # finished by sync, from the commits

    assert cli.main(["sync"]) == 0
    report = capsys.readouterr().out
    assert "final lineage commit had stalled; finished from the model repository: lineage status FINISHED" in report
    assert "nothing left to do" in report, report
    repo_lineage = read_lineage(tmp_path / "models" / "runs" / cb.run.run_name / "lineage.json")
    assert repo_lineage["status"] == "FINISHED" and repo_lineage["checkpoints"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["oxen.lineage.status"] == "FINISHED"
    assert run.data.tags["oxen.model.commit"] == repo_lineage["model"]["commit"]
    logged = read_lineage(client.download_artifacts(run_id, "oxen/lineage.json", str(tmp_path / "dl")))
    assert [c["commit"] for c in logged["checkpoints"]] == [c["commit"] for c in repo_lineage["checkpoints"]]


def test_the_end_waits_for_a_thread_sink_without_polling_its_journal(tmp_path, hanging_port, monkeypatch):
    """A run this process already logs to is logged by a thread of the training process: the end's
    wait for it sleeps until it applies an operation (or the timeout), instead of listing the journal
    every 10 ms against the GIL that thread needs. A server that never answers: the wait still ends
    at its timeout, with the operation journaled for `sync`."""
    sink = MlflowSink.attach(cache_dir=tmp_path / "cache", run_id="f" * 32,
                             tracking_uri=f"http://127.0.0.1:{hanging_port}")
    assert isinstance(sink._proc, SinkThread)
    sink.set_tags({"oxen.test": "1"})
    ops = sink.journal.folder / "ops"
    listings = []
    real_listdir = os.listdir

    def counting(path="."):  # type: ignore[no-untyped-def]
        if Path(path) == ops:
            listings.append(time.monotonic())
        return real_listdir(path)

    monkeypatch.setattr(os, "listdir", counting)
    started = time.monotonic()
    assert not sink.flush(timeout=2.5)
    assert 2.5 <= time.monotonic() - started < 10
    assert len(listings) <= 8  # once a second at most; polling every 10 ms made ~250
    assert [op["op"] for _path, op in sink.journal.pending()] == ["set_tags"]


# A sink process killed the moment MLflow's migrations of a new SQLite store are half done: a job
# killed with -9 while its sink process (at SCHED_IDLE, seconds behind on a busy machine) still made the store.
_DIES_MAKING_THE_STORE = ("import os, signal, sys\n"
                          "from sqlalchemy import event\n"
                          "from sqlalchemy.engine import Engine\n"
                          "@event.listens_for(Engine, 'before_cursor_execute')\n"
                          "def die(conn, cursor, statement, *args):\n"
                          "    if statement.lstrip().upper().startswith('CREATE TABLE _ALEMBIC_TMP_'):\n"
                          "        os.kill(os.getpid(), signal.SIGKILL)\n"
                          "from oxen_callbacks._mlflow import sink_process\n"
                          "sys.exit(sink_process.main(sys.argv[1:]))\n")


def test_a_sink_killed_while_making_a_new_sqlite_store_leaves_sync_a_store_to_log_to(tmp_path):
    """The first operation of a run makes a new SQLite store: a sink process killed halfway through
    MLflow's migrations must not leave a store MLflow fails on for good ("table _alembic_tmp_experiments
    already exists"): `sync` creates the run and logs everything journaled."""
    from oxen_callbacks._mlflow.journal import MlflowJournal
    from oxen_callbacks._ops import sync
    from oxen_callbacks._util.processes import child_environment

    store = tmp_path / "mlflow.db"
    assert os.environ["MLFLOW_TRACKING_URI"] == f"sqlite:///{store}" and not store.exists()
    journal = MlflowJournal.create(Path(os.environ["OXEN_CALLBACKS_CACHE"]),
                                   {"tracking_uri": f"sqlite:///{store}", "run_id": None})
    journal.put(1, {"op": "create_run", "run_name": "starved", "experiment_id": None, "experiment_name": None})
    journal.put(2, {"op": "set_tags", "tags": {"oxen.run": "starved"}})
    sink = subprocess.run([sys.executable, "-c", _DIES_MAKING_THE_STORE, "--journal", str(journal.folder)],
                          stdin=subprocess.DEVNULL, env=child_environment(), timeout=300)
    assert sink.returncode == -signal.SIGKILL and journal.meta()["run_id"] is None  # killed mid-migration

    report = sync.sync_all()
    assert report["pending"] == 0, [(m["status"], m.get("error")) for m in report["mlflow"]]  # (was: "failed", OperationalError: table _alembic_tmp_... exists)
    [run] = MlflowClient().search_runs(["0"])
    assert run.info.run_name == "starved" and run.data.tags["oxen.run"] == "starved"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("mlflow.db", ".mlflow.db"))) == ["mlflow.db"]
