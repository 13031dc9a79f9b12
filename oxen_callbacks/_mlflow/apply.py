"""Carry out journaled MLflow operations: by the sink process as they come, by ``sync`` later.

Each operation is a JSON object (``{"op": "set_tags", "tags": {...}}``...) written by
:class:`.sink.MlflowSink`; :func:`apply_op` does one against an ``MlflowClient``,
:func:`replay` does every pending one of a journal in order.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any

from .._util.redact import redact_url
from ..lineage import mlflow_run_status
from ..names import (
    ENV_MLFLOW_CREDENTIALS,
    ENV_MLFLOW_TRACKING_URI,
    LINEAGE_ARTIFACT_NAME,
    MLFLOW_CREDENTIALS_FILE,
    POINTER_ARTIFACT_DIR,
    TAG_CREATION,
    TAG_LINEAGE_STATUS,
    TAG_MODEL_COMMIT,
    TAG_MODEL_PATH,
)
from .abandoned import KILLED, amend_repo_record, committed_record, superseded_by
from .fluent import sqlite_file
from .journal import META_ENDED_BY_ITS_OWNER, MlflowJournal, json_artifact_problem
from .twins import delete_twin_runs

log = logging.getLogger(__name__)


def client_for(journal: MlflowJournal, uri: str | None = None) -> Any:
    """An MlflowClient for the journal's store; credentials come from ``uri`` (the training process's
    own, when it serves its journal itself) or the environment only."""
    from mlflow import MlflowClient

    if uri is None and _same_store(journal.meta()["tracking_uri"]):
        uri = os.environ.get(ENV_MLFLOW_TRACKING_URI)
    uri = uri or journal.meta()["tracking_uri"]
    make_sqlite_store_whole(uri)
    return MlflowClient(uri)


def make_sqlite_store_whole(uri: str) -> None:
    """Make the SQLite store of ``uri``, if it does not exist yet, under a name of its own, and link it
    into place once MLflow has made all its tables.

    MLflow makes a new store in place through dozens of migrations, not all undone when the process
    dies: a sink process killed halfway (``kill -9`` of the job while the sink, at ``SCHED_IDLE`` on a
    busy machine, took seconds to make the store) left a store MLflow then fails on for good
    ("duplicate column name: step", "table _alembic_tmp_experiments already exists"), and ``sync``
    could never log what was journaled. A maker killed now leaves only its hidden file beside it, removed
    by the next maker.
    """
    from mlflow import MlflowClient

    file = sqlite_file(uri)
    if file is None or "?" in uri:
        return
    store = Path(file)
    if store.exists() or not store.parent.is_dir():
        return  # (a missing folder: MLflow's own error, as before)
    _remove_partial_stores_of_dead_makers(store)
    partial = store.with_name(f".{store.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial")
    try:
        MlflowClient(f"sqlite:///{partial}").search_experiments(max_results=1)  # all its tables made
        os.link(partial, store)  # never over a store made meanwhile
    except FileExistsError:
        pass  # made meanwhile by another process: that one is whole too, or MLflow's to judge
    except OSError:
        pass  # no hard links here: MLflow makes it in place, as before
    finally:
        for leftover in (partial, partial.with_name(partial.name + "-journal")):
            leftover.unlink(missing_ok=True)


def _remove_partial_stores_of_dead_makers(store: Path) -> None:
    for leftover in store.parent.glob(f".{store.name}.*-*.partial*"):
        pid = leftover.name[len(store.name) + 2:].split("-", 1)[0]
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:  # (its maker was killed: a maker that lives is left alone)
            leftover.unlink(missing_ok=True)
        except (ValueError, OSError):
            pass


def replay(journal: MlflowJournal) -> int:
    """Carry out the journal's pending operations in order; returns how many were done.

    Raises the first MLflow error (the remaining operations stay journaled).
    """
    client = client_for(journal)
    meta = journal.meta()
    later = superseded_by(client, journal, meta)
    done = 0
    for paths, op in journal.batches():
        apply_unless_superseded(client, journal, meta, op, later)
        meta = journal.meta()
        for path in paths:
            path.unlink()
        done += len(paths)
    return done


#: Operations that write the MLflow run's own state (tags, ``oxen/lineage.json``, its extras, its models'
#: marks): a later fit that logs to the same MLflow run writes its own. (Not ``end_run``: only the fit that
#: created the run journals it, and a fit that joined the run never ends it.)
THE_RUNS_OWN = frozenset({"set_tags", "log_json", "publish_extras", "mark_models"})


def apply_unless_superseded(client: Any, journal: MlflowJournal, meta: dict[str, Any], op: dict[str, Any],
                            later: str | None) -> None:
    """:func:`apply_op`, but for ``later`` (a later fit that logs to the run, see
    :func:`.abandoned.superseded_by`): the run's tags, lineage and marks are that fit's; the checkpoints'
    models are made, and a run this fit created is ended by it all the same."""
    if later is not None and op["op"] == "mark_models":  # its checkpoints' models, not the run's marks
        from .model_marks import complete_and_mark

        complete_and_mark(client, journal, meta, op["record"], went_on=later)
    elif later is not None and op["op"] in THE_RUNS_OWN:
        log.info("Not logging %s of run %s: fit %s logs to the same MLflow run since, whose tags, lineage and "
                 "marks are that fit's.", op["op"], meta.get("oxen_run"), later)
    else:
        apply_op(client, journal, meta, op)


def _same_store(recorded: str | None) -> bool:
    env = os.environ.get(ENV_MLFLOW_TRACKING_URI)
    return bool(env) and redact_url(env) == recorded


#: Stores whose credentials are in their URI (redacted in a journal) or that need none: never MLflow's settings
_STORES_WITHOUT_SENT_CREDENTIALS = frozenset({"sqlite", "file", "postgresql", "mysql", "mssql"})


def credentials_held_back(recorded: str) -> list[str]:
    """The MLflow credentials of this process (settings, or MLflow's credentials file) that a client of
    ``recorded`` (a journal's store) would send to a server the user did not name: not ``$MLFLOW_TRACKING_URI``'s.
    Anyone who can write a journal into the cache could otherwise name their server and collect them."""
    scheme, sep, _ = recorded.partition("://")
    if _same_store(recorded) or not sep or scheme.split("+", 1)[0].lower() in _STORES_WITHOUT_SENT_CREDENTIALS:
        return []
    held = [name for name in ENV_MLFLOW_CREDENTIALS if os.environ.get(name)]
    if Path(MLFLOW_CREDENTIALS_FILE).expanduser().is_file():
        held.append(MLFLOW_CREDENTIALS_FILE)
    return held


def apply_op(client: Any, journal: MlflowJournal, meta: dict[str, Any], op: dict[str, Any]) -> None:
    kind = op["op"]
    if kind == "create_run":
        if meta.get("run_id"):
            return
        experiment_id = op.get("experiment_id")
        if experiment_id is None:
            name = op.get("experiment_name") or "Default"
            exp = client.get_experiment_by_name(name)
            experiment_id = exp.experiment_id if exp else client.create_experiment(name)
        token = op.get("token") if isinstance(op.get("token"), str) else None  # the same on every attempt
        tags = {**(op.get("tags") or {}), **({TAG_CREATION: token} if token else {})}
        run = client.create_run(experiment_id, run_name=op.get("run_name"), tags=tags)
        journal.write_meta({**meta, "run_id": run.info.run_id, "experiment_id": experiment_id})
        if token:
            delete_twin_runs(client, experiment_id, token, keep=run.info.run_id)
        return
    run_id = meta.get("run_id")
    if not run_id:
        raise RuntimeError("MLflow run was never created")
    if kind == "set_tags":
        from mlflow.entities import RunTag

        client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in op["tags"].items()])
    elif kind == "log_json":
        if problem := json_artifact_problem(op):  # (a journal replayed by sync was checked before)
            raise ValueError(f"This log_json operation {problem}")
        data = op["data"]
        if isinstance(data.get("run"), dict) and not data["run"].get("mlflow_run_id"):
            data = {**data, "run": {**data["run"], "mlflow_run_id": run_id}}  # created after training knew
            if op["name"] == LINEAGE_ARTIFACT_NAME and meta.get("model_repo") and meta.get("oxen_run"):
                # the repository's too
                data = amend_repo_record(meta["model_repo"], meta["oxen_run"], data, fit_id=data.get("fit_id"))
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / op["name"]
            local.write_text(json.dumps(data, indent=2) + "\n")
            client.log_artifact(run_id, str(local), artifact_path=op["artifact_dir"])
    elif kind == "end_run":
        client.set_terminated(run_id, status=mlflow_run_status(op["status"]))
    elif kind == "finish_abandoned":
        done = finish_abandoned(client, journal, meta, status=op.get("status", KILLED),
                                terminate=op.get("terminate", True))
        journal.write_meta({**journal.meta(), "abandoned": done})  # (as the logged models left it)
    elif kind in ("log_model", "log_models"):  # (one, or several merged by MlflowJournal.batches)
        from .logged_models import log_checkpoint_models

        log_checkpoint_models(client, journal, meta, op["ops"] if kind == "log_models" else [op])
    elif kind == "mark_models":
        from .model_marks import complete_and_mark

        complete_and_mark(client, journal, meta, op["record"], best_path=op.get("best_path"))
    elif kind == "publish_extras":
        from .dataset_input import log_dataset_input_once
        from .extras import publish_extras
        from .logged_models import model_id_for

        record = op["record"]
        if op.get("dataset_input", True):
            log_dataset_input_once(client, journal, record)  # (unless logged with the first models)
        model_id = model_id_for(client, meta, record) if op.get("register_model") else None
        publish_extras(client, run_id, record, register_model=op.get("register_model"), graph=op.get("graph", True),
                       model_id=model_id)
    else:
        raise ValueError(f"Unknown journaled MLflow operation {kind!r}")


def end_in_repo(journal: Any, meta: dict[str, Any], status: str = KILLED) -> dict[str, Any] | None:
    """The model repository's part of :func:`finish_abandoned`: the journal's fit's record, cut to its
    committed checkpoints and ending ``status``, committed when the repository's says less (unless a
    later fit of the Oxen run holds it, see :func:`.abandoned.amend_repo_record`); ``None``: no checkpoint
    was committed. MLflow's part needs the run; this does not (``sync`` of a run its user deleted)."""
    fit_id = journal.fit_id()
    record = committed_record(meta["model_repo"], meta.get("oxen_run") or "", meta["run_id"], status, fit_id=fit_id)
    return amend_repo_record(meta["model_repo"], meta["oxen_run"], record, fit_id=fit_id) if record else None


def finish_abandoned(client: Any, journal: Any, meta: dict[str, Any], status: str = KILLED,
                     terminate: bool = True) -> dict[str, Any]:
    """Tag, log and terminate the run from what was committed; returns what was done (for sync's
    report). ``status``: what the run ends as when its lineage was not committed final (``KILLED``
    for a dead training process; a training run whose final commit stalled says its own);
    ``terminate``: end the run if still ``RUNNING`` (not a run the user started and ends, nor one
    ``$MLFLOW_RUN_ID`` handed over: its owner ends it)."""
    run_id = meta["run_id"]
    trainer_died = status == KILLED  # else the training run itself left it to sync (its final commit stalled)
    record = end_in_repo(journal, meta, status)
    if (later := superseded_by(client, journal, meta)) is not None:
        # the MLflow run is the later fit's now: only this fit's checkpoints get their logged models
        from .model_marks import complete_and_mark

        if record is not None:
            complete_and_mark(client, journal, journal.meta(), record, best_unless_last=True, went_on=later)
        return {"status": status, "continued_by": later, "trainer_died": trainer_died,
                "checkpoints": len(record["checkpoints"]) if record else 0, "model_commit": None,
                "model_path": None, "terminated": None}
    status = record["status"] if record else status
    tags = {TAG_LINEAGE_STATUS: status}
    if record and record["model"].get("commit"):
        tags.update({TAG_MODEL_COMMIT: record["model"]["commit"], TAG_MODEL_PATH: record["model"]["path"]})
    apply_op(client, journal, meta, {"op": "set_tags", "tags": tags})
    if record is not None:
        apply_op(client, journal, meta, {"op": "log_json", "artifact_dir": POINTER_ARTIFACT_DIR,
                                         "name": LINEAGE_ARTIFACT_NAME, "data": record})
        from .dataset_input import log_dataset_input_once
        from .model_marks import complete_and_mark

        log_dataset_input_once(client, journal, record)  # (its end, which logs it, never came)
        # the checkpoints committed after the trainer died get their logged models too
        complete_and_mark(client, journal, journal.meta(), record, best_unless_last=True)
        if record.get("ended_at"):  # the fit ended its lineage, not its MLflow logging: the end's extras too
            from .extras import noted_extras

            register_model, graph = noted_extras(journal.meta())
            if register_model or graph:
                apply_op(client, journal, journal.meta(), {"op": "publish_extras", "record": record,
                                                           "register_model": register_model, "graph": graph})
    terminated = terminate and not meta.get(META_ENDED_BY_ITS_OWNER) and client.get_run(run_id).info.status == "RUNNING"
    ended_as = mlflow_run_status(status)
    if terminated:
        client.set_terminated(run_id, status=ended_as)
    return {"status": status, "trainer_died": trainer_died, "checkpoints": len(record["checkpoints"]) if record else 0,
            "model_commit": tags.get(TAG_MODEL_COMMIT), "model_path": tags.get(TAG_MODEL_PATH),
            "terminated": ended_as if terminated else None}
