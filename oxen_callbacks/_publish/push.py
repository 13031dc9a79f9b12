"""Pushing a model repository to its Oxen remote, with a wall-clock limit and retries.

A server that accepts a connection and never answers makes oxenai's push hang
forever while holding the GIL, so every push runs in a child process that is
killed at the deadline. A push that still fails is journaled
(``.oxen/oxen-callbacks/push-pending.json``) for ``oxen-callbacks sync``; the
commits are safe in the local repository either way. A token for the remote's host in the
environment (``OXEN_API_KEY``) reaches the push child through a private Oxen config folder
(:func:`oxen_callbacks._oxen.auth.private_config`), never through the user's home or argv.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._oxen import child as oxen_child
from .._oxen import layout as oxen_layout
from .._oxen import repo as oxen_repo
from .._oxen.remote_spec import parse_remote
from .._util.fs import DamagedFile, read_json_object, write_json_atomically
from .._util.redact import redact_text, redact_url
from ..errors import ConfigurationError, OxenError

#: Pauses between attempts of one push (the first try, then these).
BACKOFF_S = (1.0, 3.0)


@dataclass
class PushTarget:
    remote: str
    branch: str | None
    timeout: float = 300.0
    url: str | None = None
    dirty: bool = False


def pending_push_path(repo: str | os.PathLike[str]) -> Path:
    return oxen_layout.state_dir(repo) / "push-pending.json"


def pending_push(repo: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The journaled push of ``repo``, if one failed and is not done yet.

    Raises:
        DamagedFile: its file cannot be read, or names no remote.
    """
    try:
        marker = read_json_object(pending_push_path(repo))
    except FileNotFoundError:
        return None
    name = pending_push_path(repo).name
    if not isinstance(marker.get("remote"), str):
        raise DamagedFile(f"{name} holds remote = {marker.get('remote')!r}, not a name")
    for key in ("branch", "url"):
        if not isinstance(marker.get(key), (str, type(None))):
            raise DamagedFile(f"{name} holds {key} = {marker[key]!r}, not a {key} name")
    return marker


def _remote_host(repo: str | os.PathLike[str], target: PushTarget) -> str | None:
    """The host the push goes to (its token may come from the environment); ``None`` if unknown."""
    try:
        url = target.url or oxen_layout.remotes(repo).get(target.remote)
        return parse_remote(url).host if url else None
    except (ConfigurationError, oxen_layout.DamagedLayout):
        return None  # oxenai says what is wrong with it


def _attempt(repo: str | os.PathLike[str], target: PushTarget, branch: str) -> str | None:
    """One push in a child process; the error text, or ``None`` on success."""
    try:
        oxen_child.run_in_child(oxen_repo.push, timeout=target.timeout, own_group=True, path=str(repo),
                                remote=target.remote, branch=branch, url=target.url,
                                remote_host=_remote_host(repo, target))
    except oxen_child.ChildTimedOut:
        return f"no answer from the remote within {target.timeout:.0f}s"
    except (OxenError, ConfigurationError) as exc:  # (e.g. no child could start: a push never stops the worker)
        return str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
    return None


def push_with_timeout(repo: str | os.PathLike[str], target: PushTarget) -> dict[str, Any]:
    """Push ``target.branch`` (default: the checked-out branch) to ``target.remote``.

    Connection errors are retried with backoff; a timeout is not (the server is
    hanging, another wait would only stall the queue).
    """
    branch = target.branch or oxen_layout.head_ref(repo)
    started = time.monotonic()
    error = _attempt(repo, target, branch)
    for pause in BACKOFF_S:
        if error is None or error.startswith("no answer"):
            break
        time.sleep(pause)
        error = _attempt(repo, target, branch)
    report: dict[str, Any] = {"kind": "push", "ok": error is None, "remote": target.remote, "branch": branch,
                              "url": redact_url(target.url), "seconds": round(time.monotonic() - started, 3)}
    target.dirty = False  # done, or journaled for sync: never retried in a loop here
    marker = pending_push_path(repo)
    if error is None:
        marker.unlink(missing_ok=True)
        return report
    report["error"] = redact_text(error)
    write_json_atomically(marker, {**report, "at": time.time(), "url": target.url and redact_url(target.url)},
                          make_parents=True)
    return report
