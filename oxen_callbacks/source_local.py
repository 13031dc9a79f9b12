"""Reading commits of a local Oxen repository without touching its working tree.

The training process never calls oxenai on the user's repository (see
:mod:`oxen_callbacks.oxen_child`): commit ids resolve from the repository's files
and branch names in a child process. A commit is materialized by copying its
files' bytes from Oxen's content store, listed by :mod:`oxen_callbacks.oxen_tree`
(in-process: that reads files only); if the tree cannot be read, ``oxen restore``
in a child process writes the same files.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Self

from tqdm.auto import tqdm

from . import oxen_child, oxen_layout, oxen_tree
from .errors import ConfigurationError, OxenError
from .oxen_repo import LocalRepo, call_oxen
from .snapshot import remove_tree

log = logging.getLogger(__name__)

_BAR_BYTES = 256 << 20  # a progress bar (on a terminal) from this size or file count on
_BAR_FILES = 10_000
_BATCH = 256  # files per task of the copy threads (and at most _CHUNK bytes)
_WORKERS = min(4, os.cpu_count() or 1)  # measured on 2 cores: 2 threads ~10-25% faster than 1 on 10k files
_CHUNK = 64 << 20
_SMALL = 1 << 20  # files up to this size are copied through memory
_FICLONE = 0x40049409  # linux/fs.h: _IOW(0x94, 9, int)
_UNSUPPORTED = {errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY, errno.ENOSYS}


class LocalSource:
    """A local dataset repository as a source of pinned snapshots (a :class:`~oxen_callbacks.source.Source`)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.repo = LocalRepo(path, role="dataset repository")
        self.location = str(self.repo.path)
        digest = hashlib.sha1(self.location.encode()).hexdigest()[:10]
        self.key = f"{self.repo.path.name}-{digest}"

    @property
    def local_root(self) -> Path:
        """The repository's folder."""
        return self.repo.path

    def resolve(self, revision: str | None) -> str:
        return self.repo.resolve(revision, branches=lambda: oxen_child.branches(self.repo.path))

    def default_revision(self) -> str | None:
        """What an omitted revision means: the checked-out branch (``None`` when detached)."""
        return self.repo.current_branch()

    def tracks_working_tree(self, revision: str | None) -> bool:
        """True when ``revision`` names what is checked out (so local edits could be meant)."""
        current = self.repo.current_branch()
        return revision in (None, "HEAD") or (current is not None and revision == current)

    def changed_paths(self, paths: list[str]) -> list[str]:
        return oxen_child.changed_paths(self.repo.path, paths)

    def materialize(self, commit: str, paths: list[str], dest: Path) -> dict[str, dict[str, int]] | None:
        """Write ``paths`` of ``commit`` under ``dest`` (an empty scratch folder).

        Copies from the content store (:func:`copy_from_store`), read-only files, and
        returns each path's file count and bytes; when the tree cannot be read there,
        logs a warning and runs ``oxen restore`` in a child instead (returns ``None``).
        """
        try:
            return copy_from_store(self.repo.path, commit, paths, dest)
        except oxen_tree.PathNotInCommit as exc:
            raise _missing(exc.path, commit, self.repo) from None
        except oxen_tree.UnreadableTree as exc:
            log.warning("Cannot copy %s@%s from Oxen's content store (%s); using `oxen restore` instead.",
                        self.location, commit, exc)
        _empty_folder(dest)
        oxen_child.materialize(self.repo.path, commit, paths, dest)


def copy_from_store(repo: Path, commit: str, paths: list[str], dest: Path) -> dict[str, dict[str, int]]:
    """Write ``paths`` of ``commit`` under ``dest`` by copying bytes from Oxen's content store.

    Files are copies (a reflink where the filesystem supports it), never hard links:
    a write through a link would change the repository's history. Each file's size
    is checked against the tree. Copying starts while the tree is still being read.

    Raises:
        oxen_tree.PathNotInCommit: a path is not in the commit.
        oxen_tree.UnreadableTree: the tree or a stored file cannot be read.
    """
    counts: dict[str, dict[str, int]] = {}
    oxen_tree.read(repo, partial(_copy_tree, repo, commit, paths, dest, counts))
    return counts


def _copy_tree(repo: Path, commit: str, paths: list[str], dest: Path, counts: dict[str, dict[str, int]],
               tree: oxen_tree.Tree) -> None:
    """Copy what ``tree`` walks: full batches of files on threads as the walk goes, then the
    big files one by one (progress by chunk) and the last batch in this thread."""
    _empty_folder(dest)  # a retried read starts over
    pool: ThreadPoolExecutor | None = None  # only for pulls of more than one batch
    futures: list[Future[int]] = []
    large: list[oxen_tree.TreeFile] = []
    batch: list[oxen_tree.TreeFile] = []
    seen: set[str] = set()
    total = filled = 0
    with _Copier(repo, dest) as copier:
        try:
            counts.clear()  # a retried read starts over
            for rel, item in ((rel, item) for rel in paths for item in tree.walk(commit, rel)):
                if isinstance(item, str):
                    copier.folder(item)
                    continue
                count = counts.setdefault(rel, {"files": 0, "bytes": 0})
                count["files"] += 1
                count["bytes"] += item.size
                if item.path in seen:
                    continue
                seen.add(item.path)
                total += item.size
                copier.folder(os.path.dirname(item.path))
                if item.size >= _CHUNK:
                    large.append(item)
                    continue
                batch.append(item)
                filled += item.size
                if len(batch) >= _BATCH or filled >= _CHUNK:
                    pool = pool or ThreadPoolExecutor(_WORKERS, thread_name_prefix="oxcb-pin")
                    futures.append(pool.submit(copier.copy_all, batch))
                    batch, filled = [], 0
            show = total >= _BAR_BYTES or len(seen) >= _BAR_FILES
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"pin {repo.name}@{commit[:10]}",
                      disable=None if show else True) as bar:
                for entry in large:
                    copier.copy(entry, bar.update)
                bar.update(copier.copy_all(batch))
                for future in futures:
                    bar.update(future.result())
        finally:
            for future in futures:
                future.cancel()
            if pool:
                pool.shutdown()


class _Copier:
    """Copies stored files of one repository into one folder, by reflink where possible."""

    def __init__(self, repo: Path, dest: Path) -> None:
        self.store = str(oxen_layout.versions_root(repo))
        self.dest = str(dest)
        self.made = {""}
        self.dest_fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
        try:
            self.store_fd = os.open(self.store, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            os.close(self.dest_fd)
            raise oxen_tree.UnreadableTree(f"content store {self.store}: {exc.strerror}") from exc
        self.reflink = True  # until the filesystem says otherwise

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc: object) -> None:
        os.close(self.store_fd)
        os.close(self.dest_fd)

    def folder(self, rel: str) -> None:
        """Make the folder ``rel`` (and its parents) under the destination, once."""
        if rel not in self.made:
            os.makedirs(os.path.join(self.dest, rel), exist_ok=True)
            self.made.add(rel)

    def copy_all(self, batch: list[oxen_tree.TreeFile]) -> int:
        for entry in batch:
            self.copy(entry)
        return sum(entry.size for entry in batch)

    def copy(self, entry: oxen_tree.TreeFile, progress: Callable[[int], object] | None = None) -> None:
        stored = oxen_layout.version_relpath(entry.hash)
        try:
            fd_in = os.open(stored, os.O_RDONLY, dir_fd=self.store_fd)
        except OSError as exc:
            raise oxen_tree.UnreadableTree(f"{self.store}/{stored} ({entry.path!r}): {exc.strerror}") from exc
        try:
            if os.fstat(fd_in).st_size != entry.size:
                raise oxen_tree.UnreadableTree(f"{self.store}/{stored} ({entry.path!r}) is not {entry.size} bytes")
            # created read-only (the fd still writes): the snapshot needs no chmod pass per file
            fd_out = os.open(entry.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444, dir_fd=self.dest_fd)
            try:
                self._copy(fd_in, fd_out, entry.size, progress)
            finally:
                os.close(fd_out)
        finally:
            os.close(fd_in)

    def _copy(self, fd_in: int, fd_out: int, size: int, progress: Callable[[int], object] | None) -> None:
        """Reflink, else copy in the kernel (big files, progress by chunk) or through memory."""
        if size > _SMALL and not self._clone(fd_in, fd_out):
            _copy_range(fd_in, fd_out, size, progress)
            return
        if 0 < size <= _SMALL and not self._clone(fd_in, fd_out):
            _copy_small(fd_in, fd_out, size)
        if progress:
            progress(size)

    def _clone(self, fd_in: int, fd_out: int) -> bool:
        """Reflink ``fd_in`` into ``fd_out`` (btrfs, XFS...); False where the filesystem cannot."""
        if not self.reflink:
            return False
        try:
            fcntl.ioctl(fd_out, _FICLONE, fd_in)
            return True
        except OSError as exc:
            if exc.errno not in _UNSUPPORTED:
                raise
            self.reflink = False
            return False


def _copy_small(fd_in: int, fd_out: int, size: int) -> None:
    """Copy a small file through memory (cheaper than ``copy_file_range`` for a few KiB)."""
    data = os.read(fd_in, size)
    while len(data) < size:
        more = os.read(fd_in, size - len(data))
        if not more:
            raise oxen_tree.UnreadableTree(f"a stored file ended after {len(data)} of {size} bytes")
        data += more
    view = memoryview(data)
    while view:
        view = view[os.write(fd_out, view):]


def _copy_range(fd_in: int, fd_out: int, size: int, progress: Callable[[int], object] | None) -> None:
    """Copy ``size`` bytes in the kernel (``copy_file_range``, else ``sendfile``)."""
    copied = 0
    while copied < size:
        count = min(size - copied, _CHUNK)
        try:
            n = os.copy_file_range(fd_in, fd_out, count)
        except OSError as exc:
            if exc.errno not in _UNSUPPORTED:
                raise
            n = os.sendfile(fd_out, fd_in, None, count)
        if n == 0:
            raise oxen_tree.UnreadableTree(f"a stored file ended after {copied} of {size} bytes")
        copied += n
        if progress:
            progress(n)


def _empty_folder(path: Path) -> None:
    for entry in os.scandir(path):
        if entry.is_dir(follow_symlinks=False):
            remove_tree(entry.path)
        else:
            os.unlink(entry.path)


def restore_into(repo: LocalRepo, commit: str, paths: list[str], dest: Path) -> None:
    """Write ``paths`` of ``commit`` under ``dest`` through a shadow working tree.

    Oxen restores the commit's bytes into the shadow (see
    :func:`oxen_layout.make_shadow`); the user's tree, HEAD and branches are never
    touched. Runs in the child process of :func:`oxen_child.materialize`.
    """
    import oxen

    oxen_layout.make_shadow(repo.path, dest, commit)
    shadow = oxen.Repo(str(dest))
    try:
        for rel in tqdm(paths, desc=f"pin {repo.path.name}@{commit[:10]}", unit="path", disable=None):
            try:
                call_oxen(shadow.restore, rel, False, commit, what=f"read {rel!r} at {commit}")
            except OxenError as exc:
                if "not found" not in str(exc).lower():
                    raise
                raise _missing(rel, commit, repo) from None
            if not (dest / rel).exists():
                raise _missing(rel, commit, repo)
    finally:
        remove_tree(dest / oxen_layout.OXEN_DIR)


def _missing(rel: str, commit: str, repo: LocalRepo) -> ConfigurationError:
    return ConfigurationError(
        f"Path {rel!r} is not in commit {commit} of the dataset repository {str(repo.path)!r}.",
        "paths are relative to the repository root (e.g. 'train.csv', 'images/'); "
        "check the commit holds them with `oxen ls` or `oxen log`.",
    )
