"""Our ends of the pipes to helper processes, kept out of the processes training forks.

A helper learns that training is done, or gone, when its stdin reaches EOF, and the training
process reads results from the commit worker's stdout. A process the training process forks
without exec (a ``multiprocessing`` fork ``Pool``, data-loading workers) inherits every
descriptor, these pipe ends included: while it lived, the commit worker never saw that EOF (the
end of a fit waited the worker's 60 s limit, then left it running) and, the trainer killed, a
helper could block on a results pipe nobody reads.

In a forked child each guarded descriptor is pointed at ``/dev/null`` instead of closed: the
child's copies of our file objects close that number later, and it must not be someone else's by
then. A descriptor is touched only while it is still the pipe it was (its device and inode), so
a number closed and reused since for a file of the user's is left alone.
"""

from __future__ import annotations

import os
from typing import IO, Any

from .fs import file_identity

_guarded: dict[int, tuple[int, int]] = {}  # descriptor -> (st_dev, st_ino) of the pipe end it was


def keep_from_forks(*streams: IO[Any] | None) -> None:
    """Keep ``streams`` (open pipe ends of ours) out of the processes forked from now on."""
    for fd, identity in list(_guarded.items()):
        if file_identity(fd) != identity:
            _guarded.pop(fd, None)  # closed since (the number may be someone else's now)
    for stream in streams:
        if stream is not None and (identity := file_identity(stream.fileno())) is not None:
            _guarded[stream.fileno()] = identity


def _in_forked_child() -> None:
    if not _guarded:
        return
    guarded = list(_guarded.items())
    _guarded.clear()
    null = os.open(os.devnull, os.O_RDWR)
    try:
        for fd, identity in guarded:
            if file_identity(fd) == identity:
                os.dup2(null, fd, inheritable=False)
    finally:
        os.close(null)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_in_forked_child)
