"""Read-only snapshot folders of one commit, in a cache keyed by repository and commit.

A snapshot holds the requested paths of one commit. Its manifest, written last
and atomically, says which paths are complete, so a re-pin of a cached commit
reads one small file whatever the data size. Each file's content hash (xxh3-128,
as Oxen records it) is kept in a sidecar beside the manifest, read by a deep check
(:meth:`SnapshotStore.check`), and by the cheap one for the paths whose files are no longer those
the manifest's stamp recorded (inodes, modification times: written in place, or replaced).
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

from .._oxen import layout as oxen_layout
from .._oxen.commit_id import checked_commit_id, is_commit_id
from .._util.fs import make_dirs_writable, parse_json, remove_tree, write_json_atomically
from .._util.materialized import Materialized
from .._util.relpath import covered, covers, safe_relpath
from .._util.scratch import scratch_folder
from .entries import count_files, entry_kind, files_under, hash_file, make_readonly

log = logging.getLogger(__name__)
_SHOWN = 10  # problems named in a report of one snapshot
VIEWS_SUFFIX = ".views"  # ``<commit>.views/``: the views of a snapshot (see :mod:`.views`)


class DamagedRecord(ValueError):
    """A snapshot's manifest or content hash record cannot be read (truncated, not JSON, another shape)."""


@dataclass
class Manifest:
    """What a snapshot folder holds: complete paths, with their file count, size and stamp (which files:
    :func:`~.entries.count_files`; none in a manifest of an older version)."""

    commit: str
    paths: dict[str, dict[str, int]] = field(default_factory=dict)

    def covers(self, path: str) -> bool:
        return covered(path, self.paths)

    def missing(self, paths: Iterable[str]) -> list[str]:
        return [p for p in paths if not self.covers(p)]

    @property
    def files(self) -> int:
        return sum(v["files"] for v in self.paths.values())

    @property
    def bytes(self) -> int:
        return sum(v["bytes"] for v in self.paths.values())


class SnapshotStore:
    """The snapshot folders of one repository under a cache root.

    Layout: ``<root>/snapshots/<repo_key>/<commit>/`` (the files),
    ``<commit>.manifest.json``, ``<commit>.hashes.json``, ``<commit>.lock`` and the pins' views
    ``<commit>.views/`` beside it.
    """

    def __init__(self, cache_dir: str | os.PathLike[str], repo_key: str) -> None:
        self.cache_dir = Path(cache_dir).expanduser().resolve()
        self.base = self.cache_dir / "snapshots" / repo_key

    def folder(self, commit: str) -> Path:
        return self.base / checked_commit_id(commit, what="A snapshot")

    def lock_path(self, commit: str) -> Path:
        return self.base / f"{checked_commit_id(commit, what='A snapshot')}.lock"

    def views_root(self, commit: str) -> Path:
        """Where the pins of some of the commit's paths read them (see :mod:`.views`)."""
        return self.base / f"{checked_commit_id(commit, what='A snapshot')}{VIEWS_SUFFIX}"

    def manifest_path(self, commit: str) -> Path:
        return self.base / f"{checked_commit_id(commit, what='A snapshot')}.manifest.json"

    def identity(self, commit: str) -> tuple[object, ...] | None:
        """Which snapshot of ``commit`` this is, on which machine: it changes when the snapshot is made
        again, or read from another cache or boot (``None`` when it is not there)."""
        try:
            folder, manifest = os.stat(self.folder(commit)), os.stat(self.manifest_path(commit))
        except OSError:
            return None
        return (_boot_id(), folder.st_dev, folder.st_ino, manifest.st_ino, manifest.st_mtime_ns)

    def manifest(self, commit: str) -> Manifest:
        """What the snapshot holds; nothing when its folder was deleted or its manifest
        cannot be read (to have it made again)."""
        try:
            paths = self._recorded_paths(commit)
        except DamagedRecord:
            return Manifest(commit)
        return Manifest(commit, paths if self.folder(commit).is_dir() else {})

    def _recorded_paths(self, commit: str) -> dict[str, dict[str, int]]:
        """The manifest's paths (none without a manifest); :class:`DamagedRecord` if it cannot be read."""
        data = _read_json(self.manifest_path(commit))
        paths = data.get("paths") if isinstance(data, dict) else None
        if data is not None and not (isinstance(paths, dict) and all(
                isinstance(v, dict) and isinstance(v.get("files"), int) and isinstance(v.get("bytes"), int)
                for v in paths.values())):
            raise DamagedRecord(f"its manifest {commit}.manifest.json is not a manifest")
        for rel in paths or {}:  # a path that leaves the snapshot folder was never written by us
            if not _inside(rel):
                raise DamagedRecord(f"its manifest {commit}.manifest.json names {rel!r}, outside the snapshot")
        return paths or {}

    def records(self, commit: str, rel: str) -> bool:
        """Whether the snapshot's records say ``commit`` holds ``rel`` (a recorded path, or a file at or under it)."""
        try:
            return rel in self._recorded_paths(commit) or any(covers(rel, f) for f in self.hashes(commit) or {})
        except DamagedRecord:
            return False

    def unlike(self, commit: str, expected: dict[str, str], paths: list[str]) -> list[str]:
        """Where the snapshot's content hash record of the files under ``paths`` differs from ``expected``
        (the repository's own): a record written by someone else, beside bytes that are not the commit's."""
        try:
            wanted = set(paths)
            recorded = {f: h for f, h in (self.hashes(commit) or {}).items() if covered(f, wanted)}
        except DamagedRecord as exc:
            return [str(exc)]
        return [f"{f!r} is recorded unlike the repository's commit" for f in sorted(expected.keys() | recorded.keys())
                if expected.get(f) != recorded.get(f)]

    def write_manifest(self, manifest: Manifest) -> None:
        write_json_atomically(self.manifest_path(manifest.commit),
                    {"commit": manifest.commit, "paths": manifest.paths}, indent=1)

    def hashes(self, commit: str) -> dict[str, str] | None:
        """Content hash of every file of the snapshot; ``None`` when none were recorded.

        Raises:
            DamagedRecord: the record cannot be read.
        """
        data = _read_json(self.base / f"{commit}.hashes.json")
        files = data.get("files") if isinstance(data, dict) else None
        if data is not None and not (isinstance(files, dict)
                                     and all(isinstance(v, str) for v in files.values())):
            raise DamagedRecord(f"its content hash record {commit}.hashes.json is not one")
        return files

    def _not_a_folder(self, commit: str) -> str | None:
        """What is in place of the snapshot folder when it is not a folder (``None``: a folder, or nothing,
        which the next pin makes again)."""
        root = self.folder(commit)
        if not os.path.lexists(root) or root.is_dir():
            return None
        mode = root.lstat().st_mode
        return f"the snapshot folder is {'a file' if stat.S_ISREG(mode) else entry_kind(mode)}, not a folder"

    def record_problems(self, commit: str) -> list[str]:
        """Why the manifest or content hash record of a snapshot cannot be read, or what is in place of
        its folder (none: readable or absent)."""
        problems = [in_place] if (in_place := self._not_a_folder(commit)) else []
        for read in (self._recorded_paths, self.hashes):
            try:
                read(commit)
            except DamagedRecord as exc:
                problems.append(str(exc))
        return problems

    def discard(self, commit: str) -> None:
        """Delete a snapshot (or a file in place of its folder) and its records (the next pin makes it again)."""
        folder = self.folder(commit)
        if os.path.lexists(folder) and not os.path.isdir(folder):
            folder.unlink()
        remove_tree(folder)
        remove_tree(self.views_root(commit))  # (links to the old files)
        for suffix in ("manifest", "hashes"):
            (self.base / f"{commit}.{suffix}.json").unlink(missing_ok=True)

    def _add_hashes(self, commit: str, hashes: dict[str, str]) -> None:
        write_json_atomically(self.base / f"{commit}.hashes.json",
                    {"commit": commit, "algorithm": "xxh3-128", "files": {**(self.hashes(commit) or {}), **hashes}})

    def scratch(self) -> AbstractContextManager[Path]:
        """A new empty folder on the cache's filesystem (for atomic moves into a snapshot), deleted after
        (one a killed pin left is deleted by the next: :func:`~oxen_callbacks._util.scratch.scratch_folder`)."""
        return scratch_folder(self.cache_dir / "tmp")

    def adopt(self, commit: str, staged_root: Path, rel_paths: list[str], manifest: Manifest,
              made: Materialized | None = None) -> None:
        """Move ``rel_paths`` from ``staged_root`` into the snapshot, make them read-only, record them.

        ``made`` (counts and hashes from the copier, whose files are created read-only)
        spares a stat, a chmod and a hash of every file: 100k files cost ~1 s. Without
        it, each file is hashed here. Hashes are recorded before the manifest.
        """
        counts = made.counts if made else None
        folder = self.folder(commit)
        if not folder.is_dir():  # made anew (after a damaged one was deleted): views of the old one go
            remove_tree(self.views_root(commit))
        folder.mkdir(parents=True, exist_ok=True)
        self._add_hashes(commit, made.hashes if made else _hash_files(staged_root, rel_paths))
        make_dirs_writable(folder)
        try:
            for rel in rel_paths:
                names = [e for e in os.listdir(staged_root) if e != oxen_layout.OXEN_DIR] if rel == "." else [rel]
                for name in names:
                    dest = folder / name
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    _merge_move(staged_root / name, dest)
                on_disk = count_files(folder, rel)  # (its stamp: which files these are)
                manifest.paths[rel] = {**counts[rel], "stamp": on_disk["stamp"]} if counts and rel in counts else on_disk
        finally:
            make_readonly(folder, files=counts is None)
        self.write_manifest(manifest)

    def check(self, commit: str, *, deep: bool = False, paths: list[str] | None = None) -> list[str]:
        """What differs between the snapshot and its records, one line per problem (none: intact).

        Cheap by default: file count, bytes and stamp (which files: inodes, modification times; a path
        whose stamp differs has its files' content hashes checked) of each recorded path. ``deep`` also
        compares the content hash of every file (under ``paths``, default all) with the
        one recorded when it was made.
        """
        root = self.folder(commit)
        try:
            recorded_paths = self._recorded_paths(commit)
        except DamagedRecord as exc:
            return [str(exc)]
        if recorded_paths and (in_place := self._not_a_folder(commit)):
            return [in_place]
        if recorded_paths and not os.path.lexists(root):  # (a pin makes it again; "ok" it is not)
            return [f"the snapshot folder is missing (its records say {Manifest(commit, recorded_paths).files} files)"]
        manifest = Manifest(commit, recorded_paths if root.is_dir() else {})
        odd: dict[str, str] = {}
        problems: list[str] = []
        restamped: list[str] = []
        for rel, recorded in manifest.paths.items():
            actual = count_files(root, rel, odd)
            if (actual["files"], actual["bytes"]) != (recorded["files"], recorded["bytes"]):
                problems.append(f"{rel!r} holds {actual['files']} files, {actual['bytes']} bytes; "
                                f"recorded {recorded['files']} files, {recorded['bytes']} bytes")
            elif recorded.get("stamp", actual["stamp"]) != actual["stamp"]:  # (none: made by an older version)
                restamped.append(rel)
        problems += [f"{path!r} is {kind} (a snapshot holds none)" for path, kind in sorted(odd.items())]
        problems += self._restamped_problems(commit, restamped, paths)
        if deep and manifest.paths:
            try:
                hashes = self.hashes(commit)
            except DamagedRecord as exc:
                return [*problems, str(exc)]
            if hashes is None:
                return [*problems, "no content hashes were recorded (made by an older version)"]
            problems += _content_problems(root, paths or list(manifest.paths), hashes)
        return list(dict.fromkeys(problems))  # (a file rewritten in place is found by both checks)

    def _restamped_problems(self, commit: str, rels: list[str], paths: list[str] | None) -> list[str]:
        """What changed under ``rels`` (and ``paths``, when given: a pin's), whose files are not those the
        snapshot was made with (written in place, or replaced): their content hashes tell (none: the
        same bytes, e.g. a copied cache)."""
        scope = rels if paths is None else list(dict.fromkeys(
            r if covers(p, r) else p for r in rels for p in paths if covers(p, r) or covers(r, p)))
        if not scope:
            return []
        try:
            hashes = self.hashes(commit)
        except DamagedRecord as exc:
            return [str(exc)]
        if hashes is None:
            return [f"{rel!r} was written or replaced in place (its files' inodes or modification times changed)"
                    for rel in scope]
        problems = _content_problems(self.folder(commit), scope, hashes)
        if not problems:
            log.warning("Snapshot %s holds other files than it was made with under %s, with the commit's bytes "
                        "(a copied cache?): each check reads them again. To spare that, %s.",
                        self.folder(commit), shown([repr(r) for r in scope]), remake_hint(self.folder(commit)))
        return problems


def cached_snapshots(cache_dir: str | os.PathLike[str]) -> Iterator[tuple[SnapshotStore, str]]:
    """Every snapshot under a cache root: its store and commit."""
    snapshots = Path(cache_dir).expanduser() / "snapshots"
    for base in sorted(snapshots.iterdir()) if snapshots.is_dir() else ():
        for manifest in sorted(base.glob("*.manifest.json")):
            commit = manifest.name.removesuffix(".manifest.json")
            if is_commit_id(commit):  # nothing else is ours
                yield SnapshotStore(cache_dir, base.name), commit


def remake_hint(folder: str | os.PathLike[str]) -> str:
    """How to have a damaged snapshot made again at the next pin."""
    return f"delete it (`chmod -R u+w {folder} && rm -rf {folder}`): the next pin makes it again"


def shown(problems: list[str]) -> str:
    """``problems`` in one line, the first few of them."""
    more = f" (+{len(problems) - _SHOWN} more)" if len(problems) > _SHOWN else ""
    return "; ".join(problems[:_SHOWN]) + more


def _content_problems(root: Path, paths: list[str], recorded: dict[str, str]) -> list[str]:
    """Files under ``paths`` of ``root`` whose content differs from ``recorded``, or missing or extra."""
    on_disk = {f for rel in paths for f in files_under(root, rel, skip=oxen_layout.OXEN_DIR)}
    scope = set(paths)
    wanted = {f for f in recorded if covered(f, scope)}
    problems = [f"{f!r} is missing" for f in sorted(wanted - on_disk)]
    problems += [f"{f!r} was not in the commit" for f in sorted(on_disk - wanted)]
    for f in sorted(wanted & on_disk):
        try:
            if hash_file(root / f) != recorded[f]:
                problems.append(f"{f!r} changed (content hash differs)")
        except OSError as exc:
            problems.append(f"{f!r} cannot be read ({exc.strerror or exc})")
    return problems


def _hash_files(root: Path, rel_paths: list[str]) -> dict[str, str]:
    return {f: hash_file(root / f) for rel in rel_paths for f in files_under(root, rel, skip=oxen_layout.OXEN_DIR)}


def _read_json(path: Path) -> object:
    """A JSON file's content; ``None`` when there is no file; :class:`DamagedRecord` when it cannot be read."""
    try:
        return parse_json(path.read_bytes())
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, ValueError) as exc:  # truncated, not UTF-8, a folder in its place...
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise DamagedRecord(f"{path.name} cannot be read ({reason})") from None


def _inside(rel: str) -> bool:
    """Whether ``rel`` is a normalized path inside a snapshot folder (not absolute, no ``..``)."""
    try:
        return safe_relpath(rel) == rel
    except ValueError:
        return False


def _boot_id() -> str:
    """This machine and boot (Linux's boot id, else the host's name)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as boot:
            return boot.read().strip()
    except OSError:
        import socket

        return socket.gethostname()


def _merge_move(src: Path, dest: Path) -> None:
    """Move ``src`` to ``dest``; where ``dest`` exists (same commit, same bytes), keep it."""
    if not dest.exists():
        os.replace(src, dest)
    elif src.is_dir() and dest.is_dir():
        for child in os.listdir(src):
            _merge_move(src / child, dest / child)

