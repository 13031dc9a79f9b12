"""Log lineage into MLflow: tags as soon as each fact is known, the pointer file at the end.

Every MLflow call is journaled on disk first and carried out by a background
thread, so a slow or dead tracking server never stalls training; what is not
done when the run ends stays in ``<cache>/mlflow-journal/`` for
``oxen-callbacks sync`` (or the next run) to finish.

Example::

    sink = MlflowSink.attach(cache_dir=cache)        # the active run, or a new one
    sink.set_tags({"oxen.dataset.commit": pin.commit})
    sink.log_lineage(record); sink.end("FINISHED"); sink.flush(timeout=30)
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from .locks import FileLock
from .redact import redact_url

log = logging.getLogger(__name__)

LINEAGE_ARTIFACT_DIR = "oxen"
LINEAGE_ARTIFACT_NAME = "lineage.json"
_RETRY_DELAYS = (0.5, 1.0, 2.0, 4.0, 8.0)


def mlflow_available() -> bool:
    try:
        import mlflow  # noqa: F401
    except ImportError:
        return False
    return True


class MlflowJournal:
    """The not-yet-done MLflow operations of one training run, on disk."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        (folder / "ops").mkdir(parents=True, exist_ok=True)

    @classmethod
    def create(cls, cache_dir: Path, meta: dict[str, Any]) -> "MlflowJournal":
        journal = cls(cache_dir / "mlflow-journal" / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}")
        journal.write_meta(meta)
        return journal

    @property
    def lock_path(self) -> Path:
        """Held by the process still working on this journal (``sync`` leaves it alone)."""
        return self.folder / "owner.lock"

    def meta(self) -> dict[str, Any]:
        """The run this journal logs to (kept in memory too: a finished journal's folder is deleted)."""
        try:
            self._meta = json.loads((self.folder / "meta.json").read_text())
        except FileNotFoundError:
            if not hasattr(self, "_meta"):
                raise
        return dict(self._meta)

    def write_meta(self, meta: dict[str, Any]) -> None:
        tmp = self.folder / f".meta.{uuid.uuid4().hex}.tmp"
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, self.folder / "meta.json")
        self._meta = dict(meta)

    def put(self, seq: int, op: dict[str, Any]) -> Path:
        path = self.folder / "ops" / f"{seq:06d}.json"
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(op))
        os.replace(tmp, path)
        return path

    def pending(self) -> list[tuple[Path, dict[str, Any]]]:
        ops = sorted(p for p in (self.folder / "ops").glob("*.json"))
        return [(p, json.loads(p.read_text())) for p in ops]

    def is_empty(self) -> bool:
        return not any((self.folder / "ops").glob("*.json"))


def journals(cache_dir: Path) -> list[Path]:
    """Every MLflow journal folder under ``cache_dir``, oldest first."""
    root = Path(cache_dir) / "mlflow-journal"
    return sorted(p for p in root.iterdir() if (p / "meta.json").exists()) if root.is_dir() else []


def replay(journal: MlflowJournal) -> int:
    """Carry out the journal's pending operations in order; returns how many were done.

    Raises the first MLflow error (the remaining operations stay journaled).
    """
    from mlflow import MlflowClient

    meta = journal.meta()
    uri = os.environ.get("MLFLOW_TRACKING_URI") if _same_store(meta["tracking_uri"]) else None
    client = MlflowClient(uri or meta["tracking_uri"])
    done = 0
    for path, op in journal.pending():
        _apply(client, journal, meta, op)
        meta = journal.meta()
        path.unlink()
        done += 1
    return done


def _same_store(recorded: str | None) -> bool:
    env = os.environ.get("MLFLOW_TRACKING_URI")
    return bool(env) and redact_url(env) == recorded


def _apply(client: Any, journal: MlflowJournal, meta: dict[str, Any], op: dict[str, Any]) -> None:
    kind = op["op"]
    if kind == "create_run":
        if meta.get("run_id"):
            return
        experiment_id = op.get("experiment_id")
        if experiment_id is None:
            name = op.get("experiment_name") or "Default"
            exp = client.get_experiment_by_name(name)
            experiment_id = exp.experiment_id if exp else client.create_experiment(name)
        run = client.create_run(experiment_id, run_name=op.get("run_name"), tags=op.get("tags") or {})
        journal.write_meta({**meta, "run_id": run.info.run_id, "experiment_id": experiment_id})
        return
    run_id = meta.get("run_id")
    if not run_id:
        raise RuntimeError("MLflow run was never created")
    if kind == "set_tags":
        from mlflow.entities import RunTag

        client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in op["tags"].items()])
    elif kind == "log_json":
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / op["name"]
            local.write_text(json.dumps(op["data"], indent=2) + "\n")
            client.log_artifact(run_id, str(local), artifact_path=op["artifact_dir"])
    elif kind == "end_run":
        client.set_terminated(run_id, status=op["status"])
    else:
        raise ValueError(f"Unknown journaled MLflow operation {kind!r}")


class MlflowSink:
    """One MLflow run's lineage logging; see the module docstring.

    Build with :meth:`attach`. ``run_id`` is ``None`` until the run exists when
    this sink creates it.
    """

    def __init__(self, journal: MlflowJournal, *, owns_run: bool, client_uri: str | None = None) -> None:
        self.journal = journal
        self._lock = FileLock(journal.lock_path)
        self._lock.acquire()
        self._closing = False
        self._gave_up = False
        self.owns_run = owns_run
        self._client_uri = client_uri or journal.meta()["tracking_uri"]
        self._seq = 0
        self._cond = threading.Condition()
        self._queued = 0
        self._done = 0
        self.last_error: str | None = None
        self._created = threading.Event()
        if journal.meta().get("run_id"):
            self._created.set()
        self._thread = threading.Thread(target=self._run, daemon=True, name="oxen-mlflow-sink")
        self._thread.start()

    @classmethod
    def attach(
        cls,
        *,
        cache_dir: Path,
        run_id: str | None = None,
        tracking_uri: str | None = None,
        experiment_name: str | None = None,
        run_name: str | None = None,
        wait_for_run: float = 30.0,
    ) -> "MlflowSink":
        """Log into ``run_id``, else the active MLflow run, else a new run this sink ends."""
        import mlflow

        if run_id is None and mlflow.active_run() is not None:
            active = mlflow.active_run()
            run_id = active.info.run_id
            tracking_uri = tracking_uri or mlflow.get_tracking_uri()
        uri = tracking_uri or mlflow.get_tracking_uri()
        meta = {"tracking_uri": redact_url(uri), "run_id": run_id}
        journal = MlflowJournal.create(cache_dir, meta)
        sink = cls(journal, owns_run=run_id is None, client_uri=uri)
        if run_id is None:
            experiment_id = None
            if experiment_name is None and os.environ.get("MLFLOW_EXPERIMENT_ID"):
                experiment_id = os.environ["MLFLOW_EXPERIMENT_ID"]
            sink._enqueue({"op": "create_run", "experiment_name": experiment_name or os.environ.get("MLFLOW_EXPERIMENT_NAME"),
                           "experiment_id": experiment_id, "run_name": run_name})
            if not sink._created.wait(wait_for_run):
                log.warning("MLflow at %s did not answer within %.0fs; lineage is journaled for "
                            "`oxen-callbacks sync`", redact_url(uri), wait_for_run)
        return sink

    # -- state ----------------------------------------------------------------------
    @property
    def run_id(self) -> str | None:
        return self.journal.meta().get("run_id")

    @property
    def tracking_uri(self) -> str:
        """The tracking URI without credentials."""
        return self.journal.meta()["tracking_uri"]

    # -- operations -------------------------------------------------------------------
    def set_tags(self, tags: dict[str, Any]) -> None:
        self._enqueue({"op": "set_tags", "tags": {k: v for k, v in tags.items() if v is not None}})

    def log_lineage(self, record: dict[str, Any]) -> None:
        self._enqueue({"op": "log_json", "artifact_dir": LINEAGE_ARTIFACT_DIR, "name": LINEAGE_ARTIFACT_NAME,
                       "data": record})

    def end(self, status: str = "FINISHED") -> None:
        """End the run (when this sink started it); no more operations after this."""
        if self.owns_run:
            self._enqueue({"op": "end_run", "status": status})
        with self._cond:
            self._closing = True
            self._cond.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait for the queued operations; ``False`` if some remain (journaled) at the timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._done < self._queued and not self._gave_up:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(min(left, 0.5) if left is not None else 0.5)
            return self._done >= self._queued

    # -- internals -----------------------------------------------------------------------
    def _enqueue(self, op: dict[str, Any]) -> None:
        with self._cond:
            self._seq += 1
            self.journal.put(self._seq, op)
            self._queued += 1
            self._cond.notify_all()

    def _release(self, *, forget: bool) -> None:
        self._lock.release()
        if forget:
            shutil.rmtree(self.journal.folder, ignore_errors=True)

    def _run(self) -> None:
        from mlflow import MlflowClient

        client = None
        while True:
            with self._cond:
                while self._done >= self._queued:
                    if self._closing:
                        self._release(forget=self.journal.is_empty())
                        return
                    self._cond.wait()
            pending = self.journal.pending()
            if not pending:
                with self._cond:
                    self._done = self._queued
                    self._cond.notify_all()
                continue
            path, op = pending[0]
            for attempt, delay in enumerate((*_RETRY_DELAYS, None)):
                try:
                    client = client or MlflowClient(self._client_uri)
                    _apply(client, self.journal, self.journal.meta(), op)
                    path.unlink(missing_ok=True)
                    if op["op"] == "create_run":
                        self._created.set()
                    self.last_error = None
                    break
                except Exception as exc:  # network, server or store errors: retry, then keep journaled
                    self.last_error = f"{type(exc).__name__}: {exc}"
                    if delay is None:
                        log.warning("MLflow %s failed (%s); kept for `oxen-callbacks sync`", op["op"], self.last_error)
                        self._release(forget=False)
                        with self._cond:
                            self._gave_up = True
                            self._cond.notify_all()
                        return  # stop: order matters, the rest stays journaled
                    time.sleep(delay)
            with self._cond:
                self._done += 1
                self._cond.notify_all()
