"""Pushing a model repository to its Oxen remote, with a wall-clock limit and retries.

A server that accepts a connection and never answers makes oxenai's push hang
forever while holding the GIL, so every push runs in a child process that is
killed at the deadline. A push that still fails is journaled
(``.oxen/oxen-callbacks/push-pending.json``) for ``oxen-callbacks sync``; the
commits are safe in the local repository either way.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._oxen import layout as oxen_layout
from .._util.redact import redact_text, redact_url

#: Pauses between attempts of one push (the first try, then these).
BACKOFF_S = (1.0, 3.0)

_PUSH = """
import sys, oxen
path, name, branch, url = sys.argv[1:5]
repo = oxen.Repo(path)
if url:
    try:
        repo.set_remote(name, url)
    except Exception as exc:
        if "already" not in str(exc).lower():
            raise
repo.push(name, branch)
"""


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
    """The journaled push of ``repo``, if one failed and is not done yet."""
    try:
        return json.loads(pending_push_path(repo).read_text())
    except FileNotFoundError:
        return None


def _attempt(repo: str | os.PathLike[str], target: PushTarget, branch: str) -> str | None:
    """One push in a child process; the error text, or ``None`` on success."""
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _PUSH, str(repo), target.remote, branch, target.url or ""],
            capture_output=True, text=True, timeout=target.timeout, start_new_session=True,
        )
    except subprocess.TimeoutExpired:
        return f"no answer from the remote within {target.timeout:.0f}s"
    if proc.returncode == 0:
        return None
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else f"exit code {proc.returncode}"


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
    marker.parent.mkdir(parents=True, exist_ok=True)
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps({**report, "at": time.time(), "url": target.url and redact_url(target.url)}))
    os.replace(tmp, marker)
    return report
