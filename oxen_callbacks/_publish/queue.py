"""A durable, on-disk queue of publishing jobs, one folder per training process.

Layout under ``<model_repo>/.oxen/oxen-callbacks/queues/<queue_id>/``::

    meta.json          run name, owner pid/host, remote
    owner.lock         flock held by the training process while it lives
    worker.lock        flock held by whichever worker drains the queue
    jobs/<seq>.json    pending jobs, written atomically (temp + rename)
    done/<seq>.json    results, written before the job file is removed
    staging/<seq>/     the frozen checkpoint bytes of a pending job
    worker.log         the worker's log (oxenai's own prints included)

A job survives a crash of the training process, of the worker, or of both: the
next worker (or ``oxen-callbacks sync``) finishes it.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._oxen import layout as oxen_layout
from .._util.fs import DamagedFile, read_json_object, write_json_atomically
from .._util.locks import is_locked


@dataclass(frozen=True)
class Job:
    seq: int
    kind: str
    payload: dict[str, Any]

    @property
    def name(self) -> str:
        return f"{self.seq:08d}"


def queues_root(model_repo: str | os.PathLike[str]) -> Path:
    return oxen_layout.state_dir(model_repo) / "queues"


def repo_lock_path(model_repo: str | os.PathLike[str]) -> Path:
    return oxen_layout.state_dir(model_repo) / "repo.lock"


class JobQueue:
    """The jobs of one training process for one model repository."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self.jobs_dir = self.folder / "jobs"
        self.done_dir = self.folder / "done"
        self.staging_dir = self.folder / "staging"

    @classmethod
    def create(cls, model_repo: str | os.PathLike[str], run: str, meta: dict[str, Any]) -> "JobQueue":
        queue = cls(queues_root(model_repo) / f"{run}-{uuid.uuid4().hex[:8]}")
        for d in (queue.jobs_dir, queue.done_dir, queue.staging_dir):
            d.mkdir(parents=True, exist_ok=True)
        write_json_atomically(queue.folder / "meta.json", {"run": run, **meta})
        return queue

    @property
    def owner_lock(self) -> Path:
        return self.folder / "owner.lock"

    @property
    def worker_lock(self) -> Path:
        return self.folder / "worker.lock"

    @property
    def log_path(self) -> Path:
        return self.folder / "worker.log"

    def meta(self) -> dict[str, Any]:
        try:
            return json.loads((self.folder / "meta.json").read_text())
        except FileNotFoundError:
            return {}

    def damage(self) -> str | None:
        """What makes this queue unreadable (a file cut short or edited by hand), or ``None``."""
        try:
            read_json_object(self.folder / "meta.json")
        except FileNotFoundError:
            pass
        except DamagedFile as exc:
            return str(exc)
        for name in self._job_names():
            try:
                job = read_json_object(self.jobs_dir / name)
            except FileNotFoundError:
                continue  # done meanwhile
            except DamagedFile as exc:
                return f"jobs/{exc}"
            kinds = {"seq": int, "kind": str, "payload": dict}
            if wrong := next((key for key, kind in kinds.items() if not isinstance(job.get(key), kind)), None):
                return f"jobs/{name} holds {wrong} = {job.get(wrong)!r}, not a {kinds[wrong].__name__}"
        return None

    def update_meta(self, **values: Any) -> None:
        write_json_atomically(self.folder / "meta.json", {**self.meta(), **values})

    def next_seq(self) -> int:
        names = [*os.listdir(self.jobs_dir), *os.listdir(self.done_dir)]
        seqs = [int(n.split(".")[0]) for n in names if n.endswith(".json") and n[0].isdigit()]
        return max(seqs, default=0) + 1

    def staging_for(self, seq: int) -> Path:
        return self.staging_dir / f"{seq:08d}"

    def put(self, seq: int, kind: str, payload: dict[str, Any]) -> Job:
        job = Job(seq, kind, payload)
        write_json_atomically(self.jobs_dir / f"{job.name}.json", {"seq": seq, "kind": kind, "payload": payload})
        return job

    def pending(self) -> list[Job]:
        jobs = []
        for name in self._job_names():
            try:
                data = json.loads((self.jobs_dir / name).read_text())
            except FileNotFoundError:
                continue
            jobs.append(Job(data["seq"], data["kind"], data["payload"]))
        return jobs

    def _job_names(self) -> list[str]:
        return [name for name in sorted(os.listdir(self.jobs_dir)) if name.endswith(".json") and name[0].isdigit()]

    def is_pending(self, job: Job) -> bool:
        return (self.jobs_dir / f"{job.name}.json").exists()

    def complete(self, job: Job, result: dict[str, Any]) -> None:
        """Record ``result``, then forget the job and its staged bytes (in that order)."""
        write_json_atomically(self.done_dir / f"{job.name}.json", result)
        (self.jobs_dir / f"{job.name}.json").unlink(missing_ok=True)

    def drop(self, job: Job) -> None:
        """Forget a pending job without doing it (and its staged bytes)."""
        (self.jobs_dir / f"{job.name}.json").unlink(missing_ok=True)
        shutil.rmtree(self.staging_for(job.seq), ignore_errors=True)

    def result(self, seq: int) -> dict[str, Any] | None:
        """The recorded result of job ``seq``, if it is done."""
        try:
            return json.loads((self.done_dir / f"{seq:08d}.json").read_text())
        except FileNotFoundError:
            return None

    def results(self) -> list[dict[str, Any]]:
        out = []
        for name in sorted(os.listdir(self.done_dir)):
            if name.endswith(".json") and name[0].isdigit():
                out.append(json.loads((self.done_dir / name).read_text()))
        return out

    def is_orphan(self) -> bool:
        """Its training process is gone (and no worker drains it)."""
        return not is_locked(self.owner_lock) and not is_locked(self.worker_lock)


def run_backlog(model_repo: str | os.PathLike[str], run: str) -> list[tuple[JobQueue, list[Job]]]:
    """The queues of run ``run`` (any training process of it) that still hold jobs, with those jobs
    (a damaged queue, which ``sync`` reports, is not read)."""
    found = []
    for queue in all_queues(model_repo):
        if queue.damage() is None and queue.meta().get("run") == run and (jobs := queue.pending()):
            found.append((queue, jobs))
    return found


def all_queues(model_repo: str | os.PathLike[str]) -> Iterator[JobQueue]:
    root = queues_root(model_repo)
    if root.is_dir():
        for name in sorted(os.listdir(root)):
            if (root / name / "jobs").is_dir():
                yield JobQueue(root / name)
