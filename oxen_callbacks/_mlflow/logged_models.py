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
``oxen.model.best``; a registered version is made from that logged model (:mod:`.registry`).

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
import re
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .._publish.fits import earlier_fits, saved_by
from .._util.redact import redact_url
from ..lineage import BEST_KEY
from ..names import (
    TAG_MODEL_BEST,
    TAG_MODEL_COMMIT,
    TAG_MODEL_FINAL,
    TAG_MODEL_PATH,
    TAG_MODEL_REPO,
    TAG_RUN,
)
from .abandoned import committed_record
from .dataset_input import META_DATASET_LOGGED, log_dataset_input_noted
from .journal import META_JOINED_RUN, MlflowJournal
from .model_search import (
    Found,
    checkpoint_key,
    experiments_of_fits,
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
MARK = "true"
_META_KEY = "logged_models"  # journal meta: {"<commit>:<path>": model id, or None while being created}
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


def _skipped(client: Any) -> bool:
    """Whether logged models are not to be tried: a client before MLflow 3, or a server that refused them."""
    if not supported(client):
        import mlflow

        _say_unsupported(f"MLflow {getattr(mlflow, '__version__', '?')} has no logged models (MLflow 3 has)")
        return True
    return client.tracking_uri in _servers_without


@contextlib.contextmanager
def _unless_the_server_lacks_them(client: Any) -> Iterator[None]:
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
    if _skipped(client):
        return
    with _unless_the_server_lacks_them(client):
        dataset = next((op["dataset"] for op in ops if op.get("dataset")), None)
        if dataset and not meta.get(META_DATASET_LOGGED):  # the input the models' metrics name
            meta = log_dataset_input_noted(client, journal, meta, dataset)
        _ensure(client, journal, meta, ops, existing=None)


def complete_and_mark(client: Any, journal: MlflowJournal, meta: dict[str, Any], record: dict[str, Any], *,
                      best_path: str | None = None, best_unless_last: bool = False,
                      went_on: str | None = None) -> dict[str, Any]:
    """Give every committed checkpoint of ``record``'s own fit its logged model (those whose report never
    came: a killed trainer), then tag the final one and the best one (of the whole run: a continued run's
    earlier fits' models lose their marks); returns ``{"final": id, "best": id}``.

    The best is ``record["model"]`` when its path is ``best_path``, or (``best_unless_last``, for a run
    finished from its commits, whose trainer's knowledge is gone) when it is not the last checkpoint.
    ``went_on``: a later fit that logs to the MLflow run (:func:`.abandoned.superseded_by`): the models
    are made, the marks left as that fit's end set them.
    """
    entries = [c for c in record.get("checkpoints") or [] if c.get("commit")]
    marked: dict[str, Any] = {}
    if entries and (models_wanted(meta) or earlier_fits(record)) and not _skipped(client):
        with _unless_the_server_lacks_them(client):
            if models_wanted(meta):
                marked = _complete_and_mark(client, journal, meta, record, entries, best_path, best_unless_last, went_on)
            elif went_on is None:  # (log_models=False) the final and best marks of the fits this one continued are not the run's
                _unmark(client, journal, meta, record, entries)
    return marked


def _unmark(client: Any, journal: MlflowJournal, meta: dict[str, Any], record: dict[str, Any],
            entries: list[dict[str, Any]]) -> None:
    """Take the final and best marks off the models of ``entries`` (earlier fits' checkpoints)."""
    experiment_id, meta = _experiment(client, journal, meta)
    models = models_of(client, experiments_of_fits(client, experiment_id, meta.get("tracking_uri"), record),
                       record["model"]["repo"], record["run"].get("name"))
    for tag in (TAG_MODEL_FINAL, TAG_MODEL_BEST):
        _take_mark_off(client, models, {checkpoint_key(e["commit"], e["path"]) for e in entries}, tag, keep=None)


def _take_mark_off(client: Any, models: dict[str, Found], keys: Iterable[str], tag: str, *, keep: str | None) -> None:
    """Delete ``tag`` from the models of checkpoints ``keys`` other than ``keep``'s model (compared by
    model id: two checkpoints may share one): an earlier fit's marks, of a continued run (a model of
    another repository once at the same path is not the run's)."""
    kept = models[keep].model_id if keep in models else None
    unmarked = {found.model_id for key, found in models.items()
                if found.tags.get(tag) == MARK and found.model_id != kept and key in keys}
    for model_id in unmarked:
        client.delete_logged_model_tag(model_id, tag)


def _complete_and_mark(client: Any, journal: MlflowJournal, meta: dict[str, Any], record: dict[str, Any],
                       entries: list[dict[str, Any]], best_path: str | None, best_unless_last: bool,
                       went_on: str | None) -> dict[str, Any]:
    repo, run = record["model"]["repo"], record["run"].get("name")
    experiment_id, meta = _experiment(client, journal, meta)
    known = meta.get(_META_KEY) or {}
    keys = [checkpoint_key(e["commit"], e["path"]) for e in entries]
    later = went_on or _continued_since(meta, record, entries)
    if later is None and all(known.get(key) for key in keys):
        # This journal (one fit's) made the model of every checkpoint the run has, and no later fit
        # continued it: a continued run's record lists its earlier fits' checkpoints too, so no
        # model an earlier fit made can carry a mark to take off, and no search is needed.
        existing = {key: Found(known[key], {}) for key in keys}
    else:
        existing = with_shared_models(models_of(
            client, experiments_of_fits(client, experiment_id, meta.get("tracking_uri"), record), repo, run), entries)
    missing = [{"commit": e["commit"], "path": e["path"], "step": e.get("step"), "epoch": e.get("epoch"),
                "metrics": e.get("metrics") or {}, "same_model_as": e.get("same_model_as"), "model_repo": repo, "run": run,
                "fit_id": e.get("fit_id"),
                "dataset": meta.get(META_DATASET_LOGGED), "time_ms": int(time.time() * 1000)} for e in entries
               # (an earlier fit's checkpoints: their models are its own MLflow run's, or were not wanted)
               if checkpoint_key(e["commit"], e["path"]) not in existing and saved_by(e, record)]
    if missing:
        meta = _ensure(client, journal, meta, missing, existing=existing)
        for op in missing:
            if made := (meta.get(_META_KEY) or {}).get(key := checkpoint_key(op["commit"], op["path"])):
                existing[key] = Found(made, {})
    if later:  # a late replay (`sync`) of a fit the run went on from: the later fit's end marks its models
        log.info("Run %s went on after checkpoint %s (%s): its final and best models stay marked as they are.",
                 run, entries[-1]["path"], later)
        return {}
    # the last checkpoint this fit saved (a killed earlier fit's late save may come after it)
    final, model = next((e for e in reversed(entries) if saved_by(e, record)), entries[-1]), record["model"]
    best = None
    named = model.get(BEST_KEY)  # (the fit's end said whether the trainer named it its best)
    if model.get("commit") and (model.get("path") == best_path or (best_unless_last and (named is True or (
            named is None and (model["commit"], model["path"]) != (final["commit"], final["path"]))))):
        best = checkpoint_key(model["commit"], model["path"])
    wanted = {TAG_MODEL_FINAL: checkpoint_key(final["commit"], final["path"]), TAG_MODEL_BEST: best}
    marks: dict[str, list[str]] = {}  # checkpoint key -> the marks its model gets (one request each)
    for tag, key in wanted.items():
        _take_mark_off(client, existing, keys, tag, keep=key)
        if key in existing and existing[key].tags.get(tag) != MARK:
            marks.setdefault(key, []).append(tag)
    for key, tags in marks.items():
        if not _marked(client, existing[key].model_id, tags):
            del existing[key]
    if meta.get(META_JOINED_RUN):
        _unmark_other_oxen_runs(client, experiment_id, meta.get("run_id"), run)
    return {name: existing[key].model_id for name, key in (("final", wanted[TAG_MODEL_FINAL]), ("best", best))
            if key in existing}


def _unmark_other_oxen_runs(client: Any, experiment_id: str, run_id: str | None, oxen_run: str | None) -> None:
    """Take the final and best marks off the models another Oxen run logged from MLflow run ``run_id``
    (an earlier fit that logged to the run this fit joined, ended by `sync` before it): the run's
    marks are its latest fit's."""
    if not run_id:
        return
    for found in search(client, [experiment_id], {}, source_run_id=run_id):  # (this run's models only)
        if found.tags.get(TAG_RUN) != oxen_run:
            for tag in (TAG_MODEL_FINAL, TAG_MODEL_BEST):
                if found.tags.get(tag) == MARK:
                    client.delete_logged_model_tag(found.model_id, tag)


def _marked(client: Any, model_id: str, tags: list[str]) -> bool:
    """Set ``tags`` on logged model ``model_id``; ``False`` when it is gone (someone deleted it since
    the journal noted it): nothing to mark, and a replay must not fail on it forever."""
    from mlflow.exceptions import MlflowException

    try:
        client.set_logged_model_tags(model_id, dict.fromkeys(tags, MARK))
    except MlflowException:
        try:  # (the client says INVALID_PARAMETER_VALUE for a model it cannot find: ask the store)
            client.get_logged_model(model_id)
        except MlflowException as missing:
            if missing.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            log.warning("Logged model %s is no longer in MLflow (deleted?): it is not marked %s.", model_id,
                        " and ".join(tags))
            return False
        raise
    return True


def _continued_since(meta: dict[str, Any], record: dict[str, Any], entries: list[dict[str, Any]]) -> str | None:
    """Whether a later fit continued ``record``'s run, by the model repository's record of it (its
    working tree, when this machine has it): that record is a fit's that names ``record``'s among
    the fits it went on from, or (records without fit ids) it committed checkpoints after
    ``entries``' last. Says what, or ``None``. (A killed fit's save its worker commits late comes
    last in the history, yet the run is the later fit's.)"""
    model_repo, run = meta.get("model_repo"), meta.get("oxen_run")
    current = committed_record(model_repo, run, meta.get("run_id") or "") if model_repo and run else None
    if current is None:
        return None  # not here, or unreadable: the record at hand is all there is
    fit, their_fit = record.get("fit_id"), current.get("fit_id")
    if fit is not None and their_fit is not None:  # (a late save of an earlier fit may come after this fit's last)
        continued = their_fit != fit and fit in earlier_fits(current)
        return f"fit {their_fit} in {model_repo}" if continued else None
    committed = [(c["commit"], c["path"]) for c in current["checkpoints"]]
    last = (entries[-1]["commit"], entries[-1]["path"])
    after = len(committed) - 1 - committed.index(last) if last in committed else 0
    return f"{after} later checkpoint(s) in {model_repo}" if after else None


def model_id_for(client: Any, meta: dict[str, Any], record: dict[str, Any]) -> str | None:
    """The logged model of ``record``'s model (its best or final checkpoint), if there is one."""
    model = record["model"]
    if not model.get("commit") or not models_wanted(meta) or _skipped(client):
        return None
    key = checkpoint_key(model["commit"], model["path"])
    if known := (meta.get(_META_KEY) or {}).get(key):
        return known
    found = None
    with _unless_the_server_lacks_them(client):
        experiment_id = _experiment_id(client, meta)
        found = find(client, [experiment_id], model["repo"], model["commit"], model["path"])
        if found is None:  # (a last.ckpt leads to its top-k file's model)
            entries = [e for e in record.get("checkpoints") or [] if isinstance(e, dict) and e.get("commit") and e.get("path")]
            found = with_shared_models(models_of(client, [experiment_id], model["repo"], record["run"].get("name")),
                                       entries).get(key)
    return found.model_id if found else None


# -- internals ------------------------------------------------------------------------------------
def _ensure(client: Any, journal: MlflowJournal, meta: dict[str, Any], ops: list[dict[str, Any]],
            existing: dict[str, Found] | None) -> dict[str, Any]:
    """Each checkpoint's logged model, created unless the journal (or a search, after an attempt that
    may have created it) knows it, or it holds the model of another checkpoint that has one (see
    :func:`.model_search.shared_model_of`); returns the journal's meta, updated with their ids.

    The journal notes every checkpoint before its model is created and its id after (one write
    each for the whole batch), so a replay after a kill never makes a second model.
    """
    known = dict(meta.get(_META_KEY) or {})
    todo = {key: op for op in ops if not known.get(key := checkpoint_key(op["commit"], op["path"]))}  # (else done earlier)
    if not todo:
        return meta
    experiment_id, meta = _experiment(client, journal, meta)
    if new := {key: None for key in todo if key not in known}:
        meta = {**meta, _META_KEY: {**known, **new}}
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
    meta = {**meta, _META_KEY: {**(meta.get(_META_KEY) or {}), **made}, _META_SHARED: shared}
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
            if _METRIC_NAME.match(name) and isinstance(value, (int, float)) and not isinstance(value, bool)]


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


def _experiment(client: Any, journal: MlflowJournal, meta: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The run's experiment, noted in the journal's meta (a run the sink joined was not created by it)."""
    if meta.get("experiment_id"):
        return meta["experiment_id"], meta
    meta = {**meta, "experiment_id": _experiment_id(client, meta)}
    journal.write_meta(meta)
    return meta["experiment_id"], meta
