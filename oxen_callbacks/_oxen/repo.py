"""A clean, typed interface over a local oxenai repository.

oxenai's quirks are absorbed here so the rest of the library never sees them:
``Repo(path)`` does not validate; failures can be ``pyo3_runtime.PanicException``
(a ``BaseException``); a second process touching the repository fails at once on
Oxen's database lock instead of waiting; adding a path outside the repository
silently corrupts the staging area; commit ids are unpadded hex (31 or 32 chars).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from pathlib import Path
from typing import Any, TypeVar

from ..errors import ConfigurationError, OxenError, RepoBusyError
from . import layout as oxen_layout
from . import native
from .commit_id import is_commit_like

log = logging.getLogger(__name__)
T = TypeVar("T")

_BUSY_MARKERS = ("LOCK", "Resource temporarily unavailable", "lock file", "WouldBlock")


def call_oxen(fn: Callable[..., T], *args: object, what: str, busy_timeout: float = 0.0) -> T:
    """Run one oxenai call, turning its panics and errors into :class:`OxenError`.

    Oxen's "database is locked by another process" errors are retried with
    backoff for up to ``busy_timeout`` seconds, then raised as :class:`RepoBusyError`.
    """
    deadline = time.monotonic() + busy_timeout
    delay = 0.02
    while True:
        try:
            return fn(*args)
        except (KeyboardInterrupt, SystemExit, GeneratorExit):
            raise
        except BaseException as exc:  # PanicException derives from BaseException
            text = str(exc)
            if any(marker in text for marker in _BUSY_MARKERS):
                if time.monotonic() < deadline:
                    time.sleep(delay)
                    delay = min(delay * 2, 0.5)
                    continue
                raise RepoBusyError(f"{what}: repository busy ({text.strip()})") from exc
            raise OxenError(f"{what}: {text.strip()}") from exc


def preload() -> None:
    """Load oxenai's compiled core now, e.g. in a worker process before its work arrives, and the
    TOML parser every commit reads the repository's config with (~6 ms at first use)."""
    import tomllib  # noqa: F401

    native.core()


def push(path: str, remote: str, branch: str, url: str | None) -> None:
    """Push ``branch`` of the repository at ``path`` to ``remote`` (added as ``url`` first when given).

    Blocks until oxenai is done, and a dead server can make that forever: call it through
    :func:`oxen_callbacks._oxen.child.run_in_child` with a timeout.
    """
    repo = open_oxenai(path)
    if url:
        try:
            repo.set_remote(remote, url)
        except Exception as exc:
            if "already" not in str(exc).lower():
                raise
    repo.push(remote, branch, False)


def open_oxenai(path: str | os.PathLike[str]) -> Any:
    """oxenai's handle (its compiled ``PyRepo``) on the repository at ``path``; it validates nothing."""
    return native.open_repo(os.path.abspath(path))


def damaged_repo(role: str, path: str | os.PathLike[str], detail: str, hint: str | None = None) -> ConfigurationError:
    """The error for a repository whose own files (under ``.oxen``) are damaged: ``detail`` says how."""
    return ConfigurationError(
        f"The {role} {str(path)!r} looks damaged: {detail}.",
        hint or "a file under its .oxen folder is missing, truncated or corrupt (a full disk, a copy cut short?): "
        "clone the repository again (in Python: `oxen.clone('namespace/name', path)`) or restore its .oxen folder from a backup.",
    )


class LocalRepo:
    """A local Oxen repository, validated on construction.

    Example::

        repo = LocalRepo("data/reviews")
        commit = repo.resolve("main")
    """

    def __init__(self, path: str | os.PathLike[str], *, role: str = "repository") -> None:
        self.role = role
        self.path = Path(path).expanduser().resolve()
        if not self.path.exists():
            raise ConfigurationError(
                f"The {role} {str(path)!r} does not exist.",
                "pass the path of an Oxen repository (make one in Python: `oxen.init(path)`).",
            )
        if not oxen_layout.is_repo(self.path):
            root = oxen_layout.find_repo_root(self.path)
            hint = (
                f"pass the repository root {str(root)!r} and name sub-folders in `paths`."
                if root
                else "make it one first (in Python: `oxen.init(path)`), or pass the folder that holds `.oxen`."
            )
            raise ConfigurationError(f"The {role} {str(path)!r} is not an Oxen repository (no .oxen folder).", hint)
        self._handle: Any = None

    @property
    def _repo(self) -> Any:
        """The oxenai handle, made on first use (it does not pickle: see ``__getstate__``)."""
        if self._handle is None:
            self._handle = open_oxenai(self.path)
        return self._handle

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_handle": None}

    @classmethod
    def init(cls, path: str | os.PathLike[str], *, role: str = "repository") -> "LocalRepo":
        """Create (``oxen init``) a repository at ``path``, or open the existing one."""
        target = Path(path).expanduser().resolve()
        if not oxen_layout.is_repo(target):
            target.mkdir(parents=True, exist_ok=True)
            call_oxen(open_oxenai(target).init, what=f"oxen init {target}")
        return cls(target, role=role)

    def __repr__(self) -> str:
        return f"LocalRepo({str(self.path)!r})"

    # -- reading -------------------------------------------------------------
    def branches(self) -> dict[str, str]:
        """Branch name -> head commit id."""
        found = call_oxen(self._repo.list_branches, what=f"list branches of {self.path}", busy_timeout=30)
        return {b.name: b.commit_id for b in found}

    def current_branch(self) -> str | None:
        """The checked-out branch, or ``None`` when HEAD is detached."""
        ref = self._head_ref()
        return None if oxen_layout.has_commit(self.path, ref) else ref

    def _head_ref(self) -> str:
        """What ``.oxen/HEAD`` names; a clear error where there is none (no commits yet, or damage)."""
        self._check_layout()
        try:
            ref = oxen_layout.head_ref(self.path)
        except FileNotFoundError:
            if not oxen_layout.has_commits(self.path):
                raise self._no_commits() from None
            fault = "is missing"
        except UnicodeDecodeError:
            fault = "is not text"
        except OSError as exc:  # a folder in its place, unreadable...
            fault = f"cannot be read ({exc.strerror or exc})"
        else:
            if ref:
                return ref
            fault = "is empty"
        raise damaged_repo(self.role, self.path, f".oxen/HEAD {fault}",
                           "write the checked-out branch into it (e.g. `echo main > .oxen/HEAD`), "
                           "or clone the repository again.") from None

    def commit_branch(self, branches: Callable[[], dict[str, str]], *, check_name: bool = True) -> str | None:
        """The branch a new commit extends (``None`` in a repository without commits yet).

        A commit made where ``.oxen/HEAD`` is missing, empty, detached or names a branch the
        repository lacks starts a second, parentless history: Oxen then rewrites tree nodes
        earlier commits share, and those commits return other files. Such a HEAD is refused.
        ``branches`` lists branch heads: called for a missing or empty HEAD (no branch at all: a first
        commit killed before it named its branch, which the next commit completes) and, with
        ``check_name``, to check HEAD's branch exists (a worker has oxenai loaded; fit start has not).

        Raises:
            ConfigurationError: HEAD does not name a branch the repository has.
        """
        if not oxen_layout.has_commits(self.path):
            return None  # (staged files make part of the layout before the first commit)
        self._check_layout()
        if not _head_named(self.path) and not branches():
            return None  # a first commit killed before it named its branch: the next commit completes it
        ref = self._head_ref()
        if oxen_layout.has_commit(self.path, ref):
            raise damaged_repo(self.role, self.path, f".oxen/HEAD is detached at commit {ref}: a commit "
                               "there would start a history of its own",
                               "write the branch to commit on into it (e.g. `echo main > .oxen/HEAD`).")
        if check_name:
            self._held(self._branch_head(ref, branches()), ref)
        return ref

    def _check_layout(self) -> None:
        """Raise a clear error when Oxen's own files of the repository are damaged."""
        fault = oxen_layout.damage(self.path)
        if fault:
            raise damaged_repo(self.role, self.path, fault)

    def _no_commits(self) -> ConfigurationError:
        return ConfigurationError(
            f"The {self.role} {str(self.path)!r} has no commits yet.",
            "add and commit the data first, in Python: `repo = oxen.Repo(path); repo.add('train.csv'); repo.commit('first version')`.",
        )

    def commit_ids(self) -> list[str]:
        return oxen_layout.commit_ids(self.path)

    def resolve(self, revision: str | None, branches: Callable[[], dict[str, str]] | None = None) -> str:
        """Resolve a branch name, a commit id (or unique prefix) or ``HEAD`` to a commit id.

        ``branches`` lists branch heads (default: this process asks oxenai); commit
        ids resolve from the repository's files without oxenai.
        """
        list_branches = branches or self.branches
        self._check_layout()
        if not oxen_layout.has_commits(self.path):
            raise self._no_commits()
        if revision in (None, "HEAD"):
            ref = self._head_ref()
            if oxen_layout.has_commit(self.path, ref):
                return ref
            return self._held(self._branch_head(ref, list_branches()), ref)
        if oxen_layout.has_commit(self.path, revision):
            return revision
        heads = list_branches()
        if revision in heads:
            return self._held(heads[revision], revision)
        if is_commit_like(revision):
            matches = [c for c in self.commit_ids() if c.startswith(revision.lower())]
            if len(matches) == 1:
                return matches[0]
            if len(matches) > 1:
                raise ConfigurationError(
                    f"Revision {revision!r} is ambiguous in {str(self.path)!r}: it starts {len(matches)} commits.",
                    "give more characters of the commit id.",
                )
        names = ", ".join(sorted(heads)) or "none"
        raise ConfigurationError(
            f"Revision {revision!r} was not found in the {self.role} {str(self.path)!r} (branches: {names}).",
            "pass a branch name or a commit id from `oxen.Repo(path).log()` (Oxen has no tags: use a branch such as 'release/v1').",
        )

    def _branch_head(self, ref: str, heads: dict[str, str]) -> str:
        """The head of the branch HEAD names; damage when the repository lacks that branch."""
        if ref not in heads:
            names = ", ".join(sorted(heads)[:10]) or "none"
            raise damaged_repo(self.role, self.path, f".oxen/HEAD names branch {ref[:80]!r}, which it does not "
                               f"have (branches: {names})", "write the checked-out branch into it "
                               "(e.g. `echo main > .oxen/HEAD`), or pass a revision.")
        return heads[ref]

    def _held(self, commit: str, branch: str) -> str:
        """``commit`` (a branch head, listed before this looks: a pipeline may commit while a fit starts)
        if this repository holds it: a head it lacks means damage."""
        if not oxen_layout.has_commit(self.path, commit):
            raise damaged_repo(self.role, self.path,
                               f"branch {branch!r} points to {str(commit)[:80]!r}, which is not a commit it holds")
        return commit

    def log(self) -> list[dict[str, Any]]:
        """Commits reachable from HEAD, newest first."""
        commits = call_oxen(self._repo.log, what=f"oxen log {self.path}", busy_timeout=30)
        return [{"id": c.id, "message": c.message, "author": c.author, "email": c.email,
                 "timestamp": str(c.timestamp), "parent_ids": list(c.parent_ids)} for c in commits]

    def changed_paths(self, paths: Iterable[str]) -> tuple[list[str], list[str]]:
        """Uncommitted changes in ``paths``: those staged (added, modified, removed), and those of the
        working tree alone (modified, removed, untracked)."""
        status = call_oxen(self._repo.status, what=f"oxen status {self.path}", busy_timeout=30)
        clean = call_oxen(self._repo.clean, None, False, what=f"list untracked files of {self.path}")
        wanted = [p.strip("/") for p in paths]

        def under_wanted(names: Iterable[str]) -> list[str]:
            return sorted({str(n) for n in names if _under_any(str(n), wanted)})

        staged = [f for name in ("added_files", "modified_files", "removed_files") for f in getattr(status, name)()]
        unstaged = [f for name in ("unstaged_modified_files", "unstaged_removed_files") for f in getattr(status, name)()]
        untracked = [str(Path(f).relative_to(self.path)) if os.path.isabs(f) else str(f) for f in clean.files]
        return under_wanted(staged), under_wanted([*unstaged, *untracked])

    # -- writing (callers hold the repository's FileLock) ----------------------
    def add(self, rel_path: str) -> None:
        target = self.inside(rel_path, literal=True)
        call_oxen(self._repo.add, str(target), what=f"oxen add {rel_path}", busy_timeout=60)

    def rm(self, rel_path: str) -> None:
        self.inside(rel_path, literal=True)
        call_oxen(self._repo.rm, rel_path, True, False, True, what=f"oxen rm {rel_path}", busy_timeout=60)

    def commit(self, message: str) -> str:
        """Commit what is staged; returns the new commit id."""
        commit = call_oxen(self._repo.commit, message, what="oxen commit", busy_timeout=60)
        return commit.id

    def inside(self, rel_path: str, *, literal: bool = False) -> Path:
        """``rel_path`` inside this repository; with ``literal``, never one Oxen would read as a glob."""
        if literal and oxen_layout.reads_as_glob(rel_path):
            raise ConfigurationError(f"Oxen would read path {rel_path!r} as a glob pattern (it holds one of "
                                     f"{oxen_layout.GLOB_CHARACTERS!r}), not as that file.")
        target = (self.path / rel_path).resolve()
        if target != self.path and self.path not in target.parents:
            raise ConfigurationError(f"Path {rel_path!r} lies outside the {self.role} {str(self.path)!r}.")
        return target


def _head_named(path: Path) -> bool:
    """Whether ``.oxen/HEAD`` names something (a missing or empty one does not)."""
    try:
        return bool(oxen_layout.head_ref(path))
    except FileNotFoundError:
        return False
    except (OSError, UnicodeDecodeError):
        return True  # unreadable: :meth:`LocalRepo._head_ref` names the fault


def _under_any(path: str, prefixes: list[str]) -> bool:
    path = path.strip("/")
    for prefix in prefixes:
        if prefix in ("", ".") or path == prefix or path.startswith(prefix + "/"):
            return True
    return False


# -- what the short-lived child processes of :mod:`.child` run ---------------------------------
def init_at(path: str) -> None:
    LocalRepo.init(path)


def branches_at(path: str) -> dict[str, str]:
    return LocalRepo(path).branches()


#: Files of a status that are checked against the commit's bytes (each is read whole).
_STATUS_FILES_CHECKED = 5


def changed_paths_at(path: str, commit: str, paths: list[str]) -> dict[str, list[str]]:
    """``changed``: Oxen's status of ``paths`` (see :meth:`LocalRepo.changed_paths`); ``unchanged``:
    those of the first few it calls changed in the working tree whose bytes are exactly ``commit``'s,
    which a sound status never reports (its records of the commit, ``history/<commit>/dir_hashes``,
    are damaged)."""
    from . import tree as oxen_tree

    repo = LocalRepo(path)
    head_before = repo.resolve(None)
    staged, unstaged = repo.changed_paths(paths)
    changed = sorted({*staged, *unstaged})
    if head_before != commit or repo.resolve(None) != commit:  # HEAD moved: the status is not against commit
        return {"changed": changed, "unchanged": []}
    # a path with a staged change is uncommitted whatever its bytes: undone in the working tree, or
    # removed with `oxen rm --staged`, which keeps the file (the commit's bytes) and lists it as untracked
    staged_paths = [s.strip("/") for s in staged]
    suspects = [rel for rel in unstaged if not _under_any(rel, staged_paths)]
    unchanged = []
    for rel in suspects[:_STATUS_FILES_CHECKED]:
        target = Path(path) / rel
        try:
            files = oxen_tree.files_at(path, commit, [rel])[rel].files
        except (oxen_tree.PathNotInCommit, oxen_tree.UnreadableTree, OSError):
            continue  # a new file, or a tree that cannot tell (reading the commit names that damage)
        if (len(files) == 1 and files[0].path == rel and target.is_file() and not target.is_symlink()
                and files[0].held_by(target)):
            unchanged.append(rel)
    return {"changed": changed, "unchanged": unchanged}


def log_at(path: str) -> list[dict[str, Any]]:
    return LocalRepo(path).log()


def commit_at(path: str, paths: list[str], message: str, author: list[str] | None) -> str:
    """Add ``paths`` and commit them, as ``author`` (name, email) when given, else the Oxen config's identity."""
    from .identity import commit_identity

    repo = LocalRepo(path)
    with commit_identity((author[0], author[1])) if author else nullcontext():
        for rel in paths:
            repo.add(rel)
        return repo.commit(message)
