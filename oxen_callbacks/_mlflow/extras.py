"""What the end of a run logs beside its lineage: a registered version, the picture (the dataset input:
:mod:`.dataset_input`).

Apart from :mod:`.registry` (promotion and deployments, with their queries), which is imported
only to register a version: the end of a run without ``register_model`` does not load it.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

from .._util.redact import redact_text
from ..names import LINEAGE_GRAPH_ARTIFACT, LINEAGE_GRAPH_ARTIFACT_NAME, POINTER_ARTIFACT_DIR

log = logging.getLogger(__name__)
META_REGISTER_MODEL = "register_model"  # journal meta: the registered model the run's end makes a version of
META_LINEAGE_GRAPH = "lineage_graph"  # journal meta: False when the run was asked for no picture (log_lineage_graph=False)


def extras_meta(*, register_model: str | None, graph: bool) -> dict[str, Any]:
    """What the journal's meta notes of the end's extras, so that ``sync`` of a run whose training
    process died after its lineage ended (before its end was journaled) still makes them."""
    return {**({META_REGISTER_MODEL: register_model} if register_model else {}),
            **({} if graph else {META_LINEAGE_GRAPH: False})}


def noted_extras(meta: dict[str, Any]) -> tuple[str | None, bool]:
    """``(register_model, graph)`` as :func:`extras_meta` noted them (a name MLflow refuses, edited by
    hand into the journal, registers nothing: see :func:`publish_extras`)."""
    name = meta.get(META_REGISTER_MODEL)
    return (name if isinstance(name, str) and name else None), meta.get(META_LINEAGE_GRAPH) is not False


def publish_extras(client: Any, run_id: str, record: dict[str, Any], *, register_model: str | None,
                   graph: bool, model_id: str | None = None) -> dict[str, Any]:
    """At fit end: registered version (from logged model ``model_id`` when there is one), lineage
    picture (run by the MLflow sink process). A version MLflow refuses as invalid (a model name edited
    by hand into the journal) is skipped with a warning: a replay would be refused forever, and the
    run never finished."""
    from mlflow.exceptions import MlflowException

    from .picture import render

    done: dict[str, Any] = {}
    if register_model and record["model"]["commit"]:
        from .registry import register_version

        try:
            done["registered"] = register_version(client, register_model, run_id, record, model_id)
        except MlflowException as exc:
            if exc.error_code != "INVALID_PARAMETER_VALUE":
                raise  # the server or the network: retried, then left journaled
            log.warning("MLflow refused to register run %s's model as %r (%s): no version is made.", run_id,
                        register_model[:100], redact_text(str(exc))[:300])
    elif register_model:
        log.warning("No checkpoint was committed: nothing to register as %r.", register_model)
    if graph:
        view = {**record, "registered": [done["registered"]] if "registered" in done else [], "endpoints": []}
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / LINEAGE_GRAPH_ARTIFACT_NAME
            path.write_text(render(view, "svg"))
            client.log_artifact(run_id, str(path), artifact_path=POINTER_ARTIFACT_DIR)
        done["graph"] = LINEAGE_GRAPH_ARTIFACT
    return done
