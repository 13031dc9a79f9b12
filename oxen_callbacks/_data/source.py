"""What a pin reads a dataset repository through (:class:`Source`): a local folder or a remote server."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

from .._util.materialized import Materialized


@runtime_checkable
class Source(Protocol):
    """A dataset repository that revisions resolve in and commits are read from."""

    @property
    def location(self) -> str:
        """The repository's local path or remote URL, as recorded in lineage (never credentials)."""
        ...

    @property
    def key(self) -> str:
        """A folder-safe name, unique per repository, for the snapshot cache."""
        ...

    @property
    def local_root(self) -> Path | None:
        """The repository's folder on this machine; ``None`` for a remote repository."""
        ...

    def resolve(self, revision: str | None) -> str:
        """The commit id ``revision`` (branch, commit id; ``None``: the default) names now.

        Raises:
            ConfigurationError: unknown revision, or the repository cannot be reached.
        """
        ...

    def default_revision(self) -> str | None:
        """What an omitted revision means (a branch name), ``None`` when there is no name for it."""
        ...

    def tracks_working_tree(self, revision: str | None) -> bool:
        """True when ``revision`` names a checked-out tree whose local edits the user could mean."""
        ...

    def changed_paths(self, commit: str, paths: list[str]) -> list[str]:
        """Those of ``paths`` with uncommitted changes against ``commit``, the checked-out one (always
        empty without a working tree).

        Raises:
            ConfigurationError: the repository's status records are damaged.
        """
        ...

    def materialize(self, commit: str, paths: list[str], dest: Path) -> Materialized | None:
        """Write ``paths`` of ``commit`` under the empty folder ``dest``.

        Returns each path's file count and bytes and each file's content hash when known
        (checked against the commit), else ``None`` (the snapshot store counts and hashes
        what was written).
        """
        ...
