"""Pinned snapshots from a remote Oxen repository (hub or ``oxen-server``).

The revision resolves to a commit id once; every file is then downloaded *by
that commit id*, so a branch moving on the server mid-download changes nothing.
Every network call runs in a child process with a wall-clock limit (a server
that accepts and never answers must not freeze training) and is retried with
backoff on connection errors. Authentication comes from Oxen's own config
(``oxen config --auth HOST TOKEN``); tokens are never taken in URLs.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .._oxen import child as oxen_child
from .._oxen.commit_id import FULL_COMMIT_ID_LEN, checked_commit_id, is_commit_id
from .._oxen.remote_spec import RemoteSpec, parse_remote
from ..errors import ConfigurationError, OxenError

log = logging.getLogger(__name__)
BACKOFF_S = (1.0, 2.0, 4.0)


class RemoteSource:
    """A remote dataset repository as a source of pinned snapshots (a :class:`~oxen_callbacks.pin.Source`)."""

    def __init__(self, repo: str, *, host: str | None = None, timeout: float = 60.0) -> None:
        self.spec: RemoteSpec = parse_remote(repo, host)
        self.location = self.spec.url
        self.key = self.spec.key
        self.timeout = timeout

    @property
    def local_root(self) -> None:
        """No folder on this machine: the repository lives on its server."""
        return None

    def _call(self, function: str, what: str, timeout: float, **kwargs: Any) -> Any:
        error: OxenError | None = None
        for pause in (0.0, *BACKOFF_S):
            time.sleep(pause)
            try:
                return oxen_child.run_in_child(f"oxen_callbacks._data.remote:{function}", timeout=timeout,
                                               repo_id=self.spec.repo_id, host=self.spec.host,
                                               scheme=self.spec.scheme, **kwargs)
            except ConfigurationError:
                raise
            except OxenError as exc:
                error = exc
                if "no answer within" in str(exc):
                    break  # a hanging server: waiting again would only double the stall
                log.warning("%s failed (%s); retrying", what, exc)
        raise ConfigurationError(
            f"Could not {what} at {self.location}: {error}",
            "check the host and that the server is up; for a private repository run "
            "`oxen config --auth HOST TOKEN`.",
        )

    def resolve(self, revision: str | None) -> str:
        """The commit id the server names for ``revision``; its answer is checked, never trusted
        (a commit id becomes a folder name of the snapshot cache)."""
        answer = self._call("child_resolve", f"resolve revision {revision or 'main'!r}", self.timeout,
                            revision=revision)
        commit = checked_commit_id(answer, what=f"The server {self.location} (revision {revision or 'main'!r})")
        if revision is not None and len(revision) >= FULL_COMMIT_ID_LEN - 1 and is_commit_id(revision) \
                and commit != revision:
            raise ConfigurationError(
                f"The server {self.location} answered commit {commit} for commit id {revision}.",
                "check that the URL names the repository the commit belongs to.",
            )
        return commit

    def default_revision(self) -> str:
        return "main"

    def tracks_working_tree(self, revision: str | None) -> bool:
        return False  # no local working tree to be dirty

    def changed_paths(self, paths: list[str]) -> list[str]:
        return []

    def materialize(self, commit: str, paths: list[str], dest: Path) -> None:
        """Download ``paths`` of ``commit`` under ``dest`` (counted by the snapshot store afterwards)."""
        for rel in tqdm(paths, desc=f"download {self.spec.repo_id}@{commit[:10]}", unit="path", disable=None):
            self._call("child_download", f"download {rel!r}", self.timeout * 10, commit=commit, rel=rel,
                       dest=str(dest))


# -- child side (run by oxen_child in a separate process) -----------------------------
def child_resolve(repo_id: str, host: str, scheme: str, revision: str | None) -> str:
    from oxen import RemoteRepo

    remote = RemoteRepo(repo_id, host, revision or "main", scheme)
    name = revision or remote.revision
    try:
        branch = remote.get_branch(name)
    except ValueError:  # oxenai's "could not get branch": not a branch, maybe a commit id
        branch = None
    if branch is not None:
        return branch.commit_id
    try:
        return remote._repo.get_commit(name).id
    except ValueError:  # oxenai's "could not get commit id": say whether the repository is there at all
        url = f"{scheme}://{host}/{repo_id}"
        if not remote.exists():  # a network error here is raised, and retried by the caller
            raise ConfigurationError(f"The remote repository {url} does not exist.",
                                     "check the namespace/name in the URL (and the host), or create the repository.") from None
        raise ConfigurationError(f"Revision {name!r} was not found in {url}.",
                                 "pass a branch name or a commit id of that repository.") from None


def child_download(repo_id: str, host: str, scheme: str, commit: str, rel: str, dest: str) -> None:
    from oxen import RemoteRepo

    remote = RemoteRepo(repo_id, host, commit, scheme)
    target = Path(dest) / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        remote.download("" if rel == "." else rel, str(dest if rel == "." else target), revision=commit)
    except ValueError as exc:  # oxenai: "Path does not exist: REL" (other errors are retried by the caller)
        if "does not exist" not in str(exc):
            raise
        raise ConfigurationError(
            f"Path {rel!r} is not in commit {commit} of {scheme}://{host}/{repo_id}.",
            "paths are relative to the repository root (e.g. 'train.csv', 'images/'); "
            "check the commit holds them with `oxen ls` or on the server's web page.",
        ) from None
