"""The final and best marks of a run's logged models (see :mod:`.logged_models`), set at its end.

The ``mark_models`` operation gives every committed checkpoint of the fit its model (those whose
report never came: a killed trainer), then tags the last checkpoint's model ``oxen.model.final``
and the best one's ``oxen.model.best``; the marks move: an earlier fit of a continued run, or
another Oxen run's fit that logged to the same MLflow run before this one joined it, loses them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

from .._publish.fits import earlier_fits, saved_by
from ..lineage import BEST_KEY
from ..names import TAG_MODEL_BEST, TAG_MODEL_FINAL, TAG_RUN
from .abandoned import committed_record
from .dataset_input import META_DATASET_LOGGED
from .journal import META_JOINED_RUN, MlflowJournal
from .logged_models import (
    META_MODELS,
    ensure_models,
    experiment_of,
    models_wanted,
    skipped,
    unless_the_server_lacks_them,
)
from .model_search import Found, checkpoint_key, experiments_of_fits, models_of, search, with_shared_models

log = logging.getLogger(__name__)

MARK = "true"


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
    if entries and (models_wanted(meta) or earlier_fits(record)) and not skipped(client):
        with unless_the_server_lacks_them(client):
            if models_wanted(meta):
                marked = _complete_and_mark(client, journal, meta, record, entries, best_path, best_unless_last, went_on)
            elif went_on is None:  # (log_models=False) the final and best marks of the fits this one continued are not the run's
                _unmark(client, journal, meta, record, entries)
    return marked


def _unmark(client: Any, journal: MlflowJournal, meta: dict[str, Any], record: dict[str, Any],
            entries: list[dict[str, Any]]) -> None:
    """Take the final and best marks off the models of ``entries`` (earlier fits' checkpoints)."""
    experiment_id, meta = experiment_of(client, journal, meta)
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
    experiment_id, meta = experiment_of(client, journal, meta)
    known = meta.get(META_MODELS) or {}
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
        meta = ensure_models(client, journal, meta, missing, existing=existing)
        for op in missing:
            if made := (meta.get(META_MODELS) or {}).get(key := checkpoint_key(op["commit"], op["path"])):
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
