"""The code commit of a training run (the git checkout it runs from)."""

from __future__ import annotations

import os
import subprocess
from typing import Any


def code_info(cwd: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """``{"git_commit", "git_dirty", "git_root"}``; ``None`` values outside a git checkout.

    ``git_dirty`` counts tracked files only: untracked notes and outputs do not
    make a run irreproducible.
    """
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if not commit:
        return {"git_commit": None, "git_dirty": None, "git_root": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"git_commit": commit, "git_dirty": bool(status), "git_root": git("rev-parse", "--show-toplevel")}
