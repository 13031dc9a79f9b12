"""Twins: what a create repeated by an HTTP retry made beside what we got, found and deleted.

A tracking server that carried out a create and whose answer was lost on the way back (a gateway's
502/503/504, a read timeout) gets the request again from MLflow's HTTP retry, or from ours: it makes
a second run, or a second logged model of the same checkpoint, which nothing ever names and nobody
ends or finalizes. Each create is therefore recognisable (a run by its create op's token, tag
``oxen.creation``; a logged model by its checkpoint's tags), and after it the others are deleted
(soft deletes: MLflow keeps them as deleted). A local store (a database, files) has no HTTP retry.
Best effort: a failure here is said, and the logging goes on.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from typing import Any

from .._util.redact import redact_text
from ..names import TAG_CREATION

log = logging.getLogger(__name__)
_TOKEN = re.compile(r"[0-9a-f]{32}")  # uuid4().hex, as MlflowSink.attach makes it


def over_http(client: Any) -> bool:
    """Whether ``client`` talks to a tracking server, where a create may be sent twice."""
    return client.tracking_uri.startswith(("http://", "https://", "databricks"))


def delete_twin_runs(client: Any, experiment_id: str, token: str, *, keep: str) -> list[str]:
    """Delete the runs of ``experiment_id`` tagged with create token ``token`` other than ``keep``; their ids.
    A token that is not one we make (a journal edited by hand) is not searched with: it goes into a filter."""
    if not over_http(client) or not _TOKEN.fullmatch(token):
        return []
    from mlflow.exceptions import MlflowException

    try:
        twins = [run.info.run_id for run in client.search_runs(
            [experiment_id], filter_string=f"tags.`{TAG_CREATION}` = '{token}'")
                 if run.info.run_id != keep and run.data.tags.get(TAG_CREATION) == token]
        for twin in twins:
            client.delete_run(twin)
    except MlflowException as exc:
        log.warning("Could not look for runs a repeated create made beside %s: %s", keep, redact_text(str(exc)))
        return []
    if twins:
        log.warning("MLflow made run %s twice (a create repeated after a lost answer): deleted the twin(s) %s",
                    keep, ", ".join(twins))
    return twins


def delete_twin_models(client: Any, run_id: str, made: dict[str, str],
                       find: Callable[[], Iterable[tuple[str, str, str | None]]]) -> list[str]:
    """Delete the logged models ``find()`` lists (checkpoint key, model id, source run) of run ``run_id``
    whose checkpoint is in ``made`` (key -> the model we got) and that are not that model; their ids."""
    if not over_http(client):
        return []  # (``find`` searches: not called)
    from mlflow.exceptions import MlflowException

    try:
        twins = [model_id for key, model_id, source in find()
                 if source == run_id and key in made and model_id != made[key]]
        for twin in twins:
            client.delete_logged_model(twin)
    except MlflowException as exc:
        log.warning("Could not look for logged models a repeated create made in run %s: %s", run_id,
                    redact_text(str(exc)))
        return []
    if twins:
        log.warning("MLflow made %d logged model(s) of run %s twice (a create repeated after a lost answer): "
                    "deleted the twin(s) %s", len(twins), run_id, ", ".join(twins))
    return twins
