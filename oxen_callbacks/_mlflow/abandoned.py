"""Finish the MLflow run of a training process that died without ending it (SIGKILL, OOM killer).

``finish_abandoned`` is journaled by its sink process (stdin closed without ``end``),
by ``oxen-callbacks sync`` (trainer and sink process both gone, the whole job killed
at once), or by the training run itself when its final lineage commit did not
complete (with its own status). ``sync`` carries it out once the model repository's
commits of that run are done (:func:`commits_pending`): the run gets the lineage of
the checkpoints that made it into the model repository, tags naming the last one,
lineage status ``KILLED`` (or the given one), the ``oxen/lineage.json`` artifact, and
is terminated with that status if still ``RUNNING``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .._publish.committer import lineage_path
from .._publish.queue import run_backlog
from ..errors import LineageValidationError
from ..lineage import read_lineage

log = logging.getLogger(__name__)
KILLED = "KILLED"


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


def committed_record(model_repo: str, run: str, mlflow_run_id: str,
                     status: str = KILLED) -> dict[str, Any] | None:
    """``runs/<run>/lineage.json`` of the model repository's working tree, cut to the committed
    checkpoints, the model pointing at the last one; ``None`` when no checkpoint was committed."""
    path = Path(model_repo) / lineage_path(run)
    if not run or Path(run).name != run or not path.is_file():
        return None
    try:
        record = dict(read_lineage(path))
    except (OSError, ValueError, LineageValidationError) as exc:
        log.warning("Cannot read %s: %s", path, exc)
        return None
    record["checkpoints"] = [c for c in record["checkpoints"] if c.get("commit")]
    if record.get("status") in (None, "RUNNING"):  # a run that finished its lineage keeps its own status
        record["status"] = status
        if record["checkpoints"]:
            last = record["checkpoints"][-1]
            record["model"] = {**record["model"], "commit": last["commit"], "path": last["path"]}
    record["run"] = {**record["run"], "mlflow_run_id": record["run"].get("mlflow_run_id") or mlflow_run_id}
    return record


def finish_abandoned(client: Any, journal: Any, meta: dict[str, Any], status: str = KILLED,
                     terminate: bool = True) -> dict[str, Any]:
    """Tag, log and terminate the run from what was committed; returns what was done (for sync's
    report). ``status``: what the run ends as when its lineage was not committed final (``KILLED``
    for a dead training process; a training run whose final commit stalled says its own);
    ``terminate``: end the run if still ``RUNNING`` (not a run the user started and ends)."""
    from .journal import _apply
    from .sink import LINEAGE_ARTIFACT_DIR, LINEAGE_ARTIFACT_NAME

    run_id = meta["run_id"]
    trainer_died = status == KILLED  # else the training run itself left it to sync (its final commit stalled)
    record = committed_record(meta["model_repo"], meta.get("oxen_run") or "", run_id, status)
    status = record["status"] if record else status
    tags = {"oxen.lineage.status": status}
    if record and record["model"].get("commit"):
        tags.update({"oxen.model.commit": record["model"]["commit"], "oxen.model.path": record["model"]["path"]})
    _apply(client, journal, meta, {"op": "set_tags", "tags": tags})
    if record is not None:
        _apply(client, journal, meta, {"op": "log_json", "artifact_dir": LINEAGE_ARTIFACT_DIR,
                                       "name": LINEAGE_ARTIFACT_NAME, "data": record})
    terminated = terminate and client.get_run(run_id).info.status == "RUNNING"
    ended_as = status if status in ("FINISHED", "FAILED", KILLED) else KILLED  # MLflow's run statuses
    if terminated:
        client.set_terminated(run_id, status=ended_as)
    return {"status": status, "trainer_died": trainer_died, "checkpoints": len(record["checkpoints"]) if record else 0,
            "model_commit": tags.get("oxen.model.commit"), "model_path": tags.get("oxen.model.path"),
            "terminated": ended_as if terminated else None}
