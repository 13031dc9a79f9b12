"""What a snapshot folder (or a view of one) holds, read without following links: its regular files,
what else is there (a link, a named pipe...), their count and bytes; and making such a folder read-only."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import xxhash

from .._util.fs import creation_mask
from .._util.materialized import content_hash, file_digest

_STAMP_MOD = 1 << 64


def hash_file(path: str | os.PathLike[str]) -> str:
    """The xxh3-128 content hash of a file, as :func:`content_hash` writes it."""
    return content_hash(file_digest(path))


def files_under(root: Path, rel: str, *, skip: str | None = None) -> list[str]:
    """Regular files at or under ``rel`` of ``root``, relative to ``root`` (POSIX separators; not in a
    top folder named ``skip``; nothing else, e.g. a link or a named pipe, which ``check`` reports)."""
    top = root if rel == "." else root / rel
    if linked_part(root, rel) is not None:
        return []
    if not top.is_dir():
        return [rel] if top.is_file() else []
    found = []
    for dirpath, dirs, names in os.walk(top):
        base = Path(dirpath).relative_to(root).as_posix()
        if base == ".":
            dirs[:] = [d for d in dirs if d != skip]
        found += [name if base == "." else f"{base}/{name}" for name in names
                  if stat.S_ISREG(os.lstat(os.path.join(dirpath, name)).st_mode)]
    return found


def linked_part(root: Path, rel: str) -> str | None:
    """The first of ``root`` and the folders down to ``rel`` that is a symbolic link, relative to ``root``."""
    parts = [] if rel == "." else Path(rel).parts
    for depth in range(len(parts) + 1):
        if (root.joinpath(*parts[:depth])).is_symlink():
            return "/".join(parts[:depth]) or "."
    return None


def odd_entries(root: Path, paths: list[str]) -> dict[str, str]:
    """The entries under ``paths`` of ``root`` that are neither regular files nor folders, and what each is."""
    odd: dict[str, str] = {}
    for rel in paths:
        count_files(root, rel, odd)
    return odd


def count_files(root: Path, rel: str, odd: dict[str, str] | None = None) -> dict[str, int]:
    """Regular files and their bytes at or under ``rel`` of ``root``, never following a symbolic link,
    and their ``stamp``: which files they are (each one's path, inode and modification time; a file
    written in place or replaced, by ``sed -i`` say, changes it; making hard links to it does not).
    Every other entry found (a link as ``root`` itself, on the way or below; a named pipe, a socket,
    a device) is added to ``odd`` with what it is, and not counted."""
    found = {} if odd is None else odd
    top = root if rel == "." else root / rel
    if (link := linked_part(root, rel)) is not None:
        found[link] = "a symbolic link"
        return {"files": 0, "bytes": 0, "stamp": 0}
    try:
        info = top.lstat()
    except FileNotFoundError:
        return {"files": 0, "bytes": 0, "stamp": 0}
    if not stat.S_ISDIR(info.st_mode):
        if stat.S_ISREG(info.st_mode):
            return {"files": 1, "bytes": info.st_size, "stamp": _stamp(rel, info)}
        found[rel] = entry_kind(info.st_mode)
        return {"files": 0, "bytes": 0, "stamp": 0}
    files = size = stamp = 0
    cut = len(os.fspath(root)) + 1
    for dirpath, dirs, names in os.walk(top):
        for name in [*names, *dirs]:
            path = os.path.join(dirpath, name)
            entry = os.lstat(path)
            if stat.S_ISREG(entry.st_mode):
                files += 1
                size += entry.st_size
                stamp += _stamp(path[cut:], entry)
            elif not stat.S_ISDIR(entry.st_mode):
                found[Path(path).relative_to(root).as_posix()] = entry_kind(entry.st_mode)
    return {"files": files, "bytes": size, "stamp": stamp % _STAMP_MOD}


def _stamp(rel: str, info: os.stat_result) -> int:
    """One file's part of a stamp (summed: the order of a folder's walk does not matter)."""
    return xxhash.xxh3_64_intdigest(f"{rel}\0{info.st_ino}\0{info.st_mtime_ns}".encode(errors="surrogateescape"))


def entry_kind(mode: int) -> str:
    """What a snapshot entry that is neither a regular file nor a folder is, for people."""
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    return "a named pipe" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device file"


def make_readonly(path: Path, files: bool = True) -> None:
    """Folders 0555 and (with ``files``) files 0444, less what the umask takes away (the owner always
    reads): a snapshot is never edited in place, nor more readable than the user's own files."""
    mask = creation_mask()
    file_mode = 0o444 & ~mask | stat.S_IRUSR
    dir_mode = 0o555 & ~mask | stat.S_IRUSR | stat.S_IXUSR
    if path.is_file():
        os.chmod(path, file_mode)
        return
    for dirpath, dirs, names in os.walk(path, topdown=False):
        for name in names if files else ():
            os.chmod(os.path.join(dirpath, name), file_mode)
        for name in dirs:
            os.chmod(os.path.join(dirpath, name), dir_mode)
    os.chmod(path, dir_mode)
