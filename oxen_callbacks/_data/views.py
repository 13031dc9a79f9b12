"""A pin's view of a snapshot: a read-only folder holding the pinned paths of the commit, nothing else.

A snapshot folder holds every path any pin of that commit asked for on this machine. A pin of
``train.csv`` that read it could so read ``test.csv`` wherever another pin had cached it: the model
would read data its lineage does not name, and the same code would fail on a machine whose cache
lacks that file. A pin of some paths reads its view instead: the repository's layout, each file a
hard link to the snapshot's (no second copy; a copy where links are refused), made once per commit
and set of paths under the snapshot's lock, deleted with the snapshot. A pin of the whole commit
reads the snapshot itself. Beside each view, ``<view>.json`` records its paths and whether it holds
copies: a view made of links must hold the snapshot's own files (a file replaced in it, as ``sed -i``
does, is another file however alike its size).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from .._util.fs import parse_json, remove_tree, write_json_atomically
from .entries import files_under, hash_file, make_readonly, odd_entries

if TYPE_CHECKING:
    from .snapshot import SnapshotStore

log = logging.getLogger(__name__)
_warned_copy = False


def view_folder(store: SnapshotStore, commit: str, paths: list[str]) -> Path | None:
    """Where the pin of ``paths`` of ``commit`` reads them (``None``: the whole commit, the snapshot)."""
    if "." in paths:
        return None
    # the list as JSON: no two sets of paths share a view ("\n".join gave ["a\nb"] and ["a", "b"] one)
    return store.views_root(commit) / hashlib.sha1(json.dumps(sorted(paths)).encode()).hexdigest()[:16]


def record_path(view: Path) -> Path:
    """The record of a view: its paths, and whether it holds copies (``<view>.json`` beside it)."""
    return view.with_name(f"{view.name}.json")


def view_record(view: Path) -> dict[str, object] | None:
    """What :func:`make_view` recorded of ``view`` (``None``: made by an older version, or unreadable)."""
    try:
        data = parse_json(record_path(view).read_bytes())
    except (OSError, ValueError):
        return None
    if not (isinstance(data, dict) and isinstance(data.get("copies"), bool) and isinstance(data.get("paths"), list)
            and all(isinstance(p, str) for p in data["paths"])):
        return None
    return data


def make_view(store: SnapshotStore, commit: str, paths: list[str]) -> Path:
    """Make (again) the view of ``paths``, which the snapshot holds; the caller holds its lock."""
    target = view_folder(store, commit, paths)
    assert target is not None
    snapshot = store.folder(commit)
    remove_tree(target)
    copies = False
    with store.scratch() as scratch:
        staged = scratch / "view"
        staged.mkdir()
        for rel in paths:
            for file in files_under(snapshot, rel):
                (staged / file).parent.mkdir(parents=True, exist_ok=True)
                copies |= not _link(snapshot / file, staged / file)
            if (snapshot / rel).is_dir():  # (an empty folder of the commit is there too)
                (staged / rel).mkdir(parents=True, exist_ok=True)
        make_readonly(staged, files=False)
        target.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomically(record_path(target), {"paths": sorted(paths), "copies": copies})  # (before the view)
        os.rename(staged, target)
    return target


def view_problems(store: SnapshotStore, commit: str, paths: list[str], *, deep: bool = False) -> list[str]:
    """What differs between the view of ``paths`` and the snapshot (none: it holds exactly their files,
    each the snapshot's own, or where the view was made of copies (or by an older version, which did not
    record it) a copy of the same size; with ``deep``, a copy's content is checked too)."""
    view = view_folder(store, commit, paths)
    if view is None:
        return []
    return held_problems(store, commit, view, paths, deep=deep)


def held_problems(store: SnapshotStore, commit: str, view: Path, paths: list[str], *, deep: bool = False) -> list[str]:
    """:func:`view_problems` of the view folder ``view`` of ``paths``."""
    if not view.is_dir() or view.is_symlink():
        return [f"its view {view} is missing"]
    snapshot = store.folder(commit)
    wanted = {f for rel in paths for f in files_under(snapshot, rel)}
    held = {f for rel in paths for f in files_under(view, rel)}
    problems = [f"{f!r} is {kind} in the view {view}" for f, kind in sorted(odd_entries(view, paths).items())]
    problems += [f"{f!r} is missing from the view {view}" for f in sorted(wanted - held)]
    problems += [f"{f!r} in the view {view} is not in the snapshot" for f in sorted(held - wanted)]
    try:
        recorded = (store.hashes(commit) or {}) if deep else {}
    except ValueError as exc:  # (a DamagedRecord)
        return [*problems, str(exc)]
    record = view_record(view)
    linked = record is not None and not record["copies"]  # every file must be the snapshot's own
    for f in sorted(wanted & held):
        mine, theirs = os.stat(view / f), os.stat(snapshot / f)
        if (mine.st_dev, mine.st_ino) == (theirs.st_dev, theirs.st_ino):
            continue
        if linked or mine.st_size != theirs.st_size or (deep and hash_file(view / f) != recorded.get(f)):
            problems.append(f"{f!r} in the view {view} is not the snapshot's")
    return problems


def cached_view_problems(store: SnapshotStore, commit: str) -> list[str]:
    """What is wrong with each view of a snapshot, every file's content checked (for ``oxen-callbacks verify``).
    A view without a record (an older version's) is checked file by file: each the snapshot's own, or its bytes."""
    root = store.views_root(commit)
    try:
        views = sorted(e for e in root.iterdir() if e.suffix != ".json")
    except OSError:  # no views
        return []
    problems: list[str] = []
    for view in views:
        record = view_record(view)
        if record is not None and view == view_folder(store, commit, record["paths"]):  # type: ignore[arg-type]
            problems += held_problems(store, commit, view, record["paths"], deep=True)  # type: ignore[arg-type]
        elif view.is_dir() and not view.is_symlink():
            problems += _unrecorded_view_problems(store, commit, view)
        else:
            problems.append(f"{view} is not a view (a folder)")
    return problems


def _unrecorded_view_problems(store: SnapshotStore, commit: str, view: Path) -> list[str]:
    snapshot = store.folder(commit)
    try:
        recorded = store.hashes(commit) or {}
    except ValueError as exc:  # (a DamagedRecord)
        return [str(exc)]
    problems = [f"{f!r} is {kind} in the view {view}" for f, kind in sorted(odd_entries(view, ["."]).items())]
    for f in sorted(files_under(view, ".")):
        try:
            mine, theirs = os.stat(view / f), os.stat(snapshot / f)
            if (mine.st_dev, mine.st_ino) == (theirs.st_dev, theirs.st_ino):
                continue
        except OSError:
            pass
        if f not in recorded or hash_file(view / f) != recorded[f]:
            problems.append(f"{f!r} in the view {view} is not the snapshot's")
    return problems


def _link(src: Path, dest: Path) -> bool:
    """A hard link ``dest`` to ``src`` (True), or a copy where links are refused (False)."""
    global _warned_copy
    try:
        os.link(src, dest)
        return True
    except OSError as exc:  # another user's snapshot (protected hard links), a filesystem without links
        if exc.errno not in (errno.EPERM, errno.EACCES, errno.EMLINK, errno.ENOTSUP, errno.EXDEV):
            raise
        if not _warned_copy:
            log.warning("The snapshot cache allows no hard links here (%s): pins of some paths get copies.", exc)
            _warned_copy = True
        shutil.copy2(src, dest)
        return False
