"""The publishing worker a callback starts when it is built: it commits that callback's fit with
the fit's identity, a dead one is replaced without losing a checkpoint, an unused one goes away.
Once its run ended it waits for the process's next fit (a notebook's next cell), holding nothing."""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import file_at, process_running, wait_until_released
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning_model import CsvData, TinyModel, make_trainer

from oxen_callbacks import PinnedDataset
from oxen_callbacks._oxen import child as oxen_child
from oxen_callbacks._publish import warm_worker
from oxen_callbacks._publish.queue import repo_lock_path
from oxen_callbacks._util.locks import is_locked
from oxen_callbacks.lightning import OxenLightningCallback

AUTHOR = ("Warm Worker Test", "warm@example.com")


@pytest.fixture(autouse=True)
def no_idle_worker():
    """Each test starts as a new process would: no worker an earlier test's fit left waiting."""
    while (proc := warm_worker._take_idle()) is not None:
        warm_worker._close(proc)


def _fit(tmp_path: Path, cb: OxenLightningCallback) -> None:
    make_trainer(tmp_path, [ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1), cb], epochs=2
                 ).fit(TinyModel(), datamodule=CsvData(cb.dataset))


def _callback(dataset_repo, tmp_path: Path, author: tuple[str, str] = AUTHOR) -> OxenLightningCallback:  # type: ignore[no-untyped-def]
    pin = PinnedDataset(dataset_repo.path, revision=dataset_repo.commits[0], paths=["train.csv", "val.csv"])
    return OxenLightningCallback(dataset=pin, model_repo=tmp_path / "models", mlflow=False, author=author)


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
    assert not _files_holding(secret, tmp_path)


@pytest.mark.timeout(400)
def test_a_secret_handed_to_a_waiting_worker_reaches_no_file(dataset_repo, tmp_path, monkeypatch):
    """The second fit's environment (a token set between the cells) goes to the worker the first fit
    left waiting: through its pipe only, never into either run's queue, log or repository."""
    secret = "hf_" + "Z9yW8xV7uT6sR5qP4oN3mL2kJ1iH0gFe"
    first, second = tmp_path / "first", tmp_path / "second"
    cb = _callback(dataset_repo, first)
    _fit(first, cb)
    cb.lineage
    monkeypatch.setenv("HF_TOKEN", secret)
    cb2 = _callback(dataset_repo, second)
    _fit(second, cb2)
    assert cb2.run.publisher.worker_pid == cb.run.publisher.worker_pid
    _assert_all_committed(second, cb2.lineage)
    assert not _files_holding(secret, tmp_path)


def _files_holding(secret: str, root: Path) -> list[str]:
    leaks = []
    for folder, _dirs, names in os.walk(root):
        for name in names:
            try:
                if secret.encode() in (Path(folder) / name).read_bytes():
                    leaks.append(os.path.join(folder, name))
            except OSError:
                continue
    return leaks


@pytest.mark.timeout(400)
def test_the_next_fit_of_the_process_takes_the_worker_a_finished_fit_left_waiting(dataset_repo, tmp_path):
    """A notebook's next cell: the worker of the first fit, done, holds neither the repository nor its
    queue, and commits the second fit (another repository, another author: its own hand-off) as
    that fit's, its log in that fit's queue."""
    first, second = tmp_path / "first", tmp_path / "second"
    cb = _callback(dataset_repo, first)
    _fit(first, cb)
    _assert_all_committed(first, cb.lineage)
    pid = cb.run.publisher.worker_pid
    assert process_running(pid)  # waiting for the next run, not exited
    queue = cb.run.publisher.queue
    assert not is_locked(repo_lock_path(first / "models")) and not is_locked(queue.worker_lock)
    assert not wait_until_released(first / "models", timeout=10)  # no file of it open (its log neither)
    assert os.readlink(f"/proc/{pid}/cwd") == "/"  # nor the trainer's folder (an unmount would be refused)
    before = len(oxen_child.log(first / "models"))  # another process may use the repository meanwhile

    other_author = ("Second Cell", "second@example.com")
    cb2 = _callback(dataset_repo, second, author=other_author)
    assert cb2.run._warm_worker.proc.pid == pid  # taken over, not started anew
    _fit(second, cb2)
    assert cb2.run.publisher.worker_pid == pid
    _assert_all_committed(second, cb2.lineage)
    ours = [c for c in oxen_child.log(second / "models") if "oxen-callbacks" in c["message"]]
    assert ours and {(c["author"], c["email"]) for c in ours} == {other_author}
    assert len(oxen_child.log(first / "models")) == before  # nothing of the second fit went to the first
    second_queue = cb2.run.publisher.queue
    assert second_queue.folder.name in second_queue.log_path.read_text()
    assert second_queue.folder.name not in queue.log_path.read_text()


@pytest.mark.timeout(400)
@pytest.mark.parametrize("fate", [signal.SIGKILL, signal.SIGSTOP])
def test_a_waiting_worker_killed_or_stopped_between_fits_is_replaced_and_nothing_is_lost(dataset_repo, tmp_path, fate):
    """A worker left waiting for the next fit, then killed, or stopped (``SIGSTOP``, a debugger): a
    hand-off that fits the pipe's buffer used to seem taken by the stopped one, and the next fit's
    lineage, and the exit, waited for it forever. A new worker commits the fit; a stopped one is killed."""
    first, second = tmp_path / "first", tmp_path / "second"
    cb = _callback(dataset_repo, first)
    _fit(first, cb)
    cb.lineage
    pid = cb.run.publisher.worker_pid
    os.kill(pid, fate)
    deadline = time.monotonic() + 30
    while fate == signal.SIGKILL and process_running(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        cb2 = _callback(dataset_repo, second)
        _fit(second, cb2)
        assert cb2.run.publisher.worker_pid not in (None, pid)
        cb2.run.wait(timeout=120)
        _assert_all_committed(second, cb2.lineage)
        deadline = time.monotonic() + 30
        while process_running(pid) and time.monotonic() < deadline:  # gone, not left stopped
            time.sleep(0.1)
        assert not process_running(pid)
    finally:
        if process_running(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.timeout(400)
def test_the_waiting_worker_exits_with_the_training_process(dataset_repo, tmp_path):
    """Nothing outlives a script: the worker its fit left waiting sees its stdin close when the script exits."""
    pid_file = tmp_path / "worker.pid"
    done = subprocess.run([sys.executable, str(Path(__file__).parent / "fit_script.py"), "--dataset",
                           str(dataset_repo.path), "--revision", dataset_repo.commits[0], "--model-repo",
                           str(tmp_path / "models"), "--root", str(tmp_path / "fit"), "--epochs", "2",
                           "--out", str(tmp_path / "out.json"), "--worker-pid", str(pid_file)],
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "out.json").read_text())["lineage"]["status"] == "FINISHED"
    pid = int(pid_file.read_text())
    deadline = time.monotonic() + 30
    while process_running(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not process_running(pid)


@pytest.mark.timeout(400)
def test_a_finished_fits_publisher_closed_again_leaves_the_next_fit_alone(dataset_repo, tmp_path):
    """The worker now serves another fit: the earlier fit's publisher (closed again, as a second
    ``finish`` or an exit handler might) must not end that fit's run or wake it."""
    from lightning.pytorch.callbacks import Callback

    first, second = tmp_path / "first", tmp_path / "second"
    cb = _callback(dataset_repo, first)
    _fit(first, cb)
    cb.lineage
    earlier = cb.run.publisher

    class CloseEarlierAgain(Callback):
        def on_train_epoch_end(self, trainer, pl_module):  # type: ignore[no-untyped-def]
            earlier.close(timeout=5)

    cb2 = _callback(dataset_repo, second)
    make_trainer(second, [ModelCheckpoint(dirpath=second / "ckpt", save_top_k=-1), cb2, CloseEarlierAgain()],
                 epochs=2).fit(TinyModel(), datamodule=CsvData(cb2.dataset))
    _assert_all_committed(second, cb2.lineage)
    assert cb2.run.publisher.worker_pid == cb.run.publisher.worker_pid


@pytest.mark.timeout(300)
def test_a_run_with_a_failed_commit_still_ends_at_once_and_leaves_its_worker_waiting(tmp_path):
    """A checkpoint whose commit failed stays queued (for `sync`), the newest job the worker sees when
    the run's end comes: the end must not be taken for a wake-up within a burst of saves (close() then
    waited its whole limit, 60 s, for an answer that never came)."""
    from oxen_callbacks._publish.publisher import CheckpointPublisher
    from oxen_callbacks.errors import PublishError

    publisher = CheckpointPublisher(model_repo=tmp_path / "models", run="r1", author=AUTHOR)
    saved = tmp_path / "c1.ckpt"
    saved.write_bytes(b"weights" * 100)
    publisher.submit_checkpoint(saved, record={"run": {"name": "r1"}, "checkpoints": [], "model": {}}, step=1, epoch=0)
    publisher._put("checkpoint", {"run": "r1", "dest": "runs/r1/checkpoints/gone.ckpt", "staged_name": "gone.ckpt",
                                  "source": str(tmp_path / "gone.ckpt"), "step": 2, "epoch": 0, "metrics": {},
                                  "files": 1, "bytes": 1, "stamps": {}, "message": "m", "record": {"run": {"name": "r1"}}})
    with pytest.raises(PublishError):
        publisher.flush(120)
    time.sleep(1)  # the worker waits for work, as during training
    publisher.submit_finalize({"run": {"name": "r1"}, "checkpoints": [], "model": {}})
    assert publisher.flush(120)  # (the failed job was said once)
    assert publisher.queue.pending()[-1].kind == "checkpoint"  # kept for `sync`
    started = time.monotonic()
    publisher.close()
    assert time.monotonic() - started < 30
    assert warm_worker._take_idle() is not None


@pytest.mark.timeout(400)
def test_a_sweeps_next_callback_built_before_the_last_fit_ended_still_takes_its_worker(dataset_repo, tmp_path):
    """A sweep builds the next callback the moment fit() returns, before that fit's end let go of its
    worker: the worker is still taken at fit start, and the one started with the callback waits for later."""
    first, second = tmp_path / "first", tmp_path / "second"
    cb = _callback(dataset_repo, first)
    _fit(first, cb)
    cb2 = _callback(dataset_repo, second)  # (the first fit's commits are not done yet)
    started_with_it = cb2.run._warm_worker.proc.pid
    assert started_with_it != cb.run.publisher.worker_pid
    cb.lineage  # (the first fit's worker waits now)
    _fit(second, cb2)
    assert cb2.run.publisher.worker_pid == cb.run.publisher.worker_pid
    _assert_all_committed(second, cb2.lineage)
    assert process_running(started_with_it)  # kept for the next fit, not lost


@pytest.mark.timeout(300)
def test_nothing_is_queued_or_waited_for_after_the_run_handed_its_worker_on(dataset_repo, tmp_path):
    """A removal noted after the run ended is not committed (the final record lists the file), and a flush
    of the publisher whose worker serves another run now returns at once, never waiting for good."""
    cb = _callback(dataset_repo, tmp_path)
    _fit(tmp_path, cb)
    record = cb.lineage
    saved = next((tmp_path / "ckpt").iterdir())
    saved.unlink()
    cb.run.checkpoint_removed(saved)
    assert cb.run.publisher.pending == 0
    cb.run.publisher.submit_removal(saved)  # (straight to the publisher: journaled for `sync`)
    started = time.monotonic()
    assert cb.run.publisher.flush(timeout=None) is False
    assert time.monotonic() - started < 5
    assert cb.lineage == record


@pytest.mark.timeout(300)
def test_ctrl_c_while_the_end_waits_for_the_worker_lets_it_finish_and_exit(tmp_path):
    """Ctrl-C in a notebook while close() waits for a worker that does not answer (stopped here): the
    queue is let go of and the worker, its stdin closed, exits once it runs again."""
    import _thread
    import threading

    from oxen_callbacks._publish.publisher import CheckpointPublisher
    from oxen_callbacks._util.locks import is_locked

    publisher = CheckpointPublisher(model_repo=tmp_path / "models", run="r1", author=AUTHOR)
    saved = tmp_path / "c1.ckpt"
    saved.write_bytes(b"weights" * 100)
    publisher.submit_checkpoint(saved, record={"run": {"name": "r1"}, "checkpoints": [], "model": {}}, step=1, epoch=0)
    assert publisher.flush(120)
    proc = publisher._proc
    os.kill(proc.pid, signal.SIGSTOP)
    threading.Timer(1.0, _thread.interrupt_main).start()
    try:
        with pytest.raises(KeyboardInterrupt):
            publisher.close(timeout=60)
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    assert not is_locked(publisher.queue.owner_lock)
    assert proc.wait(timeout=30) == 0
    assert warm_worker._take_idle() is None


@pytest.mark.timeout(400)
def test_a_waiting_worker_of_another_library_version_is_let_go(dataset_repo, tmp_path, monkeypatch):
    """The library was upgraded and reloaded in the notebook since the worker started: the next fit
    starts a worker of the version it runs, and the old one exits."""
    import oxen_callbacks

    first, second = tmp_path / "first", tmp_path / "second"
    cb = _callback(dataset_repo, first)
    _fit(first, cb)
    cb.lineage
    old = cb.run.publisher.worker_pid
    monkeypatch.setattr(oxen_callbacks, "__version__", oxen_callbacks.__version__ + ".post1")
    cb2 = _callback(dataset_repo, second)
    _fit(second, cb2)
    assert cb2.run.publisher.worker_pid != old
    _assert_all_committed(second, cb2.lineage)
    deadline = time.monotonic() + 30
    while process_running(old) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not process_running(old)
