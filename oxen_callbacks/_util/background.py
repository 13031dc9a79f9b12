"""Work this process still does for a model repository after ``fit()`` returned (finishing a run's
lineage, see :meth:`oxen_callbacks.run.LineageRun.finish_soon`).

Code of this process that reads a model repository waits for that work first (a resume right after
a fit must see its final lineage), and the interpreter waits for all of it at exit.

Example::

    background.track(repo_path, thread, committed=event, describe=lambda: "run r1 (2 commits pending)")
    background.wait_for(repo_path)        # before reading runs/ of repo_path: waits for `event`
    background.wait_for(repo_path, run="r1")  # before a new fit of run r1: waits for all its work
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

_work: list[tuple[str, threading.Thread, threading.Event, Callable[[], str], str | None]] = []
_lock = threading.Lock()


def _key(repo: str | os.PathLike[str]) -> str:
    return str(Path(repo).expanduser().resolve())


def track(repo: str | os.PathLike[str], thread: threading.Thread, *, committed: threading.Event,
          describe: Callable[[], str], run: str | None = None) -> None:
    """Note ``thread`` (started or about to be) as work for ``repo``'s run ``run``: readers of the
    repository wait for ``committed`` (set once what they read is final), the interpreter's exit and a
    new fit of the same run for the thread; ``describe()`` says what it waits for, in the message at exit."""
    with _lock:
        if not _work:
            atexit.register(_wait_at_exit)
        _work[:] = [w for w in _work if w[1].is_alive()] + [(_key(repo), thread, committed, describe, run)]


def wait_for(repo: str | os.PathLike[str], timeout: float | None = None, *, run: str | None = None) -> None:
    """Wait until what this process still commits to ``repo`` in the background is committed; for
    the work of ``run`` itself (a new fit continues it), until all of it is done (its claim released,
    its MLflow run logged)."""
    key = _key(repo)
    with _lock:
        work = [(t, e, r) for k, t, e, _, r in _work if k == key]
    deadline = None if timeout is None else time.monotonic() + timeout  # one limit for all of it
    for thread, committed, its_run in work:
        if thread is threading.current_thread() or thread.ident is None:
            continue
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        if run is not None and its_run == run:
            thread.join(left)
        else:
            committed.wait(left)


def _wait_at_exit() -> None:
    """Let the work ``fit()`` returned from finish, saying so when it takes more than a second.
    Each piece is bounded by its run's own timeouts; Ctrl-C leaves the rest, journaled, to
    ``oxen-callbacks sync``."""
    with _lock:
        work, _work[:] = list(_work), []
    try:
        for _, thread, _, describe, _ in work:
            if thread.ident is None:
                continue
            thread.join(1.0)
            if thread.is_alive():
                log.warning("oxen-callbacks: finishing %s before exit; Ctrl-C leaves the rest to "
                            "`oxen-callbacks sync`.", describe())
                thread.join()
    except KeyboardInterrupt:
        log.warning("oxen-callbacks: not waiting; what is left is journaled: run `oxen-callbacks sync`.")
