"""Freeze a just-written checkpoint so rotation or a rewrite cannot change what gets committed.

Hard links cost microseconds whatever the size and survive the trainer deleting
the original (``save_top_k``, ``save_total_limit``). Where a hard link is not
possible (another filesystem, or a filesystem without links) the bytes are copied.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)
_warned_copy = False


def freeze(src: str | os.PathLike[str], dest: str | os.PathLike[str], *, copy: bool = False) -> tuple[int, int]:
    """Freeze file or folder ``src`` at ``dest``; returns ``(files, bytes)``.

    Symlinks inside a checkpoint folder (or a symlinked checkpoint, such as
    Lightning's ``save_last="link"``) are followed: what is frozen is content.
    ``copy``: copy the bytes instead of linking them, for a writer that may rewrite
    ``src`` in place without a chance to :func:`unfreeze_for_rewrite` it first.
    """
    src_path, dest_path = Path(os.path.realpath(src)), Path(dest)
    if src_path.is_dir():
        files = size = 0
        for dirpath, _dirs, names in os.walk(src_path, followlinks=True):
            rel = Path(dirpath).relative_to(src_path)
            (dest_path / rel).mkdir(parents=True, exist_ok=True)
            for name in names:
                size += _freeze_file(Path(dirpath) / name, dest_path / rel / name, copy)
                files += 1
        return files, size
    dest_path.parent.mkdir(parents=True, exist_ok=True)
    return 1, _freeze_file(src_path, dest_path, copy)


def _freeze_file(src: Path, dest: Path, copy: bool) -> int:
    global _warned_copy
    real = Path(os.path.realpath(src))
    if copy:
        shutil.copyfile(real, dest)
        return dest.stat().st_size
    try:
        os.link(real, dest)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES):
            raise
        if not _warned_copy:
            log.warning(
                "Checkpoints and the model repository are on different filesystems (or links are not "
                "allowed): checkpoints are copied at save time, which costs training time. "
                "Put the model repository on the checkpoints' filesystem to avoid it."
            )
            _warned_copy = True
        shutil.copyfile(real, dest)
    return dest.stat().st_size


class SetAside:
    """A published checkpoint file moved aside (same folder, hidden name) while it is rewritten:
    :meth:`drop` once the new one is written, :meth:`put_back` when the write failed, so a failed
    save leaves the previous file in place, as the trainer's own save would."""

    def __init__(self, path: str) -> None:
        self.path = path
        folder, name = os.path.split(path)
        self.aside = os.path.join(folder, f".{name}.oxcb-prev")
        os.replace(path, self.aside)

    def drop(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.aside)

    def put_back(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.replace(self.aside, self.path)


def unfreeze_for_rewrite(path: str, *, published: bool, keep: bool = False) -> SetAside | None:
    """Move aside what a checkpoint about to be rewritten at ``path`` shares with a frozen copy, so
    the write gets fresh inodes instead of changing the frozen bytes in place: the file when
    ``published`` by this run (returned: drop it or put it back), and in a folder every file with
    another link (unlinked; with ``keep``, for a write that may not come, replaced by a copy of itself)."""
    if os.path.isfile(path) and not os.path.islink(path):
        return SetAside(path) if published else None
    for dirpath, _dirs, names in os.walk(path):
        for name in names:
            file = os.path.join(dirpath, name)
            if os.stat(file, follow_symlinks=False).st_nlink > 1:
                if keep:
                    _own_copy(file)
                else:
                    os.unlink(file)
    return None


def _own_copy(file: str) -> None:
    """Give ``file`` an inode of its own, same bytes (its other links keep theirs)."""
    folder, name = os.path.split(file)
    tmp = os.path.join(folder, f".{name}.oxcb-copy")
    shutil.copy2(file, tmp)
    os.replace(tmp, file)
