"""Inter-process file locks (``flock``), with a timeout.

Oxen has no waiting lock of its own: a second process touching a repository
while another adds or commits fails at once. Every repository operation of this
library therefore runs under one of these locks.

Example::

    with FileLock(repo / ".oxen" / "oxen-callbacks" / "repo.lock", timeout=600):
        repo.add(...); repo.commit(...)
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from pathlib import Path
from types import TracebackType

from ..errors import OxenCallbacksError


class LockTimeout(OxenCallbacksError, TimeoutError):
    """The lock was not acquired within the timeout."""


class FileLock:
    """An exclusive ``flock`` on ``path``, released on close or process death."""

    def __init__(self, path: str | os.PathLike[str], timeout: float | None = None) -> None:
        self.path = Path(path)
        self.timeout = timeout
        self._fd: int | None = None

    def acquire(self, blocking: bool = True) -> bool:
        """Take the lock; ``False`` only when ``blocking`` is off and it is held elsewhere."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        delay = 0.005
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._fd = fd
                return True
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
            if not blocking:
                os.close(fd)
                return False
            if deadline is not None and time.monotonic() >= deadline:
                os.close(fd)
                raise LockTimeout(f"Timed out after {self.timeout}s waiting for lock {self.path}")
            time.sleep(delay)
            delay = min(delay * 2, 0.1)

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def write(self, data: bytes) -> None:
        """Replace the lock file's content (e.g. who holds it) while holding it."""
        if self._fd is None:
            raise RuntimeError(f"lock {self.path} is not held")
        os.pwrite(self._fd, data, 0)  # the new content first, then cut: a reader never sees it empty
        os.ftruncate(self._fd, len(data))

    @property
    def held(self) -> bool:
        return self._fd is not None

    def fileno(self) -> int:
        """The descriptor that holds the lock (a forked child must close it, or it holds the lock too)."""
        if self._fd is None:
            raise RuntimeError(f"lock {self.path} is not held")
        return self._fd

    def __enter__(self) -> "FileLock":
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def is_locked(path: str | os.PathLike[str]) -> bool:
    """True when some live process holds the lock at ``path``."""
    lock = FileLock(path)
    if not Path(path).exists():
        return False
    if lock.acquire(blocking=False):
        lock.release()
        return False
    return True
