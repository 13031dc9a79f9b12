"""One run per run name in a model repository, claimed before training starts.

A run's folder ``runs/<run>/`` holds its checkpoints and its lineage record: two
runs under one name would mix their checkpoints and name one dataset for both. A
name is **in use** while a live process holds its claim
(``.oxen/oxen-callbacks/runs/<run>.claim``, ``flock``-ed for the run's life), and
**taken** once a checkpoint of the run was committed (its lineage lists one) or
is still queued for commit. A run that failed or was killed before any checkpoint
reached the queue leaves its name free: its lineage record stays in history.

Under SLURM the claim names the job (``SLURM_JOB_ID``). A run whose job was pre-empted notes
so in its claim (:func:`note_preempted`); the requeued job (same job id, a new process) finds
that run (:func:`preempted_run`) and is accepted as its owner: it goes on with the same run.

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

from .._util.fs import parse_json, write_atomically
from .._util.locks import FileLock, LockTimeout, is_locked
from ..errors import ConfigurationError
from ..model_repo import (
    RUN_CLAIM_SUFFIX,
    claim_path,
    claims_dir,
    fit_record_path,
    is_run_name,
    lineage_path,
)
from ..names import ENV_SLURM_ARRAY_JOB_ID, ENV_SLURM_ARRAY_TASK_ID, ENV_SLURM_JOB_ID
from .queue import run_backlog

#: How long a claim is waited for before its name counts as in use: a live run holds it for its whole
#: life, a process asking :func:`run_in_use` (``trace``, ``lineage``) for an instant.
PROBE_WAIT_S = 1.0


class RunClaim:
    """A live run's hold on its name; see the module docstring."""

    def __init__(self, lock: FileLock) -> None:
        self._lock = lock

    @classmethod
    def take(cls, model_repo: str | os.PathLike[str], run: str, *, continuing: bool) -> "RunClaim":
        """Claim ``run`` in ``model_repo``; ``continuing``: the user resumes that very run.

        Raises:
            ConfigurationError: a live process trains under that name, or (unless
                ``continuing``) an earlier run has checkpoints under it.
        """
        repo = Path(model_repo)
        folder = claims_dir(repo)
        with FileLock(folder / ".claims.lock", timeout=60):  # one check-and-claim at a time
            path = claim_path(repo, run)
            lock = FileLock(path, timeout=PROBE_WAIT_S)
            try:
                lock.acquire()  # (a wait: run_in_use() elsewhere holds the lock for an instant to look)
            except LockTimeout:
                raise _in_use(run, repo, _owner(path)) from None
            if not continuing and has_checkpoints(repo, run) and not _requeued_owner(_owner(path)):
                lock.release()
                raise ConfigurationError(
                    f"run_name={run!r} is already taken in the model repository {str(repo)!r}: runs/{run}/ "
                    "holds an earlier run's checkpoints. A second run under that name would list them under "
                    "this run's dataset commit.",
                    f"omit run_name (each fit then gets a unique one), pass a new name, or continue that run: "
                    f"OxenLightningCallback(resume_from={run!r}, run_name={run!r}), or the HF Trainer's "
                    "resume_from_checkpoint= with a checkpoint of that run.",
                )
            lock.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "slurm_job": slurm_job(),
                                   "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode())
        return cls(lock)

    def release(self, *, preempted: bool = False) -> None:
        """The run is over (or never started): the name is no longer in use. Unless it ended
        ``preempted``, a pre-emption noted earlier is forgotten: no later start may take it over."""
        if not preempted and self._lock.held:
            owner = _owner(self._lock.path)
            if owner.pop("preempted", None) is not None:
                self._lock.write(json.dumps(owner).encode())
        self._lock.release()


def run_in_use(model_repo: str | os.PathLike[str], run: str) -> bool:
    """Whether a live process holds run ``run``'s claim in ``model_repo`` (it trains the run now)."""
    if not is_run_name(run):
        return False  # (a name from a record: not one a claim can have)
    try:
        return is_locked(claim_path(Path(model_repo), run))
    except OSError:
        return False


def slurm_job() -> str | None:
    """The SLURM job this process belongs to (``<array job>_<task>`` in a job array), if any."""
    array_job, task = os.environ.get(ENV_SLURM_ARRAY_JOB_ID), os.environ.get(ENV_SLURM_ARRAY_TASK_ID)
    if array_job and task:
        return f"{array_job}_{task}"
    return os.environ.get(ENV_SLURM_JOB_ID) or None


def note_preempted(model_repo: str | os.PathLike[str], run: str, facts: dict[str, Any]) -> None:
    """Note in the claim this process holds on ``run`` that its job was pre-empted, with ``facts`` the
    requeued job goes on with (the MLflow run, the dataset pin). Rewritten in place: the lock stays held."""
    path = claim_path(Path(model_repo), run)
    owner = _owner(path)
    data = json.dumps({**owner, "preempted": facts}).encode()
    with open(path, "r+b") as file:  # the new content first, then cut: never an empty claim to read
        file.write(data)
        file.truncate(len(data))


def preempted_run(model_repo: str | os.PathLike[str], job: str | None,
                  training: str) -> tuple[str, dict[str, Any]] | None:
    """The run SLURM job ``job`` trained under the command line ``training`` (see
    :func:`oxen_callbacks._preempt.training_key`; a note written before it was kept matches any) when
    it was pre-empted, and the facts noted then; ``None`` when it has no such run in ``model_repo``
    (off SLURM, a first start, another command of the job, a run that ended)."""
    if not job:
        return None
    found = []
    for path in claims_dir(Path(model_repo)).glob(f"*{RUN_CLAIM_SUFFIX}"):
        owner = _owner(path)
        if (owner.get("slurm_job") == job and isinstance(owner.get("preempted"), dict)
                and owner["preempted"].get("training") in (None, training)):
            found.append((owner.get("started_at") or "", path.name[: -len(RUN_CLAIM_SUFFIX)], owner["preempted"]))
    if not found:
        return None
    _, run, facts = max(found)  # the job's latest run
    return run, facts


def _requeued_owner(owner: dict[str, Any]) -> bool:
    """Whether the run's last owner was this SLURM job, pre-empted: this process is its requeued start."""
    job = slurm_job()
    return job is not None and owner.get("slurm_job") == job and bool(owner.get("preempted"))


def record_fit(model_repo: str | os.PathLike[str], fitter: str, run: str) -> None:
    """Note that the fit of the callback object ``fitter`` (an id it carries into spawned copies) runs ``run``."""
    path = fit_record_path(model_repo, fitter)
    write_atomically(path, run, make_parents=True)


def recorded_fit(model_repo: str | os.PathLike[str], fitter: str) -> str | None:
    """The run of the latest fit of ``fitter`` (see :func:`record_fit`), if any."""
    try:
        return fit_record_path(model_repo, fitter).read_text() or None
    except OSError:
        return None


def has_checkpoints(model_repo: Path, run: str) -> bool:
    """Whether a checkpoint of ``run`` was committed to ``model_repo`` or is queued for commit."""
    try:
        if parse_json((model_repo / lineage_path(run)).read_text()).get("checkpoints"):
            return True
    except FileNotFoundError:
        pass
    except (OSError, ValueError, AttributeError):
        return True  # an unreadable record: assume the worst, never mix two runs
    return any(job.kind == "checkpoint" for _queue, jobs in run_backlog(model_repo, run) for job in jobs)


def _in_use(run: str, repo: Path, owner: dict[str, Any]) -> ConfigurationError:
    if owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
        return ConfigurationError(
            f"run_name={run!r} is in use by this process: an earlier fit of it into {str(repo)!r} has not "
            "finished (it raised, and its callback still holds the run).",
            "fit again with that same callback object (it starts a new run), or pass another run_name.",
        )
    return ConfigurationError(
        f"run_name={run!r} is in use: process {owner.get('pid', '?')} on {owner.get('host', '?')} is training "
        f"that run into the model repository {str(repo)!r} right now. Two runs under one name would mix their "
        "checkpoints and lineage.",
        "pass another run_name, or none: each fit then gets a unique one.",
    )


def _owner(path: Path) -> dict[str, Any]:
    try:
        owner = parse_json(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}
