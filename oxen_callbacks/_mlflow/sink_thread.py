"""A run's MLflow journal served by a thread of the training process, for a run that process
already logs to (``MLFlowLogger``'s, HF's ``MLflowCallback``'s, the active one): MLflow is loaded
and its store open there, so no second process imports it again (see :class:`.sink.MlflowSink`)."""

from __future__ import annotations

import logging
import os
import queue
import subprocess
import threading
from pathlib import Path

from .._util.redact import redact_text

log = logging.getLogger(__name__)
#: How long the thread gathers operations after a wake-up before applying them: MLflow's calls
#: hold the training process's GIL, so the tags learnt during a burst of saves go in one request.
#: The end of the run is applied at once.
LINGER_S = 1.0


class SinkThread:
    """The sink served by a thread of the training process (a run MLflow already logs to here); it
    looks like a sink process to :class:`MlflowSink`: ``stdin`` takes its messages, ``poll()``
    tells whether it stopped. When the training process dies, ``sync`` finishes what is left
    (:meth:`.journal.MlflowJournal.abandoned`)."""

    def __init__(self, folder: Path, client_uri: str) -> None:
        self.stdin = _QueueLines()
        self.pid = os.getpid()
        self._progress = threading.Condition()
        self._steps = 0  # operations applied (or the thread ended): what a waiter watches
        self._thread = threading.Thread(target=self._serve, args=(folder, client_uri), daemon=True,
                                        name="oxen-mlflow-sink")
        self._thread.start()

    def _serve(self, folder: Path, client_uri: str) -> None:
        from .sink_process import serve_folder

        try:
            serve_folder(folder, self.stdin, client_uri, log_file=False, linger_s=LINGER_S, on_progress=self._stepped)
        except Exception as exc:  # the journal stays for `sync`; training never hears of it
            log.warning("Logging to MLflow stopped (%s); what is left is journaled in %s for `oxen-callbacks sync`.",
                        redact_text(f"{type(exc).__name__}: {exc}")[:500], folder)
        finally:
            self._stepped()

    def _stepped(self) -> None:
        with self._progress:
            self._steps += 1
            self._progress.notify_all()

    @property
    def steps(self) -> int:
        """How many times it made progress (applied operations, or ended) so far."""
        return self._steps

    def wait_for_step(self, seen: int, timeout: float) -> None:
        """Wait until it makes progress after ``seen`` (:attr:`steps`), at most ``timeout`` s: the
        training process's waiter sleeps instead of polling the journal (its GIL is the sink's)."""
        with self._progress:
            self._progress.wait_for(lambda: self._steps != seen, timeout)

    def poll(self) -> int | None:
        return None if self._thread.is_alive() else 0

    def wait(self, timeout: float | None = None) -> int:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise subprocess.TimeoutExpired("oxen-mlflow-sink", timeout or 0)
        return 0


class _QueueLines:
    """A pipe between threads with a sink process's stdin's two ends: ``write``/``flush``/``close``
    for the training side, ``next(timeout)`` (see :class:`.._util.stdin_lines.StdinLines`) for the sink."""

    def __init__(self) -> None:
        self._lines: queue.Queue[str] = queue.Queue()
        self._closed = False

    def write(self, data: bytes) -> None:
        if self._closed:
            raise ValueError("closed")
        for line in data.decode().splitlines(keepends=True):
            self._lines.put(line)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._lines.put("")  # EOF

    def next(self, timeout: float | None) -> str | None:
        try:
            return self._lines.get(timeout=timeout)
        except queue.Empty:
            return None
