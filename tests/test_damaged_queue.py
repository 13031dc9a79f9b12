"""A commit queue file damaged while training runs (a full disk, a user's editor, a bad copy): a done/ result
or a pending job that cannot be read never kills the commit worker nor the training process's reader, and
never stops training. It is warned about once, by name, and left where it is; `oxen-callbacks sync` reports it
and finishes everything else."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import children, file_at, stop_processes, wait_until_released
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning_model import CsvData, TinyModel, make_trainer

from oxen_callbacks import PinnedDataset, cli
from oxen_callbacks._oxen.repo import LocalRepo
from oxen_callbacks._publish.queue import JobQueue, all_queues
from oxen_callbacks._util.locks import FileLock
from oxen_callbacks.lightning import OxenLightningCallback

SCRIPT = Path(__file__).parent / "fit_script.py"


def _cut_short(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _retype_ok(path: Path) -> None:
    path.write_text(path.read_text().replace('"ok": true', '"ok": "yes"'))


def _copy_of_the_next(path: Path) -> None:
    path.write_bytes((path.parent / "00000002.json").read_bytes())


DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {  # what happens to done/00000001.json -> what is said
    "cut short": (_cut_short, "done/00000001.json is not JSON"),
    "not JSON": (lambda p: p.write_bytes(b"\xff\xfe\x00"), "done/00000001.json is not JSON"),
    "a list": (lambda p: p.write_text("[]"), "done/00000001.json holds a JSON array"),
    "ok a string": (_retype_ok, "done/00000001.json holds ok as a string"),
    "another job's": (_copy_of_the_next, "done/00000001.json holds the result of job 2"),
}


def _fit(dataset_repo, tmp_path: Path, extra: Callable[[OxenLightningCallback], Callback]):  # type: ignore[no-untyped-def]
    """A real fit (a save every 2 steps, 12 steps) with ``extra(oxen_callback)`` among its callbacks;
    returns the Oxen callback and that one."""
    pin = PinnedDataset(dataset_repo.path, revision=dataset_repo.commits[0], paths=["train.csv", "val.csv"])
    cb = OxenLightningCallback(dataset=pin, model_repo=tmp_path / "models", mlflow=False)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    other = extra(cb)
    make_trainer(tmp_path, [ckpt, cb, other], epochs=2).fit(TinyModel(), datamodule=CsvData(pin))
    return cb, other


def _assert_committed(models: Path, record: dict, ckpt_dir: Path, cache: Path, *, left_out: str | None = None) -> None:
    """Every file the trainer saved (but ``left_out``) is, byte for byte, in the commit the record names for it."""
    saved = {p.name: p.read_bytes() for p in ckpt_dir.iterdir() if p.name != left_out}
    named = {Path(e["path"]).name: file_at(models, e["commit"], e["path"], cache).read_bytes()
             for e in record["checkpoints"]}
    assert set(named) == set(saved), (sorted(named), sorted(saved))
    assert all(named[name] == data for name, data in saved.items())
    assert {e["commit"] for e in record["checkpoints"]} <= set(LocalRepo(models).commit_ids())


def _warnings_naming(caplog: pytest.LogCaptureFixture, name: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and name in r.getMessage()]


def _sync(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    capsys.readouterr()
    code = cli.main(["sync", *args])
    return code, capsys.readouterr().out


def _assert_sync_reports(capsys: pytest.CaptureFixture[str], path: Path, said: str) -> None:
    """`sync` names the damaged file at ``path`` (text and --json, exit 1) and leaves nothing else pending."""
    code, out = _sync(capsys)
    assert code == 1 and str(path) in out and said in out and "Skipped and left as it is" in out, out
    code, out = _sync(capsys, "--json")
    report = json.loads(out)
    assert code == 1 and report["damaged"] == 1 and report["pending"] == 0, report
    [repo] = report["model_repos"]
    [entry] = repo["damaged"]
    assert said in entry["error"] and entry["path"] == str(path)


# -- a done/ result damaged while training runs -------------------------------------------------------

class DamageResultThenKillWorker(Callback):
    """Once the first two checkpoints are committed: damage the first one's result, then kill the worker
    (SIGKILL); its successor reads every result at its start."""

    def __init__(self, oxen_cb: OxenLightningCallback, damage: Callable[[Path], None]) -> None:
        self.oxen_cb, self.damage, self.path = oxen_cb, damage, None

    def on_train_batch_end(self, trainer, *args) -> None:  # type: ignore[no-untyped-def]
        publisher = self.oxen_cb.run.publisher
        if trainer.global_step == 5 and self.path is None:
            assert publisher.flush(60)
            self.path = publisher.queue.done_dir / "00000001.json"
            self.damage(self.path)
            os.kill(publisher.worker_pid, signal.SIGKILL)


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_result_never_stops_a_restarted_worker(dataset_repo, tmp_path, caplog, capsys, damage):
    harm, said = DAMAGE[damage]
    with caplog.at_level(logging.WARNING, logger="oxen_callbacks"):
        cb, damager = _fit(dataset_repo, tmp_path, lambda oxen_cb: DamageResultThenKillWorker(oxen_cb, harm))
        record = cb.run.wait()
    assert damager.path is not None
    assert cb.run.publisher.stalled is None, cb.run.publisher.stalled
    assert record["status"] == "FINISHED"
    _assert_committed(tmp_path / "models", record, tmp_path / "ckpt", tmp_path / "read-cache")
    [warning] = _warnings_naming(caplog, "done/00000001.json")  # once, by name
    assert said in warning and str(damager.path) in warning
    _assert_sync_reports(capsys, damager.path, said)
    assert damager.path.exists(), "the damaged result was not left in place"


class DamageResultThenPauseWorker(Callback):
    """At the end of training, every checkpoint committed: damage the first result and pause the worker
    (SIGSTOP) for 3 s, a busy machine: the end of the run waits for its final commit meanwhile, reading the
    results on disk."""

    def __init__(self, oxen_cb: OxenLightningCallback) -> None:
        self.oxen_cb, self.path = oxen_cb, None

    def on_train_end(self, trainer, pl_module) -> None:  # type: ignore[no-untyped-def]
        publisher = self.oxen_cb.run.publisher
        assert publisher.flush(60)
        self.path = publisher.queue.done_dir / "00000001.json"
        self.path.write_text("[]")
        pid = publisher.worker_pid
        os.kill(pid, signal.SIGSTOP)
        threading.Timer(3.0, os.kill, (pid, signal.SIGCONT)).start()


def test_a_damaged_result_never_stops_the_training_side_reader(dataset_repo, tmp_path, caplog, capsys):
    with caplog.at_level(logging.WARNING, logger="oxen_callbacks"):
        cb, damager = _fit(dataset_repo, tmp_path, DamageResultThenPauseWorker)
        record = cb.run.wait()  # raised nothing
    assert record["status"] == "FINISHED"
    _assert_committed(tmp_path / "models", record, tmp_path / "ckpt", tmp_path / "read-cache")
    [warning] = _warnings_naming(caplog, "done/00000001.json")
    assert "holds a JSON array" in warning
    _assert_sync_reports(capsys, damager.path, "done/00000001.json holds a JSON array")


# -- a pending job damaged before the worker read it --------------------------------------------------

class DamageNextJob(Callback):
    """Pause the worker (SIGSTOP), let the next save journal its job, cut that job file short, go on."""

    def __init__(self, oxen_cb: OxenLightningCallback) -> None:
        self.oxen_cb, self.paused, self.path, self.staged = oxen_cb, None, None, None

    def on_train_batch_end(self, trainer, *args) -> None:  # type: ignore[no-untyped-def]
        publisher = self.oxen_cb.run.publisher
        if trainer.global_step == 3 and self.paused is None:
            assert publisher.flush(60)
            self.paused = publisher.worker_pid
            os.kill(self.paused, signal.SIGSTOP)
        elif trainer.global_step == 5 and self.path is None:
            [self.path] = publisher.queue.jobs_dir.glob("0*.json")  # the save at step 4
            self.staged = next(publisher.queue.staging_for(int(self.path.stem)).iterdir())
            _cut_short(self.path)
            os.kill(self.paused, signal.SIGCONT)


def test_a_damaged_pending_job_is_skipped_named_and_the_run_goes_on(dataset_repo, tmp_path, caplog, capsys):
    with caplog.at_level(logging.WARNING, logger="oxen_callbacks"):
        cb, damager = _fit(dataset_repo, tmp_path, DamageNextJob)
        record = cb.run.wait()
    assert cb.run.publisher.stalled is None, cb.run.publisher.stalled
    assert record["status"] == "FINISHED"
    name = f"jobs/{damager.path.name}"
    [warning] = _warnings_naming(caplog, name)
    assert "is not JSON" in warning and str(damager.staged.parent) in warning
    # every other checkpoint is committed; the damaged job's bytes are kept for whoever repairs it
    _assert_committed(tmp_path / "models", record, tmp_path / "ckpt", tmp_path / "read-cache",
                      left_out=damager.staged.name)
    assert damager.staged.read_bytes() == (tmp_path / "ckpt" / damager.staged.name).read_bytes()
    _assert_sync_reports(capsys, damager.path.parent.parent, f"{name} is not JSON")  # the queue, left as it is


# -- `sync` after a killed run whose queue holds a damaged result ---------------------------------------

def _workers_under(pid: int) -> list[int]:
    """The commit worker ``pid`` started (a warm one: its command line names no repository) and its commit
    processes (forks of it)."""
    found = []
    for child in children(pid):
        try:
            cmd = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        if b"oxen_callbacks._publish.worker" in cmd:
            found += [child, *_workers_under(child)]
    return found


def _wait_for(what: Callable[[], object], timeout: float = 120.0) -> object:
    deadline = time.monotonic() + timeout
    while not (found := what()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
    return found


@pytest.mark.timeout(600)
def test_sync_finishes_a_killed_runs_queue_whose_result_is_damaged(dataset_repo, tmp_path, capsys):
    """The machine dies (trainer and commit worker killed) with saves queued, and a result of the queue is
    damaged: `sync` commits every queued checkpoint into the run's record, and names the damaged result."""
    models = tmp_path / "models"
    cmd = [sys.executable, str(SCRIPT), "--dataset", str(dataset_repo.path), "--revision", dataset_repo.commits[0],
           "--model-repo", str(models), "--root", str(tmp_path / "fit"), "--run-name", "r1", "--epochs", "3",
           "--every-n-steps", "1", "--step-sleep", "0.3"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        queue = _wait_for(lambda: next((q for q in all_queues(models) if (q.done_dir / "00000002.json").exists()), None))
        assert isinstance(queue, JobQueue)
        workers = stop_processes(lambda: _workers_under(proc.pid))  # commits stop; saves go on being journaled
        assert workers
        _wait_for(lambda: len(list(queue.jobs_dir.glob("0*.json"))) >= 2)
        proc.send_signal(signal.SIGKILL)
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert not wait_until_released(models)
    queued = {}  # job -> the frozen bytes it commits
    for job in queue.pending():
        staged = queue.staging_for(job.seq) / job.payload["staged_name"]
        if job.kind == "checkpoint" and staged.exists():
            queued[f"{queue.folder.name}/{job.name}"] = staged.read_bytes()
    assert queued
    damaged = queue.done_dir / "00000001.json"
    _cut_short(damaged)

    _assert_sync_reports(capsys, damaged, "done/00000001.json is not JSON")
    assert damaged.exists()
    record = json.loads((models / "runs" / "r1" / "lineage.json").read_text())
    entries = {e["job"]: e for e in record["checkpoints"]}
    for job, data in queued.items():
        assert file_at(models, entries[job]["commit"], entries[job]["path"], tmp_path / "read-cache").read_bytes() == data
    assert f"{queue.folder.name}/00000001" in entries  # the damaged result's checkpoint was committed before


# -- an orphan queue with a damaged job, found by the next worker --------------------------------------

def test_a_worker_leaves_a_damaged_orphan_queue_and_adopts_the_others(tmp_path, monkeypatch):
    """Training processes that died left two queues: one with a job file cut short, one healthy. The next
    worker on the repository (here a real publisher's) leaves the damaged one as it is, for `sync` to report,
    and still commits the healthy one's checkpoint."""
    from oxen_callbacks._oxen.identity import resolve_author, worker_environment
    from oxen_callbacks._publish.opening import open_model_repo
    from oxen_callbacks._publish.publisher import CheckpointPublisher
    from oxen_callbacks.lineage import new_record

    for key, value in worker_environment(resolve_author(("T", "t@example.com")), tmp_path / "cache").items():
        monkeypatch.setenv(key, value)
    models = tmp_path / "models"
    open_model_repo(models, tmp_path / "cache")

    def orphan(run: str) -> JobQueue:
        base = new_record(dataset=None, model_repo=str(models), framework={"name": "x", "version": "1"},
                          run={"name": run})
        base.update(status="RUNNING", started_at="2026-12-04T05:00:00+0000", fit_id="f1")
        queue = JobQueue.create(models, run, {"pid": 1})
        for seq in (1, 2):
            queue.staging_for(seq).mkdir(parents=True)
            (queue.staging_for(seq) / f"c{seq}.ckpt").write_bytes(run.encode() * seq)
            queue.put(seq, "checkpoint", {"run": run, "dest": f"runs/{run}/checkpoints/c{seq}.ckpt",
                                          "staged_name": f"c{seq}.ckpt", "step": seq, "epoch": 0, "metrics": {},
                                          "message": f"{run} c{seq}", "record": base})
        return queue

    damaged, healthy = orphan("a"), orphan("b")  # (adopted in this order)
    _cut_short(damaged.jobs_dir / "00000002.json")
    before = {str(p.relative_to(damaged.folder)): p.read_bytes() for p in damaged.folder.rglob("*") if p.is_file()}
    with CheckpointPublisher(model_repo=models, run="live", cache_dir=tmp_path / "cache") as publisher:
        deadline = time.monotonic() + 120
        while healthy.pending() and time.monotonic() < deadline:
            time.sleep(0.1)
    assert not healthy.pending(), "the healthy orphan queue was not adopted"
    record = json.loads((models / "runs" / "b" / "lineage.json").read_text())
    for entry in record["checkpoints"]:
        data = file_at(models, entry["commit"], entry["path"], tmp_path / "read-cache").read_bytes()
        assert data == b"b" * int(entry["path"][-6])
    assert len(record["checkpoints"]) == 2
    after = {str(p.relative_to(damaged.folder)): p.read_bytes() for p in damaged.folder.rglob("*") if p.is_file()}
    assert after == before, "the damaged orphan queue was changed"
    assert "00000002.json is not JSON" in (damaged.damage() or "") and publisher.stalled is None


def test_an_adopted_orphan_queue_is_committed_as_its_own_author(tmp_path, monkeypatch, caplog):
    """A training process that died left its queue; the next worker on the repository, committing as
    another author, adopts it: the orphan's checkpoints carry the author the dead process committed as
    (the queue says which Oxen identity), the live run's its own. A queue whose identity is gone (a
    job's scratch folder) is left for `sync`, which commits it as the identity of its user."""
    from oxen_callbacks._ops import sync
    from oxen_callbacks._oxen import child as oxen_child
    from oxen_callbacks._oxen.identity import resolve_author, worker_environment
    from oxen_callbacks._publish.opening import open_model_repo
    from oxen_callbacks._publish.publisher import CheckpointPublisher
    from oxen_callbacks.lineage import new_record

    models = tmp_path / "models"
    open_model_repo(models, tmp_path / "cache")
    orphan_identity = worker_environment(resolve_author(("Orphan Author", "orphan@example.com")), tmp_path / "cache")
    gone_identity = {"OXEN_CONFIG_DIR": str(tmp_path / "identity-removed-since")}

    def orphan(run: str, env: dict[str, str]) -> JobQueue:
        base = new_record(dataset=None, model_repo=str(models), framework={"name": "x", "version": "1"},
                          run={"name": run})
        base.update(status="RUNNING", started_at="2026-12-04T05:00:00+0000", fit_id=f"fit-{run}")
        queue = JobQueue.create(models, run, {"pid": 1, "env": env})
        queue.staging_for(1).mkdir(parents=True)
        (queue.staging_for(1) / "c.ckpt").write_bytes(run.encode())
        queue.put(1, "checkpoint", {"run": run, "dest": f"runs/{run}/checkpoints/c.ckpt", "staged_name": "c.ckpt",
                                    "step": 1, "epoch": 0, "metrics": {}, "message": f"{run} c", "record": base})
        return queue

    adopted, left = orphan("dead", orphan_identity), orphan("gone", gone_identity)
    with CheckpointPublisher(model_repo=models, run="live", cache_dir=tmp_path / "cache",
                             author=("Live Author", "live@example.com")) as publisher:
        deadline = time.monotonic() + 120
        while adopted.pending() and time.monotonic() < deadline:
            time.sleep(0.1)
        (tmp_path / "live.ckpt").write_bytes(b"live")
        publisher.submit_checkpoint(tmp_path / "live.ckpt", step=2, epoch=0, record=new_record(
            dataset=None, model_repo=str(models), framework={"name": "x", "version": "1"}, run={"name": "live"}))
        assert publisher.flush(timeout=120)
    assert not adopted.pending(), "the orphan queue was not adopted"
    authors = {c["message"]: c["author"] for c in oxen_child.log(models)}
    assert [a for m, a in authors.items() if "dead c" in m] == ["Orphan Author"]
    assert [a for m, a in authors.items() if "live" in m and "dead" not in m] == ["Live Author"]
    assert left.pending() and not any("gone c" in m for m in authors)  # (not committed as anybody else)
    assert "the Oxen identity it commits as" in publisher.queue.log_path.read_text()  # (and not tried)

    # `sync`, run by a user with an Oxen identity of their own, commits it as that one, and says so
    users = tmp_path / "users-oxen-config"
    users.mkdir()
    (users / "user_config.toml").write_text('name = "Sync User"\nemail = "sync@example.com"\n')
    monkeypatch.setenv("OXEN_CONFIG_DIR", str(users))
    with caplog.at_level(logging.WARNING):
        assert sync.sync_model_repo(models, push_timeout=10)["committed"] == 1
    assert not left.pending()
    assert [c["author"] for c in oxen_child.log(models) if "gone c" in c["message"]] == ["Sync User"]
    assert "identity-removed-since) is gone: its checkpoints are committed as this environment's" in caplog.text


# -- finished queues are not kept forever -------------------------------------------------------------

def test_finished_queues_older_than_a_day_go_at_the_next_fit_or_sync_and_no_other_does(dataset_repo, tmp_path, capsys):
    """A model repository trained into every day, by a user who never runs `sync`: the finished queues of
    earlier fits go a day after their last job, at the next fit's start (its worker) or at `sync`. A queue
    whose last job is younger (a fit of two days that just ended), one still held by a live process, or one
    holding a damaged result stays, and every run's lineage stays whole."""
    models = tmp_path / "models"
    pin = PinnedDataset(dataset_repo.path, revision=dataset_repo.commits[0], paths=["train.csv", "val.csv"])

    def fit(root: Path) -> OxenLightningCallback:
        cb = OxenLightningCallback(dataset=pin, model_repo=models, mlflow=False)
        ckpt = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=2, save_top_k=-1)
        make_trainer(root, [ckpt, cb], epochs=1).fit(TinyModel(), datamodule=CsvData(pin))
        assert cb.lineage["status"] == "FINISHED"
        return cb

    first, second = fit(tmp_path / "a"), fit(tmp_path / "b")
    records = {cb.run.run_name: cb.lineage for cb in (first, second)}
    by_run = {q.meta()["run"]: q for q in all_queues(models)}
    old, young = by_run[first.run.run_name], by_run[second.run.run_name]
    damaged = JobQueue(models / ".oxen" / "oxen-callbacks" / "queues" / f"{first.run.run_name}-0badc0de")
    shutil.copytree(old.folder, damaged.folder)
    _cut_short(damaged.done_dir / "00000001.json")
    held = JobQueue(damaged.folder.with_name(f"{first.run.run_name}-0000beef"))
    shutil.copytree(old.folder, held.folder)
    long_run = JobQueue(damaged.folder.with_name(f"{first.run.run_name}-00000123"))
    shutil.copytree(old.folder, long_run.folder)

    def two_days_old(queue: JobQueue, *, only_made: bool = False) -> None:
        then = time.time() - 2 * 24 * 3600
        for path in [queue.folder / "meta.json"] + ([] if only_made else [queue.jobs_dir, queue.done_dir, queue.log_path]):
            os.utime(path, (then, then))

    for queue in (old, damaged, held):
        two_days_old(queue)
    two_days_old(long_run, only_made=True)  # made two days ago, its last job done a minute ago: a long fit's
    owner = FileLock(held.owner_lock)
    owner.acquire()  # its training process still runs (a fit of two days)
    try:
        fit(tmp_path / "c")
        left = {q.folder for q in all_queues(models)}
        assert old.folder not in left and {young.folder, damaged.folder, held.folder, long_run.folder} <= left
        assert not [p.name for p in old.folder.parent.iterdir() if p.name.startswith(".")]  # nothing half-removed

        two_days_old(young)
        code, out = _sync(capsys)
        assert code == 1 and str(damaged.done_dir / "00000001.json") in out, out  # reported, not removed
        left = {q.folder for q in all_queues(models)}
        assert young.folder not in left and {damaged.folder, held.folder, long_run.folder} <= left
        assert len(left) == 4  # and the third fit's own, a minute old
    finally:
        owner.release()
    for run, record in records.items():  # the removed queues held only results: the lineage is in the repository
        assert json.loads((models / "runs" / run / "lineage.json").read_text())["checkpoints"] == record["checkpoints"]
        _assert_committed(models, record, tmp_path / ("a" if run == first.run.run_name else "b") / "ckpt",
                          tmp_path / "read-cache")
