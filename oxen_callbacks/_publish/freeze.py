"""Freeze a just-written checkpoint so rotation or a rewrite cannot change what gets committed.

Hard links cost microseconds whatever the size and survive the trainer deleting
the original (``save_top_k``, ``save_total_limit``). Where a hard link is not
possible (another filesystem, or a filesystem without links) the bytes are copied.
A link shares the trainer's inode until the commit worker stages it (:func:`own_inodes`
gives it its own then): the trainer's next save over it gets a new file first
(:func:`unfreeze_for_rewrite`); other code writing over it in place is noticed, not undone.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import stat
from pathlib import Path
from typing import NamedTuple

from .._util.fs import creation_mask
from ..errors import PublishError

log = logging.getLogger(__name__)
_warned_copy = False


class Frozen(NamedTuple):
    """What :func:`freeze` froze: regular files and their bytes, each file's ``(size, mtime_ns)`` when
    frozen (a later write in place shows, see :func:`own_inodes`), and what it left out, why."""

    files: int
    bytes: int
    stamps: dict[str, list[int]]
    skipped: list[str]


def freeze(src: str | os.PathLike[str], dest: str | os.PathLike[str], *, copy: bool = False) -> Frozen:
    """Freeze file or folder ``src`` at ``dest``.

    Symlinks to files inside a checkpoint folder (or a symlinked checkpoint, such as
    Lightning's ``save_last="link"``) are followed: what is frozen is content. Only
    regular files are: a named pipe would hang the commit that reads it, a dangling
    link holds nothing to commit, a link to a folder outside the checkpoint is not the
    checkpoint's, and one to a folder of it is committed under its own name (each is
    skipped, logged and listed). ``copy``: copy the bytes instead of linking them,
    for a writer that may rewrite ``src`` in place without a chance to
    :func:`unfreeze_for_rewrite` it first.
    """
    src_path, dest_path = Path(os.path.realpath(src)), Path(dest)
    frozen = Frozen(0, 0, {}, [])
    if not src_path.is_dir():
        dest_path.parent.mkdir(parents=True, exist_ok=True)
        return _add(frozen, ".", _freeze_file(src_path, dest_path, copy))
    for dirpath, dirs, names in os.walk(src_path):  # (links to folders are not walked: listed below)
        rel = Path(dirpath).relative_to(src_path)
        (dest_path / rel).mkdir(parents=True, exist_ok=True)
        for name in [d for d in dirs if os.path.islink(os.path.join(dirpath, d))]:
            inside = Path(os.path.realpath(os.path.join(dirpath, name))).is_relative_to(src_path)
            frozen.skipped.append(f"{(rel / name).as_posix()}: a link to a folder " + (
                "of the checkpoint (committed once, under its own name)" if inside else
                "outside the checkpoint"))  # (a link to ~ would commit the home folder, and push it)
        for name in names:
            file = Path(dirpath) / name
            try:
                info = os.stat(file)
            except OSError as exc:  # a dangling link, a loop of links
                frozen.skipped.append(f"{(rel / name).as_posix()}: {exc.strerror or exc}")
                continue
            if not stat.S_ISREG(info.st_mode):
                frozen.skipped.append(f"{(rel / name).as_posix()}: not a regular file")
                continue
            frozen = _add(frozen, (rel / name).as_posix(), _freeze_file(file, dest_path / rel / name, copy))
    if frozen.skipped:
        log.warning("Checkpoint %s: left out of its commit: %s", src, "; ".join(frozen.skipped[:10]))
    return frozen


def _add(frozen: Frozen, rel: str, info: os.stat_result) -> Frozen:
    frozen.stamps[rel] = [info.st_size, info.st_mtime_ns]
    return frozen._replace(files=frozen.files + 1, bytes=frozen.bytes + info.st_size)


def _freeze_file(src: Path, dest: Path, copy: bool) -> os.stat_result:
    """Link (else copy) ``src`` to ``dest``; returns the frozen file's stat (a link's is ``src``'s)."""
    global _warned_copy
    real = Path(os.path.realpath(src))
    if copy:
        shutil.copyfile(real, dest)
        return os.stat(dest)
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
    return os.stat(dest)


def own_inodes(frozen: Path, stamps: dict[str, list[int]] | None) -> list[str]:
    """Give each file of the frozen checkpoint ``frozen`` that still shares its inode (with the
    trainer's file) an inode of its own, so nothing written there later reaches the model repository;
    returns the files written in place since they were frozen (``stamps``: :attr:`Frozen.stamps`),
    whose saved bytes are gone: what is committed for them is what they hold now."""
    changed = []
    files = [(".", frozen)] if frozen.is_file() else [
        (Path(d, n).relative_to(frozen).as_posix(), Path(d, n)) for d, _, ns in os.walk(frozen) for n in ns]
    for rel, file in files:
        before = after = os.stat(file)
        if before.st_nlink > 1:  # (copied beside the checkpoint, not into it: a kill must not add a file)
            _own_copy(str(file), tmp=str(frozen.parent / f".{frozen.name}.oxcb-copy"))
            after = os.stat(file)
        stamp = (stamps or {}).get(rel)
        if stamp is not None and ([before.st_size, before.st_mtime_ns] != stamp
                                  or [after.st_size, after.st_mtime_ns] != stamp):
            changed.append(rel)
    return changed


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
    ``published`` by this run or linked elsewhere (returned: drop it or put it back), and in a folder
    every file with another link (unlinked; with ``keep``, for a write that may not come, replaced by
    a copy of itself)."""
    if os.path.isfile(path) and not os.path.islink(path):  # (another link: an earlier run's freeze of it)
        return SetAside(path) if published or os.stat(path).st_nlink > 1 else None
    for dirpath, _dirs, names in os.walk(path):
        for name in names:
            file = os.path.join(dirpath, name)
            if os.stat(file, follow_symlinks=False).st_nlink > 1:
                if keep:
                    _own_copy(file)
                else:
                    os.unlink(file)
    return None


def _own_copy(file: str, tmp: str | None = None) -> None:
    """Give ``file`` an inode of its own, same bytes and times (its other links keep theirs), no more
    readable than the umask lets a new file be (the trainer's may be: fsspec keeps the first umask);
    ``tmp``: where the copy is made (default beside ``file``), on the same filesystem."""
    folder, name = os.path.split(file)
    tmp = tmp or os.path.join(folder, f".{name}.oxcb-copy")
    try:
        shutil.copy2(file, tmp)
        os.chmod(tmp, stat.S_IMODE(os.stat(tmp).st_mode) & ~creation_mask())
        os.replace(tmp, file)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def frozen_problem(root: Path, staged: Path) -> str | None:
    """What makes ``staged`` (a job's frozen bytes, inside folder ``root``) other than the regular files
    and folders :func:`freeze` makes, reached through no link; ``None`` when it is such (or is gone). A
    link put there by hand would move or commit a file from outside the repository (and push it)."""
    where = os.path.join(os.path.realpath(root), os.path.relpath(staged, root))
    if os.path.realpath(staged) != where and os.path.lexists(staged):
        return f"{staged} is reached through a link"
    walked = [staged] + ([Path(d) / n for d, ds, ns in os.walk(staged) for n in [*ds, *ns]] if staged.is_dir() else [])
    for path in walked:
        info = os.lstat(path) if os.path.lexists(path) else None
        if info is not None and not (stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode)):
            return f"{path} is not a regular file or folder (a link, a pipe)"
    return None


def check_frozen(root: Path, staged: Path) -> None:
    """Raise :class:`PublishError` when :func:`frozen_problem` finds one."""
    if problem := frozen_problem(root, staged):
        raise PublishError(f"The frozen bytes of a checkpoint are not what freezing made: {problem}.")
