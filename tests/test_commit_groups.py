"""Saves that wait together share one commit, and no saved version is lost by it.

A backlog (a burst of saves, the saves still queued when ``fit()`` returns) is committed in as
few commits as loses nothing: a file saved again (``last.ckpt``) or rotated out while waiting
starts a new commit, so every save's own bytes are in the commit its lineage entry names.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import file_at

from oxen_callbacks import read_lineage
from oxen_callbacks._oxen.repo import LocalRepo
from oxen_callbacks.errors import ConfigurationError

RUN = "r"


@pytest.fixture
def model_queue(tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    """A new model repository, an empty job queue for run ``r`` and a committer (as the worker has them)."""
    from oxen_callbacks._oxen.identity import resolve_author, worker_environment
    from oxen_callbacks._publish.committer import Committer
    from oxen_callbacks._publish.opening import open_model_repo
    from oxen_callbacks._publish.queue import JobQueue

    for key, value in worker_environment(resolve_author(("T", "t@example.com")), tmp_path / "cache").items():
        monkeypatch.setenv(key, value)
    models = tmp_path / "models"
    open_model_repo(models, tmp_path / "cache")
    return models, JobQueue.create(models, RUN, {}), Committer(LocalRepo(models))


def _base(fit: str = "f1") -> dict:
    from oxen_callbacks.lineage import new_record

    base = new_record(dataset=None, model_repo="models", framework={"name": "x", "version": "1"}, run={"name": RUN})
    base.update(status="RUNNING", started_at="2026-12-04T05:00:00+0000", fit_id=fit)
    return base


class Saves:
    """Puts jobs the way the trainer's publisher does; remembers each save's bytes."""

    def __init__(self, queue, fit: str = "f1") -> None:  # type: ignore[no-untyped-def]
        self.queue, self.fit, self.seq, self.saved = queue, fit, 0, {}

    def save(self, name: str, data: bytes, step: int) -> None:
        self.seq += 1
        (self.queue.staging_for(self.seq)).mkdir(parents=True)
        (self.queue.staging_for(self.seq) / name).write_bytes(data)
        self.queue.put(self.seq, "checkpoint", {
            "run": RUN, "dest": f"runs/{RUN}/checkpoints/{name}", "staged_name": name, "step": step, "epoch": 0,
            "metrics": {}, "message": f"oxen-callbacks: {RUN} step {step} epoch 0: {name}", "record": _base(self.fit)})
        self.saved[f"{self.queue.folder.name}/{self.seq:08d}"] = data

    def remove(self, name: str) -> None:
        self.seq += 1
        self.queue.put(self.seq, "remove", {"run": RUN, "dest": f"runs/{RUN}/checkpoints/{name}"})

    def finalize(self, best: str) -> None:
        self.seq += 1
        self.queue.put(self.seq, "finalize", {"run": RUN, "record": {**_base(self.fit), "status": "FINISHED"},
                                              "best": f"runs/{RUN}/checkpoints/{best}"})


def test_a_backlog_shares_commits_and_every_save_keeps_its_own_bytes(model_queue, tmp_path: Path) -> None:
    models, queue, committer = model_queue
    saves = Saves(queue)
    saves.save("e0.ckpt", b"epoch 0", 1)
    saves.save("last.ckpt", b"last at 1", 1)
    saves.save("e1.ckpt", b"epoch 1", 2)
    saves.save("last.ckpt", b"last at 2", 2)  # saved again while its first version still waits
    saves.remove("e0.ckpt")                   # top-k rotation
    saves.save("e2.ckpt", b"epoch 2", 3)
    saves.finalize(best="e1.ckpt")
    before = set(LocalRepo(models).commit_ids())

    results = committer.run_batch(queue, queue.pending(), final=True)

    assert all(r["ok"] for r in results) and not queue.pending()
    made = set(LocalRepo(models).commit_ids()) - before
    assert len(made) == 2  # 6 saves, a removal and the run's end: one commit per version of last.ckpt
    head = LocalRepo(models).resolve(None)
    lineage = read_lineage(models / "runs" / RUN / "lineage.json")
    assert lineage == read_lineage(file_at(models, head, f"runs/{RUN}/lineage.json", tmp_path / "l").read_text(),
                                   at_commit=head)  # the committed record, its own commit filled in
    assert lineage["status"] == "FINISHED"
    assert [c["path"].rsplit("/", 1)[1] for c in lineage["checkpoints"]] == [
        "e0.ckpt", "last.ckpt", "e1.ckpt", "last.ckpt", "e2.ckpt"]
    for i, entry in enumerate(lineage["checkpoints"]):
        assert entry["commit"] in made
        committed = file_at(models, entry["commit"], entry["path"], tmp_path / f"read{i}").read_bytes()
        assert committed == saves.saved[entry["job"]]  # this save's bytes, not a later version's
    e0, last1, e1, last2, _e2 = lineage["checkpoints"]
    assert last1["commit"] != last2["commit"]
    assert lineage["model"] == {**lineage["model"], "path": e1["path"], "commit": e1["commit"]}
    assert e0["kept"] is False
    with pytest.raises(ConfigurationError, match="not in commit"):
        file_at(models, head, e0["path"], tmp_path / "gone")  # rotated out at the end, kept in history
    messages = {c["id"]: c["message"] for c in LocalRepo(models).log()}
    assert "e2.ckpt" in messages[head] and "lineage (FINISHED)" in messages[head]


def test_each_commit_of_a_backlog_is_told_before_the_next_one_is_made(model_queue, tmp_path: Path) -> None:
    """The backlog at a fit's end takes several commits: each one's results go to the trainer as it is
    made (its MLflow logged models are then made while the next commit runs), recorded on disk first,
    and every result is told once, in order."""
    models, queue, committer = model_queue
    saves = Saves(queue)
    saves.save("e0.ckpt", b"epoch 0", 1)
    saves.save("last.ckpt", b"last at 1", 1)
    saves.save("e1.ckpt", b"epoch 1", 2)
    saves.save("last.ckpt", b"last at 2", 2)
    saves.finalize(best="e1.ckpt")
    told: list[tuple[list[dict], set[str], list[dict | None]]] = []

    def on_commit(results: list[dict]) -> None:
        told.append((results, set(LocalRepo(models).commit_ids()), [queue.result(r["seq"]) for r in results]))

    results = committer.run_batch(queue, queue.pending(), final=True, on_commit=on_commit)

    assert [r for batch, _, _ in told for r in batch] == results and len(results) == 5
    (first, commits_then, on_disk), (second, _, _) = told
    assert [r["dest"].rsplit("/", 1)[1] for r in first] == ["e0.ckpt", "last.ckpt", "e1.ckpt"]  # last.ckpt again: a new commit
    assert {r["commit"] for r in first} <= commits_then  # made...
    assert not {r["commit"] for r in second} & commits_then  # ...before the next one
    assert on_disk == first  # and recorded, for a worker that dies right after telling


def test_a_job_queued_with_a_glob_name_before_the_upgrade_is_committed_under_its_literal_name(
        model_queue, tmp_path: Path) -> None:
    """A queue left by the version before names were made literal (a killed fit, then `sync` or the next
    worker) names ``model[1].ckpt``: its bytes are committed under the literal name the new version
    gives it, the record and the final model name that path, and its rotation removes that file."""
    from oxen_callbacks._oxen.layout import literal_name

    models, queue, committer = model_queue
    saves = Saves(queue)
    saves.save("model[1].ckpt", b"epoch 1", 1)
    saves.save("model[2].ckpt", b"epoch 2", 2)
    saves.remove("model[1].ckpt")
    saves.finalize(best="model[2].ckpt")

    results = committer.run_batch(queue, queue.pending(), final=True)

    assert all(r["ok"] for r in results) and not queue.pending()
    lineage = read_lineage(models / "runs" / RUN / "lineage.json")
    first, second = lineage["checkpoints"]
    assert [first["path"], second["path"]] == [f"runs/{RUN}/checkpoints/{literal_name(n)}"
                                               for n in ("model[1].ckpt", "model[2].ckpt")]
    assert file_at(models, first["commit"], first["path"], tmp_path / "a").read_bytes() == b"epoch 1"
    assert file_at(models, second["commit"], second["path"], tmp_path / "b").read_bytes() == b"epoch 2"
    assert first["kept"] is False and second["kept"] is not False
    assert lineage["model"]["path"] == second["path"]


def test_a_save_rotated_out_while_waiting_still_reaches_history(model_queue, tmp_path: Path) -> None:
    """Saved and removed before its commit: committing both at once would lose its bytes."""
    models, queue, committer = model_queue
    saves = Saves(queue)
    saves.save("e0.ckpt", b"epoch 0", 1)
    saves.remove("e0.ckpt")
    saves.save("e1.ckpt", b"epoch 1", 2)

    committer.run_batch(queue, queue.pending(), final=True)

    lineage = read_lineage(models / "runs" / RUN / "lineage.json")
    e0, e1 = lineage["checkpoints"]
    assert file_at(models, e0["commit"], e0["path"], tmp_path / "a").read_bytes() == b"epoch 0"
    assert e0["commit"] != e1["commit"] and e0["kept"] is False
    with pytest.raises(ConfigurationError, match="not in commit"):
        file_at(models, e1["commit"], e0["path"], tmp_path / "b")


def test_removals_at_the_end_wait_for_a_commit_or_the_last_batch(model_queue, tmp_path: Path) -> None:
    models, queue, committer = model_queue
    saves = Saves(queue)
    saves.save("e0.ckpt", b"epoch 0", 1)
    saves.save("e1.ckpt", b"epoch 1", 2)
    saves.remove("e0.ckpt")

    committer.run_batch(queue, queue.pending())  # training goes on: the removal waits for the next commit
    assert [j.kind for j in queue.pending()] == ["remove"]
    committer.run_batch(queue, queue.pending(), final=True)  # the worker's last batch commits it alone

    assert not queue.pending()
    head = LocalRepo(models).resolve(None)
    with pytest.raises(ConfigurationError, match="not in commit"):
        file_at(models, head, f"runs/{RUN}/checkpoints/e0.ckpt", tmp_path / "gone")
    assert file_at(models, head, f"runs/{RUN}/checkpoints/e1.ckpt", tmp_path / "kept").read_bytes() == b"epoch 1"


def test_a_commit_shared_by_several_saves_still_names_one_checkpoint(model_queue, tmp_path: Path) -> None:
    """Deploying or resuming from a commit id picks the run's model when that commit holds it, the
    one training state when all its saves are of one step, and refuses to guess otherwise."""
    from oxen_callbacks.checkpoints import resolve_resume
    from oxen_callbacks.lineage import find_checkpoint_run

    models, queue, committer = model_queue
    saves = Saves(queue)
    saves.save("e0.ckpt", b"epoch 0", 1)
    saves.save("e1.ckpt", b"epoch 1", 2)
    saves.save("last.ckpt", b"last at 2", 2)
    saves.finalize(best="e0.ckpt")  # the best is the first of the commit's saves
    committer.run_batch(queue, queue.pending(), final=True)
    lineage = read_lineage(models / "runs" / RUN / "lineage.json")
    shared = lineage["model"]["commit"]
    assert {c["commit"] for c in lineage["checkpoints"]} == {shared}

    _record, entry = find_checkpoint_run(models, shared)
    assert entry["path"] == lineage["model"]["path"] == f"runs/{RUN}/checkpoints/e0.ckpt"
    resumed = resolve_resume(models, shared, cache_dir=tmp_path / "resume")
    assert Path(resumed.path).read_bytes() == b"epoch 0"

    other = {**lineage, "model": {**lineage["model"], "commit": "0" * 32}}  # a commit that is not the model's
    with pytest.raises(ConfigurationError, match="different steps") as refused:
        from oxen_callbacks.lineage import checkpoint_in_commit

        checkpoint_in_commit(other, shared)
    assert "e0.ckpt (step 1)" in str(refused.value) and "materialize_checkpoint" in str(refused.value)
    same_step = {**other, "checkpoints": [c for c in lineage["checkpoints"] if c["step"] == 2]}
    assert checkpoint_in_commit(same_step, shared)["path"].endswith("last.ckpt")  # one training state


def test_a_failing_save_in_a_shared_commit_loses_no_earlier_version(model_queue, tmp_path: Path, monkeypatch) -> None:
    """A save that cannot be staged (disk full, a busy repository) while sharing a commit: the saves
    before it are committed one by one, the failure names it, and the next save of the same path
    cannot replace a version that never reached history."""
    from oxen_callbacks.errors import OxenError

    models, queue, committer = model_queue
    saves = Saves(queue)
    saves.save("last.ckpt", b"last at 1", 1)
    saves.save("e1.ckpt", b"epoch 1", 2)
    real_add, disk_full = committer.repo.add, [True]

    def add_failing_while_full(rel: str) -> None:
        if rel.endswith("e1.ckpt") and disk_full[0]:
            raise OxenError("oxen add: No space left on device")
        real_add(rel)

    monkeypatch.setattr(committer.repo, "add", add_failing_while_full)
    results = committer.run_batch(queue, queue.pending())
    assert [(r["seq"], r["ok"]) for r in results] == [(1, True), (2, False)]  # the failure is e1's own
    assert "No space left" in results[1]["error"]
    saves.save("last.ckpt", b"last at 3", 3)  # as the worker goes on past the failed job
    committer.run_batch(queue, [j for j in queue.pending() if j.seq != 2])
    disk_full[0] = False
    committer.run_batch(queue, queue.pending(), final=True)  # `oxen-callbacks sync`, later

    lineage = read_lineage(models / "runs" / RUN / "lineage.json")
    assert len(lineage["checkpoints"]) == 3
    for i, entry in enumerate(lineage["checkpoints"]):
        assert file_at(models, entry["commit"], entry["path"], tmp_path / f"r{i}").read_bytes() == saves.saved[entry["job"]]


@pytest.mark.parametrize("newest, waits", [("remove", True), ("finalize", False)])
def test_a_burst_waits_past_a_rotation_for_last_ckpt_but_not_past_the_end(model_queue, monkeypatch, newest, waits):
    """Lightning saves ``epoch=N``, removes the rotated file, then saves ``last.ckpt``: the removal's
    wake-up must not end the burst (one commit per epoch, not two); the run's end does."""
    import os
    import time

    from oxen_callbacks._publish import worker
    from oxen_callbacks._util.stdin_lines import StdinLines

    _, queue, _ = model_queue
    monkeypatch.setattr(worker, "BURST_S", 3.0)
    payloads = {"checkpoint": {"run": RUN, "dest": f"runs/{RUN}/checkpoints/e.ckpt", "staged_name": "e.ckpt",
                               "record": {}, "metrics": {}, "step": 1, "epoch": 0},
                "remove": {"run": RUN, "dest": f"runs/{RUN}/checkpoints/e.ckpt"}, "finalize": {"run": RUN, "record": {}}}
    queue.put(1, "checkpoint", payloads["checkpoint"])
    queue.put(2, newest, payloads[newest])
    read_end, write_end = os.pipe()
    os.write(write_end, b"\n")  # the wake-up of job 2
    started = time.monotonic()
    assert worker._rest_of_burst(StdinLines(read_end), queue) == "\n"
    waited = time.monotonic() - started
    os.close(read_end)
    os.close(write_end)
    assert waited >= 3.0 if waits else waited < 1.5


def test_a_late_job_of_a_fit_the_run_went_on_from_leaves_the_later_fits_record(model_queue, tmp_path: Path) -> None:
    """Fit A is killed with saves still queued (its commit worker fell behind, or `sync` commits them
    later); fit B continues the run under its name and finishes. A's jobs that land afterwards add
    their checkpoints to the history, but the record stays B's: its status, model and fit. A's late
    rotation of a file name B has saved since must not delete B's file."""
    from oxen_callbacks._publish.queue import JobQueue

    models, queue_a, committer = model_queue
    a = Saves(queue_a, fit="A")
    a.save("e0.ckpt", b"A epoch 0", 1)
    committer.run_batch(queue_a, queue_a.pending())
    a.save("last.ckpt", b"A last", 2)  # queued when A was killed...
    a.remove("e0.ckpt")
    a.finalize(best="last.ckpt")       # (a stalled end, finished by `sync`)

    queue_b = JobQueue.create(models, RUN, {})
    b = Saves(queue_b, fit="B")
    b.save("e0.ckpt", b"B epoch 0", 3)  # the same name, B's bytes
    b.save("last.ckpt", b"B last", 3)
    b.finalize(best="e0.ckpt")
    assert all(r["ok"] for r in committer.run_batch(queue_b, queue_b.pending(), final=True))
    finished = read_lineage(models / "runs" / RUN / "lineage.json")
    assert finished["fit_id"] == "B" and finished["status"] == "FINISHED" and finished["earlier_fits"] == ["A"]

    results = committer.run_batch(queue_a, queue_a.pending(), final=True)  # ...and lands now

    assert all(r["ok"] for r in results) and not queue_a.pending()
    record = read_lineage(models / "runs" / RUN / "lineage.json")
    head = LocalRepo(models).resolve(None)
    assert record == read_lineage(file_at(models, head, f"runs/{RUN}/lineage.json", tmp_path / "l").read_text(),
                                  at_commit=head)
    assert {k: record[k] for k in ("fit_id", "status", "model", "run", "earlier_fits")} == {
        k: finished[k] for k in ("fit_id", "status", "model", "run", "earlier_fits")}
    late = record["checkpoints"][-1]
    assert (late["path"], late["fit_id"]) == (f"runs/{RUN}/checkpoints/last.ckpt", "A")
    assert file_at(models, late["commit"], late["path"], tmp_path / "late").read_bytes() == b"A last"
    assert (models / "runs" / RUN / "checkpoints" / "e0.ckpt").read_bytes() == b"B epoch 0"  # not rotated out
    b_e0 = next(c for c in record["checkpoints"] if c["fit_id"] == "B" and c["path"].endswith("e0.ckpt"))
    assert b_e0["kept"] is True
    assert file_at(models, head, b_e0["path"], tmp_path / "b_e0").read_bytes() == b"B epoch 0"


_REPORTING_TASK = """
import sys, time
from pathlib import Path
from oxen_callbacks._publish.batches import BatchProcess

release = Path(sys.argv[1])

def task(report, name):
    report(name)  # a commit made; the next one waits (here: until the parent has heard of this one)
    deadline = time.monotonic() + 20
    while not release.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    return "released" if release.exists() else "never released"

process = BatchProcess({"task": task})
told = []
print(process.run("task", lambda value: (told.append(value), release.touch()), name="first commit"), told)
process.retire()
"""


def test_the_commit_process_tells_each_commit_while_its_task_goes_on(tmp_path: Path) -> None:
    """The worker hears of a commit while the commit process is still making the next one (not with
    the task's reply at its end): the task below only ends early once the parent has heard."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _REPORTING_TASK, str(tmp_path / "released")], capture_output=True,
                         text=True, timeout=60, check=True)
    assert out.stdout.strip() == "released ['first commit']"


_ORPHANED_TASK = """
import os, sys, time
from pathlib import Path
from oxen_callbacks._publish.batches import BatchProcess

folder = Path(sys.argv[1])

def task(report):
    while not (folder / "worker gone").exists():
        time.sleep(0.01)
    report("first commit")  # nobody reads this any more
    (folder / "second commit made").touch()
    return "done"

process = BatchProcess({"task": task})
process._request.write('{"task": "task", "args": {}}\\n')
process._request.flush()
process._reply.close()  # the worker's end of the replies, as its death closes it
(folder / "worker gone").touch()
deadline = time.monotonic() + 20
while not (folder / "second commit made").exists() and time.monotonic() < deadline:
    time.sleep(0.01)
os.waitpid(process.pid, 0)
print((folder / "second commit made").exists())
"""


def test_a_commit_process_whose_worker_died_finishes_its_batch(tmp_path: Path) -> None:
    """A killed worker leaves its commit process the rest of the batch (its results go to disk): telling
    the dead worker of a commit must not stop the next one."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _ORPHANED_TASK, str(tmp_path)], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip() == "True"
