"""Read-only snapshot folders of one commit, in a cache keyed by repository and commit.

A snapshot holds the requested paths of one commit. Its manifest, written last
and atomically, says which paths are complete, so a re-pin of a cached commit
reads one small file whatever the data size.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .relpath import covers

_RO_FILE = stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH
_RO_DIR = _RO_FILE | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH


def default_cache_dir() -> Path:
    """``$OXEN_CALLBACKS_CACHE``, else ``$XDG_CACHE_HOME/oxen-callbacks``, else ``~/.cache/oxen-callbacks``."""
    if os.environ.get("OXEN_CALLBACKS_CACHE"):
        return Path(os.environ["OXEN_CALLBACKS_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "oxen-callbacks"


@dataclass
class Manifest:
    """What a snapshot folder holds: complete paths, with their file count and size."""

    commit: str
    paths: dict[str, dict[str, int]] = field(default_factory=dict)

    def covers(self, path: str) -> bool:
        return any(covers(done, path) for done in self.paths)

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
    ``<commit>.manifest.json`` and ``<commit>.lock`` beside it.
    """

    def __init__(self, cache_dir: str | os.PathLike[str], repo_key: str) -> None:
        self.cache_dir = Path(cache_dir).expanduser().resolve()
        self.base = self.cache_dir / "snapshots" / repo_key

    def folder(self, commit: str) -> Path:
        return self.base / commit

    def lock_path(self, commit: str) -> Path:
        return self.base / f"{commit}.lock"

    def manifest(self, commit: str) -> Manifest:
        path = self.base / f"{commit}.manifest.json"
        try:
            data = json.loads(path.read_text())
        except (FileNotFoundError, NotADirectoryError):
            return Manifest(commit)
        return Manifest(commit, data.get("paths", {}))

    def write_manifest(self, manifest: Manifest) -> None:
        path = self.base / f"{manifest.commit}.manifest.json"
        tmp = path.with_suffix(f".{uuid.uuid4().hex}.tmp")
        tmp.write_text(json.dumps({"commit": manifest.commit, "paths": manifest.paths}, indent=1))
        os.replace(tmp, path)

    def scratch(self) -> Path:
        """A new empty folder on the cache's filesystem (for atomic moves into a snapshot)."""
        path = self.cache_dir / "tmp" / uuid.uuid4().hex
        path.mkdir(parents=True)
        return path

    def adopt(self, commit: str, staged_root: Path, rel_paths: list[str], manifest: Manifest,
              counts: dict[str, dict[str, int]] | None = None) -> None:
        """Move ``rel_paths`` from ``staged_root`` into the snapshot, make them read-only, record them.

        ``counts`` (files and bytes per path, from the copier, whose files are created
        read-only) spares a stat and a chmod of every file: 100k files cost ~1 s.
        """
        folder = self.folder(commit)
        folder.mkdir(parents=True, exist_ok=True)
        _make_dirs_writable(folder)
        try:
            for rel in rel_paths:
                names = [e for e in os.listdir(staged_root) if e != ".oxen"] if rel == "." else [rel]
                for name in names:
                    dest = folder / name
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    _merge_move(staged_root / name, dest)
                if counts is not None and rel in counts:
                    manifest.paths[rel] = counts[rel]
                else:
                    manifest.paths[rel] = _count(folder if rel == "." else folder / rel)
        finally:
            _make_readonly(folder, files=counts is None)
        self.write_manifest(manifest)


def _count(path: Path) -> dict[str, int]:
    if path.is_file():
        return {"files": 1, "bytes": path.stat().st_size}
    files = size = 0
    for dirpath, _dirs, names in os.walk(path):
        for name in names:
            files += 1
            size += os.stat(os.path.join(dirpath, name)).st_size
    return {"files": files, "bytes": size}


def _make_readonly(path: Path, files: bool = True) -> None:
    """Folders 0555 and (with ``files``) files 0444: a snapshot is never edited in place."""
    if path.is_file():
        os.chmod(path, _RO_FILE)
        return
    for dirpath, dirs, names in os.walk(path, topdown=False):
        for name in names if files else ():
            os.chmod(os.path.join(dirpath, name), _RO_FILE)
        for name in dirs:
            os.chmod(os.path.join(dirpath, name), _RO_DIR)
    os.chmod(path, _RO_DIR)


def _make_dirs_writable(path: Path) -> None:
    for dirpath, _dirs, _names in os.walk(path):
        os.chmod(dirpath, 0o755)


def _merge_move(src: Path, dest: Path) -> None:
    """Move ``src`` to ``dest``; where ``dest`` exists (same commit, same bytes), keep it."""
    if not dest.exists():
        os.replace(src, dest)
    elif src.is_dir() and dest.is_dir():
        for child in os.listdir(src):
            _merge_move(src / child, dest / child)


def remove_tree(path: str | os.PathLike[str]) -> None:
    """Delete a folder that may hold read-only snapshots."""
    if os.path.isdir(path):
        _make_dirs_writable(Path(path))
        shutil.rmtree(path)
