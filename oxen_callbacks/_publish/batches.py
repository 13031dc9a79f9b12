"""The commit process: a forked child that imports oxenai ahead of time and runs one burst of
batches of the publishing worker (:mod:`.worker`), then exits and frees the repository."""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from collections.abc import Callable
from typing import Any

from .._oxen.repo import preload
from ..errors import PublishError

log = logging.getLogger("oxen_callbacks.worker")


class CommitProcessDied(PublishError):
    """The commit process was killed (SIGKILL, the OOM killer) or crashed; its jobs are still queued."""



class BatchProcess:
    """A forked process that imports oxenai ahead of time, then runs tasks until retired.

    oxenai keeps a repository's databases (and their OS locks) open until the
    process exits, so commits run in a process that exits between bursts of
    saves: other training processes, ``sync`` and the user's own ``oxen`` commands
    can use the repository then. Within a burst one process serves every batch
    (see :class:`Batches`), paying the import and the database opening once. The
    supervisor never imports oxenai (it starts native threads, and forking a
    process with threads can deadlock the child), so the child imports it right
    after the fork, while the supervisor waits for work.

    Protocol: one JSON request per line on a pipe; back, a ``{"partial": ...}`` line for each
    step a task reports as it goes (a commit's results, while the next commit runs), then one
    reply line. EOF on the request pipe (:meth:`retire`) ends the process.
    """

    def __init__(self, tasks: dict[str, Callable[..., Any]], close_fds: tuple[int, ...] = ()) -> None:
        req_read, req_write = os.pipe()
        reply_read, reply_write = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # child: never returns into the supervisor's loop, whatever happens
            try:
                for fd in (req_write, reply_read, *close_fds):
                    os.close(fd)  # e.g. the worker lock: a batch outliving a killed worker must not keep it
                preload()  # oxenai's 0.2 s import, paid before the work arrives

                with os.fdopen(req_read) as inp, os.fdopen(reply_write, "w") as out:
                    def report(value: Any) -> None:
                        try:
                            out.write(json.dumps({"partial": value}) + "\n")
                            out.flush()
                        except OSError:  # the worker is gone: the batch goes on, its results are on disk
                            pass

                    for line in inp:
                        request = json.loads(line)
                        try:
                            reply = {"ok": True, "value": tasks[request["task"]](report, **request["args"])}
                        except BaseException as exc:  # noqa: BLE001 - everything must reach the parent
                            log.exception("Publishing batch failed")
                            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
                        out.write(json.dumps(reply) + "\n")
                        out.flush()
            finally:
                os._exit(0)  # also when the parent is gone (broken pipe): the work itself is on disk
        os.close(req_read)
        os.close(reply_write)
        self._request = os.fdopen(req_write, "w")
        self._reply = os.fdopen(reply_read)
        self.started_serving: float | None = None  # monotonic time of its first task

    def run(self, task: str, on_partial: Callable[[Any], None], **args: Any) -> Any:
        """Run one task in the child, passing what it reports as it goes to ``on_partial``; raises
        :class:`PublishError` if it failed or the child died."""
        if self.started_serving is None:
            self.started_serving = time.monotonic()
        try:
            self._request.write(json.dumps({"task": task, "args": args}) + "\n")
            self._request.flush()
        except BrokenPipeError:
            pass  # a dead child shows as no reply below
        while (line := self._reply.readline()) and "partial" in (reply := json.loads(line)):
            on_partial(reply["partial"])
        if not line:
            self._close_pipes()
            _, status = os.waitpid(self.pid, 0)
            self.pid = 0
            raise CommitProcessDied(f"The commit process died ({_describe(status)}); its jobs stay queued")
        if not reply["ok"]:
            raise PublishError(reply["error"])
        return reply["value"]

    def retire(self) -> None:
        """Let the child exit (releasing the repository) and wait for it."""
        self._close_pipes()
        if self.pid:
            os.waitpid(self.pid, 0)

    def discard(self) -> None:
        """Stop a child that got no task: it has only imported oxenai, so nothing is lost."""
        self._close_pipes()
        try:
            os.kill(self.pid, signal.SIGKILL)  # no need to wait for its import to finish
        except ProcessLookupError:
            pass
        os.waitpid(self.pid, 0)

    def _close_pipes(self) -> None:
        for stream in (self._request, self._reply):
            try:
                stream.close()
            except BrokenPipeError:
                pass


def _describe(wait_status: int) -> str:
    if os.WIFSIGNALED(wait_status):
        return f"killed by {signal.Signals(os.WTERMSIG(wait_status)).name}"
    return f"exit code {os.waitstatus_to_exitcode(wait_status)}"


class Batches:
    """One commit process at a time: it serves a burst of batches, then a fresh one waits warm.

    A process that has served batches lingers ``IDLE_S`` for the next one (saves
    close together, the final lineage commit right after the last save), and is
    retired after ``HOLD_S`` of serving so that another process waiting for the
    repository is not starved; a new one is forked at once to import oxenai while
    the supervisor waits for work.
    """

    IDLE_S = 2.0
    HOLD_S = 10.0
    #: Commit processes one task may lose (killed, crashed) before the worker gives up on it:
    #: the jobs stay queued on disk and ``oxen-callbacks sync`` (or the next worker) finishes them.
    RESTARTS = 4

    def __init__(self, tasks: dict[str, Callable[..., Any]], close_fds: tuple[int, ...]) -> None:
        """``tasks``: what a commit process can be asked to run (:func:`.worker.commit_tasks`)."""
        self._tasks = tasks
        self._close_fds = close_fds
        self._child = BatchProcess(self._tasks, close_fds)

    @property
    def serving(self) -> bool:
        """Whether the current process has served a batch (and so holds the repository)."""
        return self._child.started_serving is not None

    def run(self, task: str, on_partial: Callable[[Any], None] = lambda _value: None, **args: Any) -> Any:
        """Run ``task`` in the commit process (what it reports as it goes to ``on_partial``); a killed
        process is replaced and the task run again.

        Every task is idempotent over the on-disk queue (a job is done once its result is
        recorded), so a task cut short by a kill is simply repeated. Raises
        :class:`CommitProcessDied` after :attr:`RESTARTS` lost processes in a row.
        """
        for attempt in range(self.RESTARTS + 1):
            try:
                return self._child.run(task, on_partial, **args)
            except CommitProcessDied as exc:
                self._child = BatchProcess(self._tasks, self._close_fds)
                if attempt == self.RESTARTS:
                    raise
                log.warning("%s; running %s again in a new commit process", exc, task)
                time.sleep(min(0.1 * 2 ** attempt, 2.0))
            finally:
                started = self._child.started_serving
                if started is not None and time.monotonic() - started > self.HOLD_S:
                    self.retire()
        raise AssertionError("unreachable")

    def retire(self) -> None:
        """Free the repository now (before a push, or after ``IDLE_S`` without work)."""
        if self.serving:
            self._child.retire()
            self._child = BatchProcess(self._tasks, self._close_fds)

    def close(self) -> None:
        if self.serving:
            self._child.retire()
        else:
            self._child.discard()
