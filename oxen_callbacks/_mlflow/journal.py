"""The on-disk journal of a run's MLflow operations, and the process that carries them out.

The training process only writes operations here (see :mod:`.mlflow_sink`); a
separate process (``python -m oxen_callbacks._mlflow.journal --journal DIR``) applies
them in order with retries, so neither MLflow's import (~150 MB, ~2 s) nor a slow
or dead tracking server touches training. What it cannot do stays on disk for
``oxen-callbacks sync``. Tracking-server credentials only ever travel in the
environment; the journal holds the URI without them.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from .._util.locks import FileLock, is_locked
from .._util.redact import redact_text, redact_url
from .._util.stdin_lines import StdinLines
from .abandoned import KILLED, commits_outstanding

log = logging.getLogger(__name__)
RETRY_DELAYS_S = (0.5, 1.0, 2.0, 4.0, 8.0)
_STDIN = StdinLines()  # the training process's wake-ups, hand-offs and ends
ABANDONED_SEQ = 999_999  # the last operation of a journal whose training process died


class MlflowJournal:
    """The not-yet-done MLflow operations of one training run, on disk."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder  # (not created here: a finished journal's folder must not come back)

    @classmethod
    def create(cls, cache_dir: Path, meta: dict[str, Any], *, trainer: bool = False) -> "MlflowJournal":
        """A new journal for ``meta``'s run; ``trainer``: the calling training process holds
        :attr:`trainer_lock_path` (from before ``sync`` can list it) until :meth:`release_trainer`."""
        journal = cls(cache_dir / "mlflow-journal" / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}")
        journal.recreate(meta, trainer=trainer)
        return journal

    def recreate(self, meta: dict[str, Any], *, trainer: bool = False) -> None:
        """Make (or make again, after someone removed it) the folder, then write ``meta``: listed by
        ``sync`` only from then on."""
        (self.folder / "ops").mkdir(parents=True, exist_ok=True)
        if trainer:
            self.release_trainer()  # a lock on a removed folder's file protects nothing
            self._trainer_lock = FileLock(self.trainer_lock_path)
            self._trainer_lock.acquire(blocking=False)
        self.write_meta(meta)

    @property
    def trainer_lock_path(self) -> Path:
        """Held by the training process for its whole life: ``sync`` never touches its journal."""
        return self.folder / "trainer.lock"

    def release_trainer(self) -> None:
        lock = getattr(self, "_trainer_lock", None)
        if lock is not None:
            lock.release()

    def trainer_alive(self) -> bool:
        return is_locked(self.trainer_lock_path)

    def mark_ended(self) -> None:
        """The training side ended the run (it called ``end``): nothing of it was abandoned."""
        (self.folder / "ended").touch()

    def abandoned(self) -> bool:
        """Its training process died without ending a run it commits checkpoints for, and no sink
        process lived to say so (the whole job killed at once): ``finish_abandoned`` is due.
        Call only when neither the trainer nor a sink process is alive."""
        try:
            if (self.folder / "ended").exists() or not self.meta().get("model_repo"):
                return False
        except FileNotFoundError:
            return False  # forgotten meanwhile by the sink process that finished it
        return not any(op.get("op") == "finish_abandoned" for _, op in self.pending())

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

    def _op_files(self) -> list[Path]:
        """The journaled operation files in order; none once the folder is gone (a finished journal)."""
        ops = self.folder / "ops"
        try:
            names = os.listdir(ops)
        except FileNotFoundError:
            return []
        return [ops / name for name in sorted(names) if name.endswith(".json") and not name.startswith(".")]

    def pending(self) -> list[tuple[Path, dict[str, Any]]]:
        found = []
        for path in self._op_files():
            try:
                found.append((path, json.loads(path.read_text())))
            except FileNotFoundError:
                continue  # done (and deleted) meanwhile
        return found

    def batches(self) -> list[tuple[list[Path], dict[str, Any]]]:
        """The pending operations in order, each run of ``set_tags`` merged into one (one MLflow
        request instead of one per fact learnt); returns ``(op files, operation)`` pairs."""
        merged: list[tuple[list[Path], dict[str, Any]]] = []
        for path, op in self.pending():
            previous = merged[-1][1] if merged else {}
            if op["op"] == previous.get("op") == "set_tags" and len({**previous["tags"], **op["tags"]}) <= 100:
                paths = merged[-1][0]  # (MLflow takes at most 100 tags per request)
                merged[-1] = ([*paths, path], {"op": "set_tags", "tags": {**previous["tags"], **op["tags"]}})
            else:
                merged.append(([path], op))
        return merged

    def is_empty(self) -> bool:
        """Nothing left to do: no operation journaled, or the folder already forgotten by the sink process."""
        return not self._op_files()

    def write_sink_pid(self, pid: int) -> None:
        (self.folder / "sink.pid").write_text(str(pid))

    def sink_alive(self) -> bool:
        """Whether the sink process given this journal still lives (it may still be importing MLflow,
        before it takes :attr:`lock_path`)."""
        try:
            pid = int((self.folder / "sink.pid").read_text())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return False  # no pid, gone, or no /proc: the lock alone tells
        return b"oxen_callbacks._mlflow.journal" in cmdline

    @property
    def status_path(self) -> Path:
        return self.folder / "status.json"

    def status(self) -> dict[str, Any]:
        """What the sink process reports: ``{"gave_up": bool, "last_error": str | None}``."""
        try:
            return json.loads(self.status_path.read_text())
        except (FileNotFoundError, ValueError):
            return {}

    def write_status(self, **status: Any) -> None:
        tmp = self.folder / f".status.{uuid.uuid4().hex}.tmp"
        try:
            tmp.write_text(json.dumps(status))
        except FileNotFoundError:
            return  # the folder was removed (a cleaned cache): the training side makes it again
        os.replace(tmp, self.status_path)


def journals(cache_dir: Path) -> list[Path]:
    """Every MLflow journal folder under ``cache_dir``, oldest first."""
    root = Path(cache_dir) / "mlflow-journal"
    return sorted(p for p in root.iterdir() if (p / "meta.json").exists()) if root.is_dir() else []


def client_for(journal: MlflowJournal) -> Any:
    """An MlflowClient for the journal's store; credentials come from the environment only."""
    from mlflow import MlflowClient

    uri = os.environ.get("MLFLOW_TRACKING_URI") if _same_store(journal.meta()["tracking_uri"]) else None
    return MlflowClient(uri or journal.meta()["tracking_uri"])


def replay(journal: MlflowJournal) -> int:
    """Carry out the journal's pending operations in order; returns how many were done.

    Raises the first MLflow error (the remaining operations stay journaled).
    """
    client = client_for(journal)
    meta = journal.meta()
    done = 0
    for paths, op in journal.batches():
        _apply(client, journal, meta, op)
        meta = journal.meta()
        for path in paths:
            path.unlink()
        done += len(paths)
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
        data = op["data"]
        if isinstance(data.get("run"), dict) and not data["run"].get("mlflow_run_id"):
            data = {**data, "run": {**data["run"], "mlflow_run_id": run_id}}  # created after training knew
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / op["name"]
            local.write_text(json.dumps(data, indent=2) + "\n")
            client.log_artifact(run_id, str(local), artifact_path=op["artifact_dir"])
    elif kind == "end_run":
        client.set_terminated(run_id, status=op["status"])
    elif kind == "finish_abandoned":
        from .abandoned import finish_abandoned

        done = finish_abandoned(client, journal, meta, status=op.get("status", KILLED),
                                terminate=op.get("terminate", True))
        journal.write_meta({**meta, "abandoned": done})
    elif kind == "publish_extras":
        from .registry import publish_extras

        publish_extras(client, run_id, op["record"], register_model=op.get("register_model"),
                       dataset_input=op.get("dataset_input", True), graph=op.get("graph", True))
    else:
        raise ValueError(f"Unknown journaled MLflow operation {kind!r}")


def serve(journal: MlflowJournal) -> str:
    """Apply operations as they arrive, until the training run says it is over.

    Stdin: a newline wakes us; ``end`` ends this journal (the process may get
    another, see :func:`main`); EOF means the training process is gone: finish
    and exit. Returns why it stopped: ``"end"`` (stdin still open), ``"eof"``,
    ``"gave_up"`` or ``"waiting"`` (a run finished from commits not yet done: left
    to ``sync`` at once). An operation that still fails after the retries stops
    serving: order matters (tags of a run not yet created...), so the rest stays journaled.
    """
    client = None
    over = False
    while True:
        pending = journal.batches()
        for paths, op in pending:
            waiting = op["op"] == "finish_abandoned" and commits_outstanding(journal.meta())
            if waiting:  # not an error to retry: `sync` finishes the run once it has committed them
                log.info("MLflow run %s is finished by `oxen-callbacks sync` once %s", journal.meta().get("run_id"),
                         waiting)
                journal.write_status(gave_up=False, last_error=None, waiting_for=waiting)
                return "waiting"
            for delay in (*RETRY_DELAYS_S, None):
                try:
                    client = client or client_for(journal)
                    _apply(client, journal, journal.meta(), op)
                    for path in paths:
                        path.unlink(missing_ok=True)
                    journal.write_status(gave_up=False, last_error=None)
                    break
                except Exception as exc:  # network, server or store errors: retry, then keep journaled
                    error = redact_text(f"{type(exc).__name__}: {exc}")[:1000]
                    if delay is None:
                        log.warning("MLflow %s failed (%s); kept for `oxen-callbacks sync`", op["op"], error)
                        journal.write_status(gave_up=True, last_error=error)
                        return "gave_up"  # never handed another journal: the training side saw it give up
                    journal.write_status(gave_up=False, last_error=error)
                    time.sleep(delay)
        if pending:
            continue
        if over:
            return over
        line = _STDIN.next(timeout=1.0)
        over = "eof" if line == "" else "end" if line == "end\n" else False


def serve_folder(folder: Path) -> bool:
    """:func:`serve` one journal under its lock, with its own log; forget it once done."""
    journal = MlflowJournal(folder)
    handler = logging.FileHandler(journal.folder / "sink.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.getLogger().addHandler(handler)
    try:
        with FileLock(journal.lock_path):
            ended = serve(journal)
            if ended == "eof" and journal.meta().get("model_repo"):
                # the training process died without ending its run (SIGKILL, OOM): `sync` finishes the
                # run from the checkpoints its commit worker gets into the model repository
                log.warning("The training process is gone without ending MLflow run %s; kept for "
                            "`oxen-callbacks sync`", journal.meta().get("run_id"))
                journal.put(ABANDONED_SEQ, {"op": "finish_abandoned"})
            forget = journal.is_empty()
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    if forget:
        shutil.rmtree(journal.folder, ignore_errors=True)
    return ended == "end"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="oxen_callbacks._mlflow.journal")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--journal")
    source.add_argument("--warm", action="store_true",
                        help="import MLflow now, then serve the journals handed over on stdin (a JSON line each)")
    args = parser.parse_args(argv)
    os.nice(10)  # bookkeeping beside training: the trainer keeps the CPU when both want it
    logging.getLogger().setLevel(logging.INFO)
    if args.journal:
        serve_folder(Path(args.journal))
        return 0
    importlib.import_module("mlflow.tracking")  # the slow import, paid before the work arrives
    # One journal per training run of the process that started us (a notebook trains again and
    # again): each hand-off brings that run's environment and folder. EOF: the callback was
    # never used, or the training process is gone.
    while line := _STDIN.next(timeout=None):
        if not line.startswith("{"):
            continue  # a stray wake-up: between hand-offs nothing else is sent
        handoff = json.loads(line)
        os.environ.clear()
        os.environ.update(handoff["env"])
        os.chdir(handoff["cwd"])
        if not serve_folder(Path(handoff["journal"])):
            break
    return 0


if __name__ == "__main__":
    sys.exit(main())
