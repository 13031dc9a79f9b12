"""Filesystem helpers shared by the layers."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

# -- folders that may hold read-only files -------------------------------------------------
# Snapshots are read-only (folders 0555, files 0444) so that nobody edits a pinned commit
# in place; these delete or empty such folders.

def remove_tree(path: str | os.PathLike[str]) -> None:
    """Delete a folder that may hold read-only snapshots (a symbolic link in its place: the link)."""
    if os.path.islink(path):
        os.unlink(path)
    elif os.path.isdir(path):
        make_dirs_writable(Path(path))
        shutil.rmtree(path)


def empty_folder(path: str | os.PathLike[str]) -> None:
    """Delete everything inside ``path`` (a scratch folder), keeping the folder."""
    for entry in os.scandir(path):
        if entry.is_dir(follow_symlinks=False):
            remove_tree(entry.path)
        else:
            os.unlink(entry.path)


def make_dirs_writable(path: str | os.PathLike[str]) -> None:
    """Folders of ``path`` (itself included) 0755, so their entries can be moved or deleted."""
    for dirpath, _dirs, _names in os.walk(path):
        os.chmod(dirpath, 0o755)
