"""MLflow 3 logged models: one per committed checkpoint, pointing at the Oxen commit that holds it.

Each checkpoint the commit worker reports becomes an *external* logged model of the run (no
bytes copied into MLflow), unless it holds the same model as another checkpoint of the fit: the
trainer's adapter says so for Lightning's ``last.ckpt``, written right after the top-k file of the
same ``ModelCheckpoint`` and step, which then leads to that file's model (no duplicate ``last``
model per save in the Models tab, and half the requests). A model is named after its checkpoint
file, an output of the run at its step,
with the checkpoint's metrics (on the pinned dataset, when the run logs it as an input), the
run's parameters, and the tags ``oxen.run`` / ``oxen.model.repo`` / ``oxen.model.commit`` /
``oxen.model.path`` (names: :mod:`oxen_callbacks.names`). At the end the last checkpoint's
model is tagged ``oxen.model.final``, the best one's (when the trainer monitors a metric)
``oxen.model.best`` (:mod:`.model_marks`); a registered version is made from that logged model
(:mod:`.registry`).

Two journaled operations (:class:`.sink.MlflowSink` writes them, :mod:`.apply` carries them
out)::

    {"op": "log_model", "commit": ..., "path": ..., "step": 6, "metrics": {...}, ...}   # per checkpoint
    {"op": "mark_models", "record": {...final lineage...}, "best_path": "runs/r/checkpoints/..."}

Per model: one create and one finalize; the output links and the metrics of the checkpoints
reported together go in one request each; no search.
Replays never duplicate a model: the journal's meta notes a checkpoint before its model is
created and its id after; a model noted but not known is looked for by its tags first. On an
MLflow without logged models (before 3) both operations are skipped, said once.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .._util.redact import redact_url
from ..names import (
    TAG_MODEL_COMMIT,
    TAG_MODEL_PATH,
    TAG_MODEL_REPO,
    TAG_RUN,
)
from .dataset_input import META_DATASET_LOGGED, log_dataset_input_noted
from .journal import MlflowJournal
from .model_search import (
    Found,
    checkpoint_key,
    find,
    model_key,
    models_of,
    search,
    shared_model_of,
    with_shared_models,
)
from .twins import delete_twin_models

log = logging.getLogger(__name__)

MODEL_TYPE = "oxen-checkpoint"
META_MODELS = "logged_models"  # journal meta: {"<commit>:<path>": model id, or None while being created}
_META_SHARED = "shared_models"  # journal meta: {model_search.model_key: the latest model made of it}
META_LOG_MODELS = "log_models"  # journal meta: False when the run was asked for no logged models (log_models=False)
_METRIC_NAME = re.compile(r"^[/\w.\- :]{1,250}$")  # what MLflow accepts as a metric name
_BAD_MODEL_NAME = re.compile(r"[/:.%\"']")  # what MLflow refuses in a logged model's name
_said_unsupported = False
_servers_without: set[str] = set()  # tracking URIs whose server has no logged models (before MLflow 3)
_runs: dict[str, tuple[str, dict[str, str]]] = {}  # run id -> (experiment id, parameters), read once per process


# -- what the training process journals -------------------------------------------------------
def checkpoint_op(result: dict[str, Any], record: dict[str, Any], *, dataset_input: bool) -> dict[str, Any]:
    """The ``log_model`` operation for a committed checkpoint (a commit worker's ``result``)."""
    return {"op": "log_model", "commit": result["commit"], "path": result["dest"], "step": result.get("step"),
            "epoch": result.get("epoch"), "metrics": result.get("metrics") or {},
            "same_model_as": result.get("same_model_as"), "model_repo": record["model"]["repo"],
            "run": record["run"].get("name"), "fit_id": record.get("fit_id"),
            "dataset": record.get("dataset") if dataset_input else None, "time_ms": int(time.time() * 1000)}


def mark_op(record: dict[str, Any], *, best_path: str | None) -> dict[str, Any]:
    """The ``mark_models`` operation at the end: every checkpoint of ``record`` has its model, the
    final and best ones marked (``best_path``: the best checkpoint's path, when the trainer knew it)."""
    return {"op": "mark_models", "record": record, "best_path": best_path}


def models_wanted(meta: dict[str, Any]) -> bool:
    """Whether the journal's run makes logged models (``log_models=False`` turned them off)."""
    return meta.get(META_LOG_MODELS) is not False


# -- carrying them out ------------------------------------------------------------------------------
def supported(client: Any) -> bool:
    """Whether this MLflow has logged models (MLflow 3)."""
    return callable(getattr(client, "create_logged_model", None)) and callable(
        getattr(client, "search_logged_models", None))


def skipped(client: Any) -> bool:
    """Whether logged models are not to be tried: a client before MLflow 3, or a server that refused them."""
    if not supported(client):
        import mlflow

        _say_unsupported(f"MLflow {getattr(mlflow, '__version__', '?')} has no logged models (MLflow 3 has)")
        return True
    return client.tracking_uri in _servers_without


@contextlib.contextmanager
def unless_the_server_lacks_them(client: Any) -> Iterator[None]:
    """A tracking server before MLflow 3 answers a logged-model request with 404: skip them from then on."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as exc:
        if exc.error_code != "ENDPOINT_NOT_FOUND":
            raise
        _servers_without.add(client.tracking_uri)
        _say_unsupported(f"the tracking server at {redact_url(client.tracking_uri)} has no logged models "
                         "(MLflow 3 has)")


def _say_unsupported(why: str) -> None:
    global _said_unsupported
    if not _said_unsupported:
        _said_unsupported = True
        log.info("%s: checkpoints are not logged as models.", why)


def log_checkpoint_models(client: Any, journal: MlflowJournal, meta: dict[str, Any], ops: list[dict[str, Any]]) -> None:
    """Carry out ``log_model`` operations (see the module docstring), several in a few requests."""
    if skipped(client):
        return
    with unless_the_server_lacks_them(client):
        dataset = next((op["dataset"] for op in ops if op.get("dataset")), None)
        if dataset and not meta.get(META_DATASET_LOGGED):  # the input the models' metrics name
            meta = log_dataset_input_noted(client, journal, meta, dataset)
        ensure_models(client, journal, meta, ops, existing=None)


def model_id_for(client: Any, meta: dict[str, Any], record: dict[str, Any]) -> str | None:
    """The logged model of ``record``'s model (its best or final checkpoint), if there is one."""
    model = record["model"]
    if not model.get("commit") or not models_wanted(meta) or skipped(client):
        return None
    key = checkpoint_key(model["commit"], model["path"])
    if known := (meta.get(META_MODELS) or {}).get(key):
        return known
    found = None
    with unless_the_server_lacks_them(client):
        experiment_id = _experiment_id(client, meta)
        found = find(client, [experiment_id], model["repo"], model["commit"], model["path"])
        if found is None:  # (a last.ckpt leads to its top-k file's model)
            entries = [e for e in record.get("checkpoints") or [] if isinstance(e, dict) and e.get("commit") and e.get("path")]
            found = with_shared_models(models_of(client, [experiment_id], model["repo"], record["run"].get("name")),
                                       entries).get(key)
    return found.model_id if found else None


# -- internals ------------------------------------------------------------------------------------
def ensure_models(client: Any, journal: MlflowJournal, meta: dict[str, Any], ops: list[dict[str, Any]],
            existing: dict[str, Found] | None) -> dict[str, Any]:
    """Each checkpoint's logged model, created unless the journal (or a search, after an attempt that
    may have created it) knows it, or it holds the model of another checkpoint that has one (see
    :func:`.model_search.shared_model_of`); returns the journal's meta, updated with their ids.

    The journal notes every checkpoint before its model is created and its id after (one write
    each for the whole batch), so a replay after a kill never makes a second model.
    """
    known = dict(meta.get(META_MODELS) or {})
    todo = {key: op for op in ops if not known.get(key := checkpoint_key(op["commit"], op["path"]))}  # (else done earlier)
    if not todo:
        return meta
    experiment_id, meta = experiment_of(client, journal, meta)
    if new := {key: None for key in todo if key not in known}:
        meta = {**meta, META_MODELS: {**known, **new}}
        journal.write_meta(meta)
    shared = dict(meta.get(_META_SHARED) or {})  # model key -> id: the latest model made of each
    made: dict[str, str] = {}
    while todo:  # (a second round only when MLflow refused the model that others share)
        creating: dict[str, dict[str, Any]] = {}
        sharing: dict[str, str] = {}  # key -> the key of the checkpoint (created now) whose model it shares
        latest: dict[str, str] = {}  # model key -> the key of the latest checkpoint creating it so far
        for key, op in todo.items():
            of = shared_model_of(op)
            if of is not None and of in latest:
                sharing[key] = latest[of]
            elif of is not None and of in shared:
                made[key] = shared[of]
            else:
                creating[key] = op
                if own := model_key(op):
                    latest[own] = key
        found: dict[str, str | None] = {}
        for key, op in creating.items():
            if key in known:  # an attempt died or failed after noting it: its model may exist
                hit = (existing.get(key) if existing is not None
                       else find(client, [experiment_id], op["model_repo"], op["commit"], op["path"]))
                found[key] = hit.model_id if hit else None
        created = _create(client, meta["run_id"], experiment_id, creating, found)
        made.update(created)
        made.update({key: created[creator] for key, creator in sharing.items() if creator in created})
        shared.update({own: created[key] for own, key in latest.items() if key in created})
        todo = {key: todo[key] for key in sharing if key not in made}
    meta = {**meta, META_MODELS: {**(meta.get(META_MODELS) or {}), **made}, _META_SHARED: shared}
    journal.write_meta(meta)
    return meta


def _create(client: Any, run_id: str, experiment_id: str, ops: dict[str, dict[str, Any]],
            found: dict[str, str | None]) -> dict[str, str]:
    """Create the model of each op, by checkpoint key (unless ``found`` has it: made by an attempt
    that died), link them to the run at their steps, log their metrics, mark them ready (each step
    safe to repeat; one request for all links and one per 1,000 metrics); returns their ids by checkpoint."""
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus, Metric
    from mlflow.exceptions import MlflowException
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_IS_EXTERNAL

    linked: set[str] = set()
    if any(found.values()):  # the run may list models found after an attempt that died (no duplicates)
        outputs = client.get_run(run_id).outputs
        linked = {o.model_id for o in (outputs.model_outputs if outputs else [])}
    made: dict[str, str] = {}
    for key, op in ops.items():
        if found.get(key):
            made[key] = found[key]  # type: ignore[assignment]
            continue
        tags = {TAG_RUN: op.get("run"), TAG_MODEL_REPO: op["model_repo"], TAG_MODEL_COMMIT: op["commit"],
                TAG_MODEL_PATH: op["path"], MLFLOW_MODEL_IS_EXTERNAL: "true"}
        try:
            made[key] = client.create_logged_model(
                experiment_id, name=_model_name(op["path"]), source_run_id=run_id, model_type=MODEL_TYPE,
                tags={k: str(v) for k, v in tags.items() if v is not None}, params=_params(client, run_id) or None,
            ).model_id
        except MlflowException as exc:
            if exc.error_code != "INVALID_PARAMETER_VALUE":
                raise  # the server or the network: retried, then journaled for `sync`
            log.warning("MLflow refused a logged model for checkpoint %s (%s); it is not logged as a model.",
                        op["path"], exc)
    outputs = [LoggedModelOutput(model_id, step=ops[key].get("step") or 0)
               for key, model_id in made.items() if model_id not in linked]
    if outputs:
        client.log_outputs(run_id, outputs)
    metrics = [metric for key, model_id in made.items() for metric in _metrics(ops[key], model_id, Metric)]
    for start in range(0, len(metrics), 1000):  # (the same timestamps again on a replay: MLflow keeps one copy)
        client.log_batch(run_id, metrics=metrics[start:start + 1000])
    for model_id in made.values():
        client.finalize_logged_model(model_id, LoggedModelStatus.READY)
    if made:
        op = next(iter(ops.values()))
        delete_twin_models(client, run_id, made, lambda: [
            (checkpoint_key(f.tags.get(TAG_MODEL_COMMIT, ""), f.tags.get(TAG_MODEL_PATH, "")), f.model_id, f.source_run_id)
            for f in search(client, [experiment_id], {TAG_MODEL_REPO: op["model_repo"], TAG_RUN: op.get("run") or ""})])
    return made


def _metrics(op: dict[str, Any], model_id: str, metric: Any) -> list[Any]:
    """The checkpoint's metrics as MLflow ``Metric`` entities of ``model_id`` (on the dataset, if logged)."""
    dataset = {}
    if op.get("dataset"):
        from .dataset import OxenDataset

        named = OxenDataset.of(op["dataset"])
        dataset = {"dataset_name": named.name, "dataset_digest": named.digest}
    return [metric(name, float(value), op["time_ms"], op.get("step") or 0, model_id=model_id, **dataset)
            for name, value in (op.get("metrics") or {}).items()
            # (a NaN or an infinity: MLflow's SQL store reads a model's back as 0.0, a perfect loss; left out)
            if _METRIC_NAME.match(name) and isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value)]


def _model_name(path: str) -> str:
    """The checkpoint's file or folder name, without its extension, as MLflow allows a model name."""
    name = Path(path).name
    stem = Path(name).stem if Path(path).suffix else name
    return _BAD_MODEL_NAME.sub("-", stem) or "checkpoint"


def _run_facts(client: Any, run_id: str) -> tuple[str, dict[str, str]]:
    """The run's experiment and parameters (MLflow's own ``log_model`` copies them too), read once
    per process and run."""
    if run_id not in _runs:
        run = client.get_run(run_id)
        _runs[run_id] = (run.info.experiment_id, dict(run.data.params))
    return _runs[run_id]


def _params(client: Any, run_id: str) -> dict[str, str]:
    return _run_facts(client, run_id)[1]


def _experiment_id(client: Any, meta: dict[str, Any]) -> str:
    return meta.get("experiment_id") or _run_facts(client, meta["run_id"])[0]


def experiment_of(client: Any, journal: MlflowJournal, meta: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The run's experiment, noted in the journal's meta (a run the sink joined was not created by it)."""
    if meta.get("experiment_id"):
        return meta["experiment_id"], meta
    meta = {**meta, "experiment_id": _experiment_id(client, meta)}
    journal.write_meta(meta)
    return meta["experiment_id"], meta
