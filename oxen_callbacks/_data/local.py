"""Reading commits of a local Oxen repository without touching its working tree.

The training process never calls oxenai on the user's repository, nor opens its
databases (see :mod:`oxen_callbacks._oxen.child`): commit ids resolve from the
repository's files and branch names in a child process. A commit is materialized
by a child that copies its files' bytes from Oxen's content store, listed by
:mod:`oxen_callbacks._oxen.tree` and checked against their content hashes
(:mod:`oxen_callbacks._oxen.store_copy`); if the tree cannot be read, ``oxen restore``
in a child process writes the same files. A child that crashes (a damaged
repository: lmdb's memory map of a truncated file raises SIGBUS) becomes a
:class:`ConfigurationError` naming the repository.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .._oxen import child as oxen_child
from .._oxen import store_copy
from .._oxen import tree as oxen_tree
from .._oxen.repo import LocalRepo, damaged_repo
from .._oxen.store_copy import CorruptStore
from .._oxen.tree import path_not_in_commit
from .._util.fs import empty_folder
from .._util.materialized import Materialized, content_hash
from ..errors import ConfigurationError, OxenError

log = logging.getLogger(__name__)

#: Signals of a child that crashed on what it read (not killed from outside).
_CRASHES = {signal.SIGBUS, signal.SIGSEGV, signal.SIGABRT, signal.SIGILL}
#: What oxenai's errors say when the repository's own databases or config are damaged.
_DAMAGE_MARKERS = ("MDB_INVALID", "MDB_CORRUPTED", "MDB_PAGE_NOTFOUND", "Corruption:", "TOML parse error")
#: ... and when one of its own files is missing (e.g. a commit's ``dir_hashes`` database).
_MISSING_MARKERS = ("No such file or directory", "Path does not exist")


def _names_damage(oxen_error: str) -> bool:
    """Whether an oxenai error says that the repository's own files are damaged or missing."""
    return (any(marker in oxen_error for marker in _DAMAGE_MARKERS)
            or ("/.oxen/" in oxen_error and any(marker in oxen_error for marker in _MISSING_MARKERS)))


class LocalSource:
    """A local dataset repository as a source of pinned snapshots (a :class:`~oxen_callbacks.pin.Source`)."""

    def __init__(self, path: str | os.PathLike[str], *, role: str = "dataset repository") -> None:
        self.repo = LocalRepo(path, role=role)
        self.location = str(self.repo.path)
        digest = hashlib.sha1(self.location.encode()).hexdigest()[:10]
        self.key = f"{self.repo.path.name}-{digest}"

    @property
    def local_root(self) -> Path:
        """The repository's folder."""
        return self.repo.path

    def resolve(self, revision: str | None) -> str:
        with self._child_errors("list its branches"):
            return self.repo.resolve(revision, branches=lambda: oxen_child.branches(self.repo.path))

    def default_revision(self) -> str | None:
        """What an omitted revision means: the checked-out branch (``None`` when detached)."""
        return self.repo.current_branch()

    def tracks_working_tree(self, revision: str | None) -> bool:
        """True when ``revision`` names what is checked out (so local edits could be meant)."""
        current = self.repo.current_branch()
        return revision in (None, "HEAD") or (current is not None and revision == current)

    def changed_paths(self, commit: str, paths: list[str]) -> list[str]:
        with self._child_errors("read its status"):
            status = oxen_child.changed_paths(self.repo.path, commit, paths)
        if status["unchanged"]:
            raise damaged_repo(
                self.repo.role, self.location,
                f"Oxen's status calls {status['unchanged'][0]!r} changed, yet its bytes are those of commit {commit}: "
                f"its records of that commit (.oxen/history/{commit}/dir_hashes) are damaged",
                f"pin the commit itself (revision={commit!r}) to train now, then clone the repository again "
                "or restore its .oxen folder from a backup.",
            )
        return status["changed"]

    def file_hashes(self, commit: str, paths: list[str]) -> dict[str, str] | None:
        """The content hash (as a snapshot records it) of every file at or under ``paths`` in ``commit``,
        read from the repository's tree; ``None`` when the tree cannot tell."""
        try:
            found = oxen_tree.files_at(self.local_root, commit, paths)
        except (oxen_tree.PathNotInCommit, oxen_tree.UnreadableTree, OSError):
            return None
        return {f.path: content_hash(f.hash) for subtree in found.values() for f in subtree.files}

    def materialize(self, commit: str, paths: list[str], dest: Path) -> Materialized | None:
        """Write ``paths`` of ``commit`` under ``dest`` (an empty scratch folder).

        Copies from the content store in a child (:func:`copy_from_store`): read-only
        files, each checked against its content hash; returns their counts and hashes.
        When the tree cannot be read there, logs a warning and runs ``oxen restore`` in
        a child instead (returns ``None``).

        Raises:
            ConfigurationError: a path is not in the commit, or the repository looks damaged.
            OxenError: a child was killed from outside, or ran out of time.
        """
        with self._child_errors(f"read commit {commit}"):
            try:
                return copy_from_store(self.repo.path, commit, paths, dest)
            except oxen_tree.PathNotInCommit as exc:
                raise path_not_in_commit(exc.path, commit, self.location, role=self.repo.role) from None
            except CorruptStore as exc:
                raise self._damaged(str(exc)) from None
            except oxen_tree.UnreadableTree as exc:
                unreadable = exc
            log.warning("Cannot copy %s@%s from Oxen's content store (%s); using `oxen restore` instead.",
                        self.location, commit, unreadable)
            empty_folder(dest)
            try:
                oxen_child.materialize(self.repo.path, commit, paths, dest)
            except (oxen_child.ChildCrashed, oxen_child.ChildTimedOut):
                raise
            except (ConfigurationError, OxenError) as exc:
                if isinstance(exc, ConfigurationError) and isinstance(unreadable, oxen_tree.UnsupportedLayout):
                    raise  # a tree we do not read, but Oxen does: its answer stands
                why = " ".join(str(exc).split("\nHINT: ")[0].split()).rstrip(".")
                where = "its content store" if isinstance(unreadable, oxen_tree.UnsupportedLayout) else "its merkle tree"
                raise self._damaged(f"{where} cannot be read from here ({unreadable}) and `oxen restore` "
                                    f"failed: {why}") from None
            return None

    @contextmanager
    def _child_errors(self, what: str) -> Iterator[None]:
        """Clear errors naming the repository for a child that crashed reading it, was killed or hung."""
        try:
            yield
        except oxen_child.ChildTimedOut as exc:
            raise OxenError(f"Could not {what} in {self.location!r}: {exc}.") from None
        except oxen_child.ChildCrashed as exc:
            if exc.signal not in _CRASHES:
                raise OxenError(f"Could not {what} in {self.location!r}: {exc} "
                                "(stopped from outside, e.g. out of memory).") from None
            raise self._damaged(f"a process that tried to {what} crashed "
                                f"({signal.Signals(exc.signal).name})") from None
        except OxenError as exc:
            if not _names_damage(str(exc)):
                raise
            raise self._damaged(f"Oxen could not {what}: {' '.join(str(exc).split())[:300]}") from None

    def _damaged(self, detail: str) -> ConfigurationError:
        return damaged_repo(self.repo.role, self.location, detail)


def copy_from_store(repo: Path, commit: str, paths: list[str], dest: Path) -> Materialized:
    """Write ``paths`` of ``commit`` under ``dest`` in a child process that copies from Oxen's content store.

    See :func:`oxen_callbacks._oxen.store_copy.copy_commit`; its progress bar goes to our stderr.

    Raises:
        oxen_tree.PathNotInCommit: a path is not in the commit.
        oxen_tree.UnreadableTree: the tree or a stored file cannot be read
            (:class:`oxen_tree.UnsupportedLayout`: a configuration the reader does not know).
        CorruptStore: a stored file's size or content differs from the tree's record.
        OSError: ``dest``'s disk or quota is full (ENOSPC, EDQUOT).
        oxen_child.ChildCrashed: the child was killed by a signal (SIGBUS: a damaged tree).
        oxen_child.ChildTimedOut: after :data:`oxen_child.MATERIALIZE_TIMEOUT_S`.
    """
    outcome = oxen_child.run_in_child(store_copy.child_copy, timeout=oxen_child.MATERIALIZE_TIMEOUT_S,
                                      show_stderr=True, repo=str(repo), commit=commit, paths=paths, dest=str(dest),
                                      parent=os.getpid())
    if "missing" in outcome:
        raise oxen_tree.PathNotInCommit(outcome["missing"])
    if "corrupt" in outcome:
        raise CorruptStore(outcome["corrupt"])
    if "no_space" in outcome:
        raise OSError(outcome["errno"], outcome["no_space"], str(dest))
    if "unreadable" in outcome:
        kind = oxen_tree.UnsupportedLayout if outcome["layout"] else oxen_tree.UnreadableTree
        raise kind(outcome["unreadable"])
    return Materialized(outcome["counts"], outcome["hashes"])
