"""Publish checkpoints to an Oxen model repository from a training process, without stalling it.

Modelled on huggingface_hub's ``CommitScheduler`` and Lightning's
``AsyncCheckpointIO``: keyword-only construction, a background worker (a
*process* here: oxenai holds the GIL), worker errors kept and re-raised at the
next submit and at close, ``flush()``, and use as a context manager.

Example::

    with CheckpointPublisher(model_repo="models/classifier", run="run-42") as pub:
        pub.submit_checkpoint("ckpts/epoch=0.ckpt", step=100, epoch=0, record=record)
    pub.results[-1]["commit"]     # the commit holding it
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .._oxen.identity import resolve_author, worker_environment
from .._oxen.remote_spec import parse_remote
from .._oxen.repo import LocalRepo
from .._util.cache import default_cache_dir
from .._util.handoff import is_stopped
from .._util.locks import FileLock
from .._util.processes import child_environment, start_helper
from .._util.redact import redact_text
from ..errors import PublishError
from ..model_repo import checkpoints_folder
from .answers import Answers
from .dests import Destinations
from .freeze import freeze
from .known_repos import register_model_repo
from .queue import JobQueue, damage_warning
from .warm_worker import END_OF_RUN, IDLE, WarmWorker, release_idle, worker_arguments

log = logging.getLogger(__name__)


class CheckpointPublisher:
    """Queue checkpoints for commit by a worker process; see the module docstring.

    Args:
        model_repo: local model repository (created when missing), or one :func:`open_model_repo` opened.
        run: name of the run folder, ``runs/<run>/`` in the repository.
        cache_dir: state root (identity config, registry); default ``~/.cache/oxen-callbacks``.
        author: ``(name, email)`` for commits (see :mod:`oxen_callbacks._oxen.identity`).
        remote: name of an Oxen remote of the model repository to push to after commits
            (``"origin"`` when only ``remote_url`` is given).
        remote_url: URL of that remote (``https://host/namespace/name``), added to the
            repository when missing; never with credentials (Oxen's auth config holds tokens).
        branch: branch to push (default: the checked-out one).
        push_timeout: wall-clock limit of one push, in seconds.
        on_result: called (from a background thread) with each job result.
        warm: a worker started ahead of time, used instead of starting one.
        first_folder: the trainer's folder whose checkpoints keep their names in the run's folder (a
            continued run's earlier fits'; default: the first one saved into).
    """

    #: Publishing workers (the supervisor process) one run may lose before it stops waking them.
    WORKER_RESTARTS = 5

    def __init__(
        self,
        *,
        model_repo: str | os.PathLike[str] | LocalRepo,
        run: str,
        cache_dir: str | os.PathLike[str] | None = None,
        author: tuple[str, str] | None = None,
        remote: str | None = None,
        remote_url: str | None = None,
        branch: str | None = None,
        push_timeout: float = 300.0,
        on_result: Callable[[dict[str, Any]], None] | None = None,
        warm: WarmWorker | None = None,
        first_folder: str | None = None,
    ) -> None:
        self.cache_dir = Path(cache_dir or default_cache_dir()).expanduser().resolve()
        # (a LocalRepo: opened and checked by the caller at fit start just now)
        if isinstance(model_repo, LocalRepo):
            self.repo = model_repo
        else:
            from .opening import open_model_repo  # (deferred: one import floor less for the callbacks)

            self.repo = open_model_repo(model_repo, self.cache_dir)
        self.run = run
        if remote_url is not None:
            remote_url = parse_remote(remote_url).url
            remote = remote or "origin"
        self.remote, self.remote_url, self.branch, self.push_timeout = remote, remote_url, branch, push_timeout
        self._author = resolve_author(author)
        self.stall_seconds: list[float] = []
        self.dests = Destinations(checkpoints_folder(run), first_folder)
        self._proc: subprocess.Popen[bytes] | None = None
        self._worker_idle = False  # the worker answered END_OF_RUN: it waits for the next run
        self._worker_version: str | None = None  # the library version the worker runs (it said so then)
        self._warm = warm
        self._restarts = 0
        self._said_stopped = False
        self._env = worker_environment(self._author, self.cache_dir)
        self.queue = JobQueue.create(self.repo.path, run, {"pid": os.getpid(), "remote": remote, "branch": branch,
                                                           "remote_url": remote_url, "env": self._env})
        self.answers = Answers(self.repo.path, self.queue.folder, on_result, damage_warning)
        self._cond = self.answers.cond  # (the worker's hand-back at the run's end is waited for on it too)
        self._owner = FileLock(self.queue.owner_lock)
        self._owner.acquire()
        register_model_repo(self.cache_dir, self.repo.path)
        self._seq = self.queue.next_seq()
        self._start_worker()

    # -- worker process -----------------------------------------------------------
    def _start_worker(self) -> None:
        args = worker_arguments(self.queue.folder, self.repo.path, push_timeout=self.push_timeout, remote=self.remote,
                                branch=self.branch, remote_url=self.remote_url)
        env = child_environment(self._env)
        warm, self._warm = self._warm, None
        # (a process group of its own: a Ctrl-C in the notebook must not kill a commit halfway)
        self._proc = (warm.hand_over(args, env) if warm is not None else None) or start_helper(
            "publish-worker", *args, env=env)
        self._worker_pid: int | None = self._proc.pid
        reader = threading.Thread(target=self._read_results, args=(self._proc,), daemon=True, name="oxen-publisher")
        reader.start()

    def _read_results(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        idle = False
        for line in proc.stdout:
            try:
                result = json.loads(line)
            except ValueError:
                continue
            if result.get("kind") == IDLE:
                idle = True  # the run is over: the next run's reader reads on (nothing is read ahead)
                self._worker_version = result.get("version")
                break
            if result.get("kind") != "ready":
                self.answers.deliver(result)
        with self._cond:
            self._worker_idle = idle
            self._cond.notify_all()

    def _collect_from_disk(self) -> None:
        """Answers the journal holds but no worker sent (a batch that outlived its killed worker)."""
        missing = self.answers.unanswered
        if missing:
            for result in self.queue.results():
                if result.get("seq") in missing:
                    self.answers.deliver(result)
            for notice in self.queue.take_notices():  # (results that cannot be read: said once, never raised)
                self.answers.deliver(notice)

    @property
    def _handed_on(self) -> bool:
        """Whether the worker went to the idle pool: not this publisher's to wake or restart."""
        return self._proc is None

    def _wake(self) -> None:
        if self.stalled or self._handed_on:
            return
        proc = self._proc
        assert proc is not None  # (not handed on)
        if proc.poll() is not None:
            if self._restarts >= self.WORKER_RESTARTS:
                self.answers.stall(f"the publishing worker died {self._restarts + 1} times (see {self.queue.log_path})")
                return
            self._restarts += 1
            log.warning("Publishing worker exited (code %s); restarting it", proc.returncode)
            try:
                self._start_worker()
            except OSError as exc:  # no process can start now (E2BIG, no memory): never stop training for it
                self.answers.stall(f"a new publishing worker could not start ({exc})")
                return
            proc = self._proc
        assert proc is not None and proc.stdin is not None
        try:
            proc.stdin.write(b"\n")
            proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # it died meanwhile: the next wake restarts it; the job is on disk

    @property
    def failed(self) -> bool:
        """Whether a job failed and the next :meth:`flush` raises its error."""
        return self.answers.failed

    @property
    def results(self) -> list[dict[str, Any]]:
        """Each job's result (and push reports), in the order the worker answered."""
        return self.answers.results

    @property
    def stalled(self) -> str | None:
        """Why publishing stopped for this run, if it did (see :attr:`.answers.Answers.stalled`)."""
        return self.answers.stalled

    # -- submitting -----------------------------------------------------------------
    def has_source(self, source: str | os.PathLike[str]) -> bool:
        """True when a checkpoint at ``source`` was already submitted."""
        return self.dests.known(source) is not None

    def dest_for(self, source: str | os.PathLike[str]) -> str:
        """The repository path a checkpoint file or folder is published to (see :class:`.dests.Destinations`)."""
        return self.dests.dest_for(source)

    def _put(self, kind: str, payload: dict[str, Any], *, raise_errors: bool = True) -> int:
        """Journal the job, wake the worker, then report earlier failures (the new job stays queued)
        unless ``raise_errors`` is false (the next :meth:`flush` reports them)."""
        seq = self._seq
        try:
            self.queue.put(seq, kind, payload)
        except OSError as exc:  # the repository's folder deleted, its disk full or read-only
            raise PublishError(
                f"Could not journal this {kind} job in the model repository {self.repo.path} ({exc.strerror or exc}: "
                f"{exc.filename or self.queue.folder}).\nKeep the repository's folder in place and writable while training "
                "runs; the jobs journaled before this one stay for `oxen-callbacks sync`.") from exc
        self._seq += 1
        self.answers.submitted(seq)
        self._wake()
        if raise_errors:
            self.answers.raise_errors()
        return seq

    def submit_checkpoint(
        self,
        path: str | os.PathLike[str],
        *,
        record: dict[str, Any],
        step: int | None = None,
        epoch: int | None = None,
        metrics: dict[str, float] | None = None,
        copy: bool = False,
        same_model_as: str | os.PathLike[str] | None = None,
        rewrites_earlier: bool = False,
    ) -> int:
        """Freeze the finished checkpoint at ``path`` (file or folder) and queue its commit
        (``copy``: freeze a copy, see :func:`~oxen_callbacks._publish.freeze.freeze`; ``same_model_as``:
        a checkpoint submitted before, at the same step, that holds the same model: one logged model;
        ``rewrites_earlier``: see :meth:`~oxen_callbacks.run.LineageRun.checkpoint_saved`)."""
        started = time.perf_counter()
        if not os.path.exists(path):
            raise PublishError(f"Checkpoint {path} does not exist (was it written?)")
        seq = self._seq
        dest = self.dest_for(path)
        name = os.path.basename(dest)
        try:
            frozen = freeze(path, self.queue.staging_for(seq) / name, copy=copy)
        except OSError as exc:
            raise PublishError(f"Could not freeze checkpoint {path} into {self.queue.folder}: {exc}") from exc
        message = f"oxen-callbacks: {self.run} step {step} epoch {epoch}: {name}"
        payload = {"run": self.run, "dest": dest, "staged_name": name, "source": os.path.abspath(path),
                   "step": step, "epoch": epoch, "metrics": metrics or {}, "files": frozen.files,
                   "bytes": frozen.bytes, "stamps": frozen.stamps, "message": redact_text(message), "record": record}
        if frozen.skipped:
            payload["skipped"] = frozen.skipped
        if same_model_as is not None and (same_dest := self.dests.known(same_model_as)) is not None:
            payload["same_model_as"] = same_dest
        if rewrites_earlier:
            payload["rewrites_earlier"] = True
        self._put("checkpoint", payload)
        self.stall_seconds.append(time.perf_counter() - started)
        return seq

    def submit_removal(self, path: str | os.PathLike[str]) -> int | None:
        """Record that the trainer deleted a published checkpoint (top-k rotation)."""
        dest = self.dests.known(path)
        if dest is None:
            return None
        return self._put("remove", {"run": self.run, "dest": dest})

    def submit_finalize(self, record: dict[str, Any], *, best: str | os.PathLike[str] | None = None,
                        best_earlier: dict[str, Any] | None = None) -> int:
        """Journal the commit of the run's complete lineage record (``best``: the checkpoint it names
        as the model; one an earlier fit of a continued run saved is found by its ``source``;
        ``best_earlier``: its commit and path when a run this one was resumed from saved it); returns
        its job's sequence number for :meth:`final_record`. An earlier job's failure is not raised
        here but by :meth:`final_record`: the end of a run goes on (the publisher closed, MLflow told)
        whatever failed before it."""
        best_source = os.path.abspath(best) if best else None
        best_dest = self.dests.known(best_source) if best_source else None
        return self._put("finalize", {"run": self.run, "record": record, "best": best_dest, "best_source": best_source,
                                      "best_earlier": best_earlier}, raise_errors=False)

    def final_record(self, seq: int, *, timeout: float | None = None) -> dict[str, Any] | None:
        """The record :meth:`submit_finalize` committed (commit ids filled), once every job before it is
        done; ``None`` if it was not committed within ``timeout``."""
        self.flush(timeout)
        with self._cond:
            found = [r for r in self.results if r.get("seq") == seq]
        return found[0]["record"] if found else None

    @property
    def worker_pid(self) -> int | None:
        """Process id of the current worker (it is restarted if it dies), or of the last one."""
        return self._worker_pid

    # -- waiting ------------------------------------------------------------------------
    @property
    def pending(self) -> int:
        return len(self.answers.unanswered)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every submitted job has an answer; ``False`` on timeout (jobs stay journaled).

        A worker that died meanwhile is restarted (it picks the journaled jobs up); once
        publishing has stalled (see :attr:`stalled`) this returns ``False`` at once.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._cond:
                if not self.answers.unanswered or self.stalled or self._handed_on:
                    break  # (handed on: what was queued since stays journaled for `sync`)
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                self._cond.wait(timeout=min(left, 1.0) if left is not None else 1.0)
            self._collect_from_disk()
            if self._proc is None or self._proc.poll() is not None:
                self._wake()
            else:
                self._say_if_stopped(self._proc)
        done = not self.answers.unanswered
        self.answers.raise_errors()
        return done

    def _say_if_stopped(self, proc: subprocess.Popen[bytes]) -> None:
        """Say once why the wait does not end when the worker is stopped (``SIGSTOP``, a debugger)."""
        if not self._said_stopped and is_stopped(proc.pid):
            self._said_stopped = True
            log.warning("The commit worker (pid %d) of run %s is stopped: the wait for its commits goes on until it is "
                        "continued (`kill -CONT %d`); Ctrl-C leaves them journaled for `oxen-callbacks sync`.",
                        proc.pid, self.run, proc.pid)

    def close(self, timeout: float | None = None, *, by: float | None = None) -> None:
        """Flush, let the worker finish (a last push included) and release the queue.

        ``timeout`` bounds the flush; the wait for the worker's exit is bounded either way
        (by one push attempt when a remote is set): a worker still pushing then finishes
        in the background. ``by``: a time (monotonic) both waits end by. A worker that
        answered every job waits for this process's next run (:data:`.warm_worker.END_OF_RUN`);
        this publisher lets go of it.
        """
        drained = False
        try:
            drained = self.flush(timeout)
        finally:
            proc = self._proc
            try:
                if proc is not None and proc.stdin is not None and not proc.stdin.closed:
                    wait = timeout if timeout is not None else self._exit_wait_s()
                    deadline = time.monotonic() + (wait if by is None else max(0.0, min(wait, by - time.monotonic())))
                    # a pre-empted process (``by``) exits at once: its worker finishes at EOF
                    try:
                        if not (drained and by is None and self._end_run(proc, deadline)):
                            self._let_finish(proc, deadline)
                    except BaseException:  # Ctrl-C while waiting: the worker finishes and exits on its own
                        if self._proc is proc:
                            self._let_finish(proc, time.monotonic())
                        raise
            finally:
                self._owner.release()

    def _end_run(self, proc: subprocess.Popen[bytes], deadline: float) -> bool:
        """Tell the worker the run is over; once it has freed the repository (a last push done) it
        is kept for this process's next run. ``False`` if it did not say so by ``deadline``."""
        assert proc.stdin is not None
        try:
            proc.stdin.write(END_OF_RUN.encode())
            proc.stdin.flush()
        except OSError:
            return False
        with self._cond:
            while not self._worker_idle and proc.poll() is None and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(timeout=min(left, 1.0))
            idle = self._worker_idle
        if idle:
            self._proc = None  # the next run's now: never woken, ended or waited for by this one (_handed_on)
            release_idle(proc, self._worker_version)
        return idle

    @staticmethod
    def _let_finish(proc: subprocess.Popen[bytes], deadline: float) -> None:
        """Close the worker's stdin (it finishes the queue and exits) and wait for it until ``deadline``."""
        assert proc.stdin is not None
        try:
            proc.stdin.close()
        except OSError:
            pass
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("Publishing worker still busy (pid %s); it finishes in the background", proc.pid)

    def _exit_wait_s(self) -> float:
        """How long the worker may take to exit once every job is answered: its last push."""
        from .push import BACKOFF_S

        return self.push_timeout + sum(BACKOFF_S) + 30.0 if self.remote else 60.0

    def __enter__(self) -> "CheckpointPublisher":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
