"""Adds and commits under the repository lock, and the cleaning up after one that was killed.

A killed ``oxen add`` (or a copy of ours into Oxen's content store) leaves scratch files there.
Finding them means walking the store, which grows with every version ever committed, so it is
done only when a batch did not end: :func:`adding` leaves a marker for exactly that case.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .._oxen import layout as oxen_layout

log = logging.getLogger(__name__)


def adding_marker(model_repo: str | os.PathLike[str]) -> Path:
    """A file that exists while a holder of the repository lock adds and commits (see :func:`adding`)."""
    return oxen_layout.state_dir(model_repo) / "adding"


class Adding:
    """What :func:`adding` yields: set ``failed`` when an add or commit inside failed without raising."""

    failed = False


@contextmanager
def adding(model_repo: str | os.PathLike[str]) -> Iterator[Adding]:
    """Around ``oxen add`` and ``commit`` under the repository lock. A process killed inside, an error out
    of it, or a failure it reports (``failed``) leaves the marker, and the next lock holder cleans up
    after it first (:func:`clean_after_killed_adds`)."""
    clean_after_killed_adds(model_repo)
    marker = adding_marker(model_repo)
    marker.touch()
    batch = Adding()
    yield batch  # (no finally: an exception keeps the marker)
    if not batch.failed:
        marker.unlink(missing_ok=True)


def clean_after_killed_adds(model_repo: str | os.PathLike[str]) -> int:
    """Under the repository lock: delete the scratch files of a killed ``oxen add``, when one was killed
    (the marker of :func:`adding` is left: only then is the content store, which grows with every
    version ever committed, walked). Every add of this library runs under that lock, and Oxen itself
    refuses a second process mid-add, so none is live. Returns how many were removed."""
    marker = adding_marker(model_repo)
    if not marker.exists():
        return 0
    removed = 0
    for path in oxen_layout.orphan_temp_files(model_repo, older_than_s=0):
        path.unlink(missing_ok=True)
        removed += 1
    if removed:
        log.info("Removed %d orphan temp file(s) left by an interrupted oxen add", removed)
    marker.unlink(missing_ok=True)
    return removed
