"""The run a training process left unended when it died (SIGKILL, OOM killer): what it is finished from.

``finish_abandoned`` (an operation carried out by :func:`.apply.finish_abandoned`) is
journaled by its sink process (stdin closed without ``end``),
by ``oxen-callbacks sync`` (trainer and sink process both gone, the whole job killed
at once), or by the training run itself when its final lineage commit did not
complete (with its own status). ``sync`` carries it out once the model repository's
commits of that run are done (:func:`commits_pending`): the run gets the lineage of
the checkpoints that made it into the model repository (:func:`committed_record`), tags
naming the last one, lineage status ``KILLED`` (or the given one), the ``oxen/lineage.json``
artifact, and is terminated with that status if still ``RUNNING``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .._publish.queue import run_backlog
from ..errors import LineageValidationError
from ..lineage import BEST_KEY, CodePointer, LineageRecord
from ..model_repo import is_run_name, lineage_path
from ..names import TAG_FIT
from .journal import META_FIT_STARTED_MS, MlflowJournal, journals

log = logging.getLogger(__name__)
KILLED = "KILLED"


def superseded_by(client: Any, journal: Any, meta: dict[str, Any], *, by_record: bool = True) -> str | None:
    """The later fit that logs to the journal's MLflow run, whose tags, ``oxen/lineage.json``, marks and end
    are then that fit's, not this journal's to write (``sync`` replays it late); ``None``: none.

    Found by the model repository's record (a fit that went on in the same Oxen run, :func:`continued_by`),
    by a later journal of this cache for the run (a fit still training: it tags the run at its end), or
    by the run's ``oxen.fit`` tag (a later fit, of any Oxen run, from anywhere). ``by_record=False``: not by
    the record (a live fit holds its run's name: no fit of that run goes on from it meanwhile).
    """
    fit_id = journal.fit_id()
    if by_record and (later := continued_by(meta, fit_id)) is not None:
        return later
    run_id, started = meta.get("run_id"), meta.get(META_FIT_STARTED_MS)
    if not run_id or not isinstance(started, int):
        return None  # (a journal of an older version, or a run not created yet)
    for folder in journals(journal.folder.parent.parent):
        other = MlflowJournal(folder)
        try:
            their = other.meta()
        except (OSError, ValueError):
            continue
        if their.get("run_id") == run_id and isinstance(t := their.get(META_FIT_STARTED_MS), int) and t > started:
            return other.fit_id() or folder.name
    tagged_start, _, tagged_fit = str(client.get_run(run_id).data.tags.get(TAG_FIT, "")).partition(":")
    if tagged_fit and tagged_fit != fit_id and tagged_start.isdigit() and int(tagged_start) > started:
        return tagged_fit
    return None


def commits_pending(model_repo: str, run: str) -> bool:
    """Whether a live worker still commits checkpoints of ``run`` (then its lineage is not final yet)."""
    return any(not queue.is_orphan() for queue, _jobs in run_backlog(model_repo, run))


def commits_outstanding(meta: dict[str, Any]) -> str | None:
    """What a journal's run still waits for in the model repository (any queue of the run, live
    worker or not, with jobs left), for the sink process: ``None`` when nothing."""
    model_repo, run = meta.get("model_repo"), meta.get("oxen_run")
    if not model_repo or not run:
        return None
    if run_backlog(model_repo, run):
        return f"the commits of run {run} in {model_repo} are done"
    return None


def continued_by(meta: dict[str, Any], fit_id: str | None) -> str | None:
    """The later fit that went on from fit ``fit_id`` of a journal's run (``meta``: its model repository,
    Oxen run and MLflow run) and logs to the same MLflow run, by the model repository's record; or
    ``None``. That run's tags, ``oxen/lineage.json`` and status are then the later fit's: what this fit
    left journaled (replayed by ``sync``) must not write over them."""
    model_repo, run, mlflow_run_id = meta.get("model_repo"), meta.get("oxen_run"), meta.get("run_id")
    if not (fit_id and model_repo and run and mlflow_run_id and is_run_name(run)):
        return None
    try:
        current = LineageRecord.read(Path(model_repo) / lineage_path(run))
    except (OSError, ValueError, LineageValidationError):
        return None
    their_fit = current.extra.get("fit_id")
    earlier = current.extra.get("earlier_fits")
    if their_fit in (None, fit_id) or not isinstance(earlier, list) or fit_id not in earlier:
        return None
    # the fits after this one, oldest first (the latest, the record's own, last), and their MLflow runs
    later = [f for f in earlier[earlier.index(fit_id) + 1:] if isinstance(f, str)] + [str(their_fit)]
    runs = current.extra.get("earlier_mlflow_runs")
    run_of = {r.get("fit_id"): r.get("mlflow_run_id") for r in runs if isinstance(r, dict)} if isinstance(runs, list) else {}
    run_of[their_fit] = current.run.mlflow_run_id
    went_on_in_it = [f for f in later if run_of.get(f) == mlflow_run_id]
    return went_on_in_it[-1] if went_on_in_it else None


def committed_record(model_repo: str, run: str, mlflow_run_id: str, status: str = KILLED, *,
                     fit_id: str | None = None) -> dict[str, Any] | None:
    """``runs/<run>/lineage.json`` of the model repository's working tree, cut to the committed
    checkpoints, the model pointing at the last one; ``None`` when no checkpoint was committed.
    ``fit_id``: the fit whose MLflow run this is; when the run was continued by a later fit since,
    the record is cut to this fit's checkpoints and ends ``status`` (the later fit's end is not its)."""
    path = Path(model_repo) / lineage_path(run)
    if not is_run_name(run) or not path.is_file():
        return None
    try:
        record = LineageRecord.read(path)
    except (OSError, ValueError, LineageValidationError) as exc:
        log.warning("Cannot read %s: %s", path, exc)
        return None
    record.checkpoints = [c for c in record.checkpoints if c.commit]
    if fit_id is not None and record.extra.get("fit_id") not in (None, fit_id):
        record.checkpoints = [c for c in record.checkpoints if c.extra.get("fit_id") == fit_id]
        record.extra.update(fit_id=fit_id, status=None, ended_at=None)
        record.extra.pop("earlier_mlflow_runs", None)  # (the later fit's)
        codes = record.extra.pop("earlier_code", None)  # (the later fit's: by fit id, this one's among them)
        codes = codes if isinstance(codes, dict) else {}
        own = codes.get(fit_id)
        if isinstance(own, dict) and isinstance(own.get("git_commit"), (str, type(None))):  # (the record's is the later fit's)
            dirty = own.get("git_dirty")
            record.code = CodePointer._from({**own, "git_commit": own.get("git_commit"),
                                             "git_dirty": dirty if isinstance(dirty, bool) else None})
        earlier = record.extra.pop("earlier_fits", None)  # (the later fit's: those before it, and this one)
        if isinstance(earlier, list) and fit_id in earlier and earlier.index(fit_id):
            record.extra["earlier_fits"] = earlier[:earlier.index(fit_id)]
            if kept := {f: c for f, c in codes.items() if f in record.extra["earlier_fits"]}:
                record.extra["earlier_code"] = kept
        record.run.mlflow_run_id = None  # (the later fit's)
        record.model.commit = record.model.path = None
        record.model.extra.pop(BEST_KEY, None)
    if record.status in (None, "RUNNING"):  # a run that finished its lineage keeps its own status
        record.status = status
        if record.checkpoints:
            record.model.commit, record.model.path = record.checkpoints[-1].commit, record.checkpoints[-1].path
            record.model.extra.pop(BEST_KEY, None)  # (what the trainer knew of its best died with it)
    record.run.mlflow_run_id = record.run.mlflow_run_id or mlflow_run_id
    return record.to_json()


def amend_repo_record(model_repo: str, run: str, record: dict[str, Any], *, fit_id: str | None) -> dict[str, Any]:
    """Commit ``record`` (:func:`committed_record`'s) as the run's lineage in the model repository
    when the repository's record says less: still ``RUNNING``, or without the MLflow run id. So the
    repository and MLflow give one answer. Only for fit ``fit_id`` (the journal's): a run continued
    since by another fit keeps its record. Returns the record to log (the committed one when the
    commit worked)."""
    from .._publish.drain import commit_record

    try:
        current = LineageRecord.read(Path(model_repo) / lineage_path(run))
    except (OSError, ValueError, LineageValidationError):
        return record
    if fit_id is None or current.extra.get("fit_id") != fit_id or record.get("fit_id") != fit_id:
        return record  # not known to be this fit's record (the run went on since): left as it is
    if current.status == record["status"] and current.run.mlflow_run_id == record["run"]["mlflow_run_id"]:
        return record
    committed = commit_record(model_repo, run, record)
    return committed if committed is not None else record
