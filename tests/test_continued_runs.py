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
from helpers import SUBREAPER, file_at, process_tree, stop_processes
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning_model import CsvData, TinyModel, make_trainer
from mlflow import MlflowClient

from oxen_callbacks import PinnedDataset, read_lineage
from oxen_callbacks._ops import sync
from oxen_callbacks._publish.queue import all_queues, repo_lock_path
from oxen_callbacks._util.locks import is_locked
from oxen_callbacks.lightning import OxenLightningCallback

TESTS = Path(__file__).resolve().parent


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _is_worker(pid: int) -> bool:
    try:
        return b"oxen_callbacks._publish.worker" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


class _KilledFit:
    """Fit A of run ``nightly`` (with its own MLflow run), killed by ``kill -9`` while its commit
    worker, stopped, is behind: a save of A is queued, not committed. ``resume_worker()`` lets the
    worker go on (it commits A's late save, then exits)."""

    def __init__(self, dataset_repo, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
        self.models = tmp_path / "models"
        self.lineage = self.models / "runs" / "nightly" / "lineage.json"
        self.wrapper = subprocess.Popen([sys.executable, "-c", SUBREAPER, sys.executable, str(TESTS / "fit_script.py"),
                                         "--dataset", str(dataset_repo.path), "--revision", dataset_repo.commits[0],
                                         "--model-repo", str(self.models), "--root", str(tmp_path / "a"),
                                         "--run-name", "nightly", "--mlflow", "--step-sleep", "1.0", "--epochs", "60",
                                         "--every-n-steps", "3"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.worker_tree: list[int] = []

    def kill_behind(self) -> dict:  # type: ignore[type-arg]
        """Kill A once its worker is behind; returns A's record as it was then."""
        models, lineage, wrapper = self.models, self.lineage, self.wrapper
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not self.worker_tree:  # A's first checkpoint committed
            assert wrapper.poll() is None
            if lineage.is_file() and any(c["commit"] for c in read_lineage(lineage)["checkpoints"]):
                # A's worker falls behind (a big save, a busy machine...)
                tree = sorted(stop_processes(lambda: {q for w in process_tree(wrapper.pid) if _is_worker(w)
                                                      for q in process_tree(w)}))
                if tree and not is_locked(repo_lock_path(models)):
                    self.worker_tree = tree
                else:
                    _signal(tree, signal.SIGCONT)  # (stopped inside a commit: try again)
            time.sleep(0.1)
        assert self.worker_tree, "A's commit worker was never seen idle"
        while time.monotonic() < deadline and not [j for q in all_queues(models) for j in q.pending()
                                                   if j.kind == "checkpoint"]:
            time.sleep(0.1)  # A queues its next save, which its stopped worker does not commit yet
        trainer_side = [p for p in process_tree(wrapper.pid) if p != wrapper.pid and p not in self.worker_tree]
        _signal(trainer_side, signal.SIGKILL)  # kill -9 of A's trainer and its MLflow sink
        return read_lineage(lineage)

    def resume_worker(self, *, wait: bool) -> None:
        _signal(self.worker_tree, signal.SIGCONT)  # A's worker catches up: commits A's last save, then exits
        deadline = time.monotonic() + 120
        while wait and time.monotonic() < deadline and [j for q in all_queues(self.models) for j in q.pending()
                                                         if j.kind == "checkpoint"]:
            time.sleep(0.05)

    def finish(self) -> None:
        """Let A's worker commit what is left and exit."""
        self.resume_worker(wait=False)
        self.wrapper.wait(timeout=120)

    def close(self) -> None:
        _signal(process_tree(self.wrapper.pid), signal.SIGKILL)
        _signal(self.worker_tree, signal.SIGCONT)


class _LateSaveBeforeTheEnd(Callback):
    """At B's train end (its saves committed, its final lineage not yet queued), A's late save lands."""

    def __init__(self, killed: _KilledFit) -> None:
        self.killed = killed

    def on_train_end(self, trainer, pl_module) -> None:  # type: ignore[no-untyped-def]
        ours = next(c for c in trainer.callbacks if isinstance(c, OxenLightningCallback))
        deadline = time.monotonic() + 120
        while ours.run.publisher.pending and time.monotonic() < deadline:
            time.sleep(0.05)
        self.killed.resume_worker(wait=True)


def _continue(killed: _KilledFit, tmp_path: Path, *extra: Callback, **options) -> dict:  # type: ignore[no-untyped-def, type-arg]
    """Fit B: run ``nightly`` continued (the rest of the epoch of A's last committed save and one
    more); returns B's lineage."""
    b = OxenLightningCallback(model_repo=killed.models, run_name="nightly", resume_from="nightly", **options)
    # A, on a busy machine, may be epochs in before its first commit; and a save at an epoch's last
    # step (A saves every 3 of an epoch's 6) leaves nothing of that epoch to train: B would save nothing
    epochs = torch.load(b.ckpt_path, weights_only=False)["epoch"] + 2
    make_trainer(tmp_path / "b", [ModelCheckpoint(dirpath=tmp_path / "b" / "ckpt"), b, *extra], epochs=epochs).fit(
        TinyModel(), datamodule=CsvData(b.dataset), ckpt_path=b.ckpt_path)
    return b.lineage


def _finals(run: str) -> list[tuple[str, str, str]]:
    """(path, commit, MLflow run) of every logged model of Oxen run ``run`` marked final."""
    models = MlflowClient().search_logged_models(["0"], filter_string=f"tags.`oxen.run` = '{run}'")
    return [(m.tags["oxen.model.path"], m.tags["oxen.model.commit"], m.source_run_id) for m in models
            if m.tags.get("oxen.model.final") == "true"]


@pytest.mark.timeout(600)
def test_a_killed_fits_late_commit_leaves_the_record_of_the_fit_that_continued_the_run(dataset_repo, tmp_path):
    killed = _KilledFit(dataset_repo, tmp_path)
    try:
        killed_fit = killed.kill_behind()
        mine = _continue(killed, tmp_path, mlflow=False)
        assert mine["status"] == "FINISHED" and read_lineage(killed.lineage)["fit_id"] == mine["fit_id"]
        killed.finish()
    finally:
        killed.close()
    report = sync.sync_all()  # ends A's MLflow run from what A committed

    assert report["pending"] == 0, report
    record = read_lineage(killed.lineage)
    assert {k: record[k] for k in ("fit_id", "status", "model")} == {k: mine[k] for k in ("fit_id", "status", "model")}
    assert record["earlier_fits"] == [killed_fit["fit_id"]] and record["run"]["mlflow_run_id"] is None
    late = [c for c in record["checkpoints"] if c["fit_id"] == killed_fit["fit_id"]][-1]
    assert late["commit"] and late not in mine["checkpoints"]  # A's last save, committed after B finished
    assert file_at(killed.models, late["commit"], late["path"], tmp_path / "late").stat().st_size > 0
    [run] = MlflowClient().search_runs(["0"])  # A's MLflow run: KILLED, with A's checkpoints only
    assert run.info.status == "KILLED" and run.data.tags["oxen.model.commit"] == late["commit"]
    logged = read_lineage(MlflowClient().download_artifacts(run.info.run_id, "oxen/lineage.json", str(tmp_path / "dl")))
    assert logged["fit_id"] == killed_fit["fit_id"] and "earlier_fits" not in logged
    assert {c["fit_id"] for c in logged["checkpoints"]} == {killed_fit["fit_id"]}
    assert logged["checkpoints"][-1] == late and logged["model"]["commit"] == late["commit"]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("late", ["before_its_end", "after_it_ended"])
def test_a_killed_fits_late_save_is_never_the_model_of_the_fit_that_continued_the_run(dataset_repo, tmp_path, late):
    """A's late save lands after B's last checkpoint, before or after B's final lineage: B's model,
    its MLflow tags and the run's one final logged model are B's last checkpoint, also after `sync`
    has finished A's MLflow run (which marks nothing: the run went on)."""
    killed = _KilledFit(dataset_repo, tmp_path)
    try:
        killed_fit = killed.kill_behind()
        if late == "before_its_end":
            mine = _continue(killed, tmp_path, _LateSaveBeforeTheEnd(killed))
        else:
            mine = _continue(killed, tmp_path)
        killed.finish()
    finally:
        killed.close()
    assert sync.sync_all()["pending"] == 0
    record = read_lineage(killed.lineage)
    own = [c for c in record["checkpoints"] if c["fit_id"] == mine["fit_id"]]
    a_late = [c for c in record["checkpoints"] if c["fit_id"] == killed_fit["fit_id"]][-1]
    assert a_late not in mine["checkpoints"] or late == "before_its_end"
    assert record["checkpoints"][-1] == a_late  # A's save came last in the history
    assert (mine["model"]["commit"], mine["model"]["path"]) == (own[-1]["commit"], own[-1]["path"])
    assert record["model"] == mine["model"] and record["fit_id"] == mine["fit_id"]
    tags = MlflowClient().get_run(mine["run"]["mlflow_run_id"]).data.tags
    assert (tags["oxen.model.commit"], tags["oxen.model.path"]) == (own[-1]["commit"], own[-1]["path"])
    assert _finals("nightly") == [(own[-1]["path"], own[-1]["commit"], mine["run"]["mlflow_run_id"])]


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


def test_resumed_from_a_checkpoint_whose_name_holds_glob_characters_names_its_commit(dataset_repo, tmp_path):
    """``model[epoch=0].ckpt`` is committed under a literal name (``*?[]`` read as a glob by Oxen): a fit
    resumed from the trainer's file still finds that commit."""
    pin = PinnedDataset(dataset_repo.path, revision=dataset_repo.commits[0], paths=["train.csv", "val.csv"])
    models = tmp_path / "models"
    a = OxenLightningCallback(dataset=pin, model_repo=models, run_name="a", mlflow=False)
    make_trainer(tmp_path / "a", [ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="model[{epoch}]"), a],
                 epochs=1).fit(TinyModel(), datamodule=CsvData(pin))
    [saved] = a.lineage["checkpoints"]
    local = tmp_path / "ckpt" / "model[epoch=0].ckpt"
    assert saved["source"] == str(local) and "[" not in saved["path"]
    b = OxenLightningCallback(dataset=pin, model_repo=models, mlflow=False)
    make_trainer(tmp_path / "b", [b], epochs=2).fit(TinyModel(), datamodule=CsvData(pin), ckpt_path=str(local))
    resumed = b.lineage["resumed_from"]
    assert (resumed["commit"], resumed["path"]) == (saved["commit"], saved["path"])


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


def test_a_clone_whose_record_cannot_name_its_last_commit_never_resumes_an_older_checkpoint(tmp_path):
    """A record cannot name the commit it is in: the training machine's working tree names every commit,
    a clone checks out the record as committed. Resuming the run there took the last checkpoint it did
    name, an older one, silently (found by an adversarial review)."""
    from oxen_callbacks._oxen.repo import LocalRepo
    from oxen_callbacks.checkpoints import resolve_resume
    from oxen_callbacks.errors import ConfigurationError
    from oxen_callbacks.run import LineageRun

    models = tmp_path / "models"
    run = LineageRun(dataset=None, model_repo=models, framework=("test", "1"), mlflow=False, run_name="nightly",
                     author=("T", "t@example.com"))
    run.start()
    for step in (1, 2):
        (tmp_path / f"e{step}.ckpt").write_bytes(f"weights {step}".encode())
        run.checkpoint_saved(tmp_path / f"e{step}.ckpt", step=step, epoch=step)
        if step == 1:
            assert run.publisher.flush(120)  # committed alone; the second shares the final lineage commit
    run.finish("FINISHED")
    assert resolve_resume(models, "nightly").path.read_bytes() == b"weights 2"  # the training machine's copy

    record = models / "runs" / "nightly" / "lineage.json"
    as_committed = file_at(models, LocalRepo(models).resolve(None), "runs/nightly/lineage.json", tmp_path / "read")
    record.write_bytes(as_committed.read_bytes())  # what `oxen clone` checks out
    assert [c["commit"] is None for c in json.loads(record.read_text())["checkpoints"]] == [False, True]
    with pytest.raises(ConfigurationError, match=r"names no commit for its newest checkpoint\(s\)"):
        resolve_resume(models, "nightly")


def test_a_continued_runs_second_checkpoint_folder_keeps_its_subfolder_when_it_saves_first(dataset_repo, tmp_path):
    """Fit A has two ModelCheckpoints: ``best``'s files keep their names in the run's folder, ``all``'s go
    to a subfolder of their own. Fit B continues the run with ``all`` alone (it saves first now): its
    files must go on in ``all``'s subfolder, not land on the paths ``best``'s files hold (one
    ``last.ckpt`` path held one callback's model, then the other's)."""
    pin = PinnedDataset(dataset_repo.path, revision=dataset_repo.commits[0], paths=["train.csv", "val.csv"])
    models = tmp_path / "models"

    def every_save(name: str) -> ModelCheckpoint:  # (each its own state key: a monitor, or none)
        return ModelCheckpoint(dirpath=tmp_path / name, filename=name + "-{epoch}", save_top_k=-1, save_last=True,
                               monitor="val_loss" if name == "best" else None)

    a = OxenLightningCallback(dataset=pin, model_repo=models, run_name="two", mlflow=False)
    make_trainer(tmp_path / "a", [every_save("best"), every_save("all"), a], epochs=1).fit(
        TinyModel(), datamodule=CsvData(pin))
    b = OxenLightningCallback(model_repo=models, run_name="two", resume_from="two", mlflow=False)
    make_trainer(tmp_path / "b", [every_save("all"), b], epochs=2).fit(TinyModel(), datamodule=CsvData(pin),
                                                                        ckpt_path=b.ckpt_path)
    entries = b.lineage["checkpoints"]
    folder_of = {os.path.dirname(e["source"]): {os.path.dirname(x["path"]) for x in entries
                                                 if os.path.dirname(x["source"]) == os.path.dirname(e["source"])}
                 for e in entries}
    assert folder_of[str(tmp_path / "best")] == {"runs/two/checkpoints"}
    [subfolder] = folder_of[str(tmp_path / "all")]  # (both fits' saves of it)
    assert subfolder.startswith("runs/two/checkpoints/all-")
    assert len([e for e in entries if os.path.dirname(e["source"]) == str(tmp_path / "all")]) == 4


def test_a_continued_run_saving_into_a_new_default_folder_keeps_its_checkpoint_names(dataset_repo, tmp_path):
    """One ModelCheckpoint with Lightning's default folder: each new Trainer saves into a new
    ``lightning_logs/version_N``. The continued run's checkpoints keep their names in the run's folder, not
    a hashed subfolder per continuation."""
    pin = PinnedDataset(dataset_repo.path, revision=dataset_repo.commits[0], paths=["train.csv", "val.csv"])
    models = tmp_path / "models"
    a = OxenLightningCallback(dataset=pin, model_repo=models, run_name="night", mlflow=False)
    make_trainer(tmp_path / "a", [ModelCheckpoint(), a], epochs=1).fit(TinyModel(), datamodule=CsvData(pin))
    b = OxenLightningCallback(model_repo=models, run_name="night", resume_from="night", mlflow=False)
    make_trainer(tmp_path / "b", [ModelCheckpoint(), b], epochs=2).fit(TinyModel(), datamodule=CsvData(pin),
                                                                       ckpt_path=b.ckpt_path)
    assert {os.path.dirname(c["path"]) for c in b.lineage["checkpoints"]} == {"runs/night/checkpoints"}
    assert len(b.lineage["checkpoints"]) == 2
