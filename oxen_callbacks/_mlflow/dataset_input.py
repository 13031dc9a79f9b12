"""The run's dataset input (MLflow's Datasets panel), logged once: with the first logged models (their
metrics name it), else at the end of the run, else by ``sync`` for a run finished from its commits.

What was logged, and whether the run wants it at all, is noted in the run's journal meta; this module
imports MLflow only to log (the training process reads :data:`META_DATASET_INPUT` from here).
"""

from __future__ import annotations

from typing import Any

from .journal import MlflowJournal

META_DATASET_LOGGED = "logged_models_dataset"  # journal meta: the dataset section logged as the run's input
META_DATASET_INPUT = "dataset_input"  # journal meta: False when the run was asked for none (log_dataset_input=False)


def dataset_logged(meta: dict[str, Any], section: dict[str, Any] | None) -> bool:
    """Whether the run's input ``section`` (a record's dataset) was logged already."""
    return bool(section) and meta.get(META_DATASET_LOGGED) == section


def log_dataset_input_once(client: Any, journal: MlflowJournal, record: dict[str, Any]) -> None:
    """Log ``record``'s dataset as the run's input unless it was, or the run was asked not to."""
    meta, section = journal.meta(), record.get("dataset")
    if section and meta.get(META_DATASET_INPUT) is not False and not dataset_logged(meta, section):
        log_dataset_input_noted(client, journal, meta, section)


def log_dataset_input_noted(client: Any, journal: MlflowJournal, meta: dict[str, Any],
                            section: dict[str, Any]) -> dict[str, Any]:
    """Log ``section`` as the run's input and note it in the journal; returns the journal's new meta."""
    from .dataset import log_dataset_input

    log_dataset_input(client, meta["run_id"], section)
    meta = {**meta, META_DATASET_LOGGED: section}
    journal.write_meta(meta)
    return meta
