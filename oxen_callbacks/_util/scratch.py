"""Scratch folders that a killed process does not leave behind for good.

Each scratch folder has a lock beside it, held while it is in use (``flock``: released when its
process dies). Making a new one first deletes those whose lock is free: what a pin killed mid-copy
left, which can be as big as the data it was copying.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .fs import make_dirs_writable, remove_tree
from .locks import FileLock

log = logging.getLogger(__name__)


@contextmanager
def scratch_folder(tmp: Path) -> Iterator[Path]:
    """A new empty folder under ``tmp``, deleted (with its lock) on exit."""
    name = uuid.uuid4().hex
    lock_path = tmp / f"{name}.lock"
    with FileLock(lock_path):
        _sweep(tmp)
        path = tmp / name
        path.mkdir()
        try:
            yield path
        finally:
            remove_tree(path)
            lock_path.unlink(missing_ok=True)


def _sweep(tmp: Path) -> None:
    """Delete the scratch folders under ``tmp`` whose lock no live process holds. One that a killed
    pin's orphaned copier still writes into may not all go at once: the next sweep goes on."""
    for lock_path in tmp.glob("*.lock"):
        lock = FileLock(lock_path)
        if not lock.acquire(blocking=False):
            continue  # in use
        try:
            left = tmp / lock_path.stem
            if os.path.isdir(left) and not os.path.islink(left):
                log.info("Deleting %s, left by a process that was stopped", left)
                try:
                    make_dirs_writable(left)
                except OSError:  # changed under us (an orphaned copier): rmtree does what it can
                    pass
                shutil.rmtree(left, ignore_errors=True)
            if not os.path.lexists(left):
                lock_path.unlink(missing_ok=True)
        finally:
            lock.release()
