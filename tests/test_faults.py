"""Faults lose nothing: dead or hanging remotes, a killed worker, a broken model repository, a full disk."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import signal
import time

import pytest
from helpers import free_port, make_repo
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning_model import CsvData, TinyModel, make_trainer

from oxen_callbacks import PinnedDataset, cli, read_lineage
from oxen_callbacks._ops import sync
from oxen_callbacks._oxen.repo import LocalRepo
from oxen_callbacks._publish.push import pending_push, pending_push_path
from oxen_callbacks._util.processes import MAX_ENV_STRING_BYTES
from oxen_callbacks.errors import PublishError
from oxen_callbacks.lightning import OxenLightningCallback


def _fit(dataset_repo, tmp_path, extra=(), **options):  # type: ignore[no-untyped-def]
    pin = PinnedDataset(dataset_repo.path, revision=dataset_repo.commits[0], paths=["train.csv", "val.csv"])
    cb = OxenLightningCallback(dataset=pin, model_repo=tmp_path / "models", mlflow=False, **options)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    make_trainer(tmp_path, [ckpt, cb, *extra], epochs=2).fit(TinyModel(), datamodule=CsvData(pin))
    return cb


def _all_committed(cb, tmp_path) -> None:  # type: ignore[no-untyped-def]
    entries = cb.lineage["checkpoints"]  # (waits for the final lineage commit fit() did not wait for)
    commits = set(LocalRepo(tmp_path / "models").commit_ids())
    saved = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert sorted(os.path.basename(c["path"]) for c in entries) == saved
    assert all(c["commit"] in commits for c in entries)


@pytest.mark.parametrize("kind", ["refused", "hanging"])
def test_unreachable_remote_loses_nothing(kind, dataset_repo, tmp_path, hanging_port, caplog, capsys):
    port = free_port() if kind == "refused" else hanging_port
    url = f"http://127.0.0.1:{port}/ox/models"
    with caplog.at_level(logging.WARNING, logger="oxen_callbacks"):
        cb = _fit(dataset_repo, tmp_path, remote_url=url, push_timeout=3)
        _all_committed(cb, tmp_path)
    assert cb.lineage["push"]["pushed"] is False
    assert any("NOT pushed" in r.getMessage() and "oxen-callbacks sync" in r.getMessage() for r in caplog.records)
    marker = pending_push(tmp_path / "models")
    assert marker["url"] == url and marker["seconds"] <= 3 + 5  # bounded: one timeout, no retry loop on a hang

    report = sync.sync_all(push_timeout=3)
    assert report["pending"] == 1
    assert report["model_repos"][0]["push"]["ok"] is False
    assert pending_push(tmp_path / "models") is not None  # still journaled for the next sync

    capsys.readouterr()
    assert cli.main(["sync", "--push-timeout", "3"]) == 1  # something is still pending
    out = capsys.readouterr().out
    assert f"{tmp_path / 'models'}: 0 checkpoint(s) committed, push to origin failed" in out, out
    assert "1 item(s) still pending" in out, out


class DamagePushMarker(Callback):
    """At the end of training, once the failed push is journaled: cut its marker short (a full disk)."""

    def on_train_end(self, trainer, pl_module) -> None:  # type: ignore[no-untyped-def]
        marker = pending_push_path(trainer.default_root_dir + "/models")
        deadline = time.monotonic() + 60
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        marker.write_text(marker.read_text()[:7])


def test_a_damaged_push_marker_at_the_end_never_stops_the_run(dataset_repo, tmp_path, caplog, capsys):
    """The end of the run reads the push marker: damaged, it must not cut the end short (the MLflow
    run was left RUNNING without its lineage)."""
    from mlflow import MlflowClient

    pin = PinnedDataset(dataset_repo.path, revision=dataset_repo.commits[0], paths=["train.csv", "val.csv"])
    url = f"http://127.0.0.1:{free_port()}/ox/models"
    cb = OxenLightningCallback(dataset=pin, model_repo=tmp_path / "models", remote_url=url, push_timeout=3)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    with caplog.at_level(logging.WARNING, logger="oxen_callbacks"):
        make_trainer(tmp_path, [ckpt, cb, DamagePushMarker()], epochs=2).fit(TinyModel(), datamodule=CsvData(pin))
        cb.run.wait()  # the end fit() did not wait for, which raised nothing
        _all_committed(cb, tmp_path)
    run = MlflowClient().get_run(cb.lineage["run"]["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["oxen.model.commit"] == cb.lineage["model"]["commit"]
    assert cb.lineage["status"] == "FINISHED"
    assert any("Cannot tell whether the checkpoints reached the Oxen remote" in r.getMessage() for r in caplog.records)
    capsys.readouterr()
    assert cli.main(["sync", "--push-timeout", "3"]) == 1  # reported, left for the user to look at
    assert "push-pending.json" in capsys.readouterr().out


class KillWorker(Callback):
    """Kill the publishing worker (SIGKILL) after the second save."""

    def __init__(self, oxen_cb: OxenLightningCallback) -> None:
        self.oxen_cb, self.killed = oxen_cb, None

    def on_train_batch_end(self, trainer, *args) -> None:  # type: ignore[no-untyped-def]
        if trainer.global_step == 5 and self.killed is None:
            self.killed = self.oxen_cb.run.publisher.worker_pid
            os.kill(self.killed, signal.SIGKILL)


def test_killed_worker_is_restarted_and_nothing_is_lost(dataset_repo, tmp_path):
    pin = PinnedDataset(dataset_repo.path, revision=dataset_repo.commits[0], paths=["train.csv", "val.csv"])
    cb = OxenLightningCallback(dataset=pin, model_repo=tmp_path / "models", mlflow=False)
    killer = KillWorker(cb)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    make_trainer(tmp_path, [ckpt, cb, killer], epochs=2).fit(TinyModel(), datamodule=CsvData(pin))
    _all_committed(cb, tmp_path)  # (reads cb.lineage: waits for the final commit, which needs a live worker)
    assert killer.killed and cb.run.publisher.worker_pid != killer.killed


class BreakStore(Callback):
    """After the first commit, make the model repository's content store unwritable (a file in its place)."""

    def __init__(self, store, oxen_cb) -> None:  # type: ignore[no-untyped-def]
        self.store, self.oxen_cb, self.broken = store, oxen_cb, False

    def on_train_batch_end(self, trainer, *args) -> None:  # type: ignore[no-untyped-def]
        if trainer.global_step == 3 and not self.broken:
            self.oxen_cb.run.publisher.flush(60)
            shutil.move(self.store, str(self.store) + ".moved")
            self.store.write_text("not a folder")
            self.broken = True


def test_broken_model_repo_is_a_clear_error_and_sync_recovers(dataset_repo, tmp_path):
    store = tmp_path / "models" / ".oxen" / "versions"
    pin = PinnedDataset(dataset_repo.path, revision=dataset_repo.commits[0], paths=["train.csv", "val.csv"])
    cb = OxenLightningCallback(dataset=pin, model_repo=tmp_path / "models", mlflow=False)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    with pytest.raises(PublishError, match=r"(?s)Committing to the model repository .*models.*oxen-callbacks sync"):
        make_trainer(tmp_path, [ckpt, cb, BreakStore(store, cb)], epochs=2).fit(TinyModel(), datamodule=CsvData(pin))
        cb.run.wait()  # (raised by fit() when known by then, else by wait())
    store.unlink()
    shutil.move(str(store) + ".moved", store)  # the operator fixes the disk
    report = sync.sync_all()
    deadline = time.monotonic() + 120
    while report["model_repos"][0]["busy"] and time.monotonic() < deadline:  # (the run's end may still hold
        time.sleep(0.2)                                                       # its queue: sync says so)
        report = sync.sync_all()
    assert report["pending"] == 0 and report["model_repos"][0]["committed"] >= 1
    record = read_lineage(tmp_path / "models" / "runs" / cb.run.run_name / "lineage.json")
    commits = set(LocalRepo(tmp_path / "models").commit_ids())
    assert all(c["commit"] in commits for c in record["checkpoints"])
    assert {os.path.basename(c["path"]) for c in record["checkpoints"]} == {p.name for p in (tmp_path / "ckpt").iterdir()}


def test_disk_full_while_freezing_is_a_clear_error(dataset_repo, tmp_path, monkeypatch):
    """ENOSPC cannot be produced for real here (no root, no small filesystem): inject it."""
    from oxen_callbacks._publish import freeze

    def no_space(*_a, **_k):  # type: ignore[no-untyped-def]
        raise OSError(errno.ENOSPC, "No space left on device")

    # (the dataset's view is made before: os.link is every module's, and only freezing must fail)
    PinnedDataset(dataset_repo.path, revision=dataset_repo.commits[0], paths=["train.csv", "val.csv"]).pull()
    monkeypatch.setattr(freeze.os, "link", no_space)
    monkeypatch.setattr(freeze.shutil, "copyfile", no_space)
    with pytest.raises(PublishError, match="No space left on device"):
        _fit(dataset_repo, tmp_path)


def test_a_model_repository_whose_oxen_folder_is_a_link_commits_every_checkpoint(dataset_repo, tmp_path):
    """`.oxen` moved to another disk and linked back: the check that frozen bytes are reached through no
    link (a hostile job's) refused every checkpoint of such a repository."""
    make_repo(tmp_path / "models", [])
    shutil.move(str(tmp_path / "models" / ".oxen"), str(tmp_path / "other-disk"))
    os.symlink(tmp_path / "other-disk", tmp_path / "models" / ".oxen")
    cb = _fit(dataset_repo, tmp_path)
    _all_committed(cb, tmp_path)


class DeleteModelRepo(Callback):
    """Delete the model repository's folder after the first saves (a user's `rm -rf`, a cleanup job)."""

    def __init__(self, folder) -> None:  # type: ignore[no-untyped-def]
        self.folder = folder

    def on_train_batch_end(self, trainer, *args) -> None:  # type: ignore[no-untyped-def]
        if trainer.global_step == 3:
            shutil.rmtree(self.folder)


def test_a_model_repository_deleted_while_training_is_a_clear_error_naming_it(dataset_repo, tmp_path):
    """The model repository's folder vanishes mid-fit: the next save stops the fit with an error naming the
    repository and what to do (it was a bare FileNotFoundError naming a temporary job file)."""
    with pytest.raises(PublishError) as raised:
        _fit(dataset_repo, tmp_path, extra=[DeleteModelRepo(tmp_path / "models")])
    message = str(raised.value)
    assert f"in the model repository {tmp_path / 'models'} (No such file or directory" in message
    assert "Keep the repository's folder in place and writable" in message


class KillWorkerAndGrowEnvironment(KillWorker):
    """Also put a variable over Linux's limit in the environment: no new worker can start."""

    def on_train_batch_end(self, trainer, *args) -> None:  # type: ignore[no-untyped-def]
        if trainer.global_step == 5 and self.killed is None:
            os.environ["HUGE_TABLE"] = "x" * (MAX_ENV_STRING_BYTES + 10)
            super().on_train_batch_end(trainer, *args)
            self.oxen_cb.run.publisher._proc.wait(timeout=60)  # dead for the next save to see


def test_a_worker_that_cannot_be_restarted_never_stops_training(dataset_repo, tmp_path, monkeypatch, caplog):
    """The worker killed mid-fit and no process able to start any more (a variable over the kernel's
    limit, set during training): training goes on to its end, says publishing stopped, and `sync`
    commits every saved checkpoint once the environment is sane again."""
    monkeypatch.delenv("HUGE_TABLE", raising=False)
    pin = PinnedDataset(dataset_repo.path, revision=dataset_repo.commits[0], paths=["train.csv", "val.csv"])
    cb = OxenLightningCallback(dataset=pin, model_repo=tmp_path / "models", mlflow=False)
    killer = KillWorkerAndGrowEnvironment(cb)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    trainer = make_trainer(tmp_path, [ckpt, cb, killer], epochs=2)
    try:
        trainer.fit(TinyModel(), datamodule=CsvData(pin))
    finally:
        os.environ.pop("HUGE_TABLE", None)
    assert killer.killed and trainer.current_epoch == 2  # the whole fit ran
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "could not start" in said and "Run `oxen-callbacks sync`" in said
    saved = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert cb.lineage["status"] == "FINISHED"  # (the end of the run is journaled too)
    report = sync.sync_all(model_repos=[tmp_path / "models"])
    assert report["pending"] == 0, report
    record = read_lineage(tmp_path / "models" / "runs" / cb.run.run_name / "lineage.json")
    assert sorted(os.path.basename(c["path"]) for c in record["checkpoints"] if c["commit"]) == saved
