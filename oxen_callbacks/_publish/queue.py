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

import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._oxen import layout as oxen_layout
from .._util.fs import DamagedFile, json_kind, json_type_name, read_json_object, write_json_atomically
from .._util.locks import is_locked
from .freeze import frozen_problem

log = logging.getLogger(__name__)

#: A finished queue is kept this long after its last job ended (its worker.log helps debugging, and a later
#: amendment of its run's record reads the run's author and remote from it); `sync` and every worker's
#: start remove older ones (:meth:`JobQueue.forget_if_old`).
KEEP_FINISHED_S = 24 * 3600
#: How a queue folder's name ends after its run's name (:meth:`JobQueue.create`): 8 hex digits of its own.
_QUEUE_SUFFIX = re.compile(r"-[0-9a-f]{8}")
#: The start of the name a queue being removed takes (:meth:`JobQueue.forget_if_old`): no reader lists it.
_REMOVED = ".removed-"
_Fields = dict[str, tuple[type, ...]]
#: What a job file (``jobs/<seq>.json``) holds: each field and the types it may have.
_JOB_FIELDS: _Fields = {"seq": (int,), "kind": (str,), "payload": (dict,)}
#: What every result (``done/<seq>.json``) holds, and, when its job was done, what it holds besides.
_RESULT_FIELDS: _Fields = {"seq": (int,), "kind": (str,), "ok": (bool,)}
_DONE_FIELDS: dict[str, _Fields] = {
    "checkpoint": {"commit": (str,), "dest": (str,), "metrics": (dict,),
                   "step": (int, float, type(None)), "epoch": (int, float, type(None))},  # (a caller's own numbers)
    "finalize": {"commit": (str,), "record": (dict,)},
    "remove": {"commit": (str,), "dest": (str,)},
}


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


def _in_folder(name: str) -> property:
    """A path inside the queue's folder, built when asked for (listing 1,000 queues builds none)."""
    return property(lambda queue: queue.folder / name)


class JobQueue:
    """The jobs of one training process for one model repository."""

    jobs_dir = _in_folder("jobs")
    done_dir = _in_folder("done")
    staging_dir = _in_folder("staging")
    meta_path = _in_folder("meta.json")
    owner_lock = _in_folder("owner.lock")
    worker_lock = _in_folder("worker.lock")
    log_path = _in_folder("worker.log")

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self._noticed: set[str] = set()
        self._notices: list[dict[str, Any]] = []

    @classmethod
    def create(cls, model_repo: str | os.PathLike[str], run: str, meta: dict[str, Any]) -> "JobQueue":
        queue = cls(queues_root(model_repo) / f"{run}-{uuid.uuid4().hex[:8]}")  # (see _QUEUE_SUFFIX)
        for d in (queue.jobs_dir, queue.done_dir, queue.staging_dir):
            d.mkdir(parents=True, exist_ok=True)
        write_json_atomically(queue.meta_path, {"run": run, **meta})
        return queue

    def meta(self) -> dict[str, Any]:
        """What ``meta.json`` holds; ``{}`` when it is gone or damaged (see :meth:`damage`)."""
        try:
            return read_json_object(self.meta_path)
        except FileNotFoundError:
            return {}
        except DamagedFile as exc:
            self._notice(self.meta_path, str(exc))
            return {}

    def damage(self) -> str | None:
        """What makes this queue unreadable (a file cut short or edited by hand), or ``None``.

        Its meta and pending jobs only: a damaged result of a done job does not stop the queue's other
        jobs (see :meth:`damaged_results`).
        """
        try:
            read_json_object(self.meta_path)
        except FileNotFoundError:
            pass
        except DamagedFile as exc:
            return str(exc)
        for name in _numbered(self.jobs_dir):
            try:
                job = _read_entry(self.jobs_dir / name, _JOB_FIELDS, "job")
            except FileNotFoundError:
                continue  # done meanwhile
            except DamagedFile as exc:
                return str(exc)
            if job["kind"] == "checkpoint" and (problem := frozen_problem(
                    self.folder, self.staging_for(job["seq"]) / job["payload"]["staged_name"])):
                return problem
        return None

    def damaged_results(self) -> list[tuple[Path, str]]:
        """The results of done jobs that cannot be read, with what is wrong (``sync`` reports them)."""
        found = []
        for name in _numbered(self.done_dir):
            try:
                _read_result(self.done_dir / name)
            except FileNotFoundError:
                continue
            except DamagedFile as exc:
                if not (self.jobs_dir / name).exists():  # (a job still pending rewrites its result)
                    found.append((self.done_dir / name, str(exc)))
        return found

    def update_meta(self, **values: Any) -> None:
        """Add ``values`` to ``meta.json`` (a damaged one is left as it is, for ``sync`` to report)."""
        try:
            meta = read_json_object(self.meta_path)
        except FileNotFoundError:
            meta = {}
        except DamagedFile as exc:
            log.warning("Not recording %s in %s: %s", sorted(values), self.folder, exc)
            return
        write_json_atomically(self.meta_path, {**meta, **values})

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
        """The jobs waiting, oldest first; a damaged job file is left out (see :meth:`take_notices`)."""
        jobs = []
        for name in _numbered(self.jobs_dir):
            try:
                data = _read_entry(self.jobs_dir / name, _JOB_FIELDS, "job")
            except FileNotFoundError:
                continue  # done meanwhile
            except DamagedFile as exc:
                self._notice(self.jobs_dir / name, str(exc))
                continue
            jobs.append(Job(data["seq"], data["kind"], data["payload"]))
        return jobs

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
        """The recorded result of job ``seq``, if it is done (and its result can be read)."""
        return self._result_of(f"{seq:08d}.json")

    def results(self) -> list[dict[str, Any]]:
        """Every recorded result, oldest first; a damaged one is left out (see :meth:`take_notices`)."""
        return [result for name in _numbered(self.done_dir) if (result := self._result_of(name)) is not None]

    def _result_of(self, name: str) -> dict[str, Any] | None:
        try:
            return _read_result(self.done_dir / name)
        except FileNotFoundError:
            return None
        except DamagedFile as exc:
            if not (self.jobs_dir / name).exists():  # (a job still pending rewrites its result when done)
                self._notice(self.done_dir / name, str(exc))
            return None

    def _notice(self, path: Path, error: str) -> None:
        """Keep a note of damaged ``path`` (once) for :meth:`take_notices`."""
        file = path.relative_to(self.folder).as_posix()
        if file in self._noticed:
            return
        self._noticed.add(file)
        notice: dict[str, Any] = {"kind": "damaged", "ok": False, "file": file, "path": str(path), "error": error}
        if path.parent != self.folder:  # a job's file: that job gets no other answer
            notice["seq"] = int(path.stem)
            notice["staging"] = str(self.staging_for(notice["seq"]))
        self._notices.append(notice)

    def take_notices(self) -> list[dict[str, Any]]:
        """The files of this queue found damaged since the last call, each once (for the whole life of this
        object): ``damaged`` answers, which the worker sends the training process (:func:`damage_warning`)."""
        notices, self._notices = self._notices, []
        return notices

    def forget_if_old(self) -> bool:
        """Remove this queue if it is finished and its last job ended more than :data:`KEEP_FINISHED_S`
        ago: no process holds it, no job is pending, every result can be read (a damaged one stays for
        ``sync`` to report). Whether it was removed; anything in the way (a file of another user's,
        removed meanwhile) keeps it."""
        try:
            if (self._changed_within(KEEP_FINISHED_S) or not self.is_orphan() or self.damage() or self.pending()
                    or self.damaged_results()):
                return False
            # out of every reader's sight in one step: whoever lists or reads the queue meanwhile sees it gone
            gone = self.folder.with_name(f"{_REMOVED}{self.folder.name}-{uuid.uuid4().hex[:8]}")
            os.rename(self.folder, gone)
        except OSError:
            return False
        shutil.rmtree(gone, ignore_errors=True)
        return True

    def _changed_within(self, seconds: float) -> bool:
        """Whether the queue changed in the last ``seconds``: made, a job queued or done, its worker's last
        word (the log first: the newest, most of the time, so one look)."""
        since = time.time() - seconds
        for path in (self.log_path, self.done_dir, self.jobs_dir, self.meta_path):
            try:
                if path.stat().st_mtime > since:
                    return True
            except FileNotFoundError:
                continue
        return False

    def is_orphan(self) -> bool:
        """Its training process is gone (and no worker drains it)."""
        return not is_locked(self.owner_lock) and not is_locked(self.worker_lock)


def damage_warning(notice: dict[str, Any]) -> str:
    """What a ``damaged`` notice (:meth:`JobQueue.take_notices`) means for the run, said once to the user."""
    file = notice["file"]
    if file.startswith("jobs/"):
        what = f"that job cannot be read and is skipped (a checkpoint's frozen bytes stay in {notice['staging']})"
    elif file.startswith("done/"):
        what = ("its job is done and committed (the run's lineage record in the model repository lists it); "
                "only this copy of its result is lost")
    else:
        what = "the queue's settings cannot be read; this run's commits go on with what its worker was given"
    return (f"{notice['path']} is damaged ({notice['error']}): {what}. Training goes on; `oxen-callbacks sync` "
            "reports the file until it is repaired or removed.")


def _numbered(folder: Path) -> list[str]:
    """The ``<seq>.json`` files of a queue folder, in order (none once the queue was removed)."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    return sorted(name for name in names if name.endswith(".json") and name[:-5].isdigit())


def _read_entry(path: Path, fields: _Fields, what: str) -> dict[str, Any]:
    """The object in a job or result file (``what``), with ``fields`` of their types and its own sequence
    number; raises FileNotFoundError, or DamagedFile naming the file as ``jobs/…`` or ``done/…``."""
    where = f"{path.parent.name}/{path.name}"
    try:
        data = read_json_object(path)
    except DamagedFile as exc:
        raise DamagedFile(f"{path.parent.name}/{exc}") from None
    _check_fields(where, data, fields)
    if data["seq"] != int(path.stem):
        raise DamagedFile(f"{where} holds the {what} of job {data['seq']}")
    if what == "result" and data["ok"]:
        _check_fields(where, data, _DONE_FIELDS.get(data["kind"], {}))
    if what == "job":
        _check_job(where, data["kind"], data["payload"])
    return data


#: What a job's payload holds, by kind, beyond its run (what :class:`.publisher.CheckpointPublisher` writes).
_PAYLOADS: dict[str, _Fields] = {
    "checkpoint": {"dest": (str,), "staged_name": (str,), "record": (dict,), "metrics": (dict,),
                   "step": (int, float, type(None)), "epoch": (int, float, type(None))},
    "remove": {"dest": (str,)},
    "finalize": {"record": (dict,)},
}
#: Paths a payload may hold (``None`` allowed): inside the run's checkpoints folder, or (the model a run
#: resumed from another run's checkpoint names) inside ``runs/``.
_PAYLOAD_PATHS = {"dest": "own", "same_model_as": "own", "best": "any run's"}


def _check_job(where: str, kind: str, payload: dict[str, Any]) -> None:
    """Raise DamagedFile when a job's payload is one no publisher wrote (a hand edit: a path out of the
    repository, a field of another type): such a job is never done, a worker would act on it as it is."""
    from ..model_repo import RUNS_DIR, checkpoints_folder, is_run_name  # (loaded already: the publisher's; one floor less)

    if kind not in _PAYLOADS:
        raise DamagedFile(f"{where} holds a job of kind {kind!r}, which this version does not know")
    run = payload.get("run")
    if not isinstance(run, str) or not is_run_name(run):
        raise DamagedFile(f"{where} holds run = {run!r}, not the name of a folder in runs/")
    _check_fields(where, payload, _PAYLOADS[kind])
    for key, whose in _PAYLOAD_PATHS.items():
        folder = checkpoints_folder(run) if whose == "own" else RUNS_DIR
        value = payload.get(key)
        if value is not None and (not isinstance(value, str) or not _path_under(value, folder)):
            raise DamagedFile(f"{where} holds {key} = {value!r}, not a path in {folder}/")
    name = payload.get("staged_name")
    if name is not None and not is_run_name(name):  # (a backslash is a character here: an old job's name)
        raise DamagedFile(f"{where} holds staged_name = {name!r}, not a file name")


def _path_under(path: str, folder: str) -> bool:
    """Whether POSIX ``path`` names something inside ``folder`` (relative, no ``.``/``..``/empty parts)."""
    parts = path.split("/")
    return path.startswith(folder + "/") and all(part not in ("", ".", "..") for part in parts)


def _read_result(path: Path) -> dict[str, Any]:
    return _read_entry(path, _RESULT_FIELDS, "result")


def _check_fields(where: str, data: dict[str, Any], fields: _Fields) -> None:
    for key, kinds in fields.items():
        if key not in data:
            raise DamagedFile(f"{where} holds no {key}")
        value = data[key]
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            wanted = " or ".join(json_type_name(kind) for kind in kinds)
            raise DamagedFile(f"{where} holds {key} as {_a(json_kind(value))}, not {_a(wanted)}")


def _a(word: str) -> str:
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def run_backlog(model_repo: str | os.PathLike[str], run: str) -> list[tuple[JobQueue, list[Job]]]:
    """The queues of run ``run`` (any training process of it) that still hold jobs, with those jobs
    (a damaged queue, which ``sync`` reports, is not read)."""
    found = []
    for queue in queues_of_run(model_repo, run):
        if queue.damage() is None and (jobs := queue.pending()):
            found.append((queue, jobs))
    return found


def queues_of_run(model_repo: str | os.PathLike[str], run: str) -> Iterator[JobQueue]:
    """The queues of run ``run``, found by their folders' names (:data:`_QUEUE_SUFFIX`) and confirmed by
    their meta: a fit's start reads none of the other runs' finished queues (kept a day, see
    :meth:`JobQueue.forget_if_old`)."""
    def of_run(name: str) -> bool:
        return name.startswith(run) and _QUEUE_SUFFIX.fullmatch(name[len(run):]) is not None

    for queue in all_queues(model_repo, named=of_run):
        if queue.meta().get("run") == run:
            yield queue


def all_queues(model_repo: str | os.PathLike[str], named: Callable[[str], bool] = lambda _name: True) -> Iterator[JobQueue]:
    root = queues_root(model_repo)
    if root.is_dir():
        for name in sorted(os.listdir(root)):
            if not name.startswith(_REMOVED) and named(name) and os.path.isdir(os.path.join(root, name, "jobs")):
                yield JobQueue(root / name)
