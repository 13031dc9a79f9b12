"""A publishing worker started when the callback is built, before it has a queue.

Its start-up (a Python process and this library's imports, ~0.1 s of CPU) then overlaps the
user building the model and the trainer, where the training process leaves a core free,
instead of running, at the lowest priority, against the first steps of ``fit()`` and being
waited for when ``fit()`` ends. It runs at normal priority until then: nothing trains yet.
At fit start the publisher hands it the command line and environment a cold worker would get
(:meth:`WarmWorker.hand_over`); unused, it exits when this object goes away or the training
process ends (its stdin closes).

A worker whose run ended cleanly (:data:`END_OF_RUN`, answered by :data:`IDLE`) waits, imported,
for the next run of this process (:func:`release_idle`): a notebook's next cell or a sweep's next
fit takes it over instead of starting one, whose start-up would run against that fit at the lowest
priority and be waited for after it.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import threading
import weakref
from collections.abc import Mapping

from .._util.handoff import Unfitted, send_handoff
from .._util.processes import child_environment, start_helper, yield_cpu_to_training

#: The publisher's last line of a run: finish its jobs, free the repository, answer :data:`IDLE`
#: and wait for the next hand-off (EOF instead: finish and exit).
END_OF_RUN = "end\n"
#: The ``kind`` of the worker's answer to :data:`END_OF_RUN`.
IDLE = "idle"


def worker_arguments(queue_folder: str | os.PathLike[str], repo: str | os.PathLike[str], *, push_timeout: float,
                     remote: str | None = None, branch: str | None = None, remote_url: str | None = None) -> list[str]:
    """The arguments of a publishing worker for ``queue_folder`` (what ``worker.main`` parses)."""
    args = ["--queue", str(queue_folder), "--repo", str(repo), "--push-timeout", str(push_timeout)]
    if remote:
        args += ["--remote", remote] + (["--branch", branch] if branch else [])
        args += ["--remote-url", remote_url] if remote_url else []
    return args


class WarmWorker:
    def __init__(self) -> None:
        _reap_closed()
        idle = _take_idle()  # one an earlier run of this process finished with
        unused = _unfitted.find() if idle is None else None  # one an earlier callback holds unused (see Unfitted)
        # (as a cold worker, in a process group of its own: a Ctrl-C meant for the trainer must not kill a commit)
        self.proc: subprocess.Popen[bytes] | None = idle or (
            unused.take() if unused is not None else start_helper("publish-worker", "--warm", env=child_environment()))
        # unused after all: an idle one waits for the next run again, a new one exits
        self._closer = weakref.finalize(self, release_idle if idle is not None else _close, self.proc)
        _unfitted.add(self)

    def take(self) -> subprocess.Popen[bytes] | None:
        """The process, now the caller's (this object no longer has one)."""
        with _lock:  # (two threads building or fitting callbacks: one process, one taker)
            proc, self.proc = self.proc, None
            self._closer.detach()
        return proc

    def hand_over(self, args: list[str], env: Mapping[str, str]) -> subprocess.Popen[bytes] | None:
        """Give the worker its arguments (what ``worker.main`` parses) and environment; ``None`` if it
        is gone or does not take them in time (start a cold one then). Used once."""
        proc = self.take()
        if (idle := _take_idle()) is not None:  # a sweep's previous fit ended since this callback was built
            if proc is not None:
                release_idle(proc)  # (waiting for a hand-off too: the next fit's)
            proc = idle
        if proc is None:
            return None
        # through the pipe, never on disk: the environment may hold the user's tokens
        if not send_handoff(proc, {"args": args, "env": dict(env)}):
            _close(proc)
            return None
        yield_cpu_to_training(idle=False, pid=proc.pid)  # now, even if its imports are not done yet
        return proc


_unfitted = Unfitted()  # warm workers of callbacks not fitted yet
_closed: list[subprocess.Popen[bytes]] = []  # told to exit, not reaped yet
_lock = threading.Lock()  # guards _closed, _idle and each WarmWorker.take
#: Done with a run, waiting for the next one (at most one), with the library version it runs.
_idle: list[tuple[subprocess.Popen[bytes], str | None]] = []
_idle_owner = os.getpid()  # a forked child (DDP workers) must not write to its parent's pipes


def release_idle(proc: subprocess.Popen[bytes], version: str | None = None) -> None:
    """Keep ``proc``, which answered :data:`IDLE` (running ``version`` of this library), for this
    process's next run (one is enough)."""
    with _lock:
        if os.getpid() == _idle_owner and not _idle and proc.poll() is None:
            _idle.append((proc, version))
            return
    _close(proc)


def _take_idle() -> subprocess.Popen[bytes] | None:
    """The waiting worker, unless it runs another version of this library than this process now
    does (upgraded, and reloaded in a notebook, since it started): that one is let go."""
    current = importlib.import_module("oxen_callbacks").__version__
    with _lock:
        taken = _idle.pop() if _idle and os.getpid() == _idle_owner else None
    if taken is None or taken[0].poll() is not None:
        return None
    if taken[1] not in (None, current):
        _close(taken[0])
        return None
    return taken[0]


def _close(proc: subprocess.Popen[bytes]) -> None:
    """Close our ends of its pipes (it exits at EOF); it is reaped when the next one starts."""
    for stream in (proc.stdin, proc.stdout):
        try:
            if stream is not None:
                stream.close()
        except OSError:
            pass
    with _lock:
        _closed.append(proc)


def _reap_closed() -> None:
    with _lock:
        _closed[:] = [proc for proc in _closed if proc.poll() is None]
