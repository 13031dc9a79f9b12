"""The publishing worker a callback starts when it is built: it commits that callback's fit with
the fit's identity, a dead one is replaced without losing a checkpoint, an unused one goes away."""

from __future__ import annotations

import gc
import os
import signal
import time
from pathlib import Path

import pytest
from helpers import file_at, process_running
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning_model import CsvData, TinyModel, make_trainer

from oxen_callbacks import PinnedDataset
from oxen_callbacks._oxen import child as oxen_child
from oxen_callbacks.lightning import OxenLightningCallback

AUTHOR = ("Warm Worker Test", "warm@example.com")


def _fit(tmp_path: Path, cb: OxenLightningCallback) -> None:
    make_trainer(tmp_path, [ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1), cb], epochs=2
                 ).fit(TinyModel(), datamodule=CsvData(cb.dataset))


def _callback(dataset_repo, tmp_path: Path) -> OxenLightningCallback:  # type: ignore[no-untyped-def]
    pin = PinnedDataset(dataset_repo.path, revision=dataset_repo.commits[0], paths=["train.csv", "val.csv"])
    return OxenLightningCallback(dataset=pin, model_repo=tmp_path / "models", mlflow=False, author=AUTHOR)


def _assert_all_committed(tmp_path: Path, record: dict) -> None:
    saved = {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()}
    committed = {Path(c["path"]).name: file_at(tmp_path / "models", c["commit"], c["path"], tmp_path / "read").read_bytes()
                 for c in record["checkpoints"]}
    assert record["status"] == "FINISHED" and len(saved) == 2
    assert {name: committed.get(name) for name in saved} == saved


@pytest.mark.timeout(300)
def test_the_worker_started_with_the_callback_commits_its_fit_as_its_author(dataset_repo, tmp_path):
    cb = _callback(dataset_repo, tmp_path)
    warm = cb.run._warm_worker
    assert warm is not None and warm.proc is not None
    warm_pid = warm.proc.pid
    _fit(tmp_path, cb)
    assert cb.run.publisher.worker_pid == warm_pid  # the one started with the callback, not a new one
    record = cb.lineage
    _assert_all_committed(tmp_path, record)
    # the identity, like the rest of the environment, reached it at fit start through its pipe
    ours = [c for c in oxen_child.log(tmp_path / "models") if "oxen-callbacks" in c["message"]]
    assert ours and {(c["author"], c["email"]) for c in ours} == {AUTHOR}


@pytest.mark.timeout(300)
def test_a_worker_killed_before_fit_is_replaced_and_nothing_is_lost(dataset_repo, tmp_path):
    cb = _callback(dataset_repo, tmp_path)
    warm_pid = cb.run._warm_worker.proc.pid
    os.kill(warm_pid, signal.SIGKILL)
    cb.run._warm_worker.proc.wait(timeout=30)
    _fit(tmp_path, cb)
    assert cb.run.publisher.worker_pid not in (None, warm_pid)
    _assert_all_committed(tmp_path, cb.lineage)


@pytest.mark.timeout(120)
def test_a_callback_never_used_leaves_no_process_behind(dataset_repo, tmp_path):
    cb = _callback(dataset_repo, tmp_path)
    warm_pid = cb.run._warm_worker.proc.pid
    del cb
    gc.collect()
    deadline = time.monotonic() + 60
    while process_running(warm_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not process_running(warm_pid)


@pytest.mark.timeout(300)
def test_a_stopped_worker_that_cannot_take_a_large_environment_does_not_hold_fit(dataset_repo, tmp_path, monkeypatch):
    """An environment larger than a pipe's buffer (module systems on clusters), and a warm worker that
    does not read it (stopped, stuck importing): fit start gives up on it within HANDOFF_TIMEOUT_S and
    commits with a new worker."""
    from oxen_callbacks._util.handoff import HANDOFF_TIMEOUT_S

    cb = _callback(dataset_repo, tmp_path)
    warm_pid = cb.run._warm_worker.proc.pid
    os.kill(warm_pid, signal.SIGSTOP)
    for part in range(8):  # 240 KB in all; one variable may not exceed 128 KiB
        monkeypatch.setenv(f"BIG_MODULE_TABLE_{part:03d}", "x" * 30_000)
    started = time.monotonic()
    _fit(tmp_path, cb)
    assert time.monotonic() - started < HANDOFF_TIMEOUT_S + 120
    assert cb.run.publisher.worker_pid not in (None, warm_pid)
    _assert_all_committed(tmp_path, cb.lineage)
    deadline = time.monotonic() + 30
    while process_running(warm_pid) and time.monotonic() < deadline:  # killed, not left stopped
        time.sleep(0.1)
    assert not process_running(warm_pid)


def test_no_worker_is_started_ahead_on_a_process_that_is_not_rank_zero(dataset_repo, tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_PROCID", "1")
    assert _callback(dataset_repo, tmp_path).run._warm_worker is None


@pytest.mark.timeout(300)
def test_a_secret_in_the_environment_handed_over_reaches_no_file(dataset_repo, tmp_path, monkeypatch):
    """The hand-over carries the whole environment (set after the callback was built, too): through the
    pipe only, never into the queue, the worker's log, the repository or the MLflow store."""
    secret = "hf_" + "Q7vX2mK9pL4tR8wZ3nB6cD1fG5hJ0sYa"
    cb = _callback(dataset_repo, tmp_path)
    monkeypatch.setenv("HF_TOKEN", secret)
    _fit(tmp_path, cb)
    _assert_all_committed(tmp_path, cb.lineage)
    leaks = []
    for folder, _dirs, names in os.walk(tmp_path):
        for name in names:
            try:
                if secret.encode() in (Path(folder) / name).read_bytes():
                    leaks.append(os.path.join(folder, name))
            except OSError:
                continue
    assert not leaks
