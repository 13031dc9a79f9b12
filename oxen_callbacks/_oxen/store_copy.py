"""Copy a commit's files out of Oxen's content store, each checked against the tree's hash.

Runs in a child process (:func:`child_copy`, started by
:func:`oxen_callbacks._data.local.copy_from_store`): it reads Oxen's merkle tree
(:mod:`oxen_callbacks._oxen.tree`), which lmdb memory-maps, so a damaged repository
can kill it by SIGBUS. The training process only sees the child's exit status.

Every copied byte is hashed (xxh3-128) and compared with the hash Oxen recorded in
the tree, so a content-store file damaged in place never becomes a snapshot; the
hashes go to the snapshot's sidecar (see :mod:`oxen_callbacks._data.snapshot`).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import signal
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, Self

import xxhash

from .._util.fs import empty_folder
from .._util.materialized import Materialized, content_hash
from .._util.progress import show_progress
from . import layout as oxen_layout
from . import tree as oxen_tree

_BAR_BYTES = 256 << 20  # a progress bar (on a terminal) from this size or file count on
_BAR_FILES = 10_000
_BATCH = 256  # files per task of the copy threads (and at most _CHUNK bytes)
_WORKERS = min(4, os.cpu_count() or 1)  # measured on 2 cores: 2 threads ~10-25% faster than 1 on 10k files
_CHUNK = 64 << 20  # files from this size on are copied one by one, with progress by chunk
_SMALL = 1 << 20  # files up to this size are read in one call
_FICLONE = 0x40049409  # linux/fs.h: _IOW(0x94, 9, int)
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_UNSUPPORTED = {errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY, errno.ENOSYS}
#: A write that failed for want of room: the disk, or the user's quota, is full.
NO_SPACE = {errno.ENOSPC, errno.EDQUOT}


class CorruptStore(Exception):
    """A stored file's bytes are not what the tree recorded (size or content hash): damage."""


def child_copy(repo: str, commit: str, paths: list[str], dest: str, parent: int | None = None) -> dict[str, Any]:
    """The child's entry point: :func:`copy_commit`, its outcome as JSON-able data; ``parent``: the pid
    of the pin it copies for, with which it dies (:func:`_die_with`).

    One of ``{"counts", "hashes"}``, ``{"missing": path}``, ``{"corrupt": why}``,
    ``{"unreadable": why, "layout": bool}`` (``layout``: a configuration this reader does
    not know, not damage) or ``{"no_space": why, "errno": n}`` (the destination's disk or quota is full).
    """
    if parent is not None:
        _die_with(parent)
    try:
        made = copy_commit(Path(repo), commit, paths, Path(dest))
    except oxen_tree.PathNotInCommit as exc:
        return {"missing": exc.path}
    except CorruptStore as exc:
        return {"corrupt": str(exc)}
    except oxen_tree.UnreadableTree as exc:
        return {"unreadable": str(exc), "layout": isinstance(exc, oxen_tree.UnsupportedLayout)}
    except OSError as exc:
        if exc.errno not in NO_SPACE:
            raise
        return {"no_space": exc.strerror or str(exc), "errno": exc.errno}
    return {"counts": made.counts, "hashes": made.hashes}


def _die_with(parent: int) -> None:
    """Be killed when process ``parent`` dies (Linux): a pin killed by SIGKILL has no use for the rest of
    its copy, which would otherwise go on for up to two hours beside the next pin's."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux
        return
    if os.getppid() != parent:  # it died before the line above
        os._exit(1)


def copy_commit(repo: Path, commit: str, paths: list[str], dest: Path) -> Materialized:
    """Write ``paths`` of ``commit`` under ``dest`` (empty) by copying bytes from Oxen's content store.

    Files are copies (a reflink where the filesystem supports it), never hard links:
    a write through a link would change the repository's history. Copying starts
    while the tree is still being read.

    Raises:
        oxen_tree.PathNotInCommit: a path is not in the commit.
        oxen_tree.UnreadableTree: the tree or a stored file cannot be read (:class:`oxen_tree.UnsupportedLayout`:
            nor the content store, kept elsewhere).
        CorruptStore: a stored file's size or content differs from the tree's record.
    """
    oxen_tree.check_content_store(repo)
    made = Materialized({}, {})
    oxen_tree.read(repo, partial(_copy_tree, repo, commit, paths, dest, made))
    return made


def _copy_tree(repo: Path, commit: str, paths: list[str], dest: Path, made: Materialized,
               tree: oxen_tree.Tree) -> None:
    """Copy what ``tree`` walks: full batches of files on threads as the walk goes, then the
    big files one by one (progress by chunk) and the last batch in this thread."""
    empty_folder(dest)  # a retried read starts over
    made.counts.clear()
    made.hashes.clear()
    pool: ThreadPoolExecutor | None = None  # only for pulls of more than one batch
    futures: list[Future[int]] = []
    large: list[oxen_tree.TreeFile] = []
    batch: list[oxen_tree.TreeFile] = []
    total = filled = 0
    with _Copier(repo, dest) as copier:
        try:
            for rel, item in ((path, item) for path in paths for item in tree.walk(commit, path)):
                if isinstance(item, str):
                    copier.folder(item)
                    continue
                count = made.counts.setdefault(rel, {"files": 0, "bytes": 0})
                count["files"] += 1
                count["bytes"] += item.size
                if item.path in made.hashes:
                    continue
                made.hashes[item.path] = content_hash(item.hash)
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
            progress = _progress(total, len(made.hashes), f"pin {repo.name}@{commit[:10]}")
            for entry in large:
                copier.copy(entry, progress)
            progress(copier.copy_all(batch))
            for future in futures:
                progress(future.result())
        finally:
            for future in futures:
                future.cancel()
            if pool:
                pool.shutdown()


def _progress(total: int, files: int, desc: str) -> Callable[[int], object]:
    """A byte counter: a progress bar on a terminal for big pulls (tqdm loaded only then)."""
    if total < _BAR_BYTES and files < _BAR_FILES:
        return lambda _n: None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not show_progress())

    def update(n: int) -> None:
        bar.update(n)
        if bar.n >= total:
            bar.close()

    return update


class _Copier:
    """Copies stored files of one repository into one folder, by reflink where possible, hashing each."""

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
        where = f"{self.store}/{stored} ({entry.path!r})"
        try:
            fd_in = os.open(stored, os.O_RDONLY, dir_fd=self.store_fd)
        except OSError as exc:
            raise oxen_tree.UnreadableTree(f"{where}: {exc.strerror}") from exc
        try:
            if os.fstat(fd_in).st_size != entry.size:
                raise CorruptStore(f"{where} is {os.fstat(fd_in).st_size} bytes, not {entry.size}")
            # created read-only (the fd still writes): the snapshot needs no chmod pass per file
            fd_out = os.open(entry.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444, dir_fd=self.dest_fd)
            try:
                if entry.size <= _SMALL:
                    digest = self._copy_small(fd_in, fd_out, entry.size)
                else:
                    digest = _copy_large(fd_in, None if self._clone(fd_in, fd_out) else fd_out, entry.size, progress)
            finally:
                os.close(fd_out)
        finally:
            os.close(fd_in)
        if digest != entry.hash:
            raise CorruptStore(f"{where} does not match its content hash {content_hash(entry.hash)}")
        if progress and entry.size <= _SMALL:
            progress(entry.size)

    def _copy_small(self, fd_in: int, fd_out: int, size: int) -> int:
        """Read a small file in one go, hash it, write it (or reflink it); returns its hash."""
        data = os.read(fd_in, size)
        while len(data) < size:
            more = os.read(fd_in, size - len(data))
            if not more:
                raise CorruptStore(f"a stored file ended after {len(data)} of {size} bytes")
            data += more
        if size and not self._clone(fd_in, fd_out):
            view = memoryview(data)
            while view:
                view = view[os.write(fd_out, view):]
        return xxhash.xxh3_128_intdigest(data)

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


def _copy_large(fd_in: int, fd_out: int | None, size: int, progress: Callable[[int], object] | None) -> int:
    """Copy ``size`` bytes in the kernel (``copy_file_range``; ``fd_out`` ``None``: already
    reflinked) and hash them through a read-only map of the stored file; returns the hash.

    Measured on ext4 (2 cores, warm cache, 200 MB): as fast as ``copy_file_range`` alone
    (xxh3 hashes ~10 GB/s), where reading into a buffer to hash and write it was ~2x slower.
    The map is safe here: this runs in a child process (a file cut short under it is SIGBUS).
    """
    hasher = xxhash.xxh3_128()
    with mmap.mmap(fd_in, size, access=mmap.ACCESS_READ) as mapped, memoryview(mapped) as view:
        copied = 0
        while copied < size:
            count = min(size - copied, _CHUNK)
            if fd_out is not None:  # (the slice released at once, even by an error: else closing the map fails
                with view[copied:copied + count] as block:  # with a BufferError that hides that error)
                    count = _copy_range(fd_in, fd_out, block)
            with view[copied:copied + count] as block:
                hasher.update(block)
            copied += count
            if progress:
                progress(count)
    return hasher.intdigest()


def _copy_range(fd_in: int, fd_out: int, block: memoryview) -> int:
    """Copy the next ``len(block)`` bytes of ``fd_in`` (whose content ``block`` maps) to ``fd_out``."""
    try:
        copied = os.copy_file_range(fd_in, fd_out, len(block))
    except OSError as exc:
        if exc.errno not in _UNSUPPORTED:
            raise
        copied = os.write(fd_out, block)
        os.lseek(fd_in, copied, os.SEEK_CUR)
    if copied == 0:
        raise CorruptStore(f"a stored file ended {len(block)} bytes early")
    return copied
