"""Pushing a model repository to its Oxen remote, with a wall-clock limit.

A server that accepts a connection and never answers makes oxenai's push hang
forever while holding the GIL, so every push runs in a child process that is
killed at the deadline. A push that fails or times out is journaled
(``.oxen/oxen-callbacks/push-pending.json``) for ``oxen-callbacks sync``.
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

from .. import oxen_layout
from ..redact import redact_text


@dataclass
class PushTarget:
    remote: str
    branch: str | None
    timeout: float = 300.0
    dirty: bool = False


def pending_push_path(repo: str | os.PathLike[str]) -> Path:
    return oxen_layout.state_dir(repo) / "push-pending.json"


def push_with_timeout(repo: str | os.PathLike[str], target: PushTarget) -> dict[str, Any]:
    """Push ``target.branch`` (default: the checked-out branch) to ``target.remote``."""
    branch = target.branch or oxen_layout.head_ref(repo)
    started = time.monotonic()
    code = (
        "import sys, oxen\n"
        "oxen.Repo(sys.argv[1]).push(sys.argv[2], sys.argv[3])\n"
    )
    error: str | None = None
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code, str(repo), target.remote, branch],
            capture_output=True, text=True, timeout=target.timeout, start_new_session=True,
        )
        if proc.returncode != 0:
            lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
            error = lines[-1] if lines else f"exit code {proc.returncode}"
    except subprocess.TimeoutExpired:
        error = f"no answer from the remote within {target.timeout:.0f}s"
    seconds = round(time.monotonic() - started, 3)
    marker = pending_push_path(repo)
    if error is None:
        target.dirty = False
        marker.unlink(missing_ok=True)
        return {"kind": "push", "ok": True, "remote": target.remote, "branch": branch, "seconds": seconds}
    error = redact_text(error)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"remote": target.remote, "branch": branch, "error": error, "at": time.time()}))
    target.dirty = False  # journaled: retried by sync, not in a loop here
    return {"kind": "push", "ok": False, "remote": target.remote, "branch": branch, "error": error, "seconds": seconds}
