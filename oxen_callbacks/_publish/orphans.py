"""What a commit worker finishes besides its own queue: the work of processes that died.

At its start, in its commit process, a worker removes what a killed ``oxen add`` left
(:func:`clean_orphan_temp_files`) and drains the queues of training processes that died before
their jobs ran (:func:`drain_orphans`), removing finished queues older than a day;
``oxen-callbacks sync`` drains one such queue with :func:`drain`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

from .._oxen.identity import holds_identity, recorded_config
from .._util.locks import FileLock
from ..names import ENV_OXEN_CONFIG_DIR
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
        config = recorded_config(other.meta().get("env"))
        if config is not None and not holds_identity(config):
            log.warning("Not adopting orphan queue %s: the Oxen identity it commits as (%s) is gone; "
                        "`oxen-callbacks sync` reports it.", other.folder.name, config)
            continue
        lock = FileLock(other.worker_lock)
        if not lock.acquire(blocking=False):
            continue
        try:
            log.info("Adopting orphan queue %s", other.folder.name)
            with _committing_as(config):
                count += len(drain(other, committer))
        finally:
            lock.release()
    return count


@contextmanager
def _committing_as(config: str | None) -> Iterator[None]:
    """Within the block, Oxen in this (commit) process commits with the identity of config folder
    ``config`` (oxenai reads ``$OXEN_CONFIG_DIR`` at each commit): another run's checkpoints keep
    their own author, not the one of the worker that adopts them."""
    if config is None:
        yield
        return
    before = os.environ.get(ENV_OXEN_CONFIG_DIR)
    os.environ[ENV_OXEN_CONFIG_DIR] = config
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(ENV_OXEN_CONFIG_DIR, None)
        else:
            os.environ[ENV_OXEN_CONFIG_DIR] = before
