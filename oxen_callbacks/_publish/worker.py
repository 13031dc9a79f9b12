"""The publishing worker process: ``python -m oxen_callbacks._publish.worker --queue DIR --repo DIR``.

oxenai holds the GIL for a whole add (seconds for a large checkpoint) and can
hang on a dead remote, so commits run here, in a process of their own, never in
the training process. The worker drains its queue, wakes on a newline on stdin,
and finishes the remaining jobs when stdin closes (the trainer finished or died)
or :data:`~.warm_worker.END_OF_RUN` comes: then it frees the repository and waits,
imported, for the next run of the same training process (a notebook's next cell,
a sweep's next fit), handed over like a warm one's. Results go back as JSON lines
on the original stdout; oxenai's own prints and the log go to the queue's ``worker.log``.
"""

from __future__ import annotations

import sys

if __name__ == "__main__" and "--warm" not in sys.argv:
    # a worker started at fit start yields the CPU to training before the imports below (~0.1 s);
    # a warm one imports them at once, while the user builds the trainer, and yields at its hand-off
    from .._util.processes import yield_cpu_to_training

    yield_cpu_to_training(idle=False)

import argparse
import json
import logging
import os
import time
from collections.abc import Callable
from typing import IO, Any

from .. import __version__
from .._oxen.repo import LocalRepo
from .._util.handoff import take_handoff
from .._util.locks import FileLock
from .._util.processes import ENTRY_POINTS, yield_cpu_to_training
from .._util.stdin_lines import StdinLines
from ..errors import PublishError
from .batches import Batches, CommitProcessDied
from .committer import Committer
from .orphans import clean_orphan_temp_files, drain_orphans
from .push import PushTarget, push_with_timeout
from .queue import JobQueue, damage_warning
from .warm_worker import END_OF_RUN, IDLE

log = logging.getLogger("oxen_callbacks.worker")


class _Results:
    """JSON-line results to the parent; silent once the parent is gone."""

    def __init__(self, stream: IO[str] | None) -> None:
        self.stream = stream

    def emit(self, result: dict[str, Any]) -> None:
        if self.stream is None:
            return
        try:
            self.stream.write(json.dumps(result) + "\n")
            self.stream.flush()
        except (BrokenPipeError, OSError):
            self.stream = None

    def tell_damage(self, queue: JobQueue) -> None:
        """Send (and log) the damaged files ``queue`` came across since: the training process warns once."""
        for notice in queue.take_notices():
            log.warning("%s", damage_warning(notice))
            self.emit(notice)


def _keep_results_stream() -> IO[str]:
    """The original stdout, kept for results before fds 1 and 2 go to a run's log."""
    results = os.fdopen(os.dup(1), "w", buffering=1)
    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(process)d %(levelname)s %(message)s"
    )
    return results


def _log_to(log_path: str) -> None:
    """Send fds 1 and 2 (Rust prints, and the log) to this run's log."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


#: How long a wake-up waits for the saves right behind it: Lightning writes ``epoch=N…ckpt`` and
#: ``last.ckpt`` a few milliseconds apart, and one commit can take both.
BURST_S = 0.05


def commit_tasks(queue: JobQueue, committer: Committer) -> dict[str, Callable[..., Any]]:
    """What the commit process of ``queue`` runs (see :class:`.batches.BatchProcess`)."""
    def run_jobs(report: Callable[[Any], None], seqs: list[int], final: bool) -> list[dict[str, Any]]:
        """Each commit's results are reported as it is made; returns the rest (a failure)."""
        jobs = [j for j in queue.pending() if j.seq in set(seqs)]
        reported: list[dict[str, Any]] = []
        results = committer.run_batch(queue, jobs, final=final, on_commit=lambda made: (report(made),
                                                                                      reported.extend(made)))
        return results[len(reported):]

    def maintain(_report: Callable[[Any], None], skip: str) -> None:
        clean_orphan_temp_files(committer)
        drain_orphans(committer, skip=JobQueue(skip))

    return {"run_jobs": run_jobs, "maintain": maintain}


def _rest_of_burst(wakeups: StdinLines, queue: JobQueue) -> str:
    """Read the wake-ups of the next :data:`BURST_S`, or until the run's end is queued (nothing
    follows it to wait for: a removal, top-k rotation, comes between a save and ``last.ckpt``);
    ``""`` when stdin closed meanwhile, :data:`END_OF_RUN` when the run ended."""
    deadline = time.monotonic() + BURST_S
    while (left := deadline - time.monotonic()) > 0:
        line = wakeups.next(timeout=left)
        if line in ("", END_OF_RUN):
            return line
        if line is None or _newest_kind(queue) == "finalize":
            break
    return "\n"


def _newest_kind(queue: JobQueue) -> str | None:
    """The kind of the newest job waiting (``checkpoint``, ``remove``, ``finalize``), if any."""
    pending = queue.pending()
    return pending[-1].kind if pending else None


def serve(queue: JobQueue, batches: Batches, results: _Results, push: PushTarget | None, repo: str,
          wakeups: StdinLines) -> str:
    """Run the queue's jobs as they come (a newline on stdin wakes us; EOF or :data:`END_OF_RUN`:
    finish and return ``""`` or that line).

    A push that failed is not tried again by this worker: it is journaled, ``sync`` retries
    it, and the end of training waits for at most the one push in flight. When commit
    processes keep dying, the jobs stay queued for ``sync`` and the trainer is told once.
    """
    failed: set[int] = set()
    over: str | None = None  # why serving ends, once it does: "" (EOF) or END_OF_RUN
    stalled = False
    push_failed = bool(queue.meta().get("push_failed"))  # a restarted worker does not try again either
    answered: set[int] = set()  # the jobs of this round that have their result

    def answer(done: list[dict[str, Any]]) -> None:
        """Tell the trainer (each commit's at once: its MLflow work for them overlaps the next commit)."""
        for result in done:
            answered.add(result["seq"])
            if not result["ok"]:
                failed.add(result["seq"])
            elif push and result["kind"] in ("checkpoint", "finalize", "remove"):
                push.dirty = True
            results.emit(result)

    while True:
        jobs = [] if stalled else [j for j in queue.pending() if j.seq not in failed]
        answered.clear()
        try:
            answer(batches.run("run_jobs", answer, seqs=[j.seq for j in jobs], final=over is not None) if jobs else [])
        except CommitProcessDied as exc:
            stalled = True
            results.emit({"kind": "stalled", "ok": False, "error": str(exc), "queue": str(queue.folder)})
        except PublishError as exc:  # the task itself failed outside a job (e.g. the lock): fail these jobs
            answer([{"seq": j.seq, "kind": j.kind, "ok": False, "error": str(exc)}
                    for j in jobs if j.seq not in answered and queue.is_pending(j)])
        # jobs a killed commit process finished before it died: their results are on disk only
        answer([r for j in jobs if j.seq not in answered and (r := queue.result(j.seq)) is not None])
        results.tell_damage(queue)  # (a job file, or a result on disk, that cannot be read: skipped, never fatal)
        if answered:
            continue  # more may have arrived meanwhile
        if push and push.dirty and not push_failed and not stalled:
            batches.retire()  # the push process opens the repository's databases too
            report = push_with_timeout(repo, push)
            push_failed = not report["ok"]  # journaled: `sync` retries; another try here could cost a timeout
            if push_failed:
                queue.update_meta(push_failed=True)
            results.emit(report)
        if over is not None:
            return over
        line = wakeups.next(timeout=Batches.IDLE_S if batches.serving else 1.0)
        if line is None:
            batches.retire()
        elif line == "\n" and _newest_kind(queue) == "checkpoint":  # a wake-up, not the run's end: no wait
            line = _rest_of_burst(wakeups, queue)
        over = line if line in ("", END_OF_RUN) else None


def _await_handoff(stdin: StdinLines) -> list[str] | None:
    """A warm worker's run (see :mod:`.warm_worker`): take on its environment, working folder and
    umask, return its arguments; ``None`` at EOF."""
    while line := stdin.next(timeout=None):
        if line.startswith("{"):
            return list(take_handoff(line)["args"])
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=ENTRY_POINTS["publish-worker"])
    parser.add_argument("--warm", action="store_true",
                        help="wait for the arguments and environment of a run on stdin (one JSON line), then serve it")
    parser.add_argument("--queue")
    parser.add_argument("--repo")
    parser.add_argument("--remote")
    parser.add_argument("--branch")
    parser.add_argument("--remote-url")
    parser.add_argument("--push-timeout", type=float, default=300.0)
    args = parser.parse_args(argv)
    wakeups = StdinLines()
    results = _Results(_keep_results_stream())  # (before a run's log takes fds 1 and 2)
    while True:  # one run at a time: a notebook's cells, a sweep's fits (see END_OF_RUN)
        if args.warm:
            handoff = _await_handoff(wakeups)
            if handoff is None:
                return 0  # the callback was never used, or the training process is gone
            args = parser.parse_args(handoff)
        yield_cpu_to_training(idle=False)  # commits run beside training; they must progress under a busy CPU too
        if not args.queue or not args.repo:
            parser.error("--queue and --repo are required")
        queue = JobQueue(args.queue)
        _log_to(str(queue.log_path))
        if _serve_run(args, queue, results, wakeups) != END_OF_RUN:
            return 0
        _log_to(os.devnull)  # waiting, it holds no file of the repository open (its queue's log neither)
        os.chdir("/")  # nor the trainer's folder (an unmount would find it busy); the next hand-off sets it
        results.emit({"kind": IDLE, "ok": True, "version": __version__})  # the repository and the queue are free: hand over the next run
        args = parser.parse_args(["--warm"])


def _serve_run(args: argparse.Namespace, queue: JobQueue, results: _Results, wakeups: StdinLines) -> str:
    """Serve one run's queue until its end (see :func:`serve`); returns why it ended. The commit
    process is retired and the queue's worker lock released before this returns."""
    lock = FileLock(queue.worker_lock, timeout=3600)
    lock.acquire()  # a batch of a killed predecessor may still be finishing
    try:
        committer = Committer(LocalRepo(args.repo, role="model repository"))
        push = PushTarget(args.remote, args.branch, args.push_timeout, url=args.remote_url) if args.remote else None
        results.emit({"kind": "ready", "ok": True, "pid": os.getpid()})
        for result in queue.results():  # answers a killed predecessor could not send (the parent drops repeats)
            results.emit(result)
        batches = Batches(commit_tasks(queue, committer), (lock.fileno(),))
        try:
            try:
                batches.run("maintain", skip=str(queue.folder))
            except PublishError as exc:  # housekeeping only: the queue's own jobs come first
                log.warning("Start-up maintenance failed: %s", exc)
            over = serve(queue, batches, results, push, args.repo, wakeups)
        finally:
            batches.close()
    finally:
        lock.release()
    log.info("Worker done: queue %s drained", queue.folder.name)
    return over


if __name__ == "__main__":
    exit_code = main()
    logging.shutdown()
    # every result is on disk and sent: skip the interpreter's teardown, which the trainer waits for at fit end
    os._exit(exit_code)
