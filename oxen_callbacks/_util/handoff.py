"""Hand a helper process started ahead of time (a warm one) its work, through its stdin.

The hand-off carries the whole environment (it may hold the user's tokens: never on disk), which
can be larger than a pipe's buffer: the write then waits for the helper to read. A helper that is
stopped or stuck must not hold fit start, so the write has a deadline; past it the helper is
killed and the caller starts a new one. A stopped helper is killed at once: a message that fits
the pipe's buffer would seem taken, and the run would wait for it forever.
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import tempfile
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .fs import creation_mask

#: How long fit start waits for a warm helper to take its hand-off.
HANDOFF_TIMEOUT_S = 5.0


def send_handoff(proc: subprocess.Popen[bytes], message: dict[str, Any], timeout: float = HANDOFF_TIMEOUT_S) -> bool:
    """Write ``message`` (and this process's working folder and umask, which :func:`take_handoff`
    applies) as one JSON line to ``proc``'s stdin; ``False`` (``proc`` killed when it lives) if it is
    gone or does not read it within ``timeout`` seconds."""
    if proc.stdin is None or proc.poll() is not None:
        return False
    if is_stopped(proc.pid):  # a message that fits the pipe's buffer would be "taken", never read
        proc.kill()
        return False
    message = {**message, "cwd": os.getcwd(), "umask": creation_mask()}
    if _write_within(proc.stdin.fileno(), json.dumps(message).encode() + b"\n", timeout):
        return True
    proc.kill()
    return False


def is_stopped(pid: int) -> bool:
    """Whether process ``pid`` is stopped (``SIGSTOP``, a debugger's trace stop): it reads nothing
    until continued. ``False`` when it cannot be told (no ``/proc``, gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, UnicodeDecodeError):
        return False
    return stat[stat.rfind(")") + 2:][:1] in ("T", "t")  # (the state follows the command's name)


def take_handoff(line: str) -> dict[str, Any]:
    """In the helper: become the process a cold one started now would be (the sender's environment,
    ``env``, working folder and umask: files it writes are as private as the trainer's); returns
    the message."""
    message = json.loads(line)
    os.environ.clear()
    os.environ.update(message["env"])
    tempfile.tempdir = None  # chosen again from this environment's TMPDIR (a helper may serve run after run)
    os.chdir(message["cwd"])
    if isinstance(message.get("umask"), int):
        os.umask(message["umask"])
    return message


def _write_within(fd: int, data: bytes, timeout: float) -> bool:
    """Write all of ``data`` to the pipe ``fd`` unless its reader takes longer than ``timeout`` s.
    (``selectors``, not ``select.select``: a trainer may hold more than 1024 open files.)"""
    deadline = time.monotonic() + timeout
    view = memoryview(data)
    os.set_blocking(fd, False)
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_WRITE)
            while view:
                if not selector.select(max(0.0, deadline - time.monotonic())):
                    return False
                try:
                    view = view[os.write(fd, view):]
                except BlockingIOError:
                    continue
    except OSError:  # the helper died meanwhile
        return False
    finally:
        os.set_blocking(fd, True)
    return True


class Unfitted:
    """The warm helpers (objects with a ``proc``) of callbacks not fitted yet, weakly held: a callback
    built later takes one over (:meth:`find`), so a loop building callbacks, or a notebook cell run
    again, keeps one helper, not one each. The newest callback is the one a notebook fits; an
    earlier one fitted after all starts its own helper then."""

    def __init__(self) -> None:
        self._refs: list[weakref.ref[Any]] = []

    def add(self, helper: Any) -> None:
        self._refs = [ref for ref in self._refs if _usable(ref())] + [weakref.ref(helper)]

    def find(self, accept: Callable[[Any], bool] = lambda helper: True) -> Any | None:
        """A held helper whose process lives and that ``accept`` takes, if any."""
        return next((helper for ref in self._refs if _usable(helper := ref()) and accept(helper)), None)


def _usable(helper: Any) -> bool:
    return helper is not None and helper.proc is not None and helper.proc.poll() is None
