"""The MLflow sink process: applies a training run's journaled operations as they arrive.

Started by :class:`.sink.MlflowSink` (``python -m oxen_callbacks._mlflow.sink_process
--journal DIR``), or ahead of time by :class:`.warm_sink.WarmSinkProcess` (``--warm``: MLflow
imported before the work arrives). Either then serves the journals handed over on stdin, one per
training run, MLflow imported: a notebook's next fit. What it cannot do stays journaled for
``oxen-callbacks sync``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .._util.handoff import take_handoff
from .._util.locks import FileLock
from .._util.processes import ENTRY_POINTS, yield_cpu_to_training
from .._util.redact import RedactingFormatter, redact_text, redact_url
from .._util.stdin_lines import StdinLines
from ..names import ENV_MLFLOW_TRACKING_URI
from .abandoned import commits_outstanding, superseded_by
from .apply import THE_RUNS_OWN, apply_unless_superseded, client_for
from .fluent import sqlite_file
from .journal import ABANDONED_SEQ, END_LINE, TRAINING_OVER_LINE, MlflowJournal

log = logging.getLogger(__name__)
RETRY_DELAYS_S = (0.5, 1.0, 2.0, 4.0, 8.0)
_STDIN = StdinLines()  # the training process's wake-ups, hand-offs and ends


def serve(journal: MlflowJournal, lines: Any = _STDIN, client_uri: str | None = None, *, linger_s: float = 0.0,
          on_progress: Callable[[], None] | None = None) -> str:
    """Apply operations as they arrive, until the training run says it is over.

    ``lines``: the training run's messages (this process's stdin, or a queue when served by a
    thread of the training process, see :class:`.sink.SinkThread`); ``client_uri``: the store's
    URI with its credentials (default: the environment's, see :func:`.apply.client_for`);
    ``linger_s``: after a wake-up, wait that long for more operations (unless the run ends, or its
    training is over: ``trained``), so that their tags go in one request; ``on_progress``: called
    after each operation applied. A newline wakes us; ``end`` ends this journal (the process may get
    another, see :func:`main`); EOF means the training process is gone: finish
    and exit. Returns why it stopped: ``"end"`` (stdin still open), ``"eof"``,
    ``"gave_up"`` or ``"waiting"`` (a run finished from commits not yet done: left
    to ``sync`` at once). An operation that still fails after the retries stops
    serving: order matters (tags of a run not yet created...), so the rest stays journaled.
    """
    client = None
    over, trained = False, False
    later = _LaterFit()
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
                    client = client or client_for(journal, client_uri)
                    apply_unless_superseded(client, journal, journal.meta(), op,
                                            later.ask(client, journal, trained) if op["op"] in THE_RUNS_OWN else None)
                    for path in paths:
                        path.unlink(missing_ok=True)
                    journal.write_status(gave_up=False, last_error=None)
                    if on_progress is not None:
                        on_progress()
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
        line = lines.next(timeout=1.0)
        over, linger_s = _heard(line, linger_s)
        trained = trained or line == TRAINING_OVER_LINE
        lingering_until = time.monotonic() + linger_s if line and not over else 0.0
        while not over and (left := lingering_until - time.monotonic()) > 0:
            line = lines.next(timeout=left)
            over, linger_s = _heard(line, linger_s)
            trained = trained or line == TRAINING_OVER_LINE
            lingering_until = lingering_until if linger_s else 0.0


class _LaterFit:
    """The fit that started logging to the journal's MLflow run after this one (another process joined it,
    see :func:`.abandoned.superseded_by`): the run's tags, lineage and marks are then that fit's, not this
    fit's to write over. Asked before this fit writes them, again once training is over and at most once a
    second otherwise (one request); once found, for good."""

    RECHECK_S = 1.0

    def __init__(self) -> None:
        self.found: str | None = None
        self._asked: float | None = None
        self._asked_trained = False

    def ask(self, client: Any, journal: MlflowJournal, trained: bool) -> str | None:
        now = time.monotonic()
        if self.found is None and (self._asked is None or now - self._asked >= self.RECHECK_S
                                   or (trained and not self._asked_trained)):
            self._asked, self._asked_trained = now, trained
            self.found = superseded_by(client, journal, journal.meta(), by_record=False)
            if self.found is not None:
                log.warning("MLflow run %s: fit %s started logging to it after this fit of run %s: its tags, lineage "
                            "and marks stay that fit's (this fit's lineage is in the model repository, its "
                            "checkpoints' logged models are made).", journal.meta().get("run_id"), self.found,
                            journal.meta().get("oxen_run"))
        return self.found


def _heard(line: str | None, linger_s: float) -> tuple[Any, float]:
    """What a message of the training run means for :func:`serve`: ``(over, linger_s)``."""
    if line == "":
        return "eof", linger_s
    if line == END_LINE:
        return "end", linger_s
    if line == TRAINING_OVER_LINE:
        return False, 0.0  # nothing trains any more: lingering would only delay the run's logging
    return False, linger_s


def serve_folder(folder: Path, lines: Any = _STDIN, client_uri: str | None = None, *, log_file: bool = True,
                 linger_s: float = 0.0, on_progress: Callable[[], None] | None = None) -> bool:
    """:func:`serve` one journal under its lock (with its own log in a sink process); forget it once done."""
    journal = MlflowJournal(folder)
    handler = logging.FileHandler(journal.folder / "sink.log") if log_file else logging.NullHandler()
    handler.setFormatter(RedactingFormatter("%(asctime)s %(levelname)s %(message)s"))
    if log_file:
        logging.getLogger().addHandler(handler)
    try:
        with FileLock(journal.lock_path):
            ended = serve(journal, lines, client_uri, linger_s=linger_s, on_progress=on_progress)
            if ended == "eof" and journal.meta().get("model_repo"):
                # the training process died without ending its run (SIGKILL, OOM): `sync` finishes the
                # run from the checkpoints its commit worker gets into the model repository
                log.warning("The training process is gone without ending MLflow run %s; kept for "
                            "`oxen-callbacks sync`", journal.meta().get("run_id"))
                journal.put(ABANDONED_SEQ, {"op": "finish_abandoned"})
            forget = journal.is_empty()
    finally:
        if handler is not None:
            logging.getLogger().removeHandler(handler)
            handler.close()
    if forget:
        shutil.rmtree(journal.folder, ignore_errors=True)
    return ended == "end"


def _open_existing_store(uri: str | None) -> None:
    """Open the SQLite store the run will most likely log to (~1 s of CPU: its engine, its schema
    check), kept by MLflow for the hand-off; never one that does not exist yet (an unused callback
    leaves nothing behind). A server's store needs no opening."""
    file = sqlite_file(uri)
    if file is None or not Path(file).is_file():
        return
    try:
        from mlflow import MlflowClient

        MlflowClient(uri).search_experiments(max_results=1)
    except Exception:  # the hand-off's own settings decide; a failure then is reported there
        log.debug("Could not open %s early", redact_url(uri), exc_info=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=ENTRY_POINTS["mlflow-sink"])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--journal")
    source.add_argument("--warm", action="store_true",
                        help="import MLflow now, then serve the journals handed over on stdin (a JSON line each)")
    args = parser.parse_args(argv)
    yield_cpu_to_training(idle=True)  # bookkeeping beside training: it may wait for an idle core
    logging.getLogger().setLevel(logging.INFO)
    if args.journal:
        if not serve_folder(Path(args.journal)):
            return 0
    else:
        importlib.import_module("mlflow.tracking")  # the slow import, paid before the work arrives
        _open_existing_store(os.environ.get(ENV_MLFLOW_TRACKING_URI))
    # One journal per training run of the process that started us (a notebook trains again and
    # again): each hand-off brings that run's environment and folder. EOF: the callback was
    # never used, or the training process is gone.
    while line := _STDIN.next(timeout=None):
        if not line.startswith("{"):
            continue  # a stray wake-up: between hand-offs nothing else is sent
        handoff = take_handoff(line)
        if not serve_folder(Path(handoff["journal"])):
            break
    return 0


if __name__ == "__main__":
    sys.exit(main())
