"""This process's MLflow as its user left it: whether it is installed or loaded, the tracking URI
MLflow would use, the active fluent run (``mlflow.start_run``); all looked at without importing MLflow."""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from pathlib import Path

from ..names import ENV_MLFLOW_RUN_ID, ENV_MLFLOW_TRACKING_URI

SQLITE_PREFIX = "sqlite:///"

log = logging.getLogger(__name__)


def mlflow_available() -> bool:
    return importlib.util.find_spec("mlflow") is not None


def mlflow_imported() -> bool:
    """Whether this process has MLflow's client loaded (the user's logger or code imported it)."""
    return "mlflow.tracking" in sys.modules


def default_tracking_uri() -> str:
    """MLflow's own choice: ``mlflow.set_tracking_uri`` if imported, else ``$MLFLOW_TRACKING_URI``, else SQLite."""
    mlflow = sys.modules.get("mlflow")
    if mlflow is not None:
        return mlflow.get_tracking_uri()
    return os.environ.get(ENV_MLFLOW_TRACKING_URI) or f"{SQLITE_PREFIX}{Path('mlflow.db').resolve()}"


def sqlite_file(uri: str | None) -> str | None:
    """The file of a SQLite store URI (``sqlite:///mlflow.db`` -> ``mlflow.db``), else ``None``."""
    return uri[len(SQLITE_PREFIX):] if uri and uri.startswith(SQLITE_PREFIX) else None


def absolute_store(uri: str) -> str:
    """``uri`` with a relative SQLite path (``sqlite:///mlflow.db``, as MLflow's quickstart writes it) or file
    store path (``file:./mlruns``, Lightning's ``MLFlowLogger`` default; ``./mlruns``) made absolute from this
    process's working directory: what is journaled names that store wherever ``oxen-callbacks sync`` runs,
    not a new one in its working directory."""
    path = sqlite_file(uri)
    if path and not path.startswith("/"):
        return f"{SQLITE_PREFIX}{os.path.abspath(path)}"
    if uri.startswith("file:") and not uri.startswith("file://"):
        return f"file://{os.path.abspath(uri[len('file:'):])}"
    if uri.startswith(("./", "../")):
        return os.path.abspath(uri)
    return uri


def active_run() -> tuple[str, str] | None:
    """``(run_id, tracking_uri)`` of the active fluent run (``None`` when MLflow is not even imported)."""
    mlflow = sys.modules.get("mlflow")
    active = mlflow.active_run() if mlflow is not None else None
    return (active.info.run_id, mlflow.get_tracking_uri()) if active is not None else None


def run_to_join() -> tuple[str, str] | None:
    """``(run_id, tracking_uri)`` of the run MLflow's own ``start_run()`` would log into: the active
    fluent run, else the one ``$MLFLOW_RUN_ID`` names (``None``: it would start a new run)."""
    active = active_run()
    if active is None and (from_environment := os.environ.get(ENV_MLFLOW_RUN_ID, "").strip()):
        return from_environment, default_tracking_uri()
    return active


def run_to_join_id() -> str | None:
    """The id of :func:`run_to_join`'s run (``None``: MLflow would start a new run)."""
    joined = run_to_join()
    return joined[0] if joined is not None else None


def active_run_id() -> str | None:
    """The active fluent MLflow run's id (``None`` when MLflow is not even imported)."""
    active = active_run()
    return active[0] if active is not None else None


def end_run_if_running(run_id: str, status: str) -> None:
    """End MLflow run ``run_id`` as ``status`` if it still runs, and no other: through MLflow's fluent
    API when it is the active run (which MLflow then forgets), else by its client (a run the user
    ended meanwhile keeps their end)."""
    try:
        mlflow = sys.modules["mlflow"]
        if active_run_id() == run_id:
            mlflow.end_run(status)
        elif (client := mlflow.MlflowClient()).get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, status)
    except Exception:
        log.warning("Could not end MLflow run %s as %s", run_id, status, exc_info=True)
