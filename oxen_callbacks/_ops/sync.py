"""Finish what training runs journaled but could not do: commits, pushes, MLflow logging.

``oxen-callbacks sync`` calls :func:`sync_all`. It is safe to run at any time, as
often as you like: queues of live training processes are left to them, every
operation is idempotent, and what still fails stays journaled and is reported.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .._oxen import layout as oxen_layout
from .._publish.drain import drain_in_worker
from .._publish.known_repos import registered_model_repos
from .._publish.push import PushTarget, pending_push, pending_push_path, push_with_timeout
from .._publish.queue import JobQueue, all_queues
from .._util.cache import default_cache_dir
from .._util.fs import DamagedFile
from .._util.locks import FileLock, is_locked
from .._util.redact import redact_text, redact_url
from .._util.terminal import printable
from ..names import (
    ENV_MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR,
    ENV_MLFLOW_HTTP_REQUEST_MAX_RETRIES,
    ENV_MLFLOW_HTTP_REQUEST_TIMEOUT,
)

log = logging.getLogger(__name__)


def sync_model_repo(repo: Path, *, push_timeout: float = 300.0) -> dict[str, Any]:
    """Drain the orphan queues of ``repo`` and retry its pending push."""
    report: dict[str, Any] = {"repo": str(repo), "committed": 0, "failed": [], "busy": [], "damaged": [],
                              "push": None}
    for queue in all_queues(repo):
        if fault := queue.damage():  # left as it is: its owner may want to see what happened
            report["damaged"].append({"queue": queue.folder.name, "path": str(queue.folder), "error": fault})
            continue
        pending = queue.pending()
        if not pending:
            if not _report_damaged_results(queue, report):  # (a queue holding one stays, for its owner to see)
                queue.forget_if_old()
            continue
        claim = FileLock(queue.owner_lock)  # held while draining: a second `sync` leaves the queue to this one
        if is_locked(queue.worker_lock) or not claim.acquire(blocking=False):
            report["busy"].append({"queue": queue.folder.name, "pending": len(pending)})
            continue
        try:
            drain_in_worker(queue, repo, push_timeout)
        finally:
            claim.release()
        left = queue.pending()
        report["committed"] += len(pending) - len(left)
        if left:
            report["failed"].append({"queue": queue.folder.name, "pending": len(left), "log": str(queue.log_path)})
        _report_damaged_results(queue, report)
    try:
        marker = pending_push(repo)
    except DamagedFile as exc:
        marker = None
        report["damaged"].append({"path": str(pending_push_path(repo)), "error": str(exc)})
    if marker is not None:
        result = push_with_timeout(repo, PushTarget(marker["remote"], marker.get("branch"), push_timeout,
                                                    url=marker.get("url")))
        report["push"] = result
    return report


def _report_damaged_results(queue: JobQueue, report: dict[str, Any]) -> bool:
    """Add the results of ``queue`` that cannot be read to ``report`` (their jobs are done: only the record of
    it is lost, and the queue's other jobs go on); whether there were any."""
    found = queue.damaged_results()
    report["damaged"] += [{"queue": queue.folder.name, "path": str(path), "error": error} for path, error in found]
    return bool(found)


@contextmanager
def _quick_mlflow_failures() -> Iterator[None]:
    """While replaying, a server still down fails in seconds, not after MLflow's minutes of retries."""
    defaults = {ENV_MLFLOW_HTTP_REQUEST_MAX_RETRIES: "2", ENV_MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR: "1",
                ENV_MLFLOW_HTTP_REQUEST_TIMEOUT: "30"}
    saved = {k: os.environ.get(k) for k in defaults}
    for key, value in defaults.items():
        os.environ.setdefault(key, value)  # the user's own settings win
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)


def sync_mlflow(cache_dir: Path) -> list[dict[str, Any]]:
    """Replay every journaled MLflow operation of finished runs."""
    with _quick_mlflow_failures():
        return _replay_all(cache_dir)


def _replay_all(cache_dir: Path) -> list[dict[str, Any]]:
    from .._mlflow.journal import MlflowJournal, journals

    reports = []
    for folder in journals(cache_dir):
        journal = MlflowJournal(folder)
        live = journal.trainer_alive() or journal.sink_alive()
        if not live and (fault := journal.damage()):  # left as it is (no lock taken): its owner may want to see it
            reports.append({"journal": folder.name, "status": "damaged", "path": str(folder), "error": fault})
            continue
        owner = FileLock(journal.lock_path)
        # held through the replay: a second `sync` at the same time must not replay it too (it
        # created a second MLflow run for an abandoned one, left RUNNING for good)
        if live or not owner.acquire(blocking=False):
            if not journal.is_empty():  # its training process, sink process or another sync logs it
                reports.append({"journal": folder.name, "status": "busy"})
            continue
        try:
            if (folder / "meta.json").exists():  # (another sync may have finished it just before)
                entry = _replay_one(folder, journal)
                if entry is not None:
                    reports.append(entry)
            else:
                shutil.rmtree(folder, ignore_errors=True)  # (taking the lock made the folder again)
        finally:
            owner.release()
    return reports


def _replay_one(folder: Path, journal: Any) -> dict[str, Any] | None:
    """Replay one journal whose lock the caller holds; its report (``None``: nothing was left in it)."""
    from .._mlflow.apply import credentials_held_back, replay
    from .._mlflow.journal import ABANDONED_SEQ

    if journal.abandoned():  # the whole job was killed at once: no sink process lived to say so
        with contextlib.suppress(OSError):  # (a folder removed meanwhile is simply gone)
            journal.put(ABANDONED_SEQ, {"op": "finish_abandoned"})
    if journal.is_empty():
        shutil.rmtree(folder, ignore_errors=True)
        return None
    meta = journal.meta()
    if _waits_for_commits(journal, meta):
        return {"journal": folder.name, "status": "busy", "run_id": meta.get("run_id"),
                "waiting_for": f"the commits of run {meta['oxen_run']} in {meta['model_repo']}"}
    uri = meta.get("tracking_uri")  # (journaled without credentials; a journal from elsewhere may not be)
    entry: dict[str, Any] = {"journal": folder.name, "tracking_uri": redact_url(uri) if isinstance(uri, str) else uri,
                             "run_id": meta.get("run_id"), "pending": len(journal.pending())}
    if isinstance(uri, str) and (held := credentials_held_back(uri)):
        entry.update(status="held", why=f"your MLflow credentials ({', '.join(held)}) go only to the tracking server "
                     f"you name; to log it there, run `MLFLOW_TRACKING_URI={redact_url(uri)} oxen-callbacks sync`")
        return entry  # nothing sent: kept for that sync
    try:
        with contextlib.redirect_stdout(_RedactedStderr()):  # MLflow prints run links: keep stdout for our report
            entry["done"] = replay(journal)
        entry["status"] = "done"
        entry["run_id"] = journal.meta().get("run_id")  # created by the replay when training could not
        if journal.meta().get("abandoned"):
            entry["abandoned"] = journal.meta()["abandoned"]
        shutil.rmtree(folder, ignore_errors=True)
    except Exception as exc:  # MLflow still down: keep it for the next sync
        if _run_deleted(journal):  # by its user: nothing can log to it again (the lineage is in the model repository)
            _end_in_repo_if_abandoned(journal)
            entry.update(status="dropped", why=f"MLflow run {meta.get('run_id')} was deleted")
            shutil.rmtree(folder, ignore_errors=True)
            return entry
        entry["status"] = "failed"
        entry["error"] = redact_text(f"{type(exc).__name__}: {exc}")[:500]
    return entry


def _end_in_repo_if_abandoned(journal: Any) -> None:
    """A dead training process's run: its record in the model repository ends all the same (KILLED)."""
    from .._mlflow.abandoned import KILLED
    from .._mlflow.apply import end_in_repo

    ended = [op for _paths, op in journal.batches() if op["op"] == "finish_abandoned"]
    if ended and journal.meta().get("model_repo"):
        end_in_repo(journal, journal.meta(), ended[0].get("status", KILLED))


def _run_deleted(journal: Any) -> bool:
    """Whether the journal's MLflow run is deleted (its user deleted it), as its store says now."""
    from .._mlflow.apply import client_for

    run_id = journal.meta().get("run_id")
    try:
        return bool(run_id) and client_for(journal).get_run(run_id).info.lifecycle_stage == "deleted"
    except Exception:  # (unreachable, or no such run: kept, as any other failure)
        return False


class _RedactedStderr(io.TextIOBase):
    """What MLflow prints while replaying, on stderr without credentials (its run links are made
    from the tracking URI, password and all: ``http://user:pw@host/#/experiments/...``) and with
    control characters escaped (they name the run, and anyone who can write the store names it)."""

    def write(self, text: str) -> int:
        sys.stderr.write(printable(redact_text(text)))
        return len(text)

    def flush(self) -> None:
        sys.stderr.flush()


def _waits_for_commits(journal: Any, meta: dict[str, Any]) -> bool:
    """A dead training process's run is finished from its committed checkpoints: not while a
    live worker still commits some."""
    from .._mlflow.abandoned import commits_pending

    abandoned = any(op.get("op") == "finish_abandoned" for _, op in journal.pending())
    return abandoned and commits_pending(meta["model_repo"], meta.get("oxen_run") or "")


def sync_all(cache_dir: Path | None = None, *, model_repos: list[Path] | None = None,
             push_timeout: float = 300.0, mlflow: bool = True) -> dict[str, Any]:
    """Finish every journaled commit, push and MLflow operation known to this machine.

    Returns a JSON-able report: ``{"model_repos": [...], "mlflow": [...], "pending": N, "damaged": M}``
    where ``pending`` counts what is still not done and ``damaged`` the queues, queue results, journals and
    push markers left on disk as they are because they cannot be read.
    """
    cache = Path(cache_dir or default_cache_dir()).expanduser().resolve()
    repos = [Path(r).resolve() for r in (model_repos or registered_model_repos(cache))]
    repo_reports = [sync_model_repo(r, push_timeout=push_timeout) for r in repos if oxen_layout.is_repo(r)]
    mlflow_reports = sync_mlflow(cache) if mlflow else []
    pending = sum(sum(f["pending"] for f in r["failed"]) + sum(b["pending"] for b in r["busy"])
                  + (1 if r["push"] and not r["push"]["ok"] else 0) for r in repo_reports)
    pending += sum(1 for m in mlflow_reports if m["status"] not in ("done", "damaged", "dropped"))
    damaged = sum(len(r["damaged"]) for r in repo_reports) + sum(m["status"] == "damaged" for m in mlflow_reports)
    return {"model_repos": repo_reports, "mlflow": mlflow_reports, "pending": pending, "damaged": damaged}
