"""Carry out publishing jobs against a local model repository (runs inside the worker process).

Per checkpoint job, under the repository's file lock: move the frozen bytes to
``runs/<run>/checkpoints/<name>``, update ``runs/<run>/lineage.json``, stage the
top-k removals that came before it, commit. The lineage file committed with a
checkpoint names every earlier commit; its own entry's ``commit`` is ``null``
(see :func:`oxen_callbacks.lineage.read_lineage`).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .._oxen.layout import literal_path
from .._oxen.prestore import prestore
from .._oxen.repo import LocalRepo
from .._oxen.tree import tables_left_out
from .._util.locks import FileLock
from ..errors import ConfigurationError, OxenError, PublishError, RepoBusyError
from ..lineage import BEST_KEY, LATER_REPORT_KEY, NOT_COMMITTED_KEY, fill_commit
from ..model_repo import lineage_path
from .adding import adding
from .fits import (
    checkpoint_named,
    finalized,
    late_fit,
    saved_by,
    saved_by_earlier_fit,
)
from .freeze import check_frozen, own_inodes
from .grouping import commit_groups, group_message
from .queue import Job, JobQueue, repo_lock_path
from .run_record import RunRecords

log = logging.getLogger(__name__)

LOCK_TIMEOUT_S = 3600.0
_NEXT_SECOND_RETRIES = 2


class Committer:
    """Executes jobs in order; removals wait for the next commit of the same queue.

    Runs in a commit process that serves one burst of batches (see
    ``batches.BatchProcess``) and holds the repository lock until that process
    exits: oxenai keeps the repository's databases open until then, so releasing
    the lock earlier would let another process in while they are still locked.
    """

    def __init__(self, repo: LocalRepo) -> None:
        self.repo = repo
        self.records = RunRecords(repo)
        self.lock = FileLock(repo_lock_path(repo.path), timeout=LOCK_TIMEOUT_S)

    def run_batch(self, queue: JobQueue, jobs: list[Job], *, final: bool = False,
                  on_commit: Callable[[list[dict[str, Any]]], None] | None = None) -> list[dict[str, Any]]:
        """Run ``jobs`` (pending, in order); returns one result per completed job.

        Jobs waiting together share one commit where that loses nothing (:func:`.grouping.commit_groups`):
        a burst of saves or a backlog after ``fit()`` costs one ``oxen commit``, not one per
        file. Removal jobs complete with the next checkpoint or finalize commit; with ``final``
        trailing removals get a commit of their own. ``on_commit`` is told each commit's results
        as soon as they are recorded (the trainer's MLflow work for them then overlaps the next
        commit of a backlog); they are in the returned list too.
        """
        self.hold_lock()
        with adding(self.repo.path) as batch:
            results = self._run_groups(queue, jobs, final, on_commit or (lambda _results: None))
            batch.failed = not all(result["ok"] for result in results)  # (a failed add may leave a scratch file)
        return results

    def _run_groups(self, queue: JobQueue, jobs: list[Job], final: bool,
                    on_commit: Callable[[list[dict[str, Any]]], None]) -> list[dict[str, Any]]:
        results: list[dict[str, Any]] = []
        live = [job for job in jobs if queue.is_pending(job)]  # others were done by a batch that outlived its worker
        for group in commit_groups(live):
            committed = len(results)
            if not any(job.kind != "remove" for job in group):  # removals with no commit after them (yet)
                if final:
                    run = group[0].payload["run"]
                    commit = self._commit_removals(run, group, f"oxen-callbacks: {run}: rotate out {len(group)} checkpoint(s)")
                    results += _complete_removals(queue, group, commit)
                    on_commit(results[committed:])
                continue
            failure = self._commit_each(queue, group, results)
            if failure is None:
                on_commit(results[committed:])
            else:
                job, exc = failure
                log.error("Job %s (%s) failed: %s", job.name, job.kind, exc, exc_info=exc)
                results.append({"seq": job.seq, "kind": job.kind, "ok": False, "error": f"{type(exc).__name__}: {exc}"})
                return results  # keep order: later jobs wait for this one (retried by the next worker or sync)
        return results

    def _commit_each(self, queue: JobQueue, group: list[Job],
                     results: list[dict[str, Any]]) -> tuple[Job, Exception] | None:
        """Commit ``group`` (appending to ``results``); the failed job and its error, if one failed.

        When one job of a group cannot be staged, the jobs before it are committed without it
        (their bytes are already in place, and a later save of the same path must not replace
        them first) and the failure names that job; a failed commit names the group's first job.
        """
        try:
            results += self._commit_group(queue, group)
            return None
        except _GroupFailed as exc:
            failed = exc
        before = group[:failed.index or 0]
        if any(job.kind != "remove" for job in before):
            try:
                results += self._commit_group(queue, before)
            except _GroupFailed as again:
                return again.job_of(before), again.error
        return failed.job_of(group), failed.error

    def _commit_group(self, queue: JobQueue, group: list[Job]) -> list[dict[str, Any]]:
        """Stage every job of ``group`` and make one commit; the jobs' results, in order."""
        started = time.perf_counter()
        run = group[0].payload["run"]
        before = self.records.read_text(run)
        staged: list[tuple[Job, dict[str, Any], list[Job]]] = []  # (job, its result so far, removals it completes)
        messages: list[str] = []
        removals: list[Job] = []
        index: int | None = None  # the job being staged, for an error
        try:
            for index, job in enumerate(group):
                if job.kind == "remove":
                    removals.append(job)
                elif job.kind == "checkpoint":
                    staged.append((job, self._stage_checkpoint(queue, job, removals), removals))
                    messages.append(job.payload["message"])
                    removals = []
                elif job.kind == "finalize":
                    status = self._stage_finalize(job, removals)
                    staged.append((job, {"seq": job.seq, "kind": "finalize", "ok": True}, removals))
                    messages.append(f"oxen-callbacks: {run}: lineage ({status})")
                    removals = []
                else:
                    raise PublishError(f"Unknown job kind {job.kind!r}")
            index = None
            self.repo.add(lineage_path(run))
            commit = self._commit(group_message(run, messages))
        except BaseException as exc:
            # the jobs stay queued: the next commit must not list these checkpoints (their commit unknown)
            self.records.restore_text(run, before)
            if isinstance(exc, (OxenError, PublishError, OSError, ConfigurationError)):
                raise _GroupFailed(index, exc) from exc
            raise
        record = fill_commit(self.records.load(run, None), commit)
        self._note_left_out(commit, [result for job, result, _ in staged if job.kind == "checkpoint"], record)
        self.records.write(run, record)  # the working tree copy always names every commit
        seconds = round(time.perf_counter() - started, 4)
        results: list[dict[str, Any]] = []
        for job, result, completed in staged:
            results += _complete_removals(queue, completed, commit)
            result.update(commit=commit, seconds=seconds)
            if job.kind == "finalize":
                result["record"] = record
            queue.complete(job, result)
            shutil.rmtree(queue.staging_for(job.seq), ignore_errors=True)
            results.append(result)
        return results

    def _note_left_out(self, commit: str, results: list[dict[str, Any]], record: dict[str, Any]) -> None:
        """Name in each checkpoint's result and lineage entry the files ``commit`` left out of it (tables Oxen
        could not parse: it says nothing), so that no record claims bytes its commit does not hold."""
        for result in results:
            left_out = tables_left_out(self.repo.path, commit, result["dest"])
            if not left_out:
                continue
            log.warning("Oxen left %d file(s) of checkpoint %s out of commit %s: %s. Oxen reads these as tables and "
                        "does not commit one it cannot parse; the lineage entry names them (not_committed). Give such "
                        "files another extension to commit them.", len(left_out), result["dest"], commit,
                        ", ".join(left_out[:5]))
            result[NOT_COMMITTED_KEY] = left_out
            for entry in record["checkpoints"]:
                if entry.get("path") == result["dest"] and entry.get("commit") == commit:
                    entry[NOT_COMMITTED_KEY] = left_out

    def hold_lock(self) -> None:
        """Take the repository lock for the rest of this process's life (no-op when held)."""
        if not self.lock.held:
            self.lock.acquire()

    # -- jobs ---------------------------------------------------------------------
    def _stage_checkpoint(self, queue: JobQueue, job: Job, removals: list[Job]) -> dict[str, Any]:
        """Move the frozen bytes into place, list them in the run's record and ``oxen add`` them."""
        p = job.payload
        run, dest_rel = p["run"], literal_path(p["dest"])  # (a job queued before names were made literal)
        staged = queue.staging_for(job.seq) / p["staged_name"]
        self.repo.inside(dest_rel, literal=True)  # (the queue checked its path: a link in the repository is not)
        check_frozen(queue.folder, staged)
        dest = self.repo.path / dest_rel
        record = self.records.load(run, p["record"])
        late = late_fit(record, p["record"])
        self._remove_for(record, removals, late)  # they came before this save, which may reuse a name
        changed: list[str] = []
        if staged.exists() or staged.is_symlink():
            changed = own_inodes(staged, p.get("stamps"))  # the repository's files never the trainer's inodes
            _remove(dest)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged, dest)
        elif not dest.exists():
            raise PublishError(f"The frozen bytes of checkpoint {dest_rel!r} are missing from {staged}.")
        entry = {
            "commit": None,
            "path": dest_rel,
            "step": p.get("step"),
            "epoch": p.get("epoch"),
            "metrics": p.get("metrics") or {},
            "kept": True,
            "files": p.get("files"),
            "bytes": p.get("bytes"),
            "job": f"{queue.folder.name}/{job.name}",
            "source": p.get("source"),  # which file of the trainer's it is (several folders may share names)
            "fit_id": (p.get("record") or {}).get("fit_id"),  # which fit saved it (a continued run has several)
        }
        if isinstance(p.get("same_model_as"), str):  # the checkpoint of the same step it is a copy of
            entry["same_model_as"] = literal_path(p["same_model_as"])
        if changed:  # its saved bytes are gone: what is committed is what it held now
            log.warning("Checkpoint %s was written over in place after it was saved (%s): its commit holds "
                        "the new bytes, and its lineage entry says so (changed_after_save).", dest_rel, ", ".join(changed))
            entry["changed_after_save"] = changed
        if p.get("rewrites_earlier"):  # written where earlier saves were, maybe before they were frozen
            for earlier in record["checkpoints"]:
                if earlier.get("source") == p.get("source") and earlier.get("job") != entry["job"]:
                    earlier.setdefault(LATER_REPORT_KEY, {"step": entry["step"], "path": dest_rel})
        if isinstance(p.get("skipped"), list) and p["skipped"]:
            entry["skipped"] = [str(s) for s in p["skipped"]]  # (named pipes, dangling links: not committed)
        record["checkpoints"] = [c for c in record["checkpoints"] if c.get("job") != entry["job"]] + [entry]
        if not finalized(record) and late is None:  # a late job never moves a finished (or later) fit's model
            record["model"].update({"path": dest_rel, "commit": None})
            record["model"].pop(BEST_KEY, None)  # (the end says again which checkpoint is the best)
        self.records.write(run, record)
        prestore(self.repo.path, dest)
        self.repo.add(dest_rel)
        return {"seq": job.seq, "kind": "checkpoint", "ok": True, "dest": dest_rel, "step": entry["step"],
                "epoch": entry["epoch"], "metrics": entry["metrics"], "source": p.get("source"),
                "same_model_as": entry.get("same_model_as"), "changed_after_save": changed}

    def _stage_finalize(self, job: Job, removals: list[Job]) -> str:
        """Write the run's final record (status, end, the model it names); returns its status."""
        p = job.payload
        run = p["run"]
        record = self.records.load(run, p["record"])
        late = late_fit(record, p["record"])
        self._remove_for(record, removals, late)
        if late is not None:  # the end of a fit the run went on from: the later fit's record stays
            self.records.write(run, record)
            return "end of an earlier fit"
        kept = [c for c in record["checkpoints"] if c.get("kept", True)]
        # the last this fit saved: a killed earlier fit's save its worker committed late comes after it
        mine = [c for c in record["checkpoints"] if saved_by(c, record)]
        own = [c for c in mine if c.get("kept", True)]
        # the best's latest version: a file saved again under its name ("best.ckpt") is the newer best
        best = (next((c for c in [*reversed(own), *reversed(kept)] if c["path"] == literal_path(p.get("best") or "")), None)
                or saved_by_earlier_fit(kept, p.get("best_source")) or checkpoint_named(p.get("best_earlier")))
        chosen = best or (own or mine or [None])[-1]
        if chosen is None and not record["model"].get("commit"):  # (else: this fit saved none, the model stays)
            chosen = (kept or record["checkpoints"] or [None])[-1]
        if chosen is not None or not record["checkpoints"]:
            record["model"].update({"path": chosen["path"], "commit": chosen["commit"]} if chosen
                                   else {"path": None, "commit": None})
            # whether the trainer named it its best: `sync` marks it so even when it is the last one too
            named = p.get("best_named", best is not None)  # (a best found is the one chosen)
            if isinstance(named, bool):
                record["model"][BEST_KEY] = named
            else:  # (an amended record that does not say)
                record["model"].pop(BEST_KEY, None)
        self.records.write(run, record)
        return str(record.get("status", "finished"))

    def _commit_removals(self, run: str, removals: list[Job], message: str) -> str:
        record = self.records.load(run, None)
        for removal in removals:
            self._stage_removal(literal_path(removal.payload["dest"]))
        if record is not None:
            self._mark_removed(record, removals)
            self.records.write(run, record)
            self.repo.add(lineage_path(run))
        commit = self._commit(message)
        if record is not None:
            self.records.write(run, fill_commit(record, commit))
        return commit

    # -- helpers ------------------------------------------------------------------
    def _commit(self, message: str) -> str:
        """Commit what is staged; a commit failing over what a killed commit left is redone.

        Oxen's commit id hashes the parent, message, author and the time in whole seconds.
        Retried within the same second, a commit whose killed predecessor wrote part of its
        data fails ("A commit with id ... already exists or is being written", or its
        history database "wal_dir contains existing log file"); the next second gives a
        new id and a clean start.
        """
        try:
            self.repo.commit_branch(self.repo.branches)  # never a parentless commit beside the history
        except ConfigurationError as exc:
            raise PublishError(str(exc)) from None
        for attempt in range(_NEXT_SECOND_RETRIES + 1):
            try:
                return self.repo.commit(message)
            except RepoBusyError:
                raise  # already waited for (busy_timeout)
            except OxenError as exc:
                if "No changes to commit" in str(exc):
                    head = self.repo.resolve(None)
                    log.info("Nothing new to commit (%s): already in %s", message, head)
                    return head
                if attempt == _NEXT_SECOND_RETRIES:
                    raise
                log.warning("Commit failed (%s); committing again in the next second, under a new id", exc)
                time.sleep(1.01 - time.time() % 1.0)
        raise AssertionError("unreachable")

    def _stage_removal(self, dest_rel: str) -> None:
        if not (self.repo.path / dest_rel).exists():
            return
        try:
            self.repo.rm(dest_rel)
        except OxenError as exc:  # never committed (its job failed): just drop the file
            log.warning("Could not stage removal of %s: %s", dest_rel, exc)
            _remove(self.repo.path / dest_rel)

    @staticmethod
    def _mark_removed(record: dict[str, Any], removals: list[Job]) -> None:
        """Top-k rotation: the file left the run folder (it stays in history)."""
        gone = {literal_path(r.payload["dest"]) for r in removals}
        for entry in record["checkpoints"]:
            if entry["path"] in gone:
                entry["kept"] = False

    def _remove_for(self, record: dict[str, Any], removals: list[Job], late: str | None) -> None:
        """Stage ``removals`` and mark them in ``record``; those of a ``late`` fit (one the run went on
        from) only where no later fit has written that path since: its file is the later fit's now."""
        if late is not None:
            newest = {c["path"]: c.get("fit_id") for c in record["checkpoints"]}
            removals = [r for r in removals if newest.get(literal_path(r.payload["dest"]), late) == late]
        for removal in removals:
            self._stage_removal(literal_path(removal.payload["dest"]))
        self._mark_removed(record, removals)


class _GroupFailed(Exception):
    """A group's commit failed: staging job ``index`` (``None``: the commit itself) raised ``error``."""

    def __init__(self, index: int | None, error: Exception) -> None:
        super().__init__(str(error))
        self.index, self.error = index, error

    def job_of(self, group: list[Job]) -> Job:
        """The job the failure is reported under: the one being staged, else the group's first write."""
        return group[self.index] if self.index is not None else next(job for job in group if job.kind != "remove")


def _complete_removals(queue: JobQueue, removals: list[Job], commit: str) -> list[dict[str, Any]]:
    """Mark removal jobs done by ``commit`` (the commit that staged them); their results."""
    results = []
    for removal in removals:
        done = {"seq": removal.seq, "kind": "remove", "ok": True, "dest": literal_path(removal.payload["dest"]), "commit": commit}
        queue.complete(removal, done)
        results.append(done)
    return results


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
