"""Fits that go on from earlier ones: a run continued under its name, a new run resumed from a file.

A run continued under its name while a killed earlier fit's commit worker is still behind: after ``kill -9`` of a trainer its commit worker goes on by itself, at the lowest CPU priority: it
may land the killed fit's last saves after the user has already continued the run
(``resume_from=<run>, run_name=<run>``) and that fit has finished. The repository's record must
stay the later fit's (status, model, fit), with the late checkpoints added to its history, and
``sync`` must not amend it with the killed fit's MLflow run.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import file_at, process_tree, stop_processes
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning_model import CsvData, TinyModel, make_trainer
from mlflow import MlflowClient

from oxen_callbacks import PinnedDataset, read_lineage
from oxen_callbacks._ops import sync
from oxen_callbacks._publish.queue import all_queues, repo_lock_path
from oxen_callbacks._util.locks import is_locked
from oxen_callbacks.lightning import OxenLightningCallback

TESTS = Path(__file__).resolve().parent
# Starts the command and reaps it and, as their subreaper, the helpers it leaves: a stopped commit
# worker whose trainer was killed then keeps a parent in this session (an orphaned process group
# with a stopped member would get SIGHUP from the kernel: an artifact of stopping it, not the library).
SUBREAPER = ("import ctypes, os, subprocess, sys\n"
             "ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)\n"
             "subprocess.Popen(sys.argv[1:])\n"
             "while True:\n"
             "    try:\n"
             "        os.wait()\n"
             "    except ChildProcessError:\n"
             "        break\n")


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _is_worker(pid: int) -> bool:
    try:
        return b"oxen_callbacks._publish.worker" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


@pytest.mark.timeout(600)
def test_a_killed_fits_late_commit_leaves_the_record_of_the_fit_that_continued_the_run(dataset_repo, tmp_path):
    models, lineage = tmp_path / "models", tmp_path / "models" / "runs" / "nightly" / "lineage.json"
    wrapper = subprocess.Popen([sys.executable, "-c", SUBREAPER, sys.executable, str(TESTS / "fit_script.py"),
                                "--dataset", str(dataset_repo.path), "--revision", dataset_repo.commits[0],
                                "--model-repo", str(models), "--root", str(tmp_path / "a"), "--run-name", "nightly",
                                "--mlflow", "--step-sleep", "1.0", "--epochs", "60", "--every-n-steps", "3"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline, worker_tree = time.monotonic() + 300, []
        while time.monotonic() < deadline and not worker_tree:  # A's first checkpoint committed
            assert wrapper.poll() is None
            if lineage.is_file() and any(c["commit"] for c in read_lineage(lineage)["checkpoints"]):
                # A's worker falls behind (a big save, a busy machine...)
                tree = sorted(stop_processes(lambda: {q for w in process_tree(wrapper.pid) if _is_worker(w)
                                                      for q in process_tree(w)}))
                if tree and not is_locked(repo_lock_path(models)):
                    worker_tree = tree
                else:
                    _signal(tree, signal.SIGCONT)  # (stopped inside a commit: try again)
            time.sleep(0.1)
        assert worker_tree, "A's commit worker was never seen idle"
        while time.monotonic() < deadline and not [j for q in all_queues(models) for j in q.pending()
                                                   if j.kind == "checkpoint"]:
            time.sleep(0.1)  # A queues its next save, which its stopped worker does not commit yet
        trainer_side = [p for p in process_tree(wrapper.pid) if p != wrapper.pid and p not in worker_tree]
        _signal(trainer_side, signal.SIGKILL)  # kill -9 of A's trainer and its MLflow sink
        killed_fit = read_lineage(lineage)

        b = OxenLightningCallback(model_repo=models, run_name="nightly", resume_from="nightly", mlflow=False)
        # one epoch more than A's save (A, on a busy machine, may be epochs in before its first commit)
        epochs = torch.load(b.ckpt_path, weights_only=False)["epoch"] + 1
        make_trainer(tmp_path / "b", [ModelCheckpoint(dirpath=tmp_path / "b" / "ckpt"), b], epochs=epochs).fit(
            TinyModel(), datamodule=CsvData(b.dataset), ckpt_path=b.ckpt_path)
        mine = b.lineage
        assert mine["status"] == "FINISHED" and read_lineage(lineage)["fit_id"] == mine["fit_id"]

        _signal(worker_tree, signal.SIGCONT)  # A's worker catches up: commits A's last save, then exits
        wrapper.wait(timeout=120)
    finally:
        _signal(process_tree(wrapper.pid), signal.SIGKILL)
        _signal(worker_tree, signal.SIGCONT)
    report = sync.sync_all()  # ends A's MLflow run from what A committed

    assert report["pending"] == 0, report
    record = read_lineage(lineage)
    assert {k: record[k] for k in ("fit_id", "status", "model")} == {k: mine[k] for k in ("fit_id", "status", "model")}
    assert record["earlier_fits"] == [killed_fit["fit_id"]] and record["run"]["mlflow_run_id"] is None
    late = [c for c in record["checkpoints"] if c["fit_id"] == killed_fit["fit_id"]][-1]
    assert late["commit"] and late not in mine["checkpoints"]  # A's last save, committed after B finished
    assert file_at(models, late["commit"], late["path"], tmp_path / "late").stat().st_size > 0
    [run] = MlflowClient().search_runs(["0"])  # A's MLflow run: KILLED, with A's checkpoints only
    assert run.info.status == "KILLED" and run.data.tags["oxen.model.commit"] == late["commit"]
    logged = read_lineage(MlflowClient().download_artifacts(run.info.run_id, "oxen/lineage.json", str(tmp_path / "dl")))
    assert logged["fit_id"] == killed_fit["fit_id"] and "earlier_fits" not in logged
    assert {c["fit_id"] for c in logged["checkpoints"]} == {killed_fit["fit_id"]}
    assert logged["checkpoints"][-1] == late and logged["model"]["commit"] == late["commit"]


def test_resumed_from_names_a_commit_only_for_the_bytes_it_holds(dataset_repo, tmp_path):
    """A resumed fit's `resumed_from` names the commit of the file it read only when that file still
    has the committed bytes: one edited since (same name, step and size) is recorded by its file alone."""
    pin = PinnedDataset(dataset_repo.path, revision=dataset_repo.commits[0], paths=["train.csv", "val.csv"])
    models, local = tmp_path / "models", tmp_path / "ckpt" / "last.ckpt"
    a = OxenLightningCallback(dataset=pin, model_repo=models, run_name="a", mlflow=False)
    make_trainer(tmp_path / "a", [ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True), a], epochs=1).fit(
        TinyModel(), datamodule=CsvData(pin))
    last = [c for c in a.lineage["checkpoints"] if c["path"].endswith("/last.ckpt")][-1]

    def resumed_from() -> dict:  # type: ignore[type-arg]
        b = OxenLightningCallback(dataset=pin, model_repo=models, mlflow=False)
        make_trainer(tmp_path / "b", [b], epochs=2).fit(TinyModel(), datamodule=CsvData(pin), ckpt_path=str(local))
        return b.lineage["resumed_from"]

    unchanged = resumed_from()
    assert (unchanged["commit"], unchanged["path"]) == (last["commit"], last["path"])
    ckpt = torch.load(local, weights_only=False)  # the user edits the weights (pruning, a manual fix...)
    for tensor in ckpt["state_dict"].values():
        tensor.add_(1.0)
    size = local.stat().st_size
    with open(local, "wb") as f:
        torch.save(ckpt, f)
    assert local.stat().st_size == size
    edited = resumed_from()
    assert (edited["commit"], edited["path"], edited["file"]) == (None, None, str(local))


def test_a_name_taken_again_after_a_run_that_ended_before_its_first_checkpoint_continues_nothing(dataset_repo, tmp_path):
    """A run that failed before its first checkpoint leaves its name free: a new run under it is a run
    of its own, not one that went on from the failed fit (no `earlier_fits`, no status of that fit)."""
    from lightning.pytorch.callbacks import Callback

    class Bug(Callback):
        def on_train_batch_start(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
            raise RuntimeError("a bug in the training step")

    pin = PinnedDataset(dataset_repo.path, revision=dataset_repo.commits[0], paths=["train.csv", "val.csv"])
    models = tmp_path / "models"
    failed = OxenLightningCallback(dataset=pin, model_repo=models, run_name="exp1", mlflow=False)
    with pytest.raises(RuntimeError):
        make_trainer(tmp_path / "a", [ModelCheckpoint(dirpath=tmp_path / "a"), failed, Bug()], epochs=1).fit(
            TinyModel(), datamodule=CsvData(pin))
    assert failed.lineage["status"] == "FAILED" and not failed.lineage["checkpoints"]

    again = OxenLightningCallback(dataset=pin, model_repo=models, run_name="exp1", mlflow=False)
    make_trainer(tmp_path / "b", [ModelCheckpoint(dirpath=tmp_path / "b"), again], epochs=1).fit(
        TinyModel(), datamodule=CsvData(pin))

    for record in (again.lineage, json.loads((models / "runs" / "exp1" / "lineage.json").read_text())):
        assert record["status"] == "FINISHED" and record["fit_id"] == again.lineage["fit_id"]
        assert "earlier_fits" not in record and record["checkpoints"]
