"""Finding the MLflow logged models of checkpoints (see :mod:`.logged_models`) by their tags, in the
experiments an Oxen run's fits logged to.

A continued run's fits may have logged to different experiments (a later fit given another
``experiment_name``): the record lists the earlier fits' MLflow runs (``earlier_mlflow_runs``, written
by the committer), and their experiments are searched too, so the run's final and best marks move
off an earlier fit's models wherever they are.
"""

from __future__ import annotations

from typing import Any

from ..names import TAG_MODEL_COMMIT, TAG_MODEL_PATH, TAG_MODEL_REPO, TAG_RUN


class Found:
    """A logged model found: its id, tags and source run."""

    def __init__(self, model_id: str, tags: dict[str, str], source_run_id: str | None = None) -> None:
        self.model_id, self.tags, self.source_run_id = model_id, tags, source_run_id


def checkpoint_key(commit: str, path: str) -> str:
    """How a checkpoint's model is keyed (in the journal's meta too)."""
    return f"{commit}:{path}"


def model_key(checkpoint: dict[str, Any]) -> str | None:
    """How another checkpoint of the same fit and step names this one's model (its ``same_model_as``):
    ``<fit>@<step>:<path>``; ``None`` without a step or a fit id (records before fit ids)."""
    step, fit, path = checkpoint.get("step"), checkpoint.get("fit_id"), checkpoint.get("path")
    if isinstance(step, int) and not isinstance(step, bool) and isinstance(fit, str) and isinstance(path, str):
        return f"{fit}@{step}:{path}"
    return None


def shared_model_of(checkpoint: dict[str, Any]) -> str | None:
    """The :func:`model_key` of the checkpoint this one (a record's entry, or a ``log_model``
    operation) holds the same model as, by its ``same_model_as`` (what the trainer's adapter says of
    Lightning's ``last.ckpt`` written right after the top-k file of the same callback and step), or
    ``None``: a model of its own. Only such a checkpoint ever takes another's model."""
    same = checkpoint.get("same_model_as")
    return model_key({**checkpoint, "path": same}) if isinstance(same, str) else None


def with_shared_models(models: dict[str, Found], entries: list[dict[str, Any]]) -> dict[str, Found]:
    """``models`` (by checkpoint key), with each of ``entries`` (in the order they were saved) that has
    none of its own and holds the same model as an earlier one (:func:`shared_model_of`) given that
    one's model (the latest save of it before this one)."""
    out, latest = dict(models), {}
    for entry in entries:
        key = checkpoint_key(entry["commit"], entry["path"])
        if key not in out and (of := shared_model_of(entry)) in latest:
            out[key] = latest[of]
        elif key in models and (own := model_key(entry)):
            latest[own] = models[key]
    return out


def experiments_of_fits(client: Any, experiment_id: str, tracking_uri: str | None, record: dict[str, Any]) -> list[str]:
    """``experiment_id`` (this fit's), then the experiments of the MLflow runs of the fits ``record``
    went on from that are in this store (``tracking_uri``, redacted as records hold it); a run gone or
    unreadable is skipped."""
    from mlflow.exceptions import MlflowException

    found, listed = [experiment_id], record.get("earlier_mlflow_runs")
    for earlier in listed if isinstance(listed, list) else []:
        if not (isinstance(earlier, dict) and isinstance(earlier.get("mlflow_run_id"), str)
                and earlier.get("mlflow_tracking_uri") == tracking_uri):
            continue  # (another store's run, or a hand-edited entry)
        try:
            other = client.get_run(earlier["mlflow_run_id"]).info.experiment_id
        except MlflowException:
            continue
        if other not in found:
            found.append(other)
    return found


def find(client: Any, experiment_ids: list[str], repo: str, commit: str, path: str) -> Found | None:
    """The logged model of the checkpoint at ``path`` of ``commit`` in ``repo``, if there is one."""
    hits = search(client, experiment_ids, {TAG_MODEL_COMMIT: commit, TAG_MODEL_REPO: repo, TAG_MODEL_PATH: path})
    return hits[0] if hits else None


def models_of(client: Any, experiment_ids: list[str], repo: str, run: str | None) -> dict[str, Found]:
    """The logged models of Oxen run ``run`` in ``experiment_ids``, by :func:`checkpoint_key` (every page)."""
    found: dict[str, Found] = {}
    for model in search(client, experiment_ids, {TAG_MODEL_REPO: repo, TAG_RUN: run or ""}):
        tags = model.tags
        if tags.get(TAG_MODEL_COMMIT) and tags.get(TAG_MODEL_PATH):  # (anyone may tag a model: skip odd ones)
            found.setdefault(checkpoint_key(tags[TAG_MODEL_COMMIT], tags[TAG_MODEL_PATH]), model)
    return found


def _writable(value: str) -> bool:
    """Whether ``value`` can be written in a logged-model search filter (see :func:`search`)."""
    return "'" not in value and "\\" not in value


def search(client: Any, experiment_ids: list[str], wanted: dict[str, str], *,
           source_run_id: str | None = None) -> list[Found]:
    """The logged models whose tags hold exactly ``wanted`` (every page); with ``source_run_id``, only
    those that run logged.

    MLflow's logged-model search strips single quotes from a value and nothing else (no escapes,
    no double quotes): values holding a quote or a backslash cannot be written in its filter, so
    they are compared here, as every value is.
    """
    plain = " AND ".join([f"tags.`{k}` = '{v}'" for k, v in wanted.items() if _writable(v)]
                         + ([f"source_run_id = '{source_run_id}'"] if source_run_id and _writable(source_run_id) else []))
    found: list[Found] = []
    token = None
    while True:
        page = client.search_logged_models(experiment_ids, filter_string=plain or None, page_token=token)
        for model in page:
            tags = dict(model.tags)
            if all(tags.get(k) == v for k, v in wanted.items()) and source_run_id in (None, model.source_run_id):
                found.append(Found(model.model_id, tags, model.source_run_id))
        token = page.token
        if not token:
            return found
