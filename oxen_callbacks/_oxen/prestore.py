"""Put a checkpoint's bytes into Oxen's content store before ``oxen add`` does.

``oxen add`` of a 100 MB file takes ~0.4 s on this kind of machine, where hashing
it (xxh3-128) and copying it take ~0.1 s together; when the version is already
stored, add only hashes (~0.08 s). So the worker hashes each file and, if its
version is missing, copies it in with the kernel's copy (``copy_file_range``),
then lets ``oxen add`` find it. Bytes that are already stored (a checkpoint
written twice, files of a checkpoint folder that did not change) are not copied
at all. The store keeps its own copy: it never shares an inode with the
trainer's files. Layout knowledge: :func:`oxen_layout.version_path`.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from .._util.materialized import file_digest
from . import layout as oxen_layout


def prestore(repo: Path, target: Path) -> int:
    """Store every file of ``target`` (file or folder) in ``repo``'s content store; returns bytes copied.
    Nothing where the repository keeps its versions elsewhere (``versions_path``, another storage):
    ``oxen add`` stores them there, and a copy here would only fill the disk the user moved them off."""
    try:
        if oxen_layout.content_store(repo) is not None:
            return 0
    except (OSError, oxen_layout.DamagedLayout):
        return 0  # `oxen add` names what is wrong with the repository
    files = [target] if target.is_file() else [Path(d) / n for d, _, ns in os.walk(target) for n in ns]
    copied = 0
    for file in files:
        version = oxen_layout.version_path(repo, file_digest(file))
        if version.exists():
            continue
        scratch = oxen_layout.version_scratch(repo, uuid.uuid4().hex)
        scratch.parent.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copyfile(file, scratch)
            version.parent.mkdir(parents=True, exist_ok=True)
            os.replace(scratch, version)
        except BaseException:  # (a full disk: not a checkpoint-sized leftover as well)
            scratch.unlink(missing_ok=True)
            raise
        copied += version.stat().st_size
    return copied
