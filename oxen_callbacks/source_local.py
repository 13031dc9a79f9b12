"""Reading commits of a local Oxen repository without touching its working tree."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from tqdm.auto import tqdm

from . import oxen_layout
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
        return self.repo.resolve(revision)

    def tracks_working_tree(self, revision: str | None) -> bool:
        """True when ``revision`` names what is checked out (so local edits could be meant)."""
        current = self.repo.current_branch()
        return revision in (None, "HEAD") or (current is not None and revision == current)

    def changed_paths(self, paths: list[str]) -> list[str]:
        return self.repo.changed_paths(paths)

    def materialize(self, commit: str, paths: list[str], dest: Path) -> None:
        """Write ``paths`` of ``commit`` under ``dest`` (an empty scratch folder).

        Uses a shadow working tree (see :func:`oxen_layout.make_shadow`): Oxen
        restores the commit's bytes there; the user's tree, HEAD and branches are
        never touched.
        """
        import oxen

        oxen_layout.make_shadow(self.repo.path, dest, commit)
        shadow = oxen.Repo(str(dest))
        try:
            for rel in tqdm(paths, desc=f"pin {self.repo.path.name}@{commit[:10]}", unit="path", disable=None):
                try:
                    call_oxen(shadow.restore, rel, False, commit, what=f"read {rel!r} at {commit}")
                except OxenError as exc:
                    if "not found" in str(exc).lower():
                        raise ConfigurationError(
                            f"Path {rel!r} is not in commit {commit} of the dataset repository {self.location!r}.",
                            "paths are relative to the repository root (e.g. 'train.csv', 'images/'); "
                            "check the commit holds them with `oxen ls` or `oxen log`.",
                        ) from None
                    raise
                if not (dest / rel).exists():
                    raise ConfigurationError(
                        f"Path {rel!r} is not in commit {commit} of the dataset repository {self.location!r}."
                    )
        finally:
            remove_tree(dest / oxen_layout.OXEN_DIR)
