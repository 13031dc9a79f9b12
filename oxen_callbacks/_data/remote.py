"""Pinned snapshots from a remote Oxen repository (hub or ``oxen-server``).

The revision resolves to a commit id once; every file is then downloaded *by
that commit id*, so a branch moving on the server mid-download changes nothing.
Every network call runs in a child process with a wall-clock limit (a server
that accepts and never answers must not freeze training) and is retried with
backoff on connection errors. Authentication comes from ``$OXEN_API_KEY`` (see
:mod:`oxen_callbacks._oxen.auth`), else Oxen's own config (``oxen-callbacks auth --host HOST``);
tokens are never taken in URLs.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .._oxen import child as oxen_child
from .._oxen import remote as oxen_remote
from .._oxen.commit_id import FULL_COMMIT_ID_LEN, checked_commit_id, is_commit_id
from .._oxen.remote_spec import RemoteSpec, parse_remote
from .._util.progress import show_progress
from ..errors import ConfigurationError, OxenError

log = logging.getLogger(__name__)
BACKOFF_S = (1.0, 2.0, 4.0)
#: oxenai's error when a downloaded file's xxh3 is not the hash the server lists for it (it keeps nothing)
_HASH_MISMATCH = re.compile(r"Hash mismatch .*expected (?P<expected>\w+), got (?P<got>\w+)")


class RemoteSource:
    """A remote dataset repository as a source of pinned snapshots (a :class:`~oxen_callbacks.pin.Source`)."""

    def __init__(self, repo: str, *, host: str | None = None, timeout: float = 60.0,
                 named_by_record: bool = False) -> None:
        self.spec: RemoteSpec = parse_remote(repo, host)
        self.location = self.spec.url
        self.key = self.spec.key
        self.timeout = timeout
        self.named_by_record = named_by_record  # then only a token for its host is sent

    @property
    def local_root(self) -> None:
        """No folder on this machine: the repository lives on its server."""
        return None

    def _call(self, function: Callable[..., Any], what: str, timeout: float, **kwargs: Any) -> Any:
        error: OxenError | None = None
        mismatches = 0
        for pause in (0.0, *BACKOFF_S):
            time.sleep(pause)
            try:
                return oxen_child.run_in_child(function, timeout=timeout, remote_host=self.spec.host,
                                               any_host_key=not self.named_by_record,
                                               remote_plain_http=self.spec.scheme == "http",
                                               repo_id=self.spec.repo_id, host=self.spec.host,
                                               scheme=self.spec.scheme, **kwargs)
            except ConfigurationError:
                raise
            except OxenError as exc:
                error = exc
                if "no answer within" in str(exc):
                    break  # a hanging server: waiting again would only double the stall
                if mismatch := _HASH_MISMATCH.search(str(exc)):
                    mismatches += 1
                    if mismatches == 2:  # once may be a proxy altering a download; twice, the server's copy
                        raise OxenError(
                            f"Could not {what} at {self.location}: twice the server sent bytes whose hash "
                            f"({mismatch['got']}) is not the one it lists for that file ({mismatch['expected']}). "
                            "Its stored copy may be damaged, or something between you and it alters downloads. "
                            "Nothing was kept; ask the server's administrator to check the repository, or pin "
                            "another commit.") from None
                log.warning("%s failed (%s); retrying", what, exc)
        raise ConfigurationError(
            f"Could not {what} at {self.location}: {error}",
            "check the host and that the server is up; for a private repository give a token: "
            f"`oxen-callbacks auth --host {self.spec.host}` (reads it from stdin) or $OXEN_API_KEY.",
        )

    def resolve(self, revision: str | None) -> str:
        """The commit id the server names for ``revision``; its answer is checked, never trusted
        (a commit id becomes a folder name of the snapshot cache)."""
        answer = self._call(oxen_remote.resolve_revision, f"resolve revision {revision or 'main'!r}", self.timeout,
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

    def changed_paths(self, commit: str, paths: list[str]) -> list[str]:
        return []

    def materialize(self, commit: str, paths: list[str], dest: Path) -> None:
        """Download ``paths`` of ``commit`` under ``dest`` (counted by the snapshot store afterwards)."""
        for rel in tqdm(paths, desc=f"download {self.spec.repo_id}@{commit[:10]}", unit="path", disable=not show_progress()):
            self._call(oxen_remote.download, f"download {rel!r} of commit {commit}", self.timeout * 10, commit=commit, rel=rel,
                       dest=str(dest))
