"""One run per run name in a model repository, claimed before training starts.

A run's folder ``runs/<run>/`` holds its checkpoints and its lineage record: two
runs under one name would mix their checkpoints and name one dataset for both. A
name is taken once a run has claimed it (``.oxen/oxen-callbacks/runs/<run>.claim``,
kept after the run ends, also when it was killed) or committed a lineage record
there. The claim file is ``flock``-ed while its run is live, so a second process
asking for a live run's name is refused even when it continues that run.

Example::

    claim = RunClaim.take(repo_path, "nightly", continuing=False)   # ConfigurationError if taken
    ...                                                              # train, publish
    claim.release()
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from .. import oxen_layout
from ..errors import ConfigurationError
from ..locks import FileLock
from .committer import lineage_path


def claims_dir(model_repo: str | os.PathLike[str]) -> Path:
    return oxen_layout.state_dir(model_repo) / "runs"


class RunClaim:
    """A live run's hold on its name; see the module docstring."""

    def __init__(self, lock: FileLock, *, new: bool) -> None:
        self._lock = lock
        self._new = new

    @classmethod
    def take(cls, model_repo: str | os.PathLike[str], run: str, *, continuing: bool) -> "RunClaim":
        """Claim ``run`` in ``model_repo``; ``continuing``: the user resumes that very run.

        Raises:
            ConfigurationError: a live process trains under that name, or (unless
                ``continuing``) an earlier run used it.
        """
        repo = Path(model_repo)
        folder = claims_dir(repo)
        with FileLock(folder / ".claims.lock", timeout=60):  # one check-and-claim at a time
            path = folder / f"{run}.claim"
            earlier = _owner(path) if path.exists() else None
            lock = FileLock(path)
            if not lock.acquire(blocking=False):
                who = earlier or {}
                raise ConfigurationError(
                    f"run_name={run!r} is in use: process {who.get('pid', '?')} on {who.get('host', '?')} is "
                    f"training that run into the model repository {str(repo)!r} right now. Two runs under one "
                    "name would mix their checkpoints and lineage.",
                    "pass another run_name, or none: each fit then gets a unique one.",
                )
            committed = (repo / lineage_path(run)).exists()
            if (earlier is not None or committed) and not continuing:
                lock.release()
                since = f" (started {earlier['started_at']})" if earlier and earlier.get("started_at") else ""
                raise ConfigurationError(
                    f"run_name={run!r} is already taken in the model repository {str(repo)!r}: an earlier "
                    f"run{since} wrote runs/{run}/. A second run under that name would list the earlier run's "
                    "checkpoints under this run's dataset commit.",
                    f"omit run_name (each fit then gets a unique one), pass a new name, or continue that run: "
                    f"OxenLightningCallback(resume_from={run!r}, run_name={run!r}), or the HF Trainer's "
                    "resume_from_checkpoint= with a checkpoint of that run.",
                )
            lock.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                   "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode())
        return cls(lock, new=earlier is None)

    def release(self) -> None:
        """The run is over: the name stays taken, but no longer in use."""
        self._lock.release()

    def withdraw(self) -> None:
        """The run failed to start (nothing written under its name): give a new name back."""
        if self._new:
            self._lock.path.unlink(missing_ok=True)
        self._lock.release()


def _owner(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}

