"""A damaged model repository never gets a second history: earlier runs' commits keep their bytes.

Oxen commits where ``.oxen/HEAD`` is missing, empty, detached or names a branch the repository
lacks, as a parentless commit that rewrites tree nodes earlier commits share: those commits then
return another run's files while every run says FINISHED. We refuse such a HEAD: at fit start
when its own file shows it, in the commit worker (which lists branches) otherwise.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import xxhash
from helpers import store_elsewhere
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning_model import CsvData, TinyModel, make_trainer

from oxen_callbacks import PinnedDataset, read_lineage
from oxen_callbacks._ops import sync
from oxen_callbacks._oxen import tree
from oxen_callbacks._oxen.repo import LocalRepo
from oxen_callbacks.errors import ConfigurationError, PublishError
from oxen_callbacks.lightning import OxenLightningCallback


def _fit(dataset_repo, tmp_path: Path, name: str, extra=()):  # type: ignore[no-untyped-def]
    pin = PinnedDataset(dataset_repo.path, revision=dataset_repo.commits[0], paths=["train.csv", "val.csv"])
    cb = OxenLightningCallback(dataset=pin, model_repo=tmp_path / "models", mlflow=False, run_name=name)
    ckpt = ModelCheckpoint(dirpath=tmp_path / name, every_n_train_steps=2, save_top_k=-1)
    make_trainer(tmp_path / f"root-{name}", [ckpt, cb, *extra], epochs=2).fit(TinyModel(), datamodule=CsvData(pin))
    return cb


def _committed_bytes_match(models: Path, ckpt_dir: Path, record: dict) -> None:  # type: ignore[type-arg]
    """Every checkpoint the record lists holds, in its commit, the bytes the trainer saved."""
    assert record["checkpoints"]
    for entry in record["checkpoints"]:
        found = tree.files_at(models, entry["commit"], [entry["path"]])[entry["path"]].files
        saved = (ckpt_dir / os.path.basename(entry["path"])).read_bytes()
        assert [f.hash for f in found] == [xxhash.xxh3_128_intdigest(saved)], entry


@pytest.fixture
def first_run(dataset_repo, tmp_path):  # type: ignore[no-untyped-def]
    cb = _fit(dataset_repo, tmp_path, "first")
    record = cb.lineage
    _committed_bytes_match(tmp_path / "models", tmp_path / "first", record)
    return record


HEAD_FAULTS = {
    "missing": (lambda head, commit: head.unlink(), r"\.oxen/HEAD is missing"),
    "empty": (lambda head, commit: head.write_text(""), r"\.oxen/HEAD is empty"),
    "detached": (lambda head, commit: head.write_text(commit), r"\.oxen/HEAD is detached at commit"),
}


@pytest.mark.parametrize("fault", sorted(HEAD_FAULTS))
def test_a_model_repo_head_that_shows_damage_stops_the_fit_before_a_step(fault, first_run, dataset_repo, tmp_path):
    models = tmp_path / "models"
    damage, message = HEAD_FAULTS[fault]
    commits = set(LocalRepo(models).commit_ids())
    damage(models / ".oxen" / "HEAD", first_run["model"]["commit"])
    with pytest.raises(ConfigurationError, match=rf"(?s)model repository .*looks damaged: {message}.*HINT: write"):
        _fit(dataset_repo, tmp_path, "second")
    assert not (tmp_path / "second").exists()  # no step ran
    assert set(LocalRepo(models).commit_ids()) == commits
    _committed_bytes_match(models, tmp_path / "first", first_run)


def test_a_head_naming_a_missing_branch_is_refused_by_the_worker_and_sync_finishes(first_run, dataset_repo, tmp_path):
    """A typo in HEAD ("mian") shows only in the branch list: the worker commits nothing; once
    HEAD is fixed, sync commits every journaled save on the real branch."""
    models = tmp_path / "models"
    commits = set(LocalRepo(models).commit_ids())
    (models / ".oxen" / "HEAD").write_text("mian")
    with pytest.raises(PublishError, match=r"(?s)looks damaged: \.oxen/HEAD names branch 'mian', which it does not "
                                           r"have \(branches: main\).*oxen-callbacks sync"):
        cb = _fit(dataset_repo, tmp_path, "second")
        cb.run.wait()
    assert set(LocalRepo(models).commit_ids()) == commits  # nothing committed beside the history
    _committed_bytes_match(models, tmp_path / "first", first_run)

    (models / ".oxen" / "HEAD").write_text("main")  # the operator fixes it
    sync.sync_all()
    second = read_lineage(models / "runs" / "second" / "lineage.json")
    assert {os.path.basename(c["path"]) for c in second["checkpoints"]} >= {"epoch=0-step=2.ckpt"}
    _committed_bytes_match(models, tmp_path / "second", second)
    _committed_bytes_match(models, tmp_path / "first", first_run)
    assert LocalRepo(models).branches() == {"main": LocalRepo(models).resolve("main")}


class WaitForTheCommitError(Callback):
    """Training ends only once the worker's commit error has reached the trainer: the time a user's
    export or final evaluation at the end of training leaves."""

    def __init__(self, oxen_cb: OxenLightningCallback) -> None:
        self.oxen_cb = oxen_cb

    def on_train_end(self, trainer, pl_module) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + 60
        while not self.oxen_cb.run.publisher.failed and time.monotonic() < deadline:
            time.sleep(0.05)
        assert self.oxen_cb.run.publisher.failed


def test_a_commit_error_known_as_fit_ends_still_ends_the_run_and_sync_can_finish_it(first_run, dataset_repo, tmp_path):
    """A commit error that reached the trainer before `fit()` ended used to skip the end of the run:
    the queue, its worker and the run's name stayed this process's, so `sync` left the run "to the
    live training process" and its MLflow run stayed RUNNING as long as the notebook lived. Now the
    end goes on (fit() still raises the error), and `sync` in the same process (the next cell, once
    HEAD is fixed) commits the saves and ends the MLflow run."""
    from mlflow import MlflowClient

    models = tmp_path / "models"
    (models / ".oxen" / "HEAD").write_text("mian")
    pin = PinnedDataset(dataset_repo.path, revision=dataset_repo.commits[0], paths=["train.csv", "val.csv"])
    cb = OxenLightningCallback(dataset=pin, model_repo=models, run_name="second", mlflow_timeout=30)
    # one save, at the end of training: an error that came before a later save would be that save's
    ckpt = ModelCheckpoint(dirpath=tmp_path / "second", every_n_epochs=2, save_top_k=-1)
    with pytest.raises(PublishError, match="names branch 'mian'"):
        make_trainer(tmp_path / "root-second", [ckpt, cb, WaitForTheCommitError(cb)], epochs=2).fit(
            TinyModel(), datamodule=CsvData(pin))
    held = cb.lineage
    assert held["status"] == "FINISHED" and held["final_commit"] == "pending"
    assert held["checkpoints"] == [] and held["model"]["commit"] is None  # nothing committed (yet)
    mlflow_run = held["run"]["mlflow_run_id"]

    (models / ".oxen" / "HEAD").write_text("main")  # the operator fixes it; this process lives on
    sync.sync_all()
    second = read_lineage(models / "runs" / "second" / "lineage.json")
    assert second["status"] == "FINISHED" and "final_commit" not in second
    _committed_bytes_match(models, tmp_path / "second", second)
    run = MlflowClient().get_run(mlflow_run)
    assert run.info.status == "FINISHED"
    assert run.data.tags["oxen.model.commit"] == second["model"]["commit"]


class DeleteHead(Callback):
    """Delete the model repository's HEAD mid-training, once the first checkpoints are committed."""

    def __init__(self, models: Path, oxen_cb: OxenLightningCallback) -> None:
        self.models, self.oxen_cb, self.done = models, oxen_cb, False

    def on_train_batch_end(self, trainer, *args) -> None:  # type: ignore[no-untyped-def]
        if trainer.global_step == 3 and not self.done:
            self.oxen_cb.run.publisher.flush(60)
            (self.models / ".oxen" / "HEAD").unlink()
            self.done = True


def test_head_deleted_during_training_never_rewrites_history(first_run, dataset_repo, tmp_path):
    models = tmp_path / "models"
    pin = PinnedDataset(dataset_repo.path, revision=dataset_repo.commits[0], paths=["train.csv", "val.csv"])
    cb = OxenLightningCallback(dataset=pin, model_repo=models, mlflow=False, run_name="second")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "second", every_n_train_steps=2, save_top_k=-1)
    with pytest.raises(PublishError, match=r"\.oxen/HEAD is missing"):
        make_trainer(tmp_path / "root", [ckpt, cb, DeleteHead(models, cb)], epochs=2).fit(
            TinyModel(), datamodule=CsvData(pin))
        cb.run.wait()
    _committed_bytes_match(models, tmp_path / "first", first_run)
    (models / ".oxen" / "HEAD").write_text("main")
    sync.sync_all()
    second = read_lineage(models / "runs" / "second" / "lineage.json")
    assert {os.path.basename(c["path"]) for c in second["checkpoints"]} == {p.name for p in (tmp_path / "second").iterdir()}
    _committed_bytes_match(models, tmp_path / "second", second)
    _committed_bytes_match(models, tmp_path / "first", first_run)


@pytest.fixture
def immutable():  # type: ignore[no-untyped-def]
    """``chattr +i`` a folder: nobody, root included, can write in it (the tests may run as root,
    for whom permission bits change nothing); undone after the test."""
    made: list[Path] = []

    def make(path: Path) -> None:
        subprocess.run(["chattr", "+i", str(path)], check=True, capture_output=True)
        made.append(path)
        with pytest.raises(PermissionError):
            (path / "probe").write_bytes(b"")

    yield make
    for path in made:
        subprocess.run(["chattr", "-i", str(path)], check=True)


@pytest.mark.parametrize("place", ["content-store-immutable", "content-store-a-file", "repository-immutable",
                                   "content-store-elsewhere-immutable"])
def test_an_unwritable_model_repository_stops_the_fit_before_a_step(place, first_run, dataset_repo, tmp_path,
                                                                    immutable):
    """Before, a read-only content store passed the start and every commit after it failed (the fit
    died at its second save), and a read-only repository gave a raw PermissionError."""
    models = tmp_path / "models"
    store = models / ".oxen" / "versions" / "files"
    if place == "content-store-a-file":
        shutil.move(store, tmp_path / "store.moved")
        store.write_text("not a folder")
    elif place == "content-store-elsewhere-immutable":  # (versions_path: the one Oxen writes)
        store_elsewhere(models, tmp_path / "elsewhere")
        (tmp_path / "elsewhere").mkdir()
        immutable(tmp_path / "elsewhere")
    else:
        immutable(store if place == "content-store-immutable" else models)
    with pytest.raises(ConfigurationError, match=rf"(?s)model repository '{models}' cannot be written: .*"
                                                 r"HINT: make it writable"):
        _fit(dataset_repo, tmp_path, "second")
    assert not (tmp_path / "second").exists()  # no step ran


def test_a_checkpoint_missing_from_its_commit_is_named_in_the_model_repository(first_run, tmp_path):
    from oxen_callbacks.checkpoints import materialize_checkpoint

    models = tmp_path / "models"
    with pytest.raises(ConfigurationError, match=rf"'runs/first/checkpoints/nope\.ckpt' is not in commit "
                                                 rf"{first_run['model']['commit']} of the model repository '{models}'"):
        materialize_checkpoint(models, commit=first_run["model"]["commit"], path="runs/first/checkpoints/nope.ckpt",
                               cache_dir=tmp_path / "cache")


def test_a_first_commit_cut_short_is_completed_by_the_next_fit(dataset_repo, tmp_path):
    """A commit process killed in a repository's first commit leaves that commit's folder, no branch
    and no HEAD. That is no damage: the next fit commits on, and a branch names its commits."""
    from helpers import make_repo

    from oxen_callbacks._oxen import child as oxen_child

    models = tmp_path / "models"
    make_repo(models, [("first, cut short", {"README.md": "models\n"})])
    (models / ".oxen" / "HEAD").unlink()  # what the kill left: the commit, but no branch names it
    shutil.rmtree(models / ".oxen" / "refs")
    assert LocalRepo(models).commit_ids() and not oxen_child.branches(models)

    record = _fit(dataset_repo, tmp_path, "after-cut").lineage
    assert record["status"] == "FINISHED"
    _committed_bytes_match(models, tmp_path / "after-cut", record)
    branches = oxen_child.branches(models)
    assert list(branches) == ["main"] and branches["main"] in LocalRepo(models).commit_ids()


class DamageRecord(Callback):
    """Cut the run's `lineage.json` in the model repository's working tree short mid-training (a full
    disk, an editor), once the first checkpoints are committed."""

    def __init__(self, models: Path, oxen_cb: OxenLightningCallback, damage: bytes) -> None:
        self.models, self.oxen_cb, self.damage, self.done = models, oxen_cb, damage, False

    def on_train_batch_end(self, trainer, *args) -> None:  # type: ignore[no-untyped-def]
        if trainer.global_step == 3 and not self.done:
            self.oxen_cb.run.publisher.flush(60)
            (self.models / "runs" / "damaged" / "lineage.json").write_bytes(self.damage)
            self.done = True


@pytest.mark.parametrize("damage", [b'{"schema": "oxen-callbacks/lin', b"[]"], ids=["cut-short", "a-list"])
def test_a_run_record_damaged_in_the_working_tree_never_stops_training(damage, dataset_repo, tmp_path):
    """The record in the working tree is only a copy of what the run's last commit holds: the next
    commit extends the committed one, training goes on, and no checkpoint drops out of the record."""
    models = tmp_path / "models"
    pin = PinnedDataset(dataset_repo.path, revision=dataset_repo.commits[0], paths=["train.csv", "val.csv"])
    cb = OxenLightningCallback(dataset=pin, model_repo=models, mlflow=False, run_name="damaged")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "damaged", every_n_train_steps=2, save_top_k=-1)
    make_trainer(tmp_path / "root", [ckpt, cb, DamageRecord(models, cb, damage)], epochs=2).fit(
        TinyModel(), datamodule=CsvData(pin))

    record = cb.lineage
    assert record["status"] == "FINISHED"
    assert {os.path.basename(c["path"]) for c in record["checkpoints"]} == {p.name for p in (tmp_path / "damaged").iterdir()}
    _committed_bytes_match(models, tmp_path / "damaged", record)
    assert read_lineage(models / "runs" / "damaged" / "lineage.json")["checkpoints"] == record["checkpoints"]
