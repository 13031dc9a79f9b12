"""Reading commits of a local Oxen repository without touching its working tree.

The training process never calls oxenai on the user's repository (see
:mod:`oxen_callbacks.oxen_child`): commit ids resolve from the repository's files,
branch names and materialization run in a child process.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from tqdm.auto import tqdm

from . import oxen_child, oxen_layout
from .errors import ConfigurationError, OxenError
from .oxen_repo import LocalRepo, call_oxen
from .snapshot import remove_tree

log = logging.getLogger(__name__)


class LocalSource:
    """A local dataset repository as a source of pinned snapshots."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.repo = LocalRepo(path, role="dataset repository")
        self.location = str(self.repo.path)
        digest = hashlib.sha1(self.location.encode()).hexdigest()[:10]
        self.key = f"{self.repo.path.name}-{digest}"

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

    def materialize(self, commit: str, paths: list[str], dest: Path) -> None:
        """Write ``paths`` of ``commit`` under ``dest`` (an empty scratch folder), in a child process."""
        oxen_child.materialize(self.repo.path, commit, paths, dest)


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
