"""Sink processes with MLflow imported before a run needs them (see :class:`WarmSinkProcess`).

Importing MLflow and opening its store costs a new sink process 1-2 s of CPU: a warm one pays it
while the user builds the model and trainer, and one left idle by a finished run of this process
(a notebook trains again and again) serves the next run at once. :class:`.sink.MlflowSink` hands
each its run's journal.
"""

from __future__ import annotations

import os
import subprocess
import threading
import weakref
from pathlib import Path

from .._util.fs import file_identity
from .._util.handoff import Unfitted, send_handoff
from .._util.processes import child_environment, start_helper
from ..names import ENV_MLFLOW_TRACKING_URI
from .fluent import default_tracking_uri, sqlite_file


def start_sink(args: list[str], settings: dict[str, str]) -> subprocess.Popen[bytes]:
    # (in a process group of its own: it may outlive training to finish the logging)
    return start_helper("mlflow-sink", *args, env=child_environment(settings), stdout=subprocess.DEVNULL,
                        cwd=os.getcwd())


#: How long fit start waits for a warm sink to take its hand-off: an environment larger than a pipe's
#: buffer waits for it to finish importing MLflow and opening the store (a stopped one is replaced).
SINK_HANDOFF_TIMEOUT_S = 30.0


class WarmSinkProcess:
    """A sink process with MLflow imported before fit end needs it (1-2 s of CPU): an idle one
    left by an earlier training run of this process (a notebook trains again and again), else
    one started now, when the callback is built. It gets its journal at fit start
    (:meth:`hand_over`); unused, it exits when this object goes away or the training process
    ends (its stdin closes).
    """

    def __init__(self, tracking_uri: str | None = None, *, start: bool = True) -> None:
        # the store the run most likely logs to, opened ahead too when it exists (see sink_process)
        self.store_uri = tracking_uri or default_tracking_uri()
        idle = _take_idle()
        self._was_idle = idle is not None
        unused = _unfitted.find(lambda held: held.store_uri == self.store_uri) if idle is None else None
        if unused is not None:  # one built for a callback not fitted (see Unfitted)
            self._was_idle = unused._was_idle
            idle = unused._take()
        self.proc: subprocess.Popen[bytes] | None = idle or (
            start_sink(["--warm"], {ENV_MLFLOW_TRACKING_URI: self.store_uri}) if start else None)
        self._closer = weakref.finalize(self, _retire, self.proc, self._was_idle)
        _unfitted.add(self)

    @classmethod
    def if_idle(cls, tracking_uri: str | None = None) -> "WarmSinkProcess | None":
        """The sink an earlier run of this process left idle, or one a callback not fitted holds (a
        cell that failed before ``fit()``, run again), if there is one; none is started."""
        made = cls(tracking_uri, start=False)
        return made if made.proc is not None else None

    def _take(self) -> subprocess.Popen[bytes] | None:
        """The process, now the caller's to use or stop (this object no longer closes it)."""
        proc, self.proc = self.proc, None
        self._closer.detach()
        return proc

    def discard(self) -> None:
        """Not needed after all (the run is logged from this process): an idle process goes back to
        wait for the next run, one still importing MLflow is stopped now rather than after its import."""
        proc = self._take()
        if proc is None or proc.poll() is not None:
            return
        if self._was_idle:
            release_idle(proc)
        else:
            _stop(proc)

    def hand_over(self, journal_folder: Path, settings: dict[str, str]) -> subprocess.Popen[bytes] | None:
        """Give the process its journal; ``None`` if it is gone (start a new one then)."""
        proc = self._take()
        idle = None if self._was_idle else _take_idle()
        if idle is not None:  # left idle since we started (a sweep's previous fit ended meanwhile)
            if proc is not None:
                _stop(proc)
            proc = idle
        if proc is None:
            return None
        # the whole environment, through the pipe (never on disk): a reused process must not keep
        # an earlier run's settings
        handoff = {"journal": str(journal_folder), "env": {**os.environ, **settings}}
        # (it reads only once MLflow is imported and the store opened: seconds on a loaded machine)
        if not send_handoff(proc, handoff, timeout=SINK_HANDOFF_TIMEOUT_S):  # gone, or stopped or stuck (killed now)
            proc.wait()
            return None
        return proc


_idle: list[subprocess.Popen[bytes]] = []  # sink processes done with their run, MLflow imported
_idle_lock = threading.Lock()
_idle_owner = os.getpid()  # a forked child (DDP workers) must not write to its parent's pipes


_unfitted = Unfitted()  # warm sinks of callbacks not fitted yet (each imports MLflow: one is enough)


def _retire(proc: subprocess.Popen[bytes] | None, was_idle: bool) -> None:
    """An unused warm sink whose callback went away (or the process exits): one idle after a run
    exits at once when its stdin closes; one never given a run is stopped, not left to finish
    importing MLflow (seconds of CPU, ~100 MB) after the training process is gone."""
    if proc is None:
        return
    if was_idle:
        close_stdin(proc)
    else:
        _stop(proc)


#: The SQLite files each sink process has logged to, as they were then (device, inode): MLflow keeps
#: an engine per store URI for the process's life, which would go on writing into a file deleted or
#: replaced since (a notebook that starts its store afresh between cells).
_stores_served: weakref.WeakKeyDictionary[subprocess.Popen[bytes], dict[str, tuple[int, int] | None]] = (
    weakref.WeakKeyDictionary())


def _take_idle() -> subprocess.Popen[bytes] | None:
    with _idle_lock:
        while _idle and os.getpid() == _idle_owner:
            proc = _idle.pop()
            if proc.poll() is None and _stores_unchanged(proc):
                return proc
            close_stdin(proc)  # (one whose store file changed exits, and a new sink opens the new file)
    return None


def release_idle(proc: subprocess.Popen[bytes], store_uri: str | None = None) -> None:
    """Keep ``proc`` for this process's next run; ``store_uri``: the store it logged to."""
    if file := sqlite_file(store_uri):
        _stores_served.setdefault(proc, {})[file] = file_identity(file)
    with _idle_lock:
        if os.getpid() == _idle_owner and not _idle:
            _idle.append(proc)
            return
    close_stdin(proc)  # one idle process is enough


def _stores_unchanged(proc: subprocess.Popen[bytes]) -> bool:
    return all(file_identity(file) == seen for file, seen in _stores_served.get(proc, {}).items())


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop a sink process that has no journal yet (it may still be importing MLflow)."""
    proc.kill()
    proc.wait()


def close_stdin(proc: subprocess.Popen[bytes]) -> None:
    try:
        if proc.stdin is not None:
            proc.stdin.close()
    except OSError:
        pass
