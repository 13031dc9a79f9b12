"""Pin a dataset to one immutable Oxen commit and read it from a read-only snapshot.

Example::

    from oxen_callbacks import PinnedDataset

    data = PinnedDataset("data/reviews", revision="main", paths=["train.csv"])
    data.commit                 # the commit 'main' pointed at, fixed from now on
    df = pd.read_csv(data.file("train.csv"))   # bytes of that commit, whatever 'main' does next
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ._data.entries import linked_part
from ._data.snapshot import VIEWS_SUFFIX, SnapshotStore, remake_hint, shown
from ._data.source import Source
from ._data.views import make_view, view_folder, view_problems
from ._oxen.commit_id import checked_commit_id
from ._oxen.remote_spec import looks_remote
from ._oxen.tree import path_not_in_commit
from ._util.cache import default_cache_dir
from ._util.locks import FileLock, LockTimeout
from ._util.relpath import ancestors, covered, safe_relpath
from .errors import ConfigurationError, DatasetMismatchError, OxenError

log = logging.getLogger(__name__)

#: How long a pin waits for another process pinning the same commit into the same cache: longer than
#: that process's own copy may take (two hours: ``oxen_callbacks._oxen.child.MATERIALIZE_TIMEOUT_S``).
PIN_WAIT_S = 3 * 3600.0


class PinnedDataset:
    """The paths of one dataset commit, materialized on first use into a cached snapshot.

    Args:
        repo: path of a local Oxen repository, or the URL of a remote one
            (``https://hub.oxen.ai/namespace/name``; or ``namespace/name`` with ``host=``).
        revision: a branch name or commit id (or unique prefix); default: what is checked out.
            Resolved to a commit id once, at construction.
        paths: repository-relative files or folders to use; default the whole commit.
        cache_dir: snapshot cache root; default ``~/.cache/oxen-callbacks``
            (``$OXEN_CALLBACKS_CACHE`` overrides).
        allow_dirty: accept uncommitted changes in ``paths`` of the checked-out branch
            (the snapshot still holds the committed bytes; the lineage records ``dirty``).
        host: host of a remote repository given as ``namespace/name``.
        remote_timeout: wall-clock limit in seconds of one call to a remote server
            (a download of one path may take ten times that).
        verify: at the first :meth:`pull`, check every file's content hash, cached
            snapshots included (``verify(deep=True)``); new snapshots are always checked.
        named_by_record: ``repo`` comes from a lineage record or an MLflow run, not from you: its
            server gets a token for its host only, never ``OXEN_API_KEY`` (the key for every host).

    Raises:
        ConfigurationError: not an Oxen repository, unknown revision, bad paths, or
            uncommitted changes in the pinned paths without ``allow_dirty``.
    """

    #: What the repository is to the user, in errors (a checkpoint snapshot reads a model repository).
    ROLE = "dataset repository"

    def __init__(
        self,
        repo: str | os.PathLike[str],
        revision: str | None = None,
        paths: list[str] | tuple[str, ...] | str | None = None,
        *,
        cache_dir: str | os.PathLike[str] | None = None,
        allow_dirty: bool = False,
        host: str | None = None,
        remote_timeout: float = 60.0,
        verify: bool = False,
        named_by_record: bool = False,
    ) -> None:
        if isinstance(paths, str):
            paths = [paths]
        if paths is not None and not paths:
            raise ConfigurationError("paths=[] names no path to pin.",
                                     "pass paths=None to pin the whole repository, or name the paths, "
                                     "e.g. paths=['train.csv'].")
        wanted = [safe_relpath(p, what="dataset path") for p in (paths or ["."])]
        asked = set(wanted)  # (a set test per folder of each path: 3,000 paths took seconds pairwise)
        self.paths: list[str] = [p for p in dict.fromkeys(wanted) if not any(a in asked for a in ancestors(p)[:-1])]
        self._pinned = frozenset(self.paths)  # (file() tests a path's folders against it: no walk over paths)
        self.source: Source = _source_for(repo, host=host, timeout=remote_timeout, role=self.ROLE,
                                          named_by_record=named_by_record)
        self.revision = revision
        # the one choke point of every source: a commit id names cache folders, so it is checked here
        self.commit: str = checked_commit_id(self.source.resolve(revision), what=f"Resolving {self.source.location}")
        self.revision_label: str = revision or self.source.default_revision() or self.commit
        self.dirty = False
        if self.source.tracks_working_tree(revision):
            changed = self.source.changed_paths(self.commit, self.paths)
            if changed and not allow_dirty:
                shown = ", ".join(changed[:5]) + (f" (+{len(changed) - 5} more)" if len(changed) > 5 else "")
                raise ConfigurationError(
                    f"The dataset repository {self.source.location!r} has uncommitted changes in the pinned "
                    f"paths: {shown}. Training would read commit {self.commit}, not your working tree.",
                    "commit them (`oxen add ... && oxen commit -m ...`), pin another revision, "
                    "or pass allow_dirty=True (recorded as dirty in the lineage).",
                )
            self.dirty = bool(changed)
        self.store = SnapshotStore(cache_dir or default_cache_dir(), self.source.key)
        self.pull_seconds: float | None = None
        self.deep_verify = verify
        self._checked = False  # paths found in the snapshot (and deep-checked if asked), once per process
        self._deep_checked: tuple[object, ...] | None = None  # which snapshot the deep check read
        self._pulled: tuple[tuple[object, ...] | None, Path] | None = None  # (snapshot identity, folder) pull() gave

    def __getstate__(self) -> dict[str, Any]:
        """What a copy in another process gets (Ray's workers, a spawned rank): not this process's
        check, which each process makes at its first :meth:`pull` (the cache may differ there; the deep
        one of ``verify=True`` when it is not the snapshot this pin's deep check read)."""
        return {**self.__dict__, "_checked": False, "_pulled": None, "pull_seconds": None}

    # -- materialization -------------------------------------------------------
    def pull(self) -> Path:
        """Materialize the pinned paths (once; later calls and other processes reuse the cache);
        returns the folder that holds them (:attr:`path`)."""
        started = time.perf_counter()
        pulled = self._pulled
        if self._checked and pulled is not None and pulled[0] is not None and pulled[0] == self.store.identity(self.commit) \
                and pulled[1].is_dir():  # the snapshot this process found whole: not its records read again per file()
            self.pull_seconds = time.perf_counter() - started
            return pulled[1]
        if self.store.manifest(self.commit).missing(self.paths):
            self._materialize_missing()
        folder = self.store.folder(self.commit)
        if not self._checked:
            self._remake_if_lost(self.paths)
            for rel in self.paths:  # a path covered by a cached folder (or the whole commit) may not exist
                if not os.path.lexists(folder / rel):
                    raise path_not_in_commit(rel, self.commit, self.source.location, role=self.ROLE)
            self._make_view_if_lost(self.paths)
            if self.deep_verify and self._deep_checked != (seen := self.store.identity(self.commit)):
                self.verify(deep=True)  # (not again in a copy of this pin reading the same snapshot: a DataLoader worker)
                self._deep_checked = seen
            self._checked = True
        view = view_folder(self.store, self.commit, self.paths)
        if view is not None and not view.is_dir():  # (gone with a snapshot another pin made again)
            self._make_view_if_lost(self.paths)
        self.pull_seconds = time.perf_counter() - started
        self._pulled = (self.store.identity(self.commit), view or folder)
        return view or folder

    def pull_intact(self) -> Path:
        """:meth:`pull`, then check the content hash of every file of the pinned paths; a damaged
        snapshot is made again from the repository. Reads every byte: for commands, not training."""
        folder = self.pull()

        def damage() -> list[str]:
            return (self.store.check(self.commit, deep=True, paths=self.paths) or self._unlike_the_repository()
                    or view_problems(self.store, self.commit, self.paths, deep=True))

        if damage():
            self._materialize_missing(damage)  # a new snapshot is checked against the commit
            self._make_view_if_lost(self.paths)
        return folder

    def _unlike_the_repository(self) -> list[str]:
        """Where the snapshot's hash record is not the repository's tree (a snapshot and its records
        planted in a shared cache pass the deep check); nothing when the source cannot tell (remote)."""
        file_hashes = getattr(self.source, "file_hashes", None)
        expected = file_hashes(self.commit, self.paths) if file_hashes is not None else None
        return self.store.unlike(self.commit, expected, self.paths) if expected is not None else []

    def _remake_if_lost(self, rels: list[str]) -> None:
        """Make the snapshot again when it lost one of ``rels`` that its records say the commit holds
        (deleted from the cache): such a path is damage, not a path the commit lacks; so is a symbolic
        link in place of the snapshot folder or of a folder on the way to one of ``rels`` (other bytes)."""
        folder = self.store.folder(self.commit)

        def lost() -> list[str]:
            linked = {link for rel in rels if (link := linked_part(folder, rel)) is not None}
            return [f"{link!r} is a symbolic link" for link in sorted(linked)] + [
                f"{rel!r} is missing" for rel in rels
                if not os.path.lexists(folder / rel) and self.store.records(self.commit, rel)]

        if lost():
            self._materialize_missing(lost)

    def _make_view_if_lost(self, rels: list[str]) -> None:
        """Make the view of the pinned paths (:mod:`._data.views`) when it lacks one of ``rels``: new,
        or something of it was deleted (the view is made again whole, from the snapshot)."""
        view = view_folder(self.store, self.commit, self.paths)
        if view is None or all(os.path.lexists(view / rel) for rel in rels):
            return
        with self._snapshot_lock():
            if not all(os.path.lexists(view / rel) for rel in rels):
                make_view(self.store, self.commit, self.paths)

    @contextmanager
    def _snapshot_lock(self) -> Iterator[None]:
        """The snapshot's lock, for changing it; errors named for people."""
        try:
            with FileLock(self.store.lock_path(self.commit), timeout=PIN_WAIT_S):
                yield
        except LockTimeout:  # (a TimeoutError, so an OSError: not a cache we cannot write)
            raise OxenError(
                f"Another process has been pinning {self.source.location}@{self.commit} into the snapshot cache "
                f"{str(self.store.cache_dir)!r} for {PIN_WAIT_S:g}s and still holds its lock "
                f"{self.store.lock_path(self.commit)}: it looks stuck. Stop it (`fuser` on the lock names it), "
                "or pass cache_dir= another folder."
            ) from None
        except OSError as exc:  # permission denied, disk full, a file in the way...
            full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
            raise ConfigurationError(
                f"The snapshot cache {str(self.store.cache_dir)!r} is {'full' if full else 'not writable'}: "
                f"{exc.strerror or exc}{f' (pinning {self.source.location}@{self.commit})' if full else ''}.",
                "free some space, or pass cache_dir= a writable folder (or set OXEN_CALLBACKS_CACHE).",
            ) from exc

    def _materialize_missing(self, damage: Callable[[], list[str]] | None = None) -> None:
        """Make the missing pinned paths, the whole snapshot again if it is damaged (``damage``: what is
        wrong with it besides its records, asked again under the lock: another process may have made it again)."""
        with self._snapshot_lock():
            problems = self.store.record_problems(self.commit) or (damage() if damage else [])
            if problems:  # what its folder holds is unknown: make it again from nothing
                log.warning("Snapshot %s is damaged (%s): making it again", self.store.folder(self.commit),
                            shown(problems))
                self.store.discard(self.commit)
            manifest = self.store.manifest(self.commit)
            missing = manifest.missing(self.paths)
            if not missing:
                return
            with self.store.scratch() as scratch:
                made = self.source.materialize(self.commit, missing, scratch)
                self.store.adopt(self.commit, scratch, missing, manifest, made)
        log.info("Pinned %s@%s: %d files, %.1f MB in %s", self.source.location, self.commit, manifest.files,
                 manifest.bytes / 1e6, self.store.folder(self.commit))

    @property
    def is_pulled(self) -> bool:
        return not self.store.manifest(self.commit).missing(self.paths)

    @property
    def path(self) -> Path:
        """A read-only folder laid out as the repository at the pinned commit, holding the pinned paths
        and nothing else (for the whole commit, the snapshot itself; else a view of it: see
        :mod:`oxen_callbacks._data.views`)."""
        return self.pull()

    def file(self, rel_path: str) -> Path:
        """Absolute path of ``rel_path`` in the snapshot; it must lie in the pinned paths."""
        rel = safe_relpath(rel_path, what="dataset path")
        if not covered(rel, self._pinned):
            raise ConfigurationError(
                f"{rel_path!r} is not among the pinned paths {self.paths}.",
                f"add it: PinnedDataset({self.source.location!r}, paths=[..., {rel_path!r}]).",
            )
        target = self.path / rel
        if not (self.store.folder(self.commit) / rel).exists():  # (a view's link outlives the snapshot's file)
            self._remake_if_lost([rel])
        if not target.exists():
            self._make_view_if_lost([rel])
        if not target.exists():
            if self.store.records(self.commit, rel):
                self.verify()  # names what is in its place (a dangling link...)
            raise ConfigurationError(f"{rel_path!r} is not in commit {self.commit} of {self.source.location!r}.")
        return target

    def files(self) -> list[Path]:
        """Every file of the pinned paths, sorted."""
        root = self.path
        found: list[Path] = []
        for rel in self.paths:
            target = root / rel
            if target.is_file():
                found.append(target)
            else:
                found.extend(p for p in target.rglob("*") if p.is_file())
        return sorted(set(found))

    def load_dataset(self, data_files: Any = None, *, cache_dir: str | os.PathLike[str] | None = None,
                     **kwargs: Any) -> Any:
        """The pinned CSV / JSON Lines / Parquet files as a ``datasets.DatasetDict`` (``Dataset`` with ``split=``).

        Cached per commit, in ``cache_dir`` (default ``<snapshot cache>/datasets/<repo>``); see
        :func:`oxen_callbacks._data.hf_datasets.load_pinned`::

            splits = PinnedDataset("data/reviews", paths=["train.jsonl", "eval.jsonl"]).load_dataset()
            splits["train"], splits["eval"]
        """
        from ._data.hf_datasets import load_pinned

        folder = cache_dir if cache_dir is not None else self.store.cache_dir / "datasets" / self.source.key
        return load_pinned(self, data_files, cache_dir=folder, location=self.source.location, **kwargs)

    def verify(self, *, deep: bool = False) -> None:
        """Check the snapshot still holds what its manifest recorded: file counts and sizes,
        and with ``deep`` the content hash of every file of the pinned paths (reads every byte),
        recorded as the repository's commit has them (a local repository's tree tells).

        Raises:
            DatasetMismatchError: naming what changed.
            ConfigurationError: the pinned paths are not in the snapshot cache yet (nothing to check).
        """
        if missing := self.store.manifest(self.commit).missing(self.paths):
            raise ConfigurationError(
                f"Nothing to verify: {shown([repr(p) for p in missing])} of {self.source.location}@{self.commit} "
                f"{'is' if len(missing) == 1 else 'are'} not in the snapshot cache {str(self.store.cache_dir)!r} yet.",
                "call pull() first (a fit does): it checks every new snapshot against the commit as it makes it.")
        problems = self.store.check(self.commit, deep=deep, paths=self.paths)
        if deep and not problems:
            problems = self._unlike_the_repository()
        folder = self.store.folder(self.commit)
        if not problems and (problems := view_problems(self.store, self.commit, self.paths, deep=deep)):
            folder = view_folder(self.store, self.commit, self.paths) or folder  # (deleted, the next pull makes it)
        if problems:
            raise DatasetMismatchError(
                f"Snapshot {folder} of {self.source.location}@{self.commit} changed on disk: {shown(problems)}.\n"
                f"HINT: {remake_hint(folder)}."
            )

    # -- lineage ------------------------------------------------------------------
    def to_lineage(self) -> dict[str, Any]:
        """The ``dataset`` section of a lineage record."""
        return {
            "repo": self.source.location,
            "revision": self.revision_label,
            "commit": self.commit,
            "paths": list(self.paths),
            "dirty": self.dirty,
        }

    def check_same(self, recorded: dict[str, Any], *, what: str) -> None:
        """Raise :class:`DatasetMismatchError` when ``recorded`` names another commit or paths."""
        if recorded.get("commit") != self.commit:
            raise DatasetMismatchError(
                f"{what} was trained on dataset commit {recorded.get('commit')} of {recorded.get('repo')}, "
                f"but this run pins {self.commit} of {self.source.location} "
                f"(revision {self.revision_label!r}). Resuming would mix two datasets.\n"
                f"HINT: pin the recorded commit: PinnedDataset(..., revision={recorded.get('commit')!r}), "
                "or pass allow_dataset_change=True to resume on the new data on purpose."
            )

    def other_commits_held(self, *holders: Any) -> set[str]:
        """Commits of this repository other than :attr:`commit` that ``holders`` (a DataModule)
        hold in their attributes, two levels deep: another ``PinnedDataset`` of it, or a path into
        another commit's snapshot. A holder built from an earlier pin reads data the lineage won't name."""
        found: set[str] = set()
        snapshots = str(self.store.base) + os.sep
        for value in _attribute_values(holders, depth=3):
            if isinstance(value, PinnedDataset) and value.source.key == self.source.key:
                found.add(value.commit)
            elif isinstance(value, (str, os.PathLike)) and os.fspath(value).startswith(snapshots):
                found.add(os.fspath(value)[len(snapshots):].split(os.sep, 1)[0].removesuffix(VIEWS_SUFFIX))
        return found - {self.commit}

    def __repr__(self) -> str:
        return f"PinnedDataset({self.source.location!r}, commit={self.commit!r}, paths={self.paths})"


def _attribute_values(roots: tuple[Any, ...], depth: int) -> Iterator[Any]:
    """``roots`` and the values in their ``__dict__``s, dicts, lists and tuples, ``depth`` levels down
    (each object once; no properties run)."""
    seen: set[int] = set()
    level = list(roots)
    for _ in range(depth):
        below: list[Any] = []
        for value in level:
            if id(value) in seen or isinstance(value, (int, float, bool, bytes, type(None))):
                continue
            seen.add(id(value))
            yield value
            if isinstance(value, dict):
                below += list(value.values())[:1000]
            elif isinstance(value, (list, tuple, set)):
                below += list(value)[:1000]
            elif not isinstance(value, (str, os.PathLike)):
                below += list(getattr(value, "__dict__", {}).values())
        level = below


def as_pinned(dataset: "PinnedDataset | str | os.PathLike[str] | None", revision: str | None,
              paths: list[str] | None, cache_dir: str | os.PathLike[str] | None) -> "PinnedDataset | None":
    """What the callbacks' ``dataset=`` / ``revision=`` / ``paths=`` arguments mean."""
    if isinstance(dataset, PinnedDataset) and (revision is not None or paths is not None):
        raise ConfigurationError(
            "revision= and paths= apply when dataset= is a repository path, not a PinnedDataset.",
            "set them on the PinnedDataset: PinnedDataset(repo, revision=..., paths=[...]).",
        )
    if dataset is None or isinstance(dataset, PinnedDataset):
        return dataset
    return PinnedDataset(dataset, revision, paths, cache_dir=cache_dir)


def _source_for(repo: str | os.PathLike[str], *, host: str | None, timeout: float, role: str,
                named_by_record: bool = False) -> Source:
    """The source ``repo`` names: a remote server's repository, or a folder on this machine.
    Each kind is imported only when a pin uses it."""
    if host is not None or looks_remote(str(repo)):
        from ._data.remote import RemoteSource

        return RemoteSource(str(repo), host=host, timeout=timeout, named_by_record=named_by_record)
    from ._data.local import LocalSource

    return LocalSource(repo, role=role)
