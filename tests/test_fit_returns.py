"""What holds when fit() returns: every checkpoint committed or frozen and journaled; the final
lineage commit and MLflow logging finish afterwards (``.lineage``, interpreter exit, or ``sync``
for a killed process), and a run the trainer already logs to gets no second MLflow process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import assert_every_saved_checkpoint_committed, file_at, sync_until_nothing_pending
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import MLFlowLogger
from lightning_model import CsvData, TinyModel, make_trainer
from mlflow import MlflowClient

from oxen_callbacks import PinnedDataset, read_lineage
from oxen_callbacks._ops import sync
from oxen_callbacks._oxen import child as oxen_child
from oxen_callbacks._oxen.repo import LocalRepo
from oxen_callbacks._util.processes import ENTRY_POINTS
from oxen_callbacks.checkpoints import materialize_checkpoint
from oxen_callbacks.errors import PublishError
from oxen_callbacks.lightning import OxenLightningCallback

SCRIPT = Path(__file__).parent / "fit_script.py"


def _script(dataset_repo, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    cmd = [sys.executable, str(SCRIPT), "--dataset", str(dataset_repo.path), "--revision", dataset_repo.commits[0],
           "--model-repo", str(tmp_path / "models"), "--root", str(tmp_path / "fit"), "--epochs", "2",
           "--mlflow", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)


def _only_run(client: MlflowClient):  # type: ignore[no-untyped-def]
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return run


def _assert_every_saved_checkpoint_committed(tmp_path: Path, record: dict) -> None:
    assert_every_saved_checkpoint_committed(tmp_path / "models", record, tmp_path / "fit" / "ckpt", tmp_path / "read-cache")


@pytest.mark.timeout(600)
def test_a_script_that_ends_right_after_fit_leaves_complete_lineage(dataset_repo, tmp_path):
    """Nothing reads .lineage: the interpreter's exit waits for the final commit and for MLflow."""
    done = _script(dataset_repo, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    run = _only_run(MlflowClient())
    record = read_lineage(tmp_path / "models" / "runs" / run.data.tags["oxen.run"] / "lineage.json")
    assert record["status"] == "FINISHED" and record["run"]["mlflow_run_id"] == run.info.run_id
    _assert_every_saved_checkpoint_committed(tmp_path, record)
    assert run.info.status == "FINISHED"
    assert run.data.tags["oxen.model.commit"] == record["model"]["commit"]
    logged = read_lineage(MlflowClient().download_artifacts(run.info.run_id, "oxen/lineage.json", str(tmp_path / "dl")))
    assert logged["checkpoints"] == record["checkpoints"]
    assert sync.sync_all()["pending"] == 0  # nothing was left over


@pytest.mark.timeout(600)
@pytest.mark.parametrize("mlflow_run", ["own", "logger"])
def test_killed_the_moment_fit_returns_sync_finishes_everything(dataset_repo, tmp_path, mlflow_run):
    """SIGKILL right after fit(): no checkpoint is lost, and `sync` ends the MLflow run from the commits
    (for a run joined from MLFlowLogger too, whose operations a thread of the killed process served)."""
    done = _script(dataset_repo, tmp_path, "--after-fit", "kill", *(["--logger"] if mlflow_run == "logger" else []))
    assert done.returncode == -9, done.stderr[-3000:]
    sync_until_nothing_pending()
    client = MlflowClient()
    run = _only_run(client)
    repo_lineage = read_lineage(tmp_path / "models" / "runs" / run.data.tags["oxen.run"] / "lineage.json")
    _assert_every_saved_checkpoint_committed(tmp_path, repo_lineage)
    run = client.get_run(run.info.run_id)
    assert run.info.status != "RUNNING"
    assert run.data.tags["oxen.model.commit"] in LocalRepo(tmp_path / "models").commit_ids()
    logged = read_lineage(client.download_artifacts(run.info.run_id, "oxen/lineage.json", str(tmp_path / "dl")))
    assert [c["commit"] for c in logged["checkpoints"]] == [c["commit"] for c in repo_lineage["checkpoints"]]


def _sink_processes() -> set[int]:
    """This process's MLflow sink processes (an idle one an earlier fit of the process left included)."""
    mine = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == os.getpid() and ENTRY_POINTS["mlflow-sink"].encode() in cmdline:
            mine.add(int(pid))
    return mine


class _NoteSinkProcesses(Callback):
    """Notes, at every epoch end, the MLflow sink processes this training process has running."""

    def __init__(self) -> None:
        self.seen: list[set[int]] = []

    def on_train_epoch_end(self, *_args) -> None:  # type: ignore[no-untyped-def]
        self.seen.append(_sink_processes())


@pytest.mark.timeout(300)
def test_joining_a_logger_run_imports_mlflow_nowhere_else(dataset_repo, tmp_path):
    """With an MLFlowLogger the trainer already holds MLflow: no second process imports it again,
    and the logger's run still gets the lineage."""
    pin = PinnedDataset(dataset_repo.path, revision=dataset_repo.commits[0], paths=["train.csv", "val.csv"])
    logger = MLFlowLogger(experiment_name="shared", log_model=False, tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    before = _sink_processes()
    cb = OxenLightningCallback(dataset=pin, model_repo=tmp_path / "models")
    notes = _NoteSinkProcesses()
    make_trainer(tmp_path, [ModelCheckpoint(dirpath=tmp_path / "ckpt"), cb, notes], epochs=2,
                 logger=logger).fit(TinyModel(), datamodule=CsvData(pin))
    record = cb.lineage
    assert [seen - before for seen in notes.seen] == [set(), set()]  # none started for this fit
    run = MlflowClient().get_run(logger.run_id)
    assert record["run"]["mlflow_run_id"] == logger.run_id
    assert run.data.tags["oxen.model.commit"] == record["model"]["commit"]
    assert run.data.tags["oxen.dataset.commit"] == dataset_repo.commits[0]
    logged = read_lineage(MlflowClient().download_artifacts(logger.run_id, "oxen/lineage.json", str(tmp_path / "dl")))
    assert logged["model"]["commit"] == record["model"]["commit"]
    assert record["model"]["commit"] in LocalRepo(tmp_path / "models").commit_ids()


def _fit_into_a_logger_run(dataset_repo, tmp_path: Path) -> tuple[OxenLightningCallback, MLFlowLogger]:  # type: ignore[no-untyped-def]
    pin = PinnedDataset(dataset_repo.path, revision=dataset_repo.commits[0], paths=["train.csv", "val.csv"])
    logger = MLFlowLogger(experiment_name="shared", log_model=False, tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    cb = OxenLightningCallback(dataset=pin, model_repo=tmp_path / "models")
    make_trainer(tmp_path, [ModelCheckpoint(dirpath=tmp_path / "ckpt"), cb], epochs=2, logger=logger).fit(
        TinyModel(), datamodule=CsvData(pin))
    return cb, logger


@pytest.mark.timeout(300)
def test_when_the_lineage_answers_the_repository_is_free_though_the_worker_freed_it_beside_mlflow(
        dataset_repo, tmp_path, monkeypatch):
    """The end closes the publisher (the worker frees the repository, the run's name is released) while the
    MLflow logging goes on; the lineage answers once both are done: the user's own `oxen` commands and
    another fit of the run's name work at once. The worker is made slow to let go."""
    from oxen_callbacks._publish.claim import run_in_use
    from oxen_callbacks._publish.publisher import CheckpointPublisher
    from oxen_callbacks._publish.queue import repo_lock_path
    from oxen_callbacks._util.locks import FileLock

    close = CheckpointPublisher.close

    def slow_to_let_go(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        time.sleep(1.5)
        return close(self, *args, **kwargs)

    monkeypatch.setattr(CheckpointPublisher, "close", slow_to_let_go)
    cb, logger = _fit_into_a_logger_run(dataset_repo, tmp_path)
    record = cb.lineage
    assert not run_in_use(tmp_path / "models", record["run"]["name"])
    with FileLock(repo_lock_path(tmp_path / "models"), timeout=0):
        pass  # (held by the commit process until the worker frees the repository)
    logged = read_lineage(MlflowClient().download_artifacts(logger.run_id, "oxen/lineage.json", str(tmp_path / "dl")))
    assert logged == record and record["model"]["commit"] in LocalRepo(tmp_path / "models").commit_ids()


@pytest.mark.timeout(300)
def test_an_error_closing_the_publisher_is_raised_after_the_lineage_reached_mlflow(dataset_repo, tmp_path, monkeypatch):
    """A publishing error that comes as the publisher closes (after the final commit) reaches ``wait()``;
    the MLflow run still gets the committed lineage first."""
    from oxen_callbacks._publish.publisher import CheckpointPublisher

    close = CheckpointPublisher.close

    def failing(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        close(self, *args, **kwargs)
        raise PublishError("the worker said: disk full")

    monkeypatch.setattr(CheckpointPublisher, "close", failing)
    cb, logger = _fit_into_a_logger_run(dataset_repo, tmp_path)
    with pytest.raises(PublishError, match="disk full"):
        cb.run.wait()
    logged = read_lineage(MlflowClient().download_artifacts(logger.run_id, "oxen/lineage.json", str(tmp_path / "dl")))
    assert logged["model"]["commit"] in LocalRepo(tmp_path / "models").commit_ids()
    assert MlflowClient().get_run(logger.run_id).data.tags["oxen.lineage.status"] == "FINISHED"


@pytest.mark.timeout(300)
def test_fit_does_not_wait_for_a_tracking_server_that_never_answers(dataset_repo, tmp_path, monkeypatch):
    """A tracking server that accepts and never answers: fit() returns all the same (were it waiting,
    mlflow_timeout=600 would outlast this test's timeout) with every checkpoint committed; the
    MLflow side stays journaled for `sync`."""
    mute = socket.create_server(("127.0.0.1", 0))
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    pin = PinnedDataset(dataset_repo.path, revision=dataset_repo.commits[0], paths=["train.csv", "val.csv"])
    cb = OxenLightningCallback(dataset=pin, model_repo=tmp_path / "models", mlflow_timeout=600,
                               mlflow_tracking_uri=f"http://127.0.0.1:{mute.getsockname()[1]}")
    try:
        make_trainer(tmp_path, [ModelCheckpoint(dirpath=tmp_path / "fit" / "ckpt", every_n_train_steps=2,
                                                save_top_k=-1), cb], epochs=2).fit(TinyModel(), datamodule=CsvData(pin))
        assert cb.run.sink.run_id is None  # MLflow never answered, yet fit() returned
        # resuming right away reads the final lineage, and does not wait for MLflow either
        last = materialize_checkpoint(tmp_path / "models", run=cb.run.run_name)
        assert read_lineage(tmp_path / "models" / "runs" / cb.run.run_name / "lineage.json")["status"] == "FINISHED"
        assert last.path.read_bytes() == (tmp_path / "fit" / "ckpt" / Path(last.repo_path).name).read_bytes()
    finally:
        mute.close()  # refused from now on: the sink gives up after its retries
    record = cb.lineage
    assert record["status"] == "FINISHED" and record["run"]["mlflow_run_id"] is None
    _assert_every_saved_checkpoint_committed(tmp_path, record)
    assert record == read_lineage(tmp_path / "models" / "runs" / cb.run.run_name / "lineage.json")
    assert sync.sync_all()["pending"] > 0  # the MLflow operations, kept for when the server is back


class CtrlCAtStep(Callback):
    """A Ctrl-C at step ``step`` (Lightning turns it into the same KeyboardInterrupt handling)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:  # type: ignore[no-untyped-def]
        if trainer.global_step == self.step:
            raise KeyboardInterrupt


@pytest.mark.timeout(600)
def test_a_fit_stopped_by_ctrl_c_returns_at_once_while_mlflow_never_answers(dataset_repo, tmp_path, monkeypatch):
    """Ctrl-C during a fit whose tracking server accepts and never answers: fit() used to wait up to
    mlflow_timeout (30 s here) for MLflow before it let the user go (found by a review). Now it ends at
    once; the run's end (KILLED, its checkpoints committed) goes on beside it, MLflow's part journaled."""
    mute = socket.create_server(("127.0.0.1", 0))
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")  # each request tried for 3 x 10 s, 3 s apart:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")  # longer than mlflow_timeout
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    pin = PinnedDataset(dataset_repo.path, revision=dataset_repo.commits[0], paths=["train.csv", "val.csv"])
    cb = OxenLightningCallback(dataset=pin, model_repo=tmp_path / "models", mlflow_timeout=30,
                               mlflow_tracking_uri=f"http://127.0.0.1:{mute.getsockname()[1]}")
    trainer = make_trainer(tmp_path, [ModelCheckpoint(dirpath=tmp_path / "fit" / "ckpt", every_n_train_steps=2,
                                                      save_top_k=-1), cb, CtrlCAtStep(5)], epochs=2)
    try:
        started = time.monotonic()
        with pytest.raises((KeyboardInterrupt, SystemExit)):
            trainer.fit(TinyModel(), datamodule=CsvData(pin))
            raise AssertionError("fit() went on after the Ctrl-C")  # (an older Lightning returns instead)
        assert time.monotonic() - started < 15, "fit() waited for MLflow after the Ctrl-C"
        assert cb.run.record["status"] == "KILLED"
    finally:
        mute.close()  # refused from now on: the end gives up on MLflow after its retries
    record = cb.lineage
    assert record["status"] == "KILLED"
    assert record == read_lineage(tmp_path / "models" / "runs" / cb.run.run_name / "lineage.json")
    _assert_every_saved_checkpoint_committed(tmp_path, record)


class CtrlCOnceACommitFailed(Callback):
    """A Ctrl-C once the commit worker's error has reached the trainer."""

    def __init__(self, oxen_cb: OxenLightningCallback) -> None:
        self.oxen_cb, self.pressed_at = oxen_cb, None

    def on_train_batch_end(self, trainer, *args) -> None:  # type: ignore[no-untyped-def]
        if self.oxen_cb.run.publisher.failed:  # (before the next save reports the error itself)
            self.pressed_at = time.monotonic()
            raise KeyboardInterrupt
        time.sleep(0.2)  # slow steps: the error comes in the epoch after the first save


@pytest.mark.timeout(600)
def test_a_ctrl_c_after_a_commit_error_returns_at_once_while_mlflow_never_answers(dataset_repo, tmp_path, monkeypatch):
    """The same, when a commit had failed before (a typo in the model repository's HEAD): that path
    ended the run synchronously, waiting for MLflow (found by a review)."""
    pin = PinnedDataset(dataset_repo.path, revision=dataset_repo.commits[0], paths=["train.csv", "val.csv"])
    first = OxenLightningCallback(dataset=pin, model_repo=tmp_path / "models", mlflow=False)
    make_trainer(tmp_path / "first", [ModelCheckpoint(dirpath=tmp_path / "first" / "ckpt"), first], epochs=1).fit(
        TinyModel(), datamodule=CsvData(pin))
    first.lineage
    (tmp_path / "models" / ".oxen" / "HEAD").write_text("mian")
    mute = socket.create_server(("127.0.0.1", 0))
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    cb = OxenLightningCallback(dataset=pin, model_repo=tmp_path / "models", mlflow_timeout=30,
                               mlflow_tracking_uri=f"http://127.0.0.1:{mute.getsockname()[1]}")
    ctrl_c = CtrlCOnceACommitFailed(cb)
    trainer = make_trainer(tmp_path, [ModelCheckpoint(dirpath=tmp_path / "fit" / "ckpt", save_top_k=-1), cb, ctrl_c],
                           epochs=50)
    try:
        with pytest.raises((KeyboardInterrupt, SystemExit)):
            trainer.fit(TinyModel(), datamodule=CsvData(pin))
            raise AssertionError("fit() went on after the Ctrl-C")
        assert time.monotonic() - ctrl_c.pressed_at < 15, "fit() waited for MLflow after the Ctrl-C"
        assert cb.run.record["status"] == "KILLED"
    finally:
        mute.close()
    with pytest.raises(PublishError, match="names branch 'mian'"):
        cb.run.wait()  # (the commit error, kept for whoever waits)


@pytest.mark.timeout(600)
def test_killed_the_moment_fit_returns_the_run_still_ends_finished(dataset_repo, tmp_path):
    """fit() returned, so training completed: a kill before the MLflow run even exists (its own run,
    the sink still starting) must not turn that into KILLED: the final lineage is journaled by then."""
    done = _script(dataset_repo, tmp_path, "--after-fit", "kill")
    assert done.returncode == -9, done.stderr[-3000:]
    sync_until_nothing_pending()
    run = _only_run(MlflowClient())
    repo_lineage = read_lineage(tmp_path / "models" / "runs" / run.data.tags["oxen.run"] / "lineage.json")
    assert repo_lineage["status"] == "FINISHED"
    assert run.data.tags["oxen.lineage.status"] == "FINISHED" and run.info.status == "FINISHED"
    # the run was created after training ended: the model repository's record names it too
    assert repo_lineage["run"]["mlflow_run_id"] == run.info.run_id
    head = oxen_child.branches(tmp_path / "models")["main"]
    committed = read_lineage(file_at(tmp_path / "models", head, f"runs/{run.data.tags['oxen.run']}/lineage.json",
                                     tmp_path / "read-cache"))
    assert committed["run"]["mlflow_run_id"] == run.info.run_id and committed["model"] == repo_lineage["model"]


def test_waiting_for_background_work_is_bounded_by_one_timeout_in_all(tmp_path):
    """Several fits still finishing in one repository (a notebook's sweep): a reader's ``timeout`` bounds
    its whole wait (a pre-empted job has only KillWait), not each fit's in turn."""
    import threading
    import time

    from oxen_callbacks._util import background

    release = threading.Event()
    threads = [threading.Thread(target=release.wait, daemon=True) for _ in range(3)]
    for thread in threads:
        thread.start()
        background.track(tmp_path, thread, committed=threading.Event(), describe=lambda: "a fit", run="r")
    try:
        started = time.monotonic()
        background.wait_for(tmp_path, timeout=1.0)
        background.wait_for(tmp_path, timeout=1.0, run="r")
        assert time.monotonic() - started < 2.9  # one second each, not three
    finally:
        release.set()


def test_once_training_is_over_the_sink_thread_applies_operations_as_they_come(tmp_path):
    """While training runs, a sink thread of the training process gathers operations for a while
    (their MLflow calls hold the trainer's GIL); once the trainer says training is over (at fit end,
    with the final lineage), the run's remaining logging does not wait out that gathering."""
    import threading

    from oxen_callbacks._mlflow.journal import END_LINE, TRAINING_OVER_LINE, MlflowJournal
    from oxen_callbacks._mlflow.sink_process import serve
    from oxen_callbacks._mlflow.sink_thread import _QueueLines

    class WakeUpsOnly(_QueueLines):
        """serve() also looks at the journal each second without a wake-up (a lost one) and applies what it
        finds at once: a look that fell between the test's put and its wake-up (both 1 s after the start)
        applied the operation ungathered. Here it waits for the wake-ups alone."""

        def next(self, timeout: float | None) -> str | None:
            return super().next(None)

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("e")).info.run_id
    journal = MlflowJournal.create(tmp_path / "cache", {"tracking_uri": uri, "run_id": run_id})
    lines = WakeUpsOnly()
    ended: list[str] = []
    thread = threading.Thread(target=lambda: ended.append(serve(journal, lines, uri, linger_s=600)), daemon=True)
    thread.start()
    time.sleep(1.0)  # its first look at the empty journal is done: it waits for a wake-up

    def tags() -> dict[str, str]:
        return client.get_run(run_id).data.tags

    journal.put(1, {"op": "set_tags", "tags": {"oxen.model.commit": "c1"}})
    lines.write(b"\n")
    time.sleep(1.0)
    assert "oxen.model.commit" not in tags()  # gathered while training may still run
    lines.write(TRAINING_OVER_LINE.encode())
    deadline = time.monotonic() + 60
    while "oxen.model.commit" not in tags() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert tags()["oxen.model.commit"] == "c1"  # long before the 600 s of gathering
    journal.put(2, {"op": "set_tags", "tags": {"oxen.lineage.status": "FINISHED"}})
    lines.write(b"\n")  # after training: applied at once, no gathering
    while "oxen.lineage.status" not in tags() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert tags()["oxen.lineage.status"] == "FINISHED"
    lines.write(END_LINE.encode())
    thread.join(60)
    assert ended == ["end"] and journal.is_empty()


class Shrinking(Callback):
    """Logs ``shrink``, growing each epoch: monitored with ``mode="min"``, the first epoch is the best."""

    def on_validation_epoch_end(self, trainer, pl_module) -> None:  # type: ignore[no-untyped-def]
        pl_module.log("shrink", float(trainer.current_epoch))


class PauseWorkerAfterLastCommit(Callback):
    """At the end of training, every checkpoint committed: pause the worker (SIGSTOP) for ``seconds``,
    a machine too busy for the final lineage commit to come within ``drain_timeout``."""

    def __init__(self, oxen_cb: OxenLightningCallback, seconds: float) -> None:
        self.oxen_cb, self.seconds = oxen_cb, seconds

    def on_train_end(self, trainer, pl_module) -> None:  # type: ignore[no-untyped-def]
        import signal
        import threading

        publisher = self.oxen_cb.run.publisher
        assert publisher.flush(60)
        os.kill(publisher.worker_pid, signal.SIGSTOP)
        threading.Timer(self.seconds, os.kill, (publisher.worker_pid, signal.SIGCONT)).start()


@pytest.mark.timeout(300)
def test_a_final_commit_missing_drain_timeout_leaves_a_record_that_says_so_and_names_the_best(dataset_repo, tmp_path):
    """`callback.lineage` when the final lineage commit does not come within `drain_timeout`: it used to
    name the last checkpoint the model, FINISHED, while the committed record (later) named the best.
    Now it names the trainer's best and says the final commit is pending; the repository's record,
    once committed, agrees on the model."""
    pin = PinnedDataset(dataset_repo.path, revision=dataset_repo.commits[0], paths=["train.csv", "val.csv"])
    cb = OxenLightningCallback(dataset=pin, model_repo=tmp_path / "models", mlflow=False, drain_timeout=2)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "fit" / "ckpt", monitor="shrink", mode="min", save_top_k=-1)
    make_trainer(tmp_path / "fit", [ckpt, Shrinking(), cb, PauseWorkerAfterLastCommit(cb, 15)], epochs=3).fit(
        TinyModel(), datamodule=CsvData(pin))
    held = cb.lineage
    assert held["final_commit"] == "pending" and len(held["checkpoints"]) == 3
    first = held["checkpoints"][0]
    assert held["model"]["path"] == first["path"] and held["model"]["commit"] == first["commit"]
    assert os.path.basename(first["path"]) == os.path.basename(ckpt.best_model_path)

    deadline = time.monotonic() + 120  # the worker goes on once continued: the final record is committed
    path = tmp_path / "models" / "runs" / held["run"]["name"] / "lineage.json"
    while (committed := read_lineage(path))["status"] != "FINISHED" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert committed["status"] == "FINISHED" and "final_commit" not in committed
    assert (committed["model"]["path"], committed["model"]["commit"]) == (first["path"], first["commit"])
