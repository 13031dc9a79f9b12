"""oxenai's ``RemoteRepo`` reads of a remote repository (hub or ``oxen-server``).

``RemoteRepo(...)`` hits the network in its constructor and a server that never
answers hangs it forever with the GIL held: run these only in a child process
with a wall-clock limit (:func:`oxen_callbacks._oxen.child.run_in_child`, as
:class:`oxen_callbacks._data.remote.RemoteSource` does). Their arguments and
results are JSON-able for that.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigurationError


def resolve_revision(repo_id: str, host: str, scheme: str, revision: str | None) -> str:
    """The commit id ``revision`` (a branch or commit id; ``None``: the server's default) names now.

    Raises:
        ConfigurationError: the repository or the revision does not exist.
        ValueError: oxenai's network errors (for the caller to retry).
    """
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
        return remote._repo.get_commit(name).id  # oxenai 0.65 has no public lookup of a commit
    except ValueError:  # oxenai's "could not get commit id": say whether the repository is there at all
        url = f"{scheme}://{host}/{repo_id}"
        if not remote.exists():  # a network error here is raised, and retried by the caller
            raise ConfigurationError(f"The remote repository {url} does not exist.",
                                     "check the namespace/name in the URL (and the host), or create the repository.") from None
        raise ConfigurationError(f"Revision {name!r} was not found in {url}.",
                                 "pass a branch name or a commit id of that repository.") from None


def download(repo_id: str, host: str, scheme: str, commit: str, rel: str, dest: str) -> None:
    """Download ``rel`` (a file or folder; ``"."``: everything) of ``commit`` under the folder ``dest``.

    Raises:
        ConfigurationError: the commit does not hold ``rel``.
        ValueError: oxenai's other errors (for the caller to retry).
    """
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
            "check the commit holds them on the server's web page.",
        ) from None


def set_remote_at(path: str, name: str, url: str) -> None:
    """oxenai's ``set_remote``: records ``name`` -> ``url`` in the repository at ``path``, after asking
    the server the repository exists (so: in a child, with a wall-clock limit).

    Raises:
        ConfigurationError: the server has no such repository.
        ValueError: oxenai's network errors.
    """
    from .repo import open_oxenai

    try:
        open_oxenai(path).set_remote(name, url)
    except ValueError as exc:  # oxenai: "Remote repository not found: URL"
        if "not found" not in str(exc).lower():
            raise
        raise ConfigurationError(f"The server has no repository {url}.",
                                 "create it on the server first (on the hub: its web page), then add it.") from None
