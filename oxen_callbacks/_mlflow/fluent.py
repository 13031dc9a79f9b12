"""This process's active fluent MLflow run (``mlflow.start_run``), looked at without importing MLflow."""

from __future__ import annotations

import logging
import sys

log = logging.getLogger(__name__)


def active_run() -> tuple[str, str] | None:
    """``(run_id, tracking_uri)`` of the active fluent run (``None`` when MLflow is not even imported)."""
    mlflow = sys.modules.get("mlflow")
    active = mlflow.active_run() if mlflow is not None else None
    return (active.info.run_id, mlflow.get_tracking_uri()) if active is not None else None


def active_run_id() -> str | None:
    """The active fluent MLflow run's id (``None`` when MLflow is not even imported)."""
    active = active_run()
    return active[0] if active is not None else None


def end_active_run(status: str, *, unless: str | None) -> None:
    """End the active fluent run as ``status``, unless it is the run ``unless`` (e.g. one the user started)."""
    run_id = active_run_id()
    if run_id is None or run_id == unless:
        return
    try:
        sys.modules["mlflow"].end_run(status)
    except Exception:
        log.warning("Could not end MLflow run %s as %s", run_id, status, exc_info=True)
