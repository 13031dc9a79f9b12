"""What a commit worker finishes besides its own queue: the work of processes that died.

At its start, in its commit process, a worker removes what a killed ``oxen add`` left
(:func:`clean_orphan_temp_files`) and drains the queues of training processes that died before
their jobs ran (:func:`drain_orphans`), removing finished queues older than a day;
``oxen-callbacks sync`` drains one such queue with :func:`drain`.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from .._util.locks import FileLock
from .adding import clean_after_killed_adds
from .committer import Committer
from .queue import JobQueue, all_queues

log = logging.getLogger("oxen_callbacks.worker")


class Answers(Protocol):
    def emit(self, result: dict[str, Any]) -> None: ...


def clean_orphan_temp_files(committer: Committer) -> int:
    """Delete scratch files of a killed ``oxen add`` (see :func:`.adding.clean_after_killed_adds`)."""
    committer.hold_lock()
    return clean_after_killed_adds(committer.repo.path)


def drain(queue: JobQueue, committer: Committer, results: Answers | None = None, *, final: bool = True) -> list[dict[str, Any]]:
    """Run every pending job of ``queue`` (used for orphans and by ``oxen-callbacks sync``)."""
    done = committer.run_batch(queue, queue.pending(), final=final)
    for result in done:
        if results:
            results.emit(result)
    return done


def drain_orphans(committer: Committer, skip: JobQueue | None = None) -> int:
    """Finish the queues of training processes that died (kill -9, crash) before their jobs ran; a damaged
    one is left as it is, for ``oxen-callbacks sync`` to report."""
    count = 0
    for other in all_queues(committer.repo.path):
        if skip is not None and other.folder == skip.folder:
            continue
        if not other.pending():
            other.forget_if_old()  # (finished a day ago: removed here too, as not every user runs `sync`)
            continue
        if not other.is_orphan():
            continue
        if fault := other.damage():
            log.warning("Not adopting orphan queue %s: %s", other.folder.name, fault)
            continue
        lock = FileLock(other.worker_lock)
        if not lock.acquire(blocking=False):
            continue
        try:
            log.info("Adopting orphan queue %s", other.folder.name)
            count += len(drain(other, committer))
        finally:
            lock.release()
    return count
