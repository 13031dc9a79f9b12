"""Work this process still does for a model repository after ``fit()`` returned (finishing a run's
lineage, see :meth:`oxen_callbacks.run.LineageRun.finish_soon`).

Code of this process that reads a model repository waits for that work first (a resume right after
a fit must see its final lineage), and the interpreter waits for all of it at exit.

Example::

    background.track(repo_path, thread, describe=lambda: "run r1 (2 commits pending)")
    background.wait_for(repo_path)        # before reading runs/ of repo_path
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

_work: list[tuple[str, threading.Thread, Callable[[], str]]] = []
_lock = threading.Lock()


def _key(repo: str | os.PathLike[str]) -> str:
    return str(Path(repo).expanduser().resolve())


def track(repo: str | os.PathLike[str], thread: threading.Thread, *, describe: Callable[[], str]) -> None:
    """Note ``thread`` (started or about to be) as work for ``repo``; ``describe()`` says what it
    waits for, in the message at exit."""
    with _lock:
        if not _work:
            atexit.register(_wait_at_exit)
        _work[:] = [w for w in _work if w[1].is_alive()] + [(_key(repo), thread, describe)]


def wait_for(repo: str | os.PathLike[str] | None = None, timeout: float | None = None) -> None:
    """Wait for the work tracked for ``repo`` (every repository's when ``None``)."""
    key = _key(repo) if repo is not None else None
    with _lock:
        threads = [t for k, t, _ in _work if key is None or k == key]
    for thread in threads:
        if thread is not threading.current_thread() and thread.ident is not None:
            thread.join(timeout)


def _wait_at_exit() -> None:
    """Let the work ``fit()`` returned from finish, saying so when it takes more than a second.
    Each piece is bounded by its run's own timeouts; Ctrl-C leaves the rest, journaled, to
    ``oxen-callbacks sync``."""
    with _lock:
        work, _work[:] = list(_work), []
    for _, thread, describe in work:
        if thread.ident is None:
            continue
        thread.join(1.0)
        if thread.is_alive():
            log.warning("oxen-callbacks: finishing %s before exit; Ctrl-C leaves the rest to `oxen-callbacks sync`.",
                        describe())
            thread.join()
